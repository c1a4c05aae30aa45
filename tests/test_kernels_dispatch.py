"""What every kernel test relies on, and what chooses between the kernels: the poison fixture, that
twamerge.kernels is this checkout's kernels/, dispatch (auto, forced backends, TWAMERGE_BACKEND, the
Triton limits), and the four Triton kernels in bf16 on a GPU. The per-op tests are in
tests/test_kernels_<op>.py; shared inputs and comparison rules in tests/kernel_fixtures.py."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import TOLERANCES, assert_close
from kernel_fixtures import (
    HAS_TRITON,
    basis_args,
    block_ids,
    gen,
    needs_triton,
    poison_kernel_empty,
    sum_atol,
    triton_ops,
    unpacked,
)

from twamerge.kernels import dispatch, reference
from twamerge.kernels.dispatch import BackendUnavailableError

poison_empty = pytest.fixture(poison_kernel_empty, autouse=True, name="poison_empty")


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
    from twamerge.kernels import dispatch as kernels

    here = pathlib.Path(twamerge.__file__).resolve().parents[1]
    assert pathlib.Path(kernels.__file__).resolve().parent == here / "kernels", (
        f"twamerge is imported from {here} but twamerge.kernels from {pathlib.Path(kernels.__file__).parent}; "
        "install this checkout (pip install -e .) in its own environment"
    )


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on GPU only")
def test_bf16_on_gpu():
    if dispatch.interpreting():
        pytest.skip("the interpreter has no bf16; run with TRITON_INTERPRET=0")
    ops, dev, gs, bits = triton_ops(), torch.device("cuda"), 32, 4
    x = torch.randn(9, gs * 65, generator=gen(1)).to(torch.bfloat16).to(dev)
    g_ref, m_ref = reference.gram_torch(x)
    g_out, m_out = ops["gram"].gram_triton(x)
    assert_close("gram", g_ref, g_out, atol=sum_atol(g_ref), rtol=TOLERANCES[torch.float32][1])
    assert_close("mean", m_ref, m_out)
    t = torch.randn(8, 9, generator=gen(2)).to(dev)
    c_ref, s_ref, z_ref = reference.orth_quantize_torch(x, m_ref, t, bits, gs)
    c_out, s_out, z_out = ops["orth_quantize"].orth_quantize_triton(x, m_ref, t, bits, gs)
    assert (unpacked(c_ref, bits) - unpacked(c_out, bits)).abs().max().item() <= 1
    group_block, n_blocks = block_ids(65, "runs")
    group_block = group_block.to(dev)
    beta = torch.randn(n_blocks, 8, generator=gen(3)).to(dev)
    buf = torch.empty(gs * 65, dtype=torch.bfloat16, device=dev)
    ref = reference.combine_torch(m_ref, c_ref, s_ref, z_ref, beta, group_block, bits, gs).to(torch.bfloat16)
    out = ops["combine"].combine_triton(m_ref, c_ref, s_ref, z_ref, beta, group_block, bits, gs, out=buf)
    assert_close("combine", ref, out, atol=sum_atol(ref, torch.bfloat16))
    grad = torch.randn(gs * 65, generator=gen(4)).to(torch.bfloat16).to(dev)
    ref = reference.project_torch(grad, c_ref, s_ref, z_ref, group_block, n_blocks, bits, gs)
    out = ops["project"].project_triton(grad, c_ref, s_ref, z_ref, group_block, n_blocks, bits, gs)
    assert_close("project", ref, out, atol=sum_atol(ref))


def test_dispatch_auto_on_cpu_uses_torch_or_the_c_kernels(monkeypatch):
    """Never Triton for CPU tensors under auto: the C kernels when they build (tests/test_native.py), else the
    reference."""
    monkeypatch.delenv("TWAMERGE_BACKEND", raising=False)
    c_built = dispatch.native.status()[0]
    for op in dispatch.OPS:
        want = "native" if op in dispatch.NATIVE_OPS and c_built else "torch"
        assert dispatch.resolve(op, torch.device("cpu"), "auto", bits=8, dtype=torch.float32) == want
    x = torch.randn(3, 16)
    g, m = dispatch.gram(x)
    g_ref, m_ref = reference.gram_torch(x)
    # The C loop sums the same float32 runs in another order: equal to float32 rounding; the mean bit for bit.
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-6 * float(g_ref.abs().max())) and torch.equal(m, m_ref)


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
    mod = triton_ops()["project"]
    real = mod.project_triton
    monkeypatch.setattr(mod, "project_triton", lambda *a: calls.append(1) or real(*a))
    codes, scales, zeros, gb = basis_args()
    grad = torch.randn(32)
    out = dispatch.project(grad, codes, scales, zeros, gb, 1, 4, 8, backend="triton")
    ref = dispatch.project(grad, codes, scales, zeros, gb, 1, 4, 8, backend="torch")
    assert calls == [1]
    assert_close("project", ref, out, atol=sum_atol(ref))
    assert math.isfinite(out.abs().sum().item())


@needs_triton
def test_triton_limits_match_the_kernels():
    ops = triton_ops()
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
