"""orth_quantize: the basis P = T (x - m), quantized per group. The Triton kernel against the torch
reference (exact and |dcode| <= 1 rules, tests/kernel_fixtures.py), its argument checks, writing into
column slices of a wider basis, and the reference against layout.py's expressions."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close
from kernel_fixtures import (
    HAS_TRITON,
    dtype_id,
    exact_inputs,
    gen,
    kernel_device,
    needs_triton,
    poison_kernel_empty,
    to_device,
    triton_ops,
    unpacked,
)
from twamerge.kernels import dispatch, reference
from twamerge.kernels.layout import FLOAT_BITS, SUPPORTED_BITS

device = pytest.fixture(kernel_device, name="device")
poison_empty = pytest.fixture(poison_kernel_empty, autouse=True, name="poison_empty")

# (K, R, group_size, n_groups): one group, 63 groups, non-power-of-two groups, K past 16, many tiles.
OQ_SHAPES = [(1, 1, 8, 1), (3, 2, 8, 63), (5, 4, 32, 9), (17, 16, 128, 3), (4, 3, 24, 11), (2, 1, 8, 700)]
OQ_IDS = [f"K{k}-R{r}-G{gs}-NG{ng}" for k, r, gs, ng in OQ_SHAPES]


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("k,r,gs,ng", OQ_SHAPES, ids=OQ_IDS)
def test_orth_quantize_exact(k, r, gs, ng, dtype, bits, device):
    """Exact rule: P is computed without rounding, so codes, scales and zeros must be identical."""
    x, mean, transform = to_device(device, *exact_inputs(k, r, gs * ng, dtype, seed=k + 31 * ng + bits))
    ref = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    out = triton_ops()["orth_quantize"].orth_quantize_triton(x, mean, transform, bits, gs)
    for name, a, b in zip(("codes", "scales", "zeros"), ref, out):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differ at {(a != b).nonzero()[:5].tolist()}"


OQ_RANDOM = [(3, 2, 8, 63), (9, 8, 32, 5), (6, 5, 40, 7)]
OQ_RANDOM_IDS = [f"K{k}-R{r}-G{gs}-NG{ng}" for k, r, gs, ng in OQ_RANDOM]


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("k,r,gs,ng", OQ_RANDOM, ids=OQ_RANDOM_IDS)
def test_orth_quantize_random(k, r, gs, ng, dtype, bits, device):
    """|dcode| <= 1 rule: arbitrary data, where summation order may move a value across a boundary."""
    g = gen(7 * k + ng)
    x = torch.randn(k, gs * ng, generator=g).to(dtype)
    mean = x.float().mean(dim=0)
    transform = torch.randn(r, k, generator=g)
    x, mean, transform = to_device(device, x, mean, transform)
    c_ref, s_ref, z_ref = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    c_out, s_out, z_out = triton_ops()["orth_quantize"].orth_quantize_triton(x, mean, transform, bits, gs)
    if bits in FLOAT_BITS:
        assert_close("codes", c_ref.float(), c_out.float(), atol=TOLERANCES[c_ref.dtype][0])
        assert s_out.shape == (r, 0) and z_out.shape == (r, 0)
        return
    assert_close("scales", s_ref, s_out)
    assert_close("zeros", z_ref, z_out)
    dq = (unpacked(c_ref, bits) - unpacked(c_out, bits)).abs()
    assert dq.max().item() <= 1, f"codes differ by {dq.max().item()}"
    p = transform @ (x.float() - mean)
    err = (reference.dequantize_torch(c_out, s_out, z_out, bits, gs) - p).abs().view(r, ng, gs)
    half_step = s_ref.unsqueeze(2) / 2
    assert (err <= half_step * (1 + 1e-3) + 1e-5).all(), "dequantized error above half a step"


@needs_triton
def test_pack_roundtrip_through_kernels(device):
    """Codes written by orth_quantize decode through combine exactly as the reference decodes them."""
    gs, ng = 8, 5
    x, mean, transform = to_device(device, *exact_inputs(4, 3, gs * ng, torch.float32, seed=3))
    group_block = torch.zeros(ng, dtype=torch.int32, device=device)
    origin = torch.zeros(gs * ng, dtype=torch.float32, device=device)
    for bits in (1, 2, 4, 8):
        codes, scales, zeros = triton_ops()["orth_quantize"].orth_quantize_triton(x, mean, transform, bits, gs)
        basis = reference.dequantize_torch(codes.cpu(), scales.cpu(), zeros.cpu(), bits, gs)  # [R, D]
        for i in range(basis.shape[0]):
            # beta = e_i: combine must return basis row i, decoded from the packed bytes as the reference does
            beta = torch.zeros(1, basis.shape[0], device=device)
            beta[0, i] = 1.0
            row = triton_ops()["combine"].combine_triton(origin, codes, scales, zeros, beta, group_block, bits, gs)
            assert_close(f"bits={bits} row {i}", basis[i], row.cpu(), atol=1e-6, rtol=0)


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
        triton_ops()["orth_quantize"].orth_quantize_triton(x, mean, t, bits, gs)


@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
def test_orth_quantize_out_writes_column_slices(bits):
    """out=(codes, scales, zeros) views of a wider basis get exactly the codes of a fresh call, and
    nothing outside the slice is touched."""
    k, r, gs, ng = 5, 4, 16, 6
    x, mean, transform = exact_inputs(k, r, gs * ng, torch.float32, seed=11)
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
        impls.append(triton_ops()["orth_quantize"].orth_quantize_triton)
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


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("group_size", (8, 24, 128))
def test_quantize_reference_follows_the_layout_expressions(bits, group_size):
    """The reference computes codes in place and lets the float -> uint8 conversion do the floor; its
    codes must be those of layout.py's expressions written plainly (floor, clamp, shift and sum)."""
    g = gen(bits * 1000 + group_size)
    p = torch.randn(5, group_size * 37, generator=g) * torch.logspace(-6, 3, 5).unsqueeze(1)
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
