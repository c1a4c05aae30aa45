"""Parity of the Triton kernels with their torch references, their argument checks, and dispatch.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest before triton is imported); with
TRITON_INTERPRET=0 and a CUDA device the same tests run compiled on the GPU. Comparison rules:

* packed bytes, codes and float-storage codes: exact, whenever the basis ``P`` is computed without
  rounding (integer candidates, dyadic centre and transform), because every backend then applies
  layout.py's quantization expressions to identical floats;
* codes from arbitrary data: ``|dcode| <= 1`` (matmul summation order may move a value across a
  rounding boundary), with the dequantized error checked against half a step;
* scales, zeros and every float output: ``helpers.assert_close`` with ``TOLERANCES``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch
from helpers import TOLERANCES, PoisonedTorch, assert_close
from twamerge.kernels import dispatch, reference
from twamerge.kernels.dispatch import BackendUnavailableError
from twamerge.kernels.layout import FLOAT_BITS, SUPPORTED_BITS

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable; kernels cannot be tested")
KERNEL_MODULES = ("gram", "orth_quantize", "combine", "project")


def _dtype_id(dtype) -> str:
    return "default" if dtype is None else str(dtype).removeprefix("torch.")


def _ops():
    return {name: importlib.import_module(f"twamerge.kernels.triton_{name}") for name in KERNEL_MODULES}


@pytest.fixture
def device():
    """Where the kernels run: CPU under the interpreter, else CUDA, else skip."""
    if dispatch.interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every ``torch.empty`` in the kernel modules and the reference returns NaN / 0xA5 garbage, so an
    element a kernel forgets to write shows up as a mismatch."""
    names = ["reference"] + (list(KERNEL_MODULES) if HAS_TRITON else [])
    for name in names:
        module = name if name == "reference" else f"triton_{name}"
        monkeypatch.setattr(importlib.import_module(f"twamerge.kernels.{module}"), "torch", PoisonedTorch())
    yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_inputs(k: int, r: int, n: int, dtype: torch.dtype, seed: int):
    """Integer candidates, a dyadic centre and a dyadic transform: P = T (x - m) is exact in float32 in
    any summation order (every partial sum is a multiple of 1/16 below 2**13)."""
    g = _gen(seed)
    x = torch.randint(-8, 9, (k, n), generator=g).to(dtype)
    mean = torch.round(x.float().mean(dim=0) * 4) / 4
    transform = torch.randint(-4, 5, (r, k), generator=g).float() / 4
    return x, mean, transform


def _block_ids(n_groups: int, kind: str) -> tuple[torch.Tensor, int]:
    """group_block for a block layout: one block, one block per group, or uneven runs."""
    if n_groups == 0:
        return torch.zeros(0, dtype=torch.int32), 1
    if kind == "global":
        return torch.zeros(n_groups, dtype=torch.int32), 1
    if kind == "per-group":
        return torch.arange(n_groups, dtype=torch.int32), n_groups
    # Uneven runs of 1, 2, 3, ... groups.
    ids, b = [], 0
    while len(ids) < n_groups:
        ids.extend([b] * (b + 1))
        b += 1
    return torch.tensor(ids[:n_groups], dtype=torch.int32), b


def _random_basis(r: int, n: int, bits: int, group_size: int, seed: int):
    p = torch.randn(r, n, generator=_gen(seed))
    return reference.quantize_torch(p, bits, group_size)


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


def _unpacked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.float() if bits in FLOAT_BITS else reference.unpack_codes_torch(codes, bits).int()


def _sum_atol(ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    # Sums of many products: float32 rounding error grows with the size of the result, so the absolute
    # tolerance is the table's value scaled by the largest reference magnitude.
    return TOLERANCES[dtype][0] * max(1.0, ref.abs().max().item())


def test_poison_fixture_is_active():
    mod = importlib.import_module("twamerge.kernels.reference")
    assert mod.torch.empty(3).isnan().all()
    assert (mod.torch.empty(2, dtype=torch.uint8) == 0xA5).all()


def test_kernels_come_from_this_checkout():
    """twamerge.kernels must be the kernels/ folder beside the twamerge/ under test. An editable
    install made from another checkout maps ``twamerge.kernels`` to that checkout's kernels/, and then
    these tests would pass or fail on code that is not the code being changed."""
    import pathlib

    import twamerge
    from twamerge import kernels

    here = pathlib.Path(twamerge.__file__).resolve().parents[1]
    assert pathlib.Path(kernels.__file__).resolve().parent == here / "kernels", (
        f"twamerge is imported from {here} but twamerge.kernels from {pathlib.Path(kernels.__file__).parent}; "
        "install this checkout (pip install -e .) in its own environment"
    )


GRAM_SHAPES = [(1, 1), (1, 257), (3, 63), (5, 257), (16, 1), (17, 127), (7, 6000)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("k,n", GRAM_SHAPES, ids=[f"K{k}-N{n}" for k, n in GRAM_SHAPES])
def test_gram_parity(k, n, dtype, device):
    x = (torch.randn(k, n, generator=_gen(k * 1000 + n)) * 3 + 1).to(dtype).to(device)
    g_ref, m_ref = reference.gram_torch(x)
    g_out, m_out = _ops()["gram"].gram_triton(x)
    assert g_out.dtype == torch.float64 and m_out.dtype == torch.float32
    assert_close("mean", m_ref, m_out, atol=TOLERANCES[torch.float32][0] * 4)
    # float32 tiles against a float64 reference: scale the fp32 tolerance by the Gram's magnitude.
    assert_close("gram", g_ref, g_out, atol=_sum_atol(g_ref), rtol=TOLERANCES[torch.float32][1])


# (K, R, group_size, n_groups): one group, 63 groups, non-power-of-two groups, K past 16, many tiles.
OQ_SHAPES = [(1, 1, 8, 1), (3, 2, 8, 63), (5, 4, 32, 9), (17, 16, 128, 3), (4, 3, 24, 11), (2, 1, 8, 700)]
OQ_IDS = [f"K{k}-R{r}-G{gs}-NG{ng}" for k, r, gs, ng in OQ_SHAPES]


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("k,r,gs,ng", OQ_SHAPES, ids=OQ_IDS)
def test_orth_quantize_exact(k, r, gs, ng, dtype, bits, device):
    """Exact rule: P is computed without rounding, so codes, scales and zeros must be identical."""
    x, mean, transform = _to(device, *_exact_inputs(k, r, gs * ng, dtype, seed=k + 31 * ng + bits))
    ref = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    out = _ops()["orth_quantize"].orth_quantize_triton(x, mean, transform, bits, gs)
    for name, a, b in zip(("codes", "scales", "zeros"), ref, out):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differ at {(a != b).nonzero()[:5].tolist()}"


OQ_RANDOM = [(3, 2, 8, 63), (9, 8, 32, 5), (6, 5, 40, 7)]
OQ_RANDOM_IDS = [f"K{k}-R{r}-G{gs}-NG{ng}" for k, r, gs, ng in OQ_RANDOM]


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("k,r,gs,ng", OQ_RANDOM, ids=OQ_RANDOM_IDS)
def test_orth_quantize_random(k, r, gs, ng, dtype, bits, device):
    """|dcode| <= 1 rule: arbitrary data, where summation order may move a value across a boundary."""
    g = _gen(7 * k + ng)
    x = torch.randn(k, gs * ng, generator=g).to(dtype)
    mean = x.float().mean(dim=0)
    transform = torch.randn(r, k, generator=g)
    x, mean, transform = _to(device, x, mean, transform)
    c_ref, s_ref, z_ref = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    c_out, s_out, z_out = _ops()["orth_quantize"].orth_quantize_triton(x, mean, transform, bits, gs)
    if bits in FLOAT_BITS:
        assert_close("codes", c_ref.float(), c_out.float(), atol=TOLERANCES[c_ref.dtype][0])
        assert s_out.shape == (r, 0) and z_out.shape == (r, 0)
        return
    assert_close("scales", s_ref, s_out)
    assert_close("zeros", z_ref, z_out)
    dq = (_unpacked(c_ref, bits) - _unpacked(c_out, bits)).abs()
    assert dq.max().item() <= 1, f"codes differ by {dq.max().item()}"
    p = transform @ (x.float() - mean)
    err = (reference.dequantize_torch(c_out, s_out, z_out, bits, gs) - p).abs().view(r, ng, gs)
    half_step = s_ref.unsqueeze(2) / 2
    assert (err <= half_step * (1 + 1e-3) + 1e-5).all(), "dequantized error above half a step"


# (R, group_size, n_groups, block layout): tiny, 63 and 257 groups, odd group sizes, many small blocks.
BASIS_SHAPES = [
    (1, 8, 1, "global"),
    (2, 8, 63, "per-group"),
    (3, 32, 257, "runs"),
    (5, 128, 3, "runs"),
    (4, 24, 33, "per-group"),
    (1, 8, 1100, "runs"),
]
BASIS_IDS = [f"R{r}-G{gs}-NG{ng}-{kind}" for r, gs, ng, kind in BASIS_SHAPES]


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, None], ids=_dtype_id)
@pytest.mark.parametrize("r,gs,ng,kind", BASIS_SHAPES, ids=BASIS_IDS)
def test_combine_parity(r, gs, ng, kind, out_dtype, bits, device):
    n = gs * ng
    codes, scales, zeros = _random_basis(r, n, bits, gs, seed=r * 7 + ng)
    group_block, n_blocks = _block_ids(ng, kind)
    mean = torch.randn(n, generator=_gen(ng))
    beta = torch.randn(n_blocks, r, generator=_gen(r))
    args = _to(device, mean, codes, scales, zeros, beta, group_block)
    ref = reference.combine_torch(*args, bits, gs)
    if out_dtype is None:
        out = _ops()["combine"].combine_triton(*args, bits, gs)
        assert out.dtype == torch.float32
    else:
        buf = torch.full((n,), float("nan"), dtype=out_dtype, device=device)
        out = _ops()["combine"].combine_triton(*args, bits, gs, out=buf)
        assert out is buf
        ref = ref.to(out_dtype)
    assert_close("combine", ref, out, atol=_sum_atol(ref, out.dtype))


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("r,gs,ng,kind", BASIS_SHAPES, ids=BASIS_IDS)
def test_project_parity(r, gs, ng, kind, grad_dtype, bits, device):
    n = gs * ng
    codes, scales, zeros = _random_basis(r, n, bits, gs, seed=r * 5 + ng)
    group_block, n_blocks = _block_ids(ng, kind)
    grad = torch.randn(n, generator=_gen(ng + 1)).to(grad_dtype)
    args = _to(device, grad, codes, scales, zeros, group_block)
    ref = reference.project_torch(*args, n_blocks, bits, gs)
    out = _ops()["project"].project_triton(*args, n_blocks, bits, gs)
    assert out.dtype == torch.float32 and out.shape == (n_blocks, r)
    assert_close("project", ref, out, atol=_sum_atol(ref))
    again = _ops()["project"].project_triton(*args, n_blocks, bits, gs)
    assert torch.equal(out, again), "project is not deterministic"


@needs_triton
def test_pack_roundtrip_through_kernels(device):
    """Codes written by orth_quantize decode through combine exactly as the reference decodes them."""
    gs, ng = 8, 5
    x, mean, transform = _to(device, *_exact_inputs(4, 3, gs * ng, torch.float32, seed=3))
    group_block = torch.zeros(ng, dtype=torch.int32, device=device)
    origin = torch.zeros(gs * ng, dtype=torch.float32, device=device)
    for bits in (1, 2, 4, 8):
        codes, scales, zeros = _ops()["orth_quantize"].orth_quantize_triton(x, mean, transform, bits, gs)
        basis = reference.dequantize_torch(codes.cpu(), scales.cpu(), zeros.cpu(), bits, gs)  # [R, D]
        for i in range(basis.shape[0]):
            # beta = e_i: combine must return basis row i, decoded from the packed bytes as the reference does
            beta = torch.zeros(1, basis.shape[0], device=device)
            beta[0, i] = 1.0
            row = _ops()["combine"].combine_triton(origin, codes, scales, zeros, beta, group_block, bits, gs)
            assert_close(f"bits={bits} row {i}", basis[i], row.cpu(), atol=1e-6, rtol=0)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on GPU only")
def test_bf16_on_gpu():
    if dispatch.interpreting():
        pytest.skip("the interpreter has no bf16; run with TRITON_INTERPRET=0")
    ops, dev, gs, bits = _ops(), torch.device("cuda"), 32, 4
    x = torch.randn(9, gs * 65, generator=_gen(1)).to(torch.bfloat16).to(dev)
    g_ref, m_ref = reference.gram_torch(x)
    g_out, m_out = ops["gram"].gram_triton(x)
    assert_close("gram", g_ref, g_out, atol=_sum_atol(g_ref), rtol=TOLERANCES[torch.float32][1])
    assert_close("mean", m_ref, m_out)
    t = torch.randn(8, 9, generator=_gen(2)).to(dev)
    c_ref, s_ref, z_ref = reference.orth_quantize_torch(x, m_ref, t, bits, gs)
    c_out, s_out, z_out = ops["orth_quantize"].orth_quantize_triton(x, m_ref, t, bits, gs)
    assert (_unpacked(c_ref, bits) - _unpacked(c_out, bits)).abs().max().item() <= 1
    group_block, n_blocks = _block_ids(65, "runs")
    group_block = group_block.to(dev)
    beta = torch.randn(n_blocks, 8, generator=_gen(3)).to(dev)
    buf = torch.empty(gs * 65, dtype=torch.bfloat16, device=dev)
    ref = reference.combine_torch(m_ref, c_ref, s_ref, z_ref, beta, group_block, bits, gs).to(torch.bfloat16)
    out = ops["combine"].combine_triton(m_ref, c_ref, s_ref, z_ref, beta, group_block, bits, gs, out=buf)
    assert_close("combine", ref, out, atol=_sum_atol(ref, torch.bfloat16))
    grad = torch.randn(gs * 65, generator=_gen(4)).to(torch.bfloat16).to(dev)
    ref = reference.project_torch(grad, c_ref, s_ref, z_ref, group_block, n_blocks, bits, gs)
    out = ops["project"].project_triton(grad, c_ref, s_ref, z_ref, group_block, n_blocks, bits, gs)
    assert_close("project", ref, out, atol=_sum_atol(ref))


def _basis_args(bits=4, gs=8, ng=4, r=2):
    codes, scales, zeros = _random_basis(r, gs * ng, bits, gs, seed=0)
    return codes, scales, zeros, torch.zeros(ng, dtype=torch.int32)


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("x-int", TypeError, "x has dtype int32"),
        ("x-float64", TypeError, "x has dtype float64"),
        ("x-noncontig", ValueError, "not contiguous"),
        ("x-1d", ValueError, "2-D"),
        ("k-too-large", ValueError, "at most 256"),
    ],
)
def test_gram_bad_input(case, exc, match):
    x = {
        "x-int": torch.zeros(2, 8, dtype=torch.int32),
        "x-float64": torch.zeros(2, 8, dtype=torch.float64),
        "x-noncontig": torch.zeros(8, 2).T,
        "x-1d": torch.zeros(8),
        "k-too-large": torch.zeros(257, 8),
    }[case]
    with pytest.raises(exc, match=match):
        _ops()["gram"].gram_triton(x)


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("bits3", ValueError, "bits=3"),
        ("group12", ValueError, "group_size=12"),
        ("x-int", TypeError, "x has dtype int64"),
        ("mean-half", TypeError, "mean has dtype float16"),
        ("x-noncontig", ValueError, "not contiguous"),
        ("mean-shape", ValueError, "mean has shape"),
        ("transform-shape", ValueError, "shapes do not chain"),
        ("not-multiple", ValueError, "not a multiple of group_size=8"),
        ("tile-too-large", ValueError, "over the limit"),
    ],
)
def test_orth_quantize_bad_input(case, exc, match):
    x, mean, t, bits, gs = torch.zeros(3, 16), torch.zeros(16), torch.zeros(2, 3), 4, 8
    if case == "bits3":
        bits = 3
    elif case == "group12":
        gs = 12
    elif case == "x-int":
        x = torch.zeros(3, 16, dtype=torch.int64)
    elif case == "mean-half":
        mean = mean.half()
    elif case == "x-noncontig":
        x = torch.zeros(16, 3).T
    elif case == "mean-shape":
        mean = torch.zeros(15)
    elif case == "transform-shape":
        t = torch.zeros(2, 4)
    elif case == "not-multiple":
        x, mean = torch.zeros(3, 12), torch.zeros(12)
    elif case == "tile-too-large":
        x, mean, t, gs = torch.zeros(300, 2048), torch.zeros(2048), torch.zeros(2, 300), 1024
    with pytest.raises(exc, match=match):
        _ops()["orth_quantize"].orth_quantize_triton(x, mean, t, bits, gs)


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("bits3", ValueError, "bits=3"),
        ("group12", ValueError, "group_size=12"),
        ("codes-dtype", TypeError, "codes has dtype float32"),
        ("scales-shape", ValueError, "scales has shape"),
        ("codes-noncontig", ValueError, "codes with shape"),
        ("group-block-dtype", TypeError, "group_block has dtype int64"),
        ("group-block-shape", ValueError, "group_block has shape"),
        ("mean-shape", ValueError, "mean has shape"),
        ("beta-shape", ValueError, "beta has shape"),
        ("out-dtype", TypeError, "out has dtype int32"),
        ("out-noncontig", ValueError, "out with shape"),
    ],
)
def test_combine_bad_input(case, exc, match):
    codes, scales, zeros, gb = _basis_args()
    mean, beta, bits, gs, out = torch.zeros(32), torch.zeros(1, 2), 4, 8, None
    if case == "bits3":
        bits = 3
    elif case == "group12":
        gs = 12
    elif case == "codes-dtype":
        codes = codes.float()
    elif case == "scales-shape":
        scales = scales[:, :3].contiguous()
    elif case == "codes-noncontig":
        codes = torch.zeros(16, 2, dtype=torch.uint8).T
    elif case == "group-block-dtype":
        gb = gb.long()
    elif case == "group-block-shape":
        gb = gb[:3].contiguous()
    elif case == "mean-shape":
        mean = torch.zeros(31)
    elif case == "beta-shape":
        beta = torch.zeros(1, 3)
    elif case == "out-dtype":
        out = torch.zeros(32, dtype=torch.int32)
    elif case == "out-noncontig":
        out = torch.zeros(32, 2)[:, 0]
    with pytest.raises(exc, match=match):
        _ops()["combine"].combine_triton(mean, codes, scales, zeros, beta, gb, bits, gs, out)


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("bits3", ValueError, "bits=3"),
        ("group12", ValueError, "group_size=12"),
        ("grad-int", TypeError, "grad has dtype int32"),
        ("grad-noncontig", ValueError, "grad with shape"),
        ("grad-shape", ValueError, "grad has shape"),
        ("zeros-dtype", TypeError, "zeros has dtype float16"),
        ("group-block-shape", ValueError, "group_block has shape"),
    ],
)
def test_project_bad_input(case, exc, match):
    codes, scales, zeros, gb = _basis_args()
    grad, bits, gs = torch.zeros(32), 4, 8
    if case == "bits3":
        bits = 3
    elif case == "group12":
        gs = 12
    elif case == "grad-int":
        grad = torch.zeros(32, dtype=torch.int32)
    elif case == "grad-noncontig":
        grad = torch.zeros(32, 2)[:, 0]
    elif case == "grad-shape":
        grad = torch.zeros(40)
    elif case == "zeros-dtype":
        zeros = zeros.half()
    elif case == "group-block-shape":
        gb = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(exc, match=match):
        _ops()["project"].project_triton(grad, codes, scales, zeros, gb, 1, bits, gs)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_rejected():
    codes, scales, zeros, gb = _basis_args()
    with pytest.raises(ValueError, match="one device"):
        _ops()["project"].project_triton(torch.zeros(32, device="cuda"), codes, scales, zeros, gb, 1, 4, 8)


def test_dispatch_auto_on_cpu_uses_torch_or_the_c_kernels(monkeypatch):
    """Never Triton for CPU tensors under auto: the C kernels for combine and project when they build
    (tests/test_native.py), the reference for everything else."""
    monkeypatch.delenv("TWAMERGE_BACKEND", raising=False)
    c_built = dispatch.native.status()[0]
    for op in dispatch.OPS:
        want = "native" if op in dispatch.NATIVE_OPS and c_built else "torch"
        assert dispatch.resolve(op, torch.device("cpu"), "auto", bits=8, dtype=torch.float32) == want
    x = torch.randn(3, 16)
    g, m = dispatch.gram(x)
    g_ref, m_ref = reference.gram_torch(x)
    assert torch.equal(g, g_ref) and torch.equal(m, m_ref)


def test_dispatch_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        dispatch.resolve("combine", torch.device("cpu"), "triton")
    with pytest.raises(BackendUnavailableError):
        dispatch.gram(torch.zeros(2, 8), backend="triton")


def test_dispatch_forced_triton_when_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_status", (False, "triton does not import (ImportError: test)"))
    with pytest.raises(BackendUnavailableError, match="does not import"):
        dispatch.resolve("gram", torch.device("cpu"), "triton")
    assert dispatch.resolve("gram", torch.device("cuda"), "auto") == "torch"


def test_dispatch_env_var(monkeypatch):
    monkeypatch.setenv("TWAMERGE_BACKEND", "torch")
    assert dispatch.resolve("project", torch.device("cuda")) == "torch"
    monkeypatch.setenv("TWAMERGE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TWAMERGE_BACKEND"):
        dispatch.resolve("project", torch.device("cpu"))
    if HAS_TRITON:
        monkeypatch.setenv("TWAMERGE_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.resolve("project", torch.device("cpu")) == "triton"
        # An explicit argument wins over the environment.
        assert dispatch.resolve("project", torch.device("cpu"), "torch") == "torch"


@needs_triton
def test_dispatch_routes_to_kernels(monkeypatch):
    """Forced triton under the interpreter runs the launchers, and agrees with the torch path."""
    if not dispatch.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 to run Triton on CPU tensors")
    calls = []
    mod = _ops()["project"]
    real = mod.project_triton
    monkeypatch.setattr(mod, "project_triton", lambda *a: calls.append(1) or real(*a))
    codes, scales, zeros, gb = _basis_args()
    grad = torch.randn(32)
    out = dispatch.project(grad, codes, scales, zeros, gb, 1, 4, 8, backend="triton")
    ref = dispatch.project(grad, codes, scales, zeros, gb, 1, 4, 8, backend="torch")
    assert calls == [1]
    assert_close("project", ref, out, atol=_sum_atol(ref))
    assert math.isfinite(out.abs().sum().item())


def test_reduce_groups_keeps_a_small_block_exact_beside_a_large_one():
    """Each block is summed on its own: a tiny block after 10^5 large groups keeps float32 precision."""
    gen = torch.Generator().manual_seed(0)
    big, small = torch.randn(3, 100_000, generator=gen) * 1e3, torch.randn(3, 8, generator=gen) * 1e-6
    group_block = torch.cat([torch.zeros(100_000, dtype=torch.int32), torch.full((8,), 2, dtype=torch.int32)])
    out = reference.reduce_groups(torch.cat([big, small], dim=1), group_block, 3)
    assert_close("large block", big.double().sum(1).float(), out[0], rtol=1e-6, atol=0)
    assert torch.equal(out[1], torch.zeros(3))  # a block with no groups (empty on this rank)
    assert_close("small block", small.double().sum(1).float(), out[2], rtol=1e-6, atol=0)


@needs_triton
def test_triton_limits_match_the_kernels():
    ops = _ops()
    assert ops["gram"].MAX_K == dispatch.GRAM_MAX_K
    assert ops["orth_quantize"].MAX_TILE == dispatch.ORTH_QUANTIZE_MAX_TILE
    assert ops["combine"].MAX_GROUP == ops["project"].MAX_GROUP == dispatch.GROUP_MAX


@pytest.mark.parametrize("k", [2, 8, 16, 255, 256, 257, 300, 511, 512, 513])
@pytest.mark.parametrize("group_size", [8, 128, 1024, 1 << 14, (1 << 14) + 8])
def test_dispatch_auto_never_picks_triton_past_a_limit(monkeypatch, k, group_size):
    """Triton imports and the tensors are on CUDA: auto still runs the reference where a kernel has a
    limit, and a forced triton names the limit instead of failing inside the launcher."""
    monkeypatch.setattr(dispatch, "_triton_status", (True, "triton imports"))
    cuda = torch.device("cuda")
    sizes = {"gram": {"k": k}, "orth_quantize": {"k": k, "group_size": group_size},
             "combine": {"group_size": group_size}, "project": {"group_size": group_size}}
    for op, kw in sizes.items():
        limit = dispatch.triton_limit(op, **kw)
        expected_limit = {
            "gram": k > 256,
            "orth_quantize": (1 << (k - 1).bit_length()) * (1 << (group_size - 1).bit_length()) > 1 << 16,
            "combine": group_size > 1 << 14,
            "project": group_size > 1 << 14,
        }[op]
        assert (limit is not None) == expected_limit, (op, kw, limit)
        assert dispatch.resolve(op, cuda, "auto", **kw) == ("torch" if limit else "triton")
        if limit:
            with pytest.raises(BackendUnavailableError, match="at most|up to"):
                dispatch.resolve(op, cuda, "triton", **kw)
        else:
            assert dispatch.resolve(op, cuda, "triton", **kw) == "triton"


def test_dispatch_forced_triton_past_the_gram_limit_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_status", (True, "triton imports"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="at most 256 candidates; K=300"):
        dispatch.gram(torch.zeros(300, 8), backend="triton")
    with pytest.raises(BackendUnavailableError, match="K=600, group_size=128"):
        dispatch.orth_quantize(torch.zeros(600, 128), torch.zeros(128), torch.zeros(2, 600), 8, 128, backend="triton")


def test_dispatch_auto_logs_the_limit_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_triton_status", (True, "triton imports"))
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level("INFO", logger=dispatch.log.name):
        for _ in range(3):
            assert dispatch.resolve("gram", torch.device("cuda"), "auto", k=300) == "torch"
    lines = [r.getMessage() for r in caplog.records if "kernel gram" in r.getMessage()]
    assert len(lines) == 1 and "at most 256" in lines[0], lines


@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
def test_orth_quantize_out_writes_column_slices(bits):
    """out=(codes, scales, zeros) views of a wider basis get exactly the codes of a fresh call, and
    nothing outside the slice is touched."""
    k, r, gs, ng = 5, 4, 16, 6
    x, mean, transform = _exact_inputs(k, r, gs * ng, torch.float32, seed=11)
    ref_out = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    total = gs * (ng + 4)
    codes = torch.full((r, total if bits in FLOAT_BITS else total * bits // 8), 7, dtype=ref_out[0].dtype)
    n_groups = 0 if bits in FLOAT_BITS else total // gs
    scales, zeros = torch.full((r, n_groups), -1.0), torch.full((r, n_groups), -2.0)
    c0 = 2 * gs
    if bits in FLOAT_BITS:
        views = (codes[:, c0:c0 + gs * ng], scales, zeros)
    else:
        views = (codes[:, c0 * bits // 8:(c0 + gs * ng) * bits // 8], scales[:, 2:2 + ng], zeros[:, 2:2 + ng])
    impls = [reference.orth_quantize_torch]
    if HAS_TRITON and dispatch.interpreting():
        impls.append(_ops()["orth_quantize"].orth_quantize_triton)
    for impl in impls:
        got = impl(x, mean, transform, bits, gs, out=views)
        assert all(a is b for a, b in zip(got, views))
        for name, a, b in zip(("codes", "scales", "zeros"), ref_out, views):
            assert torch.equal(a, b), (impl.__name__, name)
        if bits not in FLOAT_BITS:
            assert (codes[:, : c0 * bits // 8] == 7).all() and (scales[:, :2] == -1).all() and (zeros[:, 8:] == -2).all()
    with pytest.raises(ValueError, match="out scales has shape"):
        reference.orth_quantize_torch(x, mean, transform, 8, gs, out=(torch.empty(r, gs * ng, dtype=torch.uint8),
                                                                      torch.empty(r, ng + 1), torch.empty(r, ng)))


def test_gram_of_a_row_slice_equals_the_contiguous_one():
    x = torch.randn(4, 300, generator=_gen(5))
    wide = torch.zeros(4, 500)
    wide[:, 100:400] = x
    g1, m1 = reference.gram_torch(x)
    g2, m2 = reference.gram_torch(wide[:, 100:400])
    assert torch.equal(g1, g2) and torch.equal(m1, m2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
def test_gram_reference_close_to_float64_on_nearly_parallel_candidates(dtype):
    """float32 partial products over runs of columns, summed in float64: the Gram matrix of fine-tunes
    that differ by 1e-4 of their magnitude stays within 1e-6 of the float64 one (measured about 1e-8)."""
    gen = _gen(3)
    n = 3 * reference.chunk_cols(8, 1) + 517  # several chunks and a partial run
    base = torch.randn(n, generator=gen)
    x = (base + 1e-4 * torch.randn(8, n, generator=gen)).to(dtype)
    exact = x.double() - x.double().mean(dim=0)
    g_exact = exact @ exact.T
    g, m = reference.gram_torch(x)
    assert float((g - g_exact).abs().max() / g_exact.norm()) < 1e-6
    assert_close("mean", x.double().mean(dim=0).float(), m)


def test_gram_is_not_finite_when_an_input_is_not():
    for bad in (float("nan"), float("inf"), float("-inf")):
        for k in (1, 2, 5):
            for row in range(k):
                x = torch.randn(k, 1000, generator=_gen(k))
                x[row, 613] = bad
                g, _ = reference.gram_torch(x)
                assert not bool(torch.isfinite(g).all()), (bad, k, row)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("group_size", (8, 24, 128))
def test_quantize_reference_follows_the_layout_expressions(bits, group_size):
    """The reference computes codes in place and lets the float -> uint8 conversion do the floor; its
    codes must be those of layout.py's expressions written plainly (floor, clamp, shift and sum)."""
    gen = _gen(bits * 1000 + group_size)
    p = torch.randn(5, group_size * 37, generator=gen) * torch.logspace(-6, 3, 5).unsqueeze(1)
    p[1, :group_size] = 0.25  # a constant group: scale 0, codes 0
    codes, scales, zeros = reference.quantize_torch(p, bits, group_size)
    grouped = p.view(5, -1, group_size)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    levels = float((1 << bits) - 1)
    scale = (hi - lo) / torch.full_like(hi, levels)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.floor((grouped - lo.unsqueeze(2)) * inv.unsqueeze(2) + 0.5).clamp_(0, levels).to(torch.int32)
    per_byte = 8 // bits
    q = q.view(5, -1, per_byte)
    packed = (q << (torch.arange(per_byte, dtype=torch.int32) * bits)).sum(dim=2).to(torch.uint8)
    assert torch.equal(codes, packed)
    assert torch.equal(scales, scale) and torch.equal(zeros, lo)
    assert torch.equal(reference.unpack_codes_torch(codes, bits).view(5, -1, per_byte).int(), q)
