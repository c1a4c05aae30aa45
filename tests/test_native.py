"""The C kernels for combine and project (kernels/native.c): parity with the torch references,
independence from the thread split, their argument limits, the build and cache, and dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PoisonedTorch, assert_close
from twamerge.kernels import dispatch, native, reference
from twamerge.kernels.dispatch import BackendUnavailableError
from twamerge.kernels.layout import PACKED_BITS


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = native.status()
    assert ok, f"the C kernels must build on the test machine (a C compiler is installed): {why}"


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every buffer the C path allocates starts as NaN / garbage, so an element it forgets to write shows."""
    monkeypatch.setattr(native, "torch", PoisonedTorch())
    monkeypatch.setattr(reference, "torch", PoisonedTorch())


def _case(bits: int, group_size: int, n_groups: int, rows: int = 5, n_blocks: int = 3, seed: int = 0):
    """A quantized basis of random (not dyadic) data, a mean, coefficients per block and block ids."""
    gen = torch.Generator().manual_seed(seed)
    cols = group_size * n_groups
    codes, scales, zeros = reference.quantize_torch(torch.randn(rows, cols, generator=gen), bits, group_size)
    # Blocks as contiguous runs of groups, of unequal length (the first may be a single group).
    cuts = sorted(torch.randperm(n_groups - 1, generator=gen)[: n_blocks - 1].add(1).tolist())
    group_block = torch.zeros(n_groups, dtype=torch.int32)
    for c in cuts:
        group_block[c:] += 1
    mean = torch.randn(cols, generator=gen)
    beta = torch.randn(n_blocks, rows, generator=gen)
    grad = torch.randn(cols, generator=gen)
    return mean, codes, scales, zeros, beta, group_block, grad


# group_size 4096 is wider than the C tile (2048 columns): one group per tile, in two halves of scratch.
@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("group_size,n_groups", [(8, 37), (128, 9), (4096, 2)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_reference(bits, group_size, n_groups, out_dtype):
    mean, codes, scales, zeros, beta, gb, _ = _case(bits, group_size, n_groups)
    want = reference.combine_torch(mean, codes, scales, zeros, beta, gb, bits, group_size,
                                   torch.full_like(mean, float("nan"), dtype=out_dtype))
    got = native.combine_native(mean, codes, scales, zeros, beta, gb, bits, group_size,
                                torch.full_like(mean, float("nan"), dtype=out_dtype))
    assert got.dtype == out_dtype
    if out_dtype == torch.bfloat16:
        # Both round the same float32 sum once; a sum that lands within float32 noise of a bf16
        # rounding boundary may round the other way: at most one bf16 step apart.
        step = got.float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((got.float() - want.float()).abs() <= step).all()
    else:
        assert_close("combine", want, got, atol=1e-5 * float(mean.abs().max() + 1))
    assert got.isfinite().all()


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("group_size,n_groups", [(8, 37), (128, 9), (4096, 2)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_project_matches_reference(bits, group_size, n_groups, grad_dtype):
    _, codes, scales, zeros, _, gb, grad = _case(bits, group_size, n_groups)
    grad = grad.to(grad_dtype)
    want = reference.project_torch(grad, codes, scales, zeros, gb, 3, bits, group_size)
    got = native.project_native(grad, codes, scales, zeros, gb, 3, bits, group_size)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    # Sums of up to 8192 products, added in another order than torch's: error grows with sqrt(n).
    assert_close("project", want, got, atol=1e-5 * (group_size * n_groups) ** 0.5, rtol=1e-5)


def test_result_does_not_depend_on_the_thread_split():
    """Each output element is computed by one call in a fixed order: 1 thread and 2 threads agree bit for bit."""
    mean, codes, scales, zeros, beta, gb, grad = _case(4, 64, 600, n_blocks=4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert len(native._split(600)) == threads
            results.append((native.combine_native(mean, codes, scales, zeros, beta, gb, 4, 64),
                            native.project_native(grad, codes, scales, zeros, gb, 4, 4, 64)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_dispatch_auto_runs_the_c_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv("TWAMERGE_BACKEND", raising=False)
    calls = []
    real = native.combine_native
    monkeypatch.setattr(native, "combine_native", lambda *a: calls.append(1) or real(*a))
    mean, codes, scales, zeros, beta, gb, _ = _case(8, 16, 4)
    out = dispatch.combine(mean, codes, scales, zeros, beta, gb, 8, 16)
    assert calls == [1]
    assert_close("combine", reference.combine_torch(mean, codes, scales, zeros, beta, gb, 8, 16), out)
    # What the C kernels do not take runs the reference under auto, and is refused when forced.
    cpu = torch.device("cpu")
    assert dispatch.resolve("combine", cpu, "auto", bits=16, dtype=torch.float32) == "torch"
    assert dispatch.resolve("project", cpu, "auto", bits=8, dtype=torch.float16) == "torch"
    assert dispatch.resolve("gram", cpu, "auto") == "torch"
    assert dispatch.resolve("gram", cpu, "native") == "torch"  # no C gram: the reference
    with pytest.raises(BackendUnavailableError, match="bits=16"):
        dispatch.resolve("combine", cpu, "native", bits=16, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="float16"):
        dispatch.project(torch.zeros(16, dtype=torch.float16), codes, scales, zeros, gb, 3, 8, 16, backend="native")


def test_bad_block_ids_are_refused_before_the_c_loop_reads_past_beta():
    mean, codes, scales, zeros, beta, gb, grad = _case(8, 16, 4)
    gb[-1] = 3  # beta has 3 blocks
    with pytest.raises(ValueError, match="block ids outside"):
        native.combine_native(mean, codes, scales, zeros, beta, gb, 8, 16)
    with pytest.raises(ValueError, match="block ids outside"):
        native.project_native(grad, codes, scales, zeros, gb, 3, 8, 16)


def test_without_a_compiler_auto_falls_back_and_forced_native_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TWAMERGE_CACHE_DIR", str(tmp_path / "cache"))
    ok, why = native.status()
    assert not ok and "no-such-cc" in why
    assert dispatch.resolve("project", torch.device("cpu"), "auto", bits=8, dtype=torch.float32) == "torch"
    with pytest.raises(BackendUnavailableError, match="no-such-cc"):
        dispatch.resolve("project", torch.device("cpu"), "native", bits=8, dtype=torch.float32)
    assert not (tmp_path / "cache").exists()


def test_a_fresh_process_builds_once_into_the_cache_and_reuses_it(tmp_path):
    """The library is compiled into TWAMERGE_CACHE_DIR; a second process loads it without compiling."""
    env = {**os.environ, "TWAMERGE_CACHE_DIR": str(tmp_path)}
    script = ("import sys\nfrom twamerge.kernels import native\nimport subprocess\n"
              "calls = []\nreal = subprocess.run\n"
              "native.subprocess.run = lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw)\n"
              "ok, why = native.status()\nassert ok, why\n"
              "print(sum('-shared' in c for c in calls))\n")
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert [r.stdout.strip() for r in runs] == ["1", "0"]
    assert len(list(Path(tmp_path, "native").glob("twamerge_native_*.so"))) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is a POSIX call")
def test_a_forked_child_runs_the_threaded_kernels_too(tmp_path):
    """The parent's thread pool does not survive fork; the child builds its own and gets the same result."""
    script = (
        "import os, torch\nfrom twamerge.kernels import native, reference\ntorch.set_num_threads(2)\n"
        "codes, scales, zeros = reference.quantize_torch(torch.randn(3, 64 * 300), 8, 64)\n"
        "gb = torch.zeros(300, dtype=torch.int32); beta = torch.randn(1, 3); mean = torch.randn(64 * 300)\n"
        "a = native.combine_native(mean, codes, scales, zeros, beta, gb, 8, 64)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    b = native.combine_native(mean, codes, scales, zeros, beta, gb, 8, 64)\n"
        "    os._exit(0 if torch.equal(a, b) else 3)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    env = {**os.environ, "TWAMERGE_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
