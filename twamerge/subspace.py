"""The subspace spanned by the candidates: flat layout, blocks, streaming Gram-Schmidt, quantized basis.

For each block ``b`` with centred directions ``D_b = [c_k - m_b]`` (K x n_b):

1. one streaming pass accumulates ``G_b = D_b D_b^T`` (float64) and the mean ``m``;
2. ``G_b = V diag(lam) V^T``; directions with ``lam <= rank_rtol * lam_max`` are dropped (duplicates,
   collinear candidates, and always the one killed by centring); ``T_b = diag(lam^-1/2) V^T``;
3. a second streaming pass forms ``P_b = T_b D_b`` (orthonormal rows: classical Gram-Schmidt through
   inner products) and quantizes it to ``bits`` in groups of ``group_size`` columns.

In one process a block whose candidates fit in ``CACHE_BYTES`` (every one-tensor block, the default
``layer`` blocks) is read once: steps 1-3 run on the same read before the next block is read.

Every block's columns are padded to a multiple of ``group_size`` in the flat space, so a
quantization group never mixes two blocks (their directions are normalised separately and can
differ in scale by orders of magnitude).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch

from . import kernels
from .distributed import Comm, SingleProcess, split_columns
from .kernels.layout import FLOAT_BITS, INPUT_DTYPES, codes_shape, storage_dtype

log = logging.getLogger(__name__)

# Flat columns staged per orth_quantize call: bounds the temporary to K * WINDOW floats.
WINDOW = 1 << 22


@dataclass
class FlatLayout:
    """Where each merged tensor lives in the flat parameter space and which block it belongs to."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    block_of: list[int]
    block_ends: list[int]  # padded end (multiple of group_size); each block starts where the previous ends
    group_size: int

    @property
    def block_starts(self) -> list[int]:
        return [0, *self.block_ends[:-1]]

    @property
    def n_blocks(self) -> int:
        return len(self.block_ends)

    @property
    def n_cols(self) -> int:
        return self.block_ends[-1] if self.block_ends else 0

    def numel(self, i: int) -> int:
        return math.prod(self.shapes[i])

    @property
    def n_params(self) -> int:
        return sum(self.numel(i) for i in range(len(self.names)))

    def group_block(self) -> torch.Tensor:
        ids = [torch.full(((e - s) // self.group_size,), b, dtype=torch.int32)
               for b, (s, e) in enumerate(zip(self.block_starts, self.block_ends))]
        return torch.cat(ids) if ids else torch.empty(0, dtype=torch.int32)

    def block_names(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(self.n_blocks)]
        for name, b in zip(self.names, self.block_of):
            out[b].append(name)
        return out


def make_layout(names: Sequence[str], shapes: Sequence[tuple[int, ...]], blocks: str, group_size: int) -> FlatLayout:
    """Group tensors (in the given order) into blocks and place them in a padded flat space.

    Args:
        blocks: ``global`` (one block), ``layer`` (one per tensor) or ``size:N`` (consecutive tensors
            until a block holds at least N elements).
    """
    if blocks == "global":
        threshold = math.inf
    elif blocks == "layer":
        threshold = 1
    else:
        threshold = int(blocks.split(":", 1)[1])
    offsets, block_of, starts, ends = [], [], [], []
    cursor = 0
    in_block = 0

    def close_block() -> None:
        nonlocal cursor, in_block
        end = -(-cursor // group_size) * group_size
        ends.append(end)
        cursor = end
        in_block = 0

    for shape in shapes:
        if not starts or in_block >= threshold:
            if starts:
                close_block()
            starts.append(cursor)
        offsets.append(cursor)
        block_of.append(len(starts) - 1)
        n = math.prod(shape)
        cursor += n
        in_block += n
    if starts:
        close_block()
    return FlatLayout(list(names), [tuple(s) for s in shapes], offsets, block_of, ends, group_size)


@dataclass
class Subspace:
    """Mean, quantized orthonormal basis and per-block transforms of the candidates.

    Shapes: ``mean`` [D] float32; ``codes``/``scales``/``zeros`` per ``kernels.layout`` with R rows;
    ``transform`` [B, R, K] float64 (zero rows past a block's rank); ``ranks`` [B]; ``spread`` [B]
    float64, the RMS distance of the candidates from their mean in each block.
    """

    layout: FlatLayout
    mean: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    transform: torch.Tensor
    ranks: list[int]
    spread: torch.Tensor
    bits: int
    n_candidates: int
    backend: str | None = None
    # The flat columns ``[start, end)`` this object holds (a rank's slice in a distributed fit); None: all.
    col_range: tuple[int, int] | None = None
    group_block: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        group_block = self.layout.group_block()
        if self.col_range is not None:
            g = self.layout.group_size
            group_block = group_block[self.col_range[0] // g: self.col_range[1] // g].contiguous()
        self.group_block = group_block.to(self.mean.device)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def dropped(self) -> list[int]:
        return [self.n_candidates - 1 - r for r in self.ranks]

    def basis_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def combine(self, beta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = mean + P~^T beta`` over the held columns (all of them unless ``col_range``); beta [B, R] float32."""
        if out.numel() == 0:
            return out
        return kernels.combine(self.mean, self.codes, self.scales, self.zeros, beta, self.group_block,
                               self.bits, self.layout.group_size, out, backend=self.backend)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """``P~ grad`` per block -> [B, R] float32 (over the held columns: a partial sum under ``col_range``)."""
        if grad.numel() == 0:
            return torch.zeros(self.layout.n_blocks, self.rows, dtype=torch.float32, device=grad.device)
        return kernels.project(grad, self.codes, self.scales, self.zeros, self.group_block,
                               self.layout.n_blocks, self.bits, self.layout.group_size, backend=self.backend)

    def step_scale(self, coordinates: str) -> torch.Tensor:
        """Units of the trained coordinates, [B, R] float64, ``beta = theta * step_scale`` (0 past a block's rank).

        ``weights``: every direction of a block in units of the block's spread, isotropic in weight
        space (the paper's parametrization). ``candidates``: direction ``i`` in units of the
        candidates' own spread along it, ``sqrt(lam_i / K)``; a unit step then changes the alphas by
        about one, whatever the eigenvalue, so near-degenerate directions (small tensors such as
        biases) cannot swing the alphas to extremes. Both are scale-free.
        """
        norms = self.transform.norm(dim=2)  # ||T_b[i]|| = lam_i ** -0.5, 0 on padded rows
        live = norms > 0
        if coordinates == "weights":
            return torch.where(live, self.spread.unsqueeze(1).expand_as(norms), torch.zeros_like(norms))
        return torch.where(live, 1.0 / (norms.clamp_min(1e-300) * math.sqrt(self.n_candidates)),
                           torch.zeros_like(norms))

    def alphas(self, beta: torch.Tensor) -> torch.Tensor:
        """Coefficients on the candidates per block, [B, K] float64, each row summing to 1.

        ``t_b = T_b^T beta_b`` and ``alpha_b = 1/K + t_b - mean(t_b)``: the weights whose combination
        of the original checkpoints equals the point ``m_b + P_b^T beta_b`` of the exact basis.
        """
        t = torch.einsum("brk,br->bk", self.transform, beta.double().cpu())
        k = self.n_candidates
        return 1.0 / k + t - t.mean(dim=1, keepdim=True)


def _as_compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in INPUT_DTYPES else x.float()


class CandidateColumns(Protocol):
    """What the subspace passes read: ``K`` candidates, one flattened tensor slice at a time.

    ``stack_slice(name, lo, hi)`` returns elements ``[lo, hi)`` of the flattened tensor ``name`` in
    every candidate, ``[K, hi - lo]`` in the stored dtype. A ``CheckpointSet`` reads just those
    bytes from safetensors files, which is how a rank of a distributed fit reads only its columns.
    """

    def __len__(self) -> int: ...

    def stack_slice(self, name: str, lo: int, hi: int) -> torch.Tensor: ...


class StackedCandidates:
    """Candidates already in memory, ``{name: [K, *shape]}`` (tests, benchmarks, library users)."""

    def __init__(self, stacks: dict[str, torch.Tensor]):
        self.stacks = stacks
        self.k = len(next(iter(stacks.values()))) if stacks else 0

    def __len__(self) -> int:
        return self.k

    def stack_slice(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self.stacks[name].reshape(self.k, -1)[:, lo:hi]


# Candidate bytes a block may hold in memory between the Gram pass and the basis pass, so that block
# is read once instead of twice (single process). A block of one tensor is always held: the
# reader returns that whole tensor anyway.
CACHE_BYTES = 1 << 30


def build_subspace(
    candidates: CandidateColumns,
    layout: FlatLayout,
    *,
    bits: int,
    comm: Comm | None = None,
    rank_rtol: float = 1e-5,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    check_finite: bool = True,
    cache_bytes: int = CACHE_BYTES,
) -> Subspace:
    """Mean, Gram matrices and quantized basis, reading the candidates one tensor at a time.

    In one process, each block is read once when its candidates fit in ``cache_bytes`` (always for
    a block of one tensor, the default ``layer`` blocks): its Gram matrix, transform and quantized
    basis are made from the same read. Larger blocks, and every block of a distributed fit (whose
    Gram matrices are summed over the ranks first), are read a second time for the basis.

    Args:
        candidates: the K candidates (:class:`CandidateColumns`).
        layout: from :func:`make_layout`.
        bits: basis storage (1, 2, 4, 8 packed; 16, 32 float).
        comm: the ranks (default: one process). Rank ``r`` builds only its flat columns
            (``distributed.split_columns``): Gram matrices are additive over columns, so the ranks'
            partial Grams, summed, are the global ones; ``mean`` and the basis cover the slice only.
            A failure on any rank while reading raises on every rank after the first pass.
        rank_rtol: eigenvalues of a block's Gram matrix at or below ``rank_rtol * max`` are dropped.
        device: where the basis and mean live (the fit device).
        check_finite: raise :class:`~twamerge.errors.NonFiniteError` naming the tensor (and the
            candidate, and its file when ``candidates`` has ``paths``) when a tensor holds NaN/Inf.
            The check reads nothing extra: any NaN/Inf makes that tensor's Gram matrix non-finite,
            and only then are its values scanned to name the culprit; so the readers do not scan
            (``CheckpointSet.stack_slice``). ``False`` (``--allow-nonfinite``) does not look for them.
        cache_bytes: the most candidate bytes held to read a multi-tensor block once.
    """
    device = torch.device(device)
    comm = comm or SingleProcess()
    k, g = len(candidates), layout.group_size
    progress = progress or (lambda it: it)
    _, ranges = split_columns(layout.n_cols, g, comm.world_size)
    c0, c1 = ranges[comm.rank]
    load_slice = candidates.stack_slice
    by_block = layout.block_names()
    index_of = {name: i for i, name in enumerate(layout.names)}
    members = [[index_of[n] for n in names] for names in by_block]
    single = comm.world_size == 1

    def owned(i: int) -> tuple[int, int]:
        """The part ``[lo, hi)`` of tensor ``i`` (flattened) that falls in ``[c0, c1)``; empty when lo >= hi."""
        o0 = layout.offsets[i]
        return max(o0, c0) - o0, min(o0 + layout.numel(i), c1) - o0

    def load(i: int) -> torch.Tensor:
        lo, hi = owned(i)
        return _as_compute(load_slice(layout.names[i], lo, hi)).reshape(k, -1).to(device)

    def itemsize(i: int) -> int:
        dtype = _dtype_of(candidates, layout.names[i])
        return dtype.itemsize if dtype in INPUT_DTYPES else 4

    # Every rank allocates K - 1 rows (the most a block can have); trimmed to the largest rank at the end.
    rows = max(1, k - 1)
    n_cols = c1 - c0
    n_groups = 0 if bits in FLOAT_BITS else n_cols // g
    mean = torch.zeros(n_cols, dtype=torch.float32, device=device)
    codes = torch.empty(codes_shape(rows, n_cols, bits), dtype=storage_dtype(bits), device=device)
    scales = torch.empty(rows, n_groups, dtype=torch.float32, device=device)
    zeros = torch.empty(rows, n_groups, dtype=torch.float32, device=device)
    grams = torch.zeros(layout.n_blocks, k, k, dtype=torch.float64)
    transform = torch.zeros(layout.n_blocks, rows, k, dtype=torch.float64)
    ranks = [0] * layout.n_blocks
    spreads = [0.0] * layout.n_blocks
    basis = _BasisWriter(layout, codes, scales, zeros, mean, bits, c0, c1, backend)

    def finish(b: int) -> None:
        if not bool(torch.isfinite(grams[b]).all()):
            from .errors import NonFiniteError

            raise NonFiniteError(
                f"the candidates hold NaN/Inf in block {b} ({', '.join(by_block[b][:3])}"
                f"{', ...' if len(by_block[b]) > 3 else ''}): no subspace can be built through them; "
                "drop that checkpoint"
            )
        ranks[b], spreads[b], t = _transform(grams[b], k, rank_rtol)
        transform[b, : t.shape[0]] = t

    def gram_pass(b: int, keep: bool) -> dict[int, torch.Tensor]:
        held: dict[int, torch.Tensor] = {}
        for i in members[b]:
            lo, hi = owned(i)
            if lo >= hi:
                continue
            x = load(i)
            gram, m = kernels.gram(x, backend=backend)
            gram = gram.cpu()
            if check_finite and not bool(torch.isfinite(gram).all()):
                gram = _locate_nonfinite(candidates, layout.names[i], x, k)
            grams[b] += gram
            o = layout.offsets[i] + lo - c0
            mean[o:o + x.shape[1]] = m
            if keep:
                held[i] = x
        return held

    reread: list[int] = []
    error: BaseException | None = None
    try:
        for b in progress(range(layout.n_blocks)):
            held_bytes = sum(k * max(0, owned(i)[1] - owned(i)[0]) * itemsize(i) for i in members[b])
            keep = single and (len(members[b]) == 1 or held_bytes <= cache_bytes)
            held = gram_pass(b, keep)
            if keep:
                finish(b)
                basis.write_block(b, transform[b], held.__getitem__)
            else:
                reread.append(b)
            del held
    except (Exception, KeyboardInterrupt) as exc:
        error = exc
    if not single:
        grams = comm.sum(grams, error)
    elif error is not None:
        raise error
    cache: dict[int, torch.Tensor] = {}

    def source(i: int) -> torch.Tensor:
        if i not in cache:
            cache.clear()
            cache[i] = load(i)
        return cache[i]

    for b in progress(reread):
        finish(b)
        basis.write_block(b, transform[b], source)
    cache.clear()

    dropped = sum(k - 1 - r for r in ranks)
    if dropped:
        log.warning("%d of %d directions dropped as duplicate or collinear (rank_rtol=%g)",
                    dropped, (k - 1) * layout.n_blocks, rank_rtol)
    used = max(1, max(ranks, default=0))
    if used < rows:
        # Rows past every block's rank hold zeros: drop them (rare: duplicates or collinear candidates).
        codes, scales, zeros = codes[:used].clone(), scales[:used].clone(), zeros[:used].clone()
        transform = transform[:, :used].contiguous()
    return Subspace(layout, mean, codes, scales, zeros, transform, ranks, torch.tensor(spreads, dtype=torch.float64),
                    bits, k, backend, (c0, c1))


def _dtype_of(candidates: CandidateColumns, name: str) -> torch.dtype:
    """Stored dtype of ``name`` when the reader says (``CheckpointSet.dtype``, stacked tensors), else float32."""
    dtype = getattr(candidates, "dtype", None)
    if callable(dtype):
        return dtype(name)
    stacks = getattr(candidates, "stacks", None)
    return stacks[name].dtype if isinstance(stacks, dict) else torch.float32


def _transform(gram: torch.Tensor, k: int, rank_rtol: float) -> tuple[int, float, torch.Tensor]:
    """(rank, spread, T [rank, K]) of a block from its Gram matrix."""
    gram = (gram + gram.T) / 2
    lam, vec = torch.linalg.eigh(gram)
    top = float(lam.max()) if lam.numel() else 0.0
    keep = lam > rank_rtol * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
    t = (vec[:, keep] / lam[keep].sqrt()).T  # [r, K]
    return int(keep.sum()), math.sqrt(max(float(gram.trace()), 0.0) / k), t


def _locate_nonfinite(candidates: CandidateColumns, name: str, x: torch.Tensor, k: int) -> torch.Tensor:
    """A tensor's Gram matrix is not finite: raise NonFiniteError naming the candidate that holds NaN/Inf.

    When every value is finite after all (float32 products of values above about 1e19 overflow), the
    Gram matrix is recomputed in float64 and returned.
    """
    from .errors import NonFiniteError

    paths = getattr(candidates, "paths", None)
    for j in range(k):
        row = x[j].float()
        finite = torch.isfinite(row)
        if not bool(finite.all()):
            n_nan = int(row.isnan().sum())
            n_inf = int((~finite).sum()) - n_nan
            where = f"{paths[j]}" if paths is not None and j < len(paths) else f"candidate {j}"
            raise NonFiniteError(
                f"{where}: tensor {name!r} holds {n_nan} NaN and {n_inf} Inf values; "
                "drop that checkpoint or pass --allow-nonfinite to merge anyway"
            )
    centred = x.double() - x.double().mean(dim=0)
    return (centred @ centred.T).cpu()


class _BasisWriter:
    """Writes a block's quantized basis rows window by window (whole groups), reading candidate columns
    straight from the tensors where a window lies inside one tensor, through a staging buffer where a
    window holds tensor boundaries or the block's padding."""

    def __init__(self, layout, codes, scales, zeros, mean, bits, c0, c1, backend):
        self.layout, self.codes, self.scales, self.zeros, self.mean = layout, codes, scales, zeros, mean
        self.bits, self.c0, self.c1, self.backend = bits, c0, c1, backend
        self.stage: torch.Tensor | None = None

    def windows(self, b: int) -> list[tuple[int, int, int | None]]:
        """``(w0, w1, tensor or None)`` in flat columns: direct runs inside one tensor, staged runs between."""
        lay, g = self.layout, self.layout.group_size
        start, end = max(lay.block_starts[b], self.c0), min(lay.block_ends[b], self.c1)
        if start >= end:
            return []
        runs, cursor = [], start
        for i in (i for i, bb in enumerate(lay.block_of) if bb == b):
            o0, o1 = lay.offsets[i], lay.offsets[i] + lay.numel(i)
            d0, d1 = max(-(-o0 // g) * g, start), min(o1 // g * g, end)
            if d0 >= d1:
                continue
            if cursor < d0:
                runs.append((cursor, d0, None))
            runs.append((d0, d1, i))
            cursor = d1
        if cursor < end:
            runs.append((cursor, end, None))
        out = []
        for r0, r1, i in runs:
            for w0 in range(r0, r1, WINDOW // g * g or g):
                out.append((w0, min(r1, w0 + (WINDOW // g * g or g)), i))
        return out

    def write_block(self, b: int, transform: torch.Tensor, source: Callable[[int], torch.Tensor]) -> None:
        lay, g, k = self.layout, self.layout.group_size, transform.shape[1]
        t32 = transform.float().to(self.mean.device)
        members = [i for i, bb in enumerate(lay.block_of) if bb == b]
        for w0, w1, direct in self.windows(b):
            if direct is not None:
                base = lay.offsets[direct] + max(0, self.c0 - lay.offsets[direct])
                window = source(direct)[:, w0 - base: w1 - base]
            else:
                window = self._staged(w0, w1, k, members, source)
            m = self.mean[w0 - self.c0: w1 - self.c0]
            kernels.orth_quantize(window, m, t32, self.bits, g, self._columns(w0 - self.c0, w1 - self.c0),
                                  backend=self.backend)

    def _columns(self, w0: int, w1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of columns ``[w0, w1)`` of the basis being written."""
        bits, g = self.bits, self.layout.group_size
        if bits in FLOAT_BITS:
            return self.codes[:, w0:w1], self.scales, self.zeros
        return self.codes[:, w0 * bits // 8: w1 * bits // 8], self.scales[:, w0 // g: w1 // g], self.zeros[:, w0 // g: w1 // g]

    def _staged(self, w0, w1, k, members, source) -> torch.Tensor:
        lay = self.layout
        if self.stage is None or self.stage.numel() < k * (w1 - w0):
            self.stage = torch.zeros(k * max(w1 - w0, lay.group_size), dtype=torch.float32, device=self.mean.device)
        window = self.stage[: k * (w1 - w0)].view(k, w1 - w0)
        window.zero_()
        for i in members:
            o0, o1 = lay.offsets[i], lay.offsets[i] + lay.numel(i)
            lo, hi = max(o0, w0), min(o1, w1)
            if lo >= hi:
                continue
            base = o0 + max(0, self.c0 - o0)
            window[:, lo - w0: hi - w0] = source(i)[:, lo - base: hi - base]
        return window
