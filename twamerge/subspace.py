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

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch

from .distributed import Comm, SingleProcess, split_columns
from .kernels import dispatch
from .kernels.layout import FLOAT_BITS, INPUT_DTYPES, Rows, codes_shape, stacked, storage_dtype
from .kernels.reference import GRAM_RUN

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


def make_layout(names: Sequence[str], shapes: Sequence[tuple[int, ...]], blocks: str, group_size: int,
                pad_tensors: bool = False) -> FlatLayout:
    """Group tensors (in the given order) into blocks and place them in a padded flat space.

    Args:
        blocks: ``global`` (one block), ``layer`` (one per tensor) or ``size:N`` (consecutive tensors
            until a block holds at least N elements).
        pad_tensors: start every tensor, not only every block, at a whole quantization group (a sharded
            model's layout: a rank's rows of a tensor widened to whole groups then stay inside that tensor,
            see :class:`Columns`). The same as without it for ``layer`` blocks.
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
        elif pad_tensors:
            cursor = -(-cursor // group_size) * group_size
        offsets.append(cursor)
        block_of.append(len(starts) - 1)
        n = math.prod(shape)
        cursor += n
        in_block += n
    if starts:
        close_block()
    return FlatLayout(list(names), [tuple(s) for s in shapes], offsets, block_of, ends, group_size)


@dataclass(frozen=True)
class Columns:
    """The flat columns one rank holds of the subspace: its mean and basis columns, and those it owns.

    ``spans`` are the columns stored, group-aligned ranges of the flat space in increasing order, laid
    end to end in this rank's local space (its ``mean`` and basis). ``owned`` are the columns whose
    Gram terms and gradient this rank adds: every real column is owned by exactly one rank, inside
    its spans. A replicated model (``distributed.split_columns``) gives a rank one contiguous range,
    stored and owned. A sharded model (``twamerge.sharding``) gives it its rows of every parameter,
    owned, stored widened to whole quantization groups: a group cut by a shard boundary is stored on
    both ranks and quantized by each exactly as one process quantizes it, and neither adds the
    other's columns. One process: ``Columns.contiguous(0, D)``.
    """

    spans: tuple[tuple[int, int], ...]
    owned: tuple[tuple[int, int], ...]

    @classmethod
    def contiguous(cls, lo: int, hi: int) -> Columns:
        part = ((lo, hi),) if hi > lo else ()
        return cls(part, part)

    @property
    def n_local(self) -> int:
        return sum(b - a for a, b in self.spans)

    def starts(self) -> list[int]:
        """Where each span begins in the local space."""
        out, at = [], 0
        for a, b in self.spans:
            out.append(at)
            at += b - a
        return out

    def local(self, col: int) -> int:
        """The local index of the stored flat column ``col``."""
        for (a, b), start in zip(self.spans, self.starts()):
            if a <= col < b:
                return start + col - a
        raise ValueError(f"flat column {col} is not held by this rank ({self.spans})")

    def within(self, lo: int, hi: int, owned: bool = False) -> list[tuple[int, int]]:
        """The stored (or ``owned``) columns inside the flat range ``[lo, hi)``."""
        ranges = self.owned if owned else self.spans
        return [(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)]

    def group_block(self, layout: FlatLayout) -> torch.Tensor:
        """The block of every stored quantization group, in local order."""
        every, g = layout.group_block(), layout.group_size
        parts = [every[a // g: b // g] for a, b in self.spans]
        return torch.cat(parts).contiguous() if parts else torch.empty(0, dtype=torch.int32)


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
    # The columns held when they are not one range (a sharded model's rank: ``Columns``); None: ``col_range``.
    columns: Columns | None = None
    group_block: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        group_block = self.layout.group_block()
        if self.columns is not None:
            group_block = self.columns.group_block(self.layout)
        elif self.col_range is not None:
            g = self.layout.group_size
            group_block = group_block[self.col_range[0] // g: self.col_range[1] // g].contiguous()
        self.group_block = group_block.to(self.mean.device)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def dropped(self) -> list[int]:
        return [self.n_candidates - 1 - r for r in self.ranks]

    def restricted(self, columns: Columns) -> Subspace:
        """The part of a whole subspace (one process's) that a rank holding ``columns`` builds (tests, benchmarks:
        the same basis on every rank, to compare a sharded step with one process's without the rounding of a
        Gram matrix summed over ranks)."""
        if self.col_range not in (None, (0, self.layout.n_cols)) or self.columns is not None:
            raise ValueError("restricted() takes the whole subspace of one process")
        g, bits, spans = self.layout.group_size, self.bits, columns.spans
        width = 1 if bits in FLOAT_BITS else bits / 8

        def cat(t: torch.Tensor, scale: float) -> torch.Tensor:
            parts = [t[..., int(a * scale): int(b * scale)] for a, b in spans]
            return torch.cat(parts, dim=-1).contiguous() if parts else t[..., :0].contiguous()

        groups = 0 if bits in FLOAT_BITS else 1 / g
        return Subspace(self.layout, cat(self.mean, 1), cat(self.codes, width), cat(self.scales, groups),
                        cat(self.zeros, groups), self.transform, self.ranks, self.spread, bits, self.n_candidates,
                        self.backend, None, columns)

    def basis_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def combine(self, beta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = mean + P~^T beta`` over the held columns (all of them unless ``col_range``); beta [B, R] float32."""
        if out.numel() == 0:
            return out
        return dispatch.combine(self.mean, self.codes, self.scales, self.zeros, beta, self.group_block,
                               self.bits, self.layout.group_size, out, backend=self.backend)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """``P~ grad`` per block -> [B, R] float32 (over the held columns: a partial sum under ``col_range``)."""
        if grad.numel() == 0:
            return torch.zeros(self.layout.n_blocks, self.rows, dtype=torch.float32, device=grad.device)
        return dispatch.project(grad, self.codes, self.scales, self.zeros, self.group_block,
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

    def beta_of(self, weights: Sequence[float]) -> torch.Tensor:
        """Coordinates ``beta`` [B, R] float64 of the point whose alphas are ``weights`` in every block
        (``combine`` makes it: every candidate, and every average of them, is a point of the subspace).

        With ``t = a - 1/K`` the offsets of the wanted weights ``a`` from uniform, ``beta_b`` solves
        ``T_b^T beta_b = t`` in the least-squares sense (exact unless the point leaves the subspace, e.g.
        a duplicate candidate whose direction was dropped). The uniform weights are the subspace's
        centre, ``beta = 0``, with nothing to solve.
        """
        target = torch.tensor(weights, dtype=torch.float64) - 1.0 / self.n_candidates
        if not bool(target.any()):
            return torch.zeros(self.layout.n_blocks, self.rows, dtype=torch.float64)
        return torch.stack([torch.linalg.pinv(t.T) @ target for t in self.transform])  # [B, R]

    def theta_of(self, weights: Sequence[float], coordinates: str) -> torch.Tensor:
        """Trained coordinates ``theta`` [B, R] float32 of the point whose alphas are ``weights`` in every block:
        ``theta = beta_of(weights) / step_scale(coordinates)`` (0 at the centre)."""
        beta = self.beta_of(weights)
        if not bool(beta.any()):
            return torch.zeros(self.layout.n_blocks, self.rows)
        scale = self.step_scale(coordinates)
        theta = torch.where(scale > 0, beta / scale.clamp_min(1e-300), torch.zeros_like(beta))
        return theta.float()

    def quantization_gap(self, written: torch.Tensor, trained: torch.Tensor, comm: Comm) -> float:
        """``|written - trained| / |trained - centre|`` over the merged tensors (padding excluded).

        ``written`` holds the merge as written, all columns (the fit's flat buffer); ``trained``, like
        ``mean``, this object's columns (a rank's, in a distributed fit), whose squared sums are added
        over ranks. Sums run tensor by tensor, in pieces of ``_GAP_PIECE`` elements: the float64
        temporaries of a whole tensor would add 20 bytes per element of the largest one to the peak.
        """
        layout, mean = self.layout, self.mean
        c0, c1 = self.col_range or (0, layout.n_cols)
        sq = torch.zeros(2, dtype=torch.float64, device=mean.device)
        error = None
        try:
            for i, o in enumerate(layout.offsets):
                lo, hi = max(o, c0), min(o + layout.numel(i), c1)
                for a in range(lo, hi, _GAP_PIECE):
                    z = min(hi, a + _GAP_PIECE)
                    real, ref, centre = written[a:z], trained[a - c0:z - c0], mean[a - c0:z - c0]
                    sq += torch.stack([(real - ref).double().square().sum(), (ref - centre).double().square().sum()])
        except Exception as exc:
            error = exc
        gap2, moved2 = comm.sum(sq.cpu(), error).tolist()
        return math.sqrt(gap2) / math.sqrt(moved2) if moved2 > 0 else 0.0


_GAP_PIECE = 1 << 20


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
    columns: Columns | None = None,
    scratch: torch.Tensor | None = None,
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
        columns: the columns this rank holds when they are not its ``split_columns`` range (a sharded
            model's rank, :class:`Columns`): it reads, stores and quantizes ``columns.spans`` and adds
            the Gram terms of ``columns.owned`` only.
        scratch: a buffer the caller does not need during the build (the fit's gradient buffer), whose
            contents the build overwrites: each tensor's K copies are stacked into it instead of a fresh
            ``[K, n]`` tensor per read (see :class:`_Scratch`), when ``candidates`` take ``out=``. Unused
            where the C kernels read the candidates in place (a ``CheckpointSet`` of float32 or bfloat16
            tensors on CPU: each candidate's tensor as the reader maps it, K pointers, no stack).
    """
    build = _Build(candidates, layout, comm or SingleProcess(), torch.device(device), bits=bits, backend=backend,
                   rank_rtol=rank_rtol, check_finite=check_finite, columns=columns, scratch=scratch)
    progress = progress or (lambda it: it)
    reread = build.first_pass(progress, cache_bytes)
    build.second_pass(reread, progress)
    return build.result()


class _Build:
    """One :func:`build_subspace` call: the buffers it fills (mean, basis, Gram matrices, transforms) and its
    steps as methods: the first pass (Gram matrices, and the basis of the blocks held in memory), the sum
    over ranks, the second pass over the blocks read again, and the result."""

    def __init__(self, candidates: CandidateColumns, layout: FlatLayout, comm: Comm, device: torch.device, *,
                 bits: int, backend: str | None, rank_rtol: float, check_finite: bool, columns: Columns | None = None,
                 scratch: torch.Tensor | None = None):
        self.candidates, self.layout, self.comm, self.device, self.backend = candidates, layout, comm, device, backend
        takes_out = "out" in inspect.signature(candidates.stack_slice).parameters
        self.scratch = _Scratch(scratch if takes_out else None)
        self.rank_rtol, self.check_finite = rank_rtol, check_finite
        self.k = k = len(candidates)
        self.col_range: tuple[int, int] | None = None
        if columns is None:
            _, ranges = split_columns(layout.n_cols, layout.group_size, comm.world_size)
            self.col_range = ranges[comm.rank]
            columns = Columns.contiguous(*self.col_range)
        self.cols = columns
        index_of = {name: i for i, name in enumerate(layout.names)}
        self.members = [[index_of[n] for n in names] for names in layout.block_names()]
        # Every rank allocates K - 1 rows (the most a block can have); trimmed to the largest rank at the end.
        self.rows = max(1, k - 1)
        n_cols = columns.n_local
        n_groups = 0 if bits in FLOAT_BITS else n_cols // layout.group_size
        self.bits = bits
        self.mean = torch.zeros(n_cols, dtype=torch.float32, device=device)
        self.codes = torch.empty(codes_shape(self.rows, n_cols, bits), dtype=storage_dtype(bits), device=device)
        self.scales = torch.empty(self.rows, n_groups, dtype=torch.float32, device=device)
        self.zeros = torch.empty(self.rows, n_groups, dtype=torch.float32, device=device)
        self.grams = torch.zeros(layout.n_blocks, k, k, dtype=torch.float64)
        self.transform = torch.zeros(layout.n_blocks, self.rows, k, dtype=torch.float64)
        self.ranks = [0] * layout.n_blocks
        self.spreads = [0.0] * layout.n_blocks
        self.basis = _BasisWriter(layout, self.codes, self.scales, self.zeros, self.mean, bits, columns,
                                  lambda i: layout.offsets[i] + self.loaded(i)[0], backend)
        self._last: dict[int, torch.Tensor | Rows] = {}  # the tensor read last in the second pass
        self._rows_ok: dict[torch.dtype, bool] = {}
        # Longest float32 run of the Gram's partial products: it divides the group size, so runs never cross a group.
        self.gram_run = math.gcd(GRAM_RUN, layout.group_size)

    def loaded(self, i: int) -> tuple[int, int]:
        """The part ``[lo, hi)`` of tensor ``i`` (flattened) in this rank's stored columns; empty when lo >= hi.

        A tensor meets at most one span: a replicated model's rank holds one range, and a sharded model's
        rank one range of every tensor, which its layout (``make_layout(pad_tensors=True)``) keeps
        inside the tensor's own groups."""
        o0 = self.layout.offsets[i]
        parts = self.cols.within(o0, o0 + self.layout.numel(i))
        if len(parts) > 1:
            raise AssertionError(f"tensor {self.layout.names[i]} meets {len(parts)} spans of this rank's columns")
        return (parts[0][0] - o0, parts[0][1] - o0) if parts else (0, 0)

    def load(self, i: int) -> torch.Tensor | Rows:
        """This rank's columns of tensor ``i`` in every candidate, [K, n] on the device: the K tensors as the
        reader returns them (memory maps of the files) when the C kernels read them in place, else stacked."""
        lo, hi = self.loaded(i)
        name = self.layout.names[i]
        dtype = _dtype_of(self.candidates, name)
        if self._in_place(dtype):
            whole = (lo, hi) == (0, self.layout.numel(i))
            get = self.candidates.get if whole else self.candidates.get_slice
            return Rows([get(j, name, check=False) if whole else get(j, name, lo, hi, check=False)
                         for j in range(self.k)])
        out = self.scratch.take(self.k, hi - lo, dtype)
        x = self.candidates.stack_slice(name, lo, hi, **({} if out is None else {"out": out}))
        return _as_compute(x).reshape(self.k, -1).to(self.device)

    def _in_place(self, dtype: torch.dtype) -> bool:
        """Whether tensors of ``dtype`` go to the kernels unstacked: a reader that hands out each candidate's
        tensor (``CheckpointSet.get``) and the C kernels for both passes."""
        if dtype not in self._rows_ok:
            self._rows_ok[dtype] = (
                self.device.type == "cpu" and callable(getattr(self.candidates, "get", None))
                and callable(getattr(self.candidates, "get_slice", None))
                and all(dispatch.resolve(op, self.device, self.backend, k=self.k, group_size=self.layout.group_size,
                                         bits=self.bits, dtype=dtype) == "native" for op in ("gram", "orth_quantize")))
        return self._rows_ok[dtype]

    def block_bytes(self, b: int) -> int:
        """Bytes of block ``b``'s columns on this rank, all candidates, as they are computed on."""
        total = 0
        for i in self.members[b]:
            lo, hi = self.loaded(i)
            dtype = _dtype_of(self.candidates, self.layout.names[i])
            total += self.k * max(0, hi - lo) * (dtype.itemsize if dtype in INPUT_DTYPES else 4)
        return total

    def gram_pass(self, b: int, keep: bool) -> dict[int, torch.Tensor]:
        """Add block ``b``'s tensors to its Gram matrix and write their mean; returns the tensors read when ``keep``."""
        held: dict[int, torch.Tensor] = {}
        self.scratch.reset()  # the previous block's tensors are done with
        for i in self.members[b]:
            lo, hi = self.loaded(i)
            if lo >= hi:
                continue
            if not keep:
                self.scratch.reset()  # nothing read before in this block is used again
            x = self.load(i)
            start = self.layout.offsets[i] + lo  # the flat column of x's first column
            owned = self.cols.within(start, start + x.shape[1], owned=True)
            # Stored columns another rank owns (a shard boundary inside a group) give their mean, not Gram terms.
            cuts = sorted({start, start + x.shape[1], *(c for piece in owned for c in piece)})
            for a, z in zip(cuts, cuts[1:]):
                part = x[:, a - start: z - start]
                # The Gram's float32 runs are fixed by the parameter (its element a - offset, its rows, whole
                # groups), and ranks cut it only at row or group boundaries, so N ranks' partials are one process's.
                gram, m = dispatch.gram(part, a - self.layout.offsets[i], self.row_length(i), self.gram_run,
                                        backend=self.backend)
                if (a, z) in owned:
                    gram = gram.cpu()
                    if self.check_finite and not bool(torch.isfinite(gram).all()):
                        gram = _locate_nonfinite(self.candidates, self.layout.names[i], part, self.k)
                    self.grams[b] += gram
                o = self.cols.local(a)
                self.mean[o:o + z - a] = m
            if keep:
                held[i] = x
        return held

    def row_length(self, i: int) -> int:
        """Elements per row (along dim 0, where a sharded model's ranks cut) of tensor ``i``."""
        shape = self.layout.shapes[i]
        return max(1, math.prod(shape[1:])) if shape and shape[0] else 1

    def finish(self, b: int) -> None:
        """Block ``b``'s rank, spread and transform from its (complete) Gram matrix."""
        if not bool(torch.isfinite(self.grams[b]).all()):
            from .errors import NonFiniteError

            names = self.layout.block_names()[b]
            raise NonFiniteError(
                f"the candidates hold NaN/Inf in block {b} ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}): no subspace can be built through them; "
                "drop that checkpoint"
            )
        self.ranks[b], self.spreads[b], t = _transform(self.grams[b], self.k, self.rank_rtol)
        self.transform[b, : t.shape[0]] = t

    def first_pass(self, progress: Callable[[Iterable], Iterable], cache_bytes: int) -> list[int]:
        """Read every block once for its Gram matrix; finish the blocks held in memory. Returns the blocks to
        read again (all of them on several ranks, whose Gram matrices are complete only once summed)."""
        whole = self.comm.world_size == 1  # one rank: a block's Gram matrix is complete after its read
        reread: list[int] = []
        error: BaseException | None = None
        try:
            for b in progress(range(self.layout.n_blocks)):
                keep = whole and (len(self.members[b]) == 1 or self.block_bytes(b) <= cache_bytes)
                held = self.gram_pass(b, keep)
                if keep:
                    self.finish(b)
                    self.basis.write_block(b, self.transform[b], held.__getitem__)
                else:
                    reread.append(b)
                del held
        except (Exception, KeyboardInterrupt) as exc:
            error = exc
        # The ranks' partial Gram matrices add up to the global ones; a failure on any rank raises on all.
        self.grams = self.comm.sum(self.grams, error)
        return reread

    def second_pass(self, blocks: list[int], progress: Callable[[Iterable], Iterable]) -> None:
        """Finish ``blocks`` and write their basis, reading their tensors again (each held while it is used)."""
        for b in progress(blocks):
            self.finish(b)
            self.basis.write_block(b, self.transform[b], self._read_again)
        self._last.clear()

    def _read_again(self, i: int) -> torch.Tensor | Rows:
        if i not in self._last:
            self._last.clear()
            self.scratch.reset()
            self._last[i] = self.load(i)
        return self._last[i]

    def result(self) -> Subspace:
        """The subspace, its rows trimmed to the largest rank of any block."""
        k, n_blocks = self.k, self.layout.n_blocks
        dropped = sum(k - 1 - r for r in self.ranks)
        if dropped:
            log.warning("%d of %d directions dropped as duplicate or collinear (rank_rtol=%g)",
                        dropped, (k - 1) * n_blocks, self.rank_rtol)
        codes, scales, zeros, transform = self.codes, self.scales, self.zeros, self.transform
        used = max(1, max(self.ranks, default=0))
        if used < self.rows:
            # Rows past every block's rank hold zeros: drop them (rare: duplicates or collinear candidates).
            codes, scales, zeros = codes[:used].clone(), scales[:used].clone(), zeros[:used].clone()
            transform = transform[:, :used].contiguous()
        return Subspace(self.layout, self.mean, codes, scales, zeros, transform, self.ranks,
                        torch.tensor(self.spreads, dtype=torch.float64), self.bits, k, self.backend, self.col_range,
                        None if self.col_range is not None else self.cols)


class _Scratch:
    """Room to stack each tensor's K copies in, handed out piece by piece from a buffer the build may overwrite.

    A fresh ``[K, n]`` tensor per read costs its page faults and zeroing, 2-3x the copy itself, and holds K
    copies of the largest tensor above the fit's own memory (2.9 bytes per parameter for an MLP of 12
    equal layers at K = 8: the peak RSS's excess over the method's floor). Taken from the fit's gradient
    buffer, idle until training, it costs neither. ``take`` hands out consecutive pieces until ``reset``;
    None when a piece does not fit (or there is no buffer): the read then allocates its own.
    """

    def __init__(self, buffer: torch.Tensor | None):
        self.bytes = None if buffer is None else buffer.reshape(-1).view(torch.uint8)
        self.used = 0

    def take(self, k: int, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.bytes is None:
            return None
        start = -(-self.used // 64) * 64  # every piece aligned for any dtype
        nbytes = k * n * dtype.itemsize
        if start + nbytes > self.bytes.numel():
            return None
        self.used = start + nbytes
        return self.bytes[start:start + nbytes].view(dtype).view(k, n)

    def reset(self) -> None:
        self.used = 0


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
    x = stacked(x).double()
    centred = x - x.mean(dim=0)
    return (centred @ centred.T).cpu()


class _BasisWriter:
    """Writes a block's quantized basis rows window by window (whole groups), reading candidate columns
    straight from the tensors where a window lies inside one tensor, through a staging buffer where a
    window holds tensor boundaries or the block's padding."""

    def __init__(self, layout, codes, scales, zeros, mean, bits, cols: Columns, first: Callable[[int], int],
                 backend):
        # ``first(i)``: the flat column of the first column of tensor ``i`` that ``source(i)`` returns.
        self.layout, self.codes, self.scales, self.zeros, self.mean = layout, codes, scales, zeros, mean
        self.bits, self.cols, self.first, self.backend = bits, cols, first, backend
        self.stage: torch.Tensor | None = None

    def windows(self, b: int) -> list[tuple[int, int, int | None]]:
        """``(w0, w1, tensor or None)`` in flat columns: direct runs inside one tensor, staged runs between;
        each inside one span of the stored columns."""
        lay, g = self.layout, self.layout.group_size
        runs = []
        for start, end in self.cols.within(lay.block_starts[b], lay.block_ends[b]):
            cursor = start
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
                base = self.first(direct)
                window = source(direct)[:, w0 - base: w1 - base]
            else:
                window = self._staged(w0, w1, k, members, source)
            l0 = self.cols.local(w0)
            m = self.mean[l0: l0 + w1 - w0]
            dispatch.orth_quantize(window, m, t32, self.bits, g, self._columns(l0, l0 + w1 - w0),
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
            base = self.first(i)
            part = source(i)[:, lo - base: hi - base]
            if isinstance(part, Rows):
                part.stack(out=window[:, lo - w0: hi - w0])
            else:
                window[:, lo - w0: hi - w0] = part
        return window
