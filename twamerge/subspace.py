"""The subspace spanned by the candidates: flat layout, blocks, streaming Gram-Schmidt, quantized basis.

For each block ``b`` with centred directions ``D_b = [c_k - m_b]`` (K x n_b):

1. one streaming pass accumulates ``G_b = D_b D_b^T`` (float64) and the mean ``m``;
2. ``G_b = V diag(lam) V^T``; directions with ``lam <= rank_rtol * lam_max`` are dropped (duplicates,
   collinear candidates, and always the one killed by centring); ``T_b = diag(lam^-1/2) V^T``;
3. a second streaming pass forms ``P_b = T_b D_b`` (orthonormal rows: classical Gram-Schmidt through
   inner products) and quantizes it to ``bits`` in groups of ``group_size`` columns.

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
) -> Subspace:
    """Two streaming passes over the candidates, one tensor at a time.

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
    """
    device = torch.device(device)
    comm = comm or SingleProcess()
    k, g = len(candidates), layout.group_size
    progress = progress or (lambda it: it)
    _, ranges = split_columns(layout.n_cols, g, comm.world_size)
    c0, c1 = ranges[comm.rank]
    load_slice = candidates.stack_slice

    def owned(i: int) -> tuple[int, int]:
        """The part ``[lo, hi)`` of tensor ``i`` (flattened) that falls in ``[c0, c1)``; empty when lo >= hi."""
        o0 = layout.offsets[i]
        return max(o0, c0) - o0, min(o0 + layout.numel(i), c1) - o0

    mean = torch.zeros(c1 - c0, dtype=torch.float32, device=device)
    grams = torch.zeros(layout.n_blocks, k, k, dtype=torch.float64)
    error: BaseException | None = None
    try:
        for i in progress(range(len(layout.names))):
            lo, hi = owned(i)
            if lo >= hi:
                continue
            x = _as_compute(load_slice(layout.names[i], lo, hi)).reshape(k, -1).to(device).contiguous()
            gram, m = kernels.gram(x, backend=backend)
            grams[layout.block_of[i]] += gram.cpu()
            o = layout.offsets[i] + lo - c0
            mean[o:o + x.shape[1]] = m
    except (Exception, KeyboardInterrupt) as exc:
        error = exc
    grams = comm.sum(grams, error)

    transforms, ranks, spreads = [], [], []
    for b in range(layout.n_blocks):
        gram = (grams[b] + grams[b].T) / 2
        lam, vec = torch.linalg.eigh(gram)
        top = float(lam.max()) if lam.numel() else 0.0
        keep = lam > rank_rtol * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
        t = (vec[:, keep] / lam[keep].sqrt()).T  # [r, K]
        transforms.append(t)
        ranks.append(int(keep.sum()))
        spreads.append(math.sqrt(max(float(gram.trace()), 0.0) / k))
    rows = max(1, max(ranks, default=0))
    transform = torch.zeros(layout.n_blocks, rows, k, dtype=torch.float64)
    for b, t in enumerate(transforms):
        transform[b, : t.shape[0]] = t
    dropped = sum(k - 1 - r for r in ranks)
    if dropped:
        log.warning("%d of %d directions dropped as duplicate or collinear (rank_rtol=%g)",
                    dropped, (k - 1) * layout.n_blocks, rank_rtol)

    n_cols = c1 - c0
    n_groups = 0 if bits in FLOAT_BITS else n_cols // g
    codes = torch.empty(codes_shape(rows, n_cols, bits), dtype=storage_dtype(bits), device=device)
    scales = torch.empty(rows, n_groups, dtype=torch.float32, device=device)
    zeros = torch.empty(rows, n_groups, dtype=torch.float32, device=device)
    # Whole groups per window: quantization groups and packed code bytes must not straddle two windows.
    width = max(g, min(WINDOW, n_cols) // g * g)
    # One flat staging buffer, viewed as a contiguous [K, w] window of whatever width is needed.
    stage = torch.zeros(k * width, dtype=torch.float32, device=device)
    by_block = layout.block_names()
    index_of = {name: i for i, name in enumerate(layout.names)}
    block_starts = layout.block_starts
    for b in progress(range(layout.n_blocks)):
        t32 = transform[b].float().to(device)
        start, end = max(block_starts[b], c0), min(layout.block_ends[b], c1)
        members = [index_of[n] for n in by_block[b]]
        cache: dict[int, torch.Tensor] = {}
        for w0 in range(start, end, width):
            w1 = min(end, w0 + width)
            window = stage[: k * (w1 - w0)].view(k, w1 - w0)
            window.zero_()
            for i in members:
                o0, o1 = layout.offsets[i], layout.offsets[i] + layout.numel(i)
                lo, hi = max(o0, w0), min(o1, w1)
                if lo >= hi:
                    continue
                # The cache holds this rank's part of tensor i: flattened elements [own_lo, own_hi).
                own_lo, own_hi = owned(i)
                if i not in cache:
                    cache.clear()
                    cache[i] = load_slice(layout.names[i], own_lo, own_hi).reshape(k, -1).to(device)
                base = o0 + own_lo
                window[:, lo - w0: hi - w0] = cache[i][:, lo - base: hi - base]
            c, s, z = kernels.orth_quantize(window, mean[w0 - c0:w1 - c0].contiguous(), t32, bits, g,
                                            backend=backend)
            _store_columns(codes, scales, zeros, c, s, z, bits, g, w0 - c0, w1 - c0)
    return Subspace(layout, mean, codes, scales, zeros, transform, ranks, torch.tensor(spreads, dtype=torch.float64),
                    bits, k, backend, (c0, c1))


def _store_columns(codes, scales, zeros, c, s, z, bits, g, w0, w1) -> None:
    if bits in FLOAT_BITS:
        codes[:, w0:w1] = c
        return
    codes[:, w0 * bits // 8: w1 * bits // 8] = c
    scales[:, w0 // g: w1 // g] = s
    zeros[:, w0 // g: w1 // g] = z
