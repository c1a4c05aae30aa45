"""The C kernels (kernels/native.c): parity with the torch references (orth_quantize's codes bit for bit),
independence from the thread split and, for gram, from where a parameter is cut; the K candidates read in place
(``Rows``); their argument limits, the build and cache, and dispatch."""

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
from twamerge.kernels.layout import PACKED_BITS, Rows


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
    assert dispatch.resolve("gram", cpu, "auto", dtype=torch.float32) == "native"
    assert dispatch.resolve("orth_quantize", cpu, "auto", bits=8, dtype=torch.bfloat16) == "native"
    assert dispatch.resolve("gram", cpu, "auto", dtype=torch.float16) == "torch"
    assert dispatch.resolve("orth_quantize", cpu, "auto", bits=32, dtype=torch.float32) == "torch"
    with pytest.raises(BackendUnavailableError, match="float16 x"):
        dispatch.gram(torch.zeros(2, 16, dtype=torch.float16), backend="native")
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


def _candidates(k: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """K nearby candidates (fine-tunes of one base): the case the Gram's float32 runs are there for."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    return (base + 1e-3 * torch.randn(k, n, generator=gen)).to(dtype)


# (K, n, start, period, run): row lengths that are multiples of the run, are not, are shorter; a start mid-row.
GRAM_CASES = [(8, 5000, 0, 0, 128), (8, 9000, 0, 2055, 128), (5, 700, 3, 1, 128), (3, 4100, 64, 2048, 128),
              (2, 999, 0, 27, 8), (9, 70000, 0, 130, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("k,n,start,period,run", GRAM_CASES)
def test_gram_matches_reference(k, n, start, period, run, dtype):
    """The same runs as the reference, each summed in another fixed order: the Gram within float32 rounding of
    the runs' partials, the mean bit for bit (the same float32 operations)."""
    x = _candidates(k, n, k + n, dtype)
    want_g, want_m = reference.gram_torch(x, start, period, run)
    got_g, got_m = native.gram_native(x, start, period, run)
    assert got_g.dtype == torch.float64 and got_m.dtype == torch.float32
    assert float((got_g - want_g).abs().max()) <= 1e-6 * float(want_g.norm())
    assert torch.equal(got_m, want_m)
    exact = x.double() - x.double().mean(dim=0)
    assert float((got_g - exact @ exact.T).abs().max()) <= 1e-6 * float(want_g.norm())
    # The K rows where they lie (a Rows: one pointer each) give the same bits as the stacked tensor.
    rows_g, rows_m = native.gram_native(Rows([r.clone() for r in x]), start, period, run)
    assert torch.equal(rows_g, got_g) and torch.equal(rows_m, got_m)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("period", [0, 2048, 2055, 130, 1])  # the reference's three ways: aligned, by row, grid
def test_gram_of_pieces_cut_between_runs_sums_to_the_whole(impl, period):
    """Issue 21: a parameter cut at row or run boundaries (where ranks and chunks cut it) gives each piece the
    float32 partials of the whole, so the pieces' Gram matrices add up to the whole one's up to float64 rounding
    (1e-15), not float32 (1e-9, what runs counted from each piece's start gave)."""
    gram = native.gram_native if impl == "native" else reference.gram_torch
    n, run = 3 * 2055 * 8 + 200, 128
    x = _candidates(8, n, period)
    whole = gram(x, 0, period, run)[0]
    gen = torch.Generator().manual_seed(period)
    breaks = [c for c in range(1, n) if c % run == 0 or (period and c % period == 0)]
    cuts = [0, *sorted(breaks[i] for i in torch.randperm(len(breaks), generator=gen)[:5].tolist()), n]
    pieces = sum(gram(x[:, a:z], a, period, run)[0] for a, z in zip(cuts, cuts[1:]))
    scale = float(whole.norm())
    assert float((pieces - whole).abs().max()) <= 1e-14 * scale
    # Cut elsewhere, the runs change: the float32 rounding of the partials shows (the test can fail).
    odd = [0, 1001, 5003, n]
    moved = sum(gram(x[:, a:z], a, period, run)[0] for a, z in zip(odd, odd[1:]))
    if period != 1:  # runs of one column are cut nowhere else
        assert float((moved - whole).abs().max()) > 1e-14 * scale


def test_gram_does_not_depend_on_the_thread_split():
    x = _candidates(6, 300_000, 2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native.gram_native(x, 17, 1000, 128))
    finally:
        torch.set_num_threads(before)
    for g, m in results[1:]:
        assert torch.equal(g, results[0][0]) and torch.equal(m, results[0][1])


def test_gram_is_not_finite_when_an_input_is_not():
    for bad in (float("nan"), float("inf")):
        for row in range(3):
            x = _candidates(3, 1000, row)
            x[row, 613] = bad
            assert not bool(torch.isfinite(native.gram_native(x, 0, 100, 128)[0]).all()), (bad, row)


# (K, R, group_size, n_groups)
OQ_CASES = [(8, 7, 128, 40), (3, 2, 8, 63), (5, 4, 24, 11), (2, 1, 4096, 2), (17, 16, 32, 5)]


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("k,r,gs,ng", OQ_CASES)
def test_orth_quantize_codes_equal_the_reference(k, r, gs, ng, dtype, bits):
    """Random (not dyadic) data: the reference forms each basis value by the same float32 products and sums
    in the same order as the C loop (no matmul, no fused multiply-add), so codes, scales and zeros are equal
    bit for bit, ties included; written into column slices of a wider basis, from a stacked tensor or in place."""
    gen = torch.Generator().manual_seed(k * 100 + ng + bits)
    x = _candidates(k, gs * ng, k + gs, dtype)
    mean = x.float().mean(dim=0)
    transform = torch.randn(r, k, generator=gen) * 300  # an orthonormalising transform of 1e-3 differences
    want = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    wide = [torch.full((r, 3 * t.shape[1]), 7, dtype=t.dtype) for t in want]
    out = tuple(w[:, t.shape[1]: 2 * t.shape[1]] for w, t in zip(wide, want))
    for source in (x, Rows([row.clone() for row in x])):
        got = native.orth_quantize_native(source, mean, transform, bits, gs, out)
        for name, a, b in zip(("codes", "scales", "zeros"), want, got):
            assert torch.equal(a, b), f"{name} differ at {(a != b).nonzero()[:5].tolist()}"
    for w, t in zip(wide, want):  # nothing written outside the slice
        assert bool((w[:, : t.shape[1]] == 7).all() and (w[:, 2 * t.shape[1]:] == 7).all())


def test_orth_quantize_does_not_depend_on_the_thread_split():
    x = _candidates(8, 128 * 700, 5)
    mean, transform = x.mean(dim=0), torch.randn(7, 8) * 300
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert len(native._split(700)) == threads
            results.append(native.orth_quantize_native(x, mean, transform, 4, 128))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_rows_must_agree():
    with pytest.raises(ValueError, match="rows differ"):
        Rows([torch.zeros(8), torch.zeros(9)])
    with pytest.raises(ValueError, match="rows differ"):
        Rows([torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)])
    rows = Rows([torch.arange(8.0), torch.arange(8.0) + 10])
    assert rows.shape == (2, 8) and torch.equal(rows[:, 2:5].stack(), torch.tensor([[2.0, 3, 4], [12, 13, 14]]))
