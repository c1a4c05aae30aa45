"""The subspace: layout and blocks, rank-revealing Gram-Schmidt, quantized basis, alphas."""

import math

import pytest
import torch
from helpers import assert_close

from twamerge.kernels import reference
from twamerge.kernels.reference import dequantize_torch
from twamerge.subspace import StackedCandidates, build_subspace, make_layout


def _candidates(k=5, shapes=((7, 3), (11,), (4, 4, 2)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(k, *s, generator=gen) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("blocks, n_blocks", [("global", 1), ("layer", 3), ("size:20", 2)])
def test_layout_blocks_are_group_aligned(blocks, n_blocks):
    stacks = _candidates()
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], blocks, 16)
    assert layout.n_blocks == n_blocks
    assert all(s % 16 == 0 and e % 16 == 0 for s, e in zip(layout.block_starts, layout.block_ends))
    assert layout.n_params == 21 + 11 + 32
    gb = layout.group_block()
    assert gb.numel() == layout.n_cols // 16 and bool((gb[1:] >= gb[:-1]).all())
    # tensors never overlap
    spans = sorted((o, o + layout.numel(i)) for i, o in enumerate(layout.offsets))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _flat_directions(stacks, layout, sub):
    k = sub.n_candidates
    d = torch.zeros(k, layout.n_cols, dtype=torch.float64)
    for i, name in enumerate(layout.names):
        x = stacks[name].reshape(k, -1).double()
        d[:, layout.offsets[i]: layout.offsets[i] + x.shape[1]] = x - x.mean(0)
    return d


@pytest.mark.parametrize("blocks", ["global", "layer"])
def test_float_basis_is_orthonormal_and_spans_the_candidates(blocks):
    stacks = _candidates()
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], blocks, 8)
    sub = build_subspace(StackedCandidates(stacks), layout, bits=32)
    p = dequantize_torch(sub.codes, sub.scales, sub.zeros, 32, 8).double()
    d = _flat_directions(stacks, layout, sub)
    for b in range(layout.n_blocks):
        s, e = layout.block_starts[b], layout.block_ends[b]
        pb = p[: sub.ranks[b], s:e]
        assert sub.ranks[b] == 4  # K - 1: centring removes one direction
        assert_close("P P^T", torch.eye(sub.ranks[b], dtype=torch.float64), pb @ pb.T, atol=1e-5, rtol=0)
        # every centred candidate lies in the span
        db = d[:, s:e]
        residual = db - (db @ pb.T) @ pb
        assert float(residual.norm()) < 1e-4 * float(db.norm())


def test_alphas_of_a_candidate_are_one_hot():
    stacks = _candidates()
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "layer", 8)
    sub = build_subspace(StackedCandidates(stacks), layout, bits=32)
    p = dequantize_torch(sub.codes, sub.scales, sub.zeros, 32, 8).double()
    d = _flat_directions(stacks, layout, sub)
    j = 2
    beta = torch.stack([
        p[:, s:e] @ d[j, s:e] for s, e in zip(layout.block_starts, layout.block_ends)
    ]).float()
    alphas = sub.alphas(beta)
    assert_close("alphas", torch.eye(5, dtype=torch.float64)[j].expand(3, 5), alphas, atol=1e-5, rtol=0)
    assert_close("sum", torch.ones(3, dtype=torch.float64), alphas.sum(1), atol=1e-12, rtol=0)


def test_duplicate_and_collinear_candidates_lower_the_rank():
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(50, generator=gen) for _ in range(3))
    # c4 duplicates c1; c5 = 2*c2 - c1 is collinear with the others after centring
    stack = torch.stack([a, b, c, a.clone(), 2 * b - a])
    layout = make_layout(["w"], [(50,)], "global", 8)
    sub = build_subspace(StackedCandidates({"w": stack}), layout, bits=8)
    assert sub.ranks == [2] and sub.dropped == [2]


def test_identical_candidates_have_rank_zero():
    x = torch.randn(30)
    layout = make_layout(["w"], [(30,)], "global", 8)
    sub = build_subspace(StackedCandidates({"w": torch.stack([x, x, x])}), layout, bits=4)
    assert sub.ranks == [0]
    beta = torch.zeros(1, sub.rows)
    out = sub.combine(beta, torch.empty(layout.n_cols))
    assert_close("mean", x, out[:30])


@pytest.mark.parametrize("group_size", [24, 64])
def test_windowed_quantization_matches_one_window(monkeypatch, group_size):
    """Blocks wider than the quantization window are written window by window, in whole groups."""
    import twamerge.subspace as subspace_mod

    stacks = _candidates(shapes=((50, 30), (7,)))
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "global", group_size)
    whole = build_subspace(StackedCandidates(stacks), layout, bits=4)
    monkeypatch.setattr(subspace_mod, "WINDOW", 100)  # not a multiple of either group size
    windowed = build_subspace(StackedCandidates(stacks), layout, bits=4)
    assert torch.equal(windowed.codes, whole.codes)
    assert torch.equal(windowed.scales, whole.scales) and torch.equal(windowed.zeros, whole.zeros)


def test_quantized_basis_error_shrinks_with_bits():
    stacks = _candidates(shapes=((64, 32),))
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "global", 64)
    exact = build_subspace(StackedCandidates(stacks), layout, bits=32)
    p = dequantize_torch(exact.codes, exact.scales, exact.zeros, 32, 64)
    errors = {}
    for bits in (1, 2, 4, 8):
        quant = build_subspace(StackedCandidates(stacks), layout, bits=bits)
        q = dequantize_torch(quant.codes, quant.scales, quant.zeros, bits, 64)
        errors[bits] = float((p - q).norm() / p.norm())
        assert quant.basis_bytes() < exact.basis_bytes() * (bits / 32 + 0.1)
    # Each extra bit halves the quantization step: at least 1.5x less error each time the bits double.
    assert errors[1] > 1.5 * errors[2] > 2.25 * errors[4] > 3.4 * errors[8], errors
    assert errors[8] < 0.02, errors


def test_spread_scales_with_the_checkpoints():
    stacks = _candidates()
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "layer", 8)
    a = build_subspace(StackedCandidates(stacks), layout, bits=8)
    b = build_subspace(StackedCandidates({n: s * 100 for n, s in stacks.items()}), layout, bits=8)
    # rtol 1e-6, not 1e-9: the candidates are float32, and x * 100 rounds in the last bit.
    assert_close("spread", a.spread * 100, b.spread, atol=0, rtol=1e-6)
    assert torch.equal(a.codes, b.codes) or (a.codes.int() - b.codes.int()).abs().max() <= 1
    assert math.isclose(float(a.transform.abs().sum()), float(b.transform.abs().sum()) * 100, rel_tol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "auto", "native"])
def test_k300_candidates_build_combine_project(backend):
    """K = 300 (past the Triton gram kernel's 256): every CPU path builds, combines and projects (the C
    kernels loop over any number of rows; they agree with the references), and the alphas of any beta
    sum to 1 per block."""
    k = 300
    stacks = _candidates(k=k, shapes=((40, 20), (33,), (500,)))
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "layer", 32)
    sub = build_subspace(StackedCandidates(stacks), layout, bits=8, backend=backend)
    assert sub.ranks == [k - 1, 33, k - 1]  # a block of 33 columns spans at most 33 directions
    assert sub.rows == k - 1 and sub.codes.shape == (k - 1, layout.n_cols)
    beta = torch.randn(layout.n_blocks, sub.rows, generator=torch.Generator().manual_seed(0)) * 0.01
    w = sub.combine(beta, torch.empty(layout.n_cols))
    assert torch.isfinite(w).all()
    assert_close("beta = 0 is the mean", sub.mean, sub.combine(torch.zeros_like(beta), torch.empty(layout.n_cols)))
    grad = torch.randn(layout.n_cols, generator=torch.Generator().manual_seed(1))
    g = sub.project(grad)
    assert g.shape == (layout.n_blocks, sub.rows) and torch.isfinite(g).all()
    basis = (sub.codes, sub.scales, sub.zeros)
    assert_close("combine", reference.combine_torch(sub.mean, *basis, beta, sub.group_block, 8, 32), w)
    assert_close("project", reference.project_torch(grad, *basis, sub.group_block, layout.n_blocks, 8, 32), g,
                 atol=1e-4)
    alphas = sub.alphas(beta)
    assert alphas.shape == (layout.n_blocks, k)
    assert_close("alphas sum to 1", torch.ones(layout.n_blocks, dtype=torch.float64), alphas.sum(1), atol=1e-9, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_the_tensor_and_candidate(bad):
    from twamerge.errors import NonFiniteError

    stacks = _candidates()
    stacks["t1"][3, 4] = bad
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "layer", 8)
    with pytest.raises(NonFiniteError, match=r"candidate 3: tensor 't1' holds"):
        build_subspace(StackedCandidates(stacks), layout, bits=8)  # checked by default
    # Not looked for with check_finite=False (--allow-nonfinite), but a non-finite Gram matrix still stops
    # the build, since no basis can be made from it.
    with pytest.raises(NonFiniteError, match=r"block 1 \(t1\)"):
        build_subspace(StackedCandidates(stacks), layout, bits=8, check_finite=False)


def test_check_finite_names_the_file_when_the_reader_has_paths():
    from twamerge.errors import NonFiniteError

    class WithPaths(StackedCandidates):
        paths = [f"/ckpt/c{i}.safetensors" for i in range(5)]

    stacks = _candidates()
    stacks["t2"][1, 0, 0, 1] = float("nan")
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "global", 8)
    with pytest.raises(NonFiniteError, match=r"/ckpt/c1.safetensors: tensor 't2' holds 1 NaN and 0 Inf"):
        build_subspace(WithPaths(stacks), layout, bits=4, check_finite=True, cache_bytes=0)


def test_check_finite_accepts_huge_finite_values():
    """Float32 partial products overflow for values near 1e25; that is not a NaN in the input: the Gram
    matrix is recomputed in float64 and the build goes on."""
    stacks = {n: s * 1e25 for n, s in _candidates().items()}
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "layer", 8)
    sub = build_subspace(StackedCandidates(stacks), layout, bits=8, check_finite=True)
    assert sub.ranks == [4, 4, 4] and torch.isfinite(sub.spread).all()


@pytest.mark.parametrize("blocks", ["global", "size:40", "layer"])
def test_one_read_and_two_reads_give_the_same_basis(blocks):
    """Blocks held in memory between the passes (read once) or read again give identical results."""
    stacks = _candidates(shapes=((7, 3), (11,), (4, 4, 2), (30,), (5, 5)))
    reads = {"n": 0}

    class Counting(StackedCandidates):
        def stack_slice(self, name, lo, hi):
            reads["n"] += 1
            return super().stack_slice(name, lo, hi)

    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], blocks, 8)
    once = build_subspace(Counting(stacks), layout, bits=4)
    assert reads["n"] == len(stacks)
    reads["n"] = 0
    twice = build_subspace(Counting(stacks), layout, bits=4, cache_bytes=0)
    assert reads["n"] == (len(stacks) if blocks == "layer" else 2 * len(stacks))
    for f in ("mean", "codes", "scales", "zeros", "transform", "spread"):
        assert torch.equal(getattr(once, f), getattr(twice, f)), f


@pytest.mark.parametrize("blocks, cache_bytes", [("global", None), ("size:40", None), ("size:40", 0), ("layer", None)])
def test_a_scratch_buffer_holds_the_reads_and_changes_nothing(blocks, cache_bytes):
    """With a scratch buffer (the fit's gradient buffer) every read is stacked into it, none into a fresh
    tensor, and the subspace is the same; a buffer too small for a read leaves that read its own tensor."""
    stacks = _candidates(shapes=((7, 3), (11,), (4, 4, 2), (30,), (5, 5)))
    into: list[bool] = []

    class TakesOut(StackedCandidates):  # as CheckpointSet.stack_slice: fills ``out`` when given
        def stack_slice(self, name, lo, hi, *, out=None):
            into.append(out is not None)
            part = super().stack_slice(name, lo, hi)
            return part.clone() if out is None else out.copy_(part)

    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], blocks, 8)
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    plain = build_subspace(TakesOut(stacks), layout, bits=4, **kw)
    assert into and not any(into)
    for room, all_into in ((layout.n_cols * 10, True), (130, False)):
        into.clear()
        scratch = torch.full((room,), float("nan"))
        sub = build_subspace(TakesOut(stacks), layout, bits=4, scratch=scratch, **kw)
        assert all(into) if all_into else (any(into) and not all(into)), into
        assert not bool(scratch.isnan().all())  # written
        for f in ("mean", "codes", "scales", "zeros", "transform", "spread"):
            assert torch.equal(getattr(plain, f), getattr(sub, f)), (room, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("blocks, cache_bytes", [("layer", None), ("size:40", None), ("size:40", 0)])
def test_candidates_read_in_place_give_the_stacked_basis(tmp_path, monkeypatch, dtype, blocks, cache_bytes):
    """From checkpoint files the C kernels read each candidate's tensor where the reader put it (memory maps:
    ``Rows``, no [K, n] stack); the subspace is bit for bit the one built from the stacked tensors with the same
    kernels, in one read or two."""
    from safetensors.torch import save_file

    import twamerge
    from twamerge import subspace
    from twamerge.kernels import layout as kernel_layout

    stacks = {n: s.to(dtype) for n, s in _candidates(shapes=((7, 3), (11,), (4, 4, 2), (30,), (5, 5))).items()}
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({n: s[i].contiguous() for n, s in stacks.items()}, paths[-1])
    made = []
    real_rows = kernel_layout.Rows.__init__
    monkeypatch.setattr(subspace.Rows, "__init__", lambda self, rows: made.append(1) or real_rows(self, rows))
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    with twamerge.open_checkpoints(paths) as cs:
        layout = make_layout(cs.keys, [cs.shape(n) for n in cs.keys], blocks, 8)
        in_place = build_subspace(cs, layout, bits=4, backend="native", **kw)
        assert made  # the kernels were given the candidates' own tensors
        monkeypatch.setattr(subspace._Build, "_in_place", lambda self, dtype: False)
        made.clear()
        stacked = build_subspace(cs, layout, bits=4, backend="native", scratch=torch.empty(layout.n_cols), **kw)
        assert not made
    for f in ("mean", "codes", "scales", "zeros", "transform", "spread"):
        assert torch.equal(getattr(in_place, f), getattr(stacked, f)), f


def test_the_torch_and_c_builds_agree():
    """The two CPU backends: the same mean, the same Gram runs summed in another order (float32 rounding), so
    transforms within 1e-5 and codes at most one step apart."""
    stacks = _candidates(shapes=((7, 300), (11,), (40, 40)))
    layout = make_layout(list(stacks), [s.shape[1:] for s in stacks.values()], "layer", 8)
    subs = [build_subspace(StackedCandidates(stacks), layout, bits=8, backend=b) for b in ("torch", "native")]
    assert torch.equal(subs[0].mean, subs[1].mean)
    assert_close("transform", subs[0].transform, subs[1].transform, atol=1e-5 * float(subs[0].transform.abs().max()))
    assert int((subs[0].codes.int() - subs[1].codes.int()).abs().max()) <= 1
