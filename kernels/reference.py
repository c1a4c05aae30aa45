"""Pure-torch references of the four subspace ops: the CPU path and the oracle for the Triton kernels.

Each function has exactly the signature, output shapes and dtypes of its Triton twin
(``<op>_triton``). Work is done in column chunks into bounded temporaries, so no full float
copy of a packed basis is ever made. See ``layout.py`` for the storage format.
"""

from __future__ import annotations

import math

import torch

from .layout import (
    FLOAT_BITS,
    check_bits,
    check_combine_args,
    check_gram_args,
    check_orth_quantize_args,
    check_orth_quantize_out,
    check_project_args,
    codes_shape,
    storage_dtype,
)

# Elements (rows x columns) of the float32 temporaries of one step: about 1 MiB, so a chunk's
# dequantized codes, centred candidates and basis rows stay in a core's L2 cache between the ops
# that use them; beyond per-group vectors (D / group_size elements), no temporary scales with D.
CHUNK_ELEMS = 1 << 18


# combine and project: elements of the decoded codes per step (1 MiB of float32).
STEP_ELEMS = 1 << 18


def chunk_cols(rows: int, group_size: int, elems: int | None = None) -> int:
    """Columns per step for ``rows``-row temporaries: whole groups, about ``elems`` (default
    ``CHUNK_ELEMS``) elements."""
    elems = CHUNK_ELEMS if elems is None else elems
    return max(group_size, elems // max(rows, 1) // group_size * group_size)


def pack_codes_torch(q: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack codes ``q`` uint8 [R, n] (values < 2**bits) into uint8 [R, n * bits // 8].

    uint8 shifts and ORs only (8-bit codes are the bytes themselves); ``out`` may be a strided view
    (a column slice of a whole basis) that is written in place.
    """
    per_byte = 8 // bits
    rows, n = q.shape
    if out is None:
        out = torch.empty(rows, n // per_byte, dtype=torch.uint8, device=q.device)
    if per_byte == 1:
        return out.copy_(q)
    v = q.view(rows, n // per_byte, per_byte)
    torch.bitwise_or(v[:, :, 0], v[:, :, 1] << bits, out=out)
    for i in range(2, per_byte):
        out |= v[:, :, i] << (i * bits)
    return out


def unpack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes_torch`: uint8 [R, m] -> uint8 [R, m * 8 // bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
    mask = (1 << bits) - 1
    return ((codes.unsqueeze(2) >> shifts) & mask).reshape(codes.shape[0], -1)


def quantize_into(p: torch.Tensor, bits: int, group_size: int, codes: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor) -> None:
    """Quantize a contiguous float32 chunk ``p`` [R, n] into the given (possibly strided) output views.

    ``p`` is overwritten (the codes are computed in place). Packed bits follow layout.py's expressions
    in its order; ``floor`` is the float -> uint8 conversion itself (it truncates, and every value is
    >= 0.5 by then), applied after the clamp, which gives the same code as clamping the floor.
    """
    rows, n = p.shape
    if bits in FLOAT_BITS:
        codes.copy_(p)
        return
    grouped = p.view(rows, n // group_size, group_size)
    # amin and amax apart: torch's fused aminmax over a short inner dimension is about 7x slower than both.
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    levels = float((1 << bits) - 1)
    # A tensor divisor, not a Python float: with a scalar divisor CUDA torch multiplies by the
    # rounded reciprocal, which is off by one ulp for most groups and breaks exact code parity.
    scale = (hi - lo) / torch.full_like(hi, levels)
    inv = torch.where(scale > 0, scale.reciprocal(), 0.0)
    grouped.sub_(lo.unsqueeze(2)).mul_(inv.unsqueeze(2)).add_(0.5).clamp_(0.0, levels)
    if bits == 8:
        codes.copy_(p)  # 8-bit codes are the bytes: one converting copy, no packing
    else:
        pack_codes_torch(p.to(torch.uint8), bits, out=codes)
    scales.copy_(scale)
    zeros.copy_(lo)


def quantize_torch(p: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float32 basis chunk ``p`` [R, n] (n % group_size == 0) into (codes, scales, zeros)."""
    check_bits(bits)
    rows, n = p.shape
    n_groups = 0 if bits in FLOAT_BITS else n // group_size
    codes = torch.empty(codes_shape(rows, n, bits), dtype=storage_dtype(bits), device=p.device)
    scales = torch.empty(rows, n_groups, dtype=torch.float32, device=p.device)
    zeros = torch.empty(rows, n_groups, dtype=torch.float32, device=p.device)
    quantize_into(p.float().contiguous().clone(), bits, group_size, codes, scales, zeros)
    return codes, scales, zeros


def dequantize_torch(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Stored basis (or a column slice of one) -> float32 [R, n]."""
    if bits in FLOAT_BITS:
        return codes.float()
    q = unpack_codes_torch(codes, bits).float()
    rows, n = q.shape
    q = q.view(rows, n // group_size, group_size)
    return (zeros.unsqueeze(2) + scales.unsqueeze(2) * q).view(rows, n)


def codes_to_float(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Codes (or float storage) of a column chunk -> float32 ``out`` [R, n], one converting pass per
    code position in a byte (8-bit and float storage: a single copy)."""
    if bits in FLOAT_BITS or bits == 8:
        return out.copy_(codes)
    per_byte = 8 // bits
    rows, m = codes.shape
    mask = (1 << bits) - 1
    view = out.view(rows, m, per_byte)
    view[:, :, 0].copy_(codes & mask)
    for i in range(1, per_byte - 1):
        view[:, :, i].copy_((codes >> (i * bits)) & mask)
    view[:, :, per_byte - 1].copy_(codes >> ((per_byte - 1) * bits))
    return out


def _chunks(cols: int, group_size: int, rows: int = 1):
    step = chunk_cols(rows, group_size)
    for c0 in range(0, cols, step):
        yield c0, min(cols, c0 + step)


def _slice_basis(codes, scales, zeros, bits, group_size, c0, c1):
    if bits in FLOAT_BITS:
        return codes[:, c0:c1], scales, zeros
    b0, b1 = c0 * bits // 8, c1 * bits // 8
    g0, g1 = c0 // group_size, c1 // group_size
    return codes[:, b0:b1], scales[:, g0:g1], zeros[:, g0:g1]


# Columns per float32 partial product of the Gram matrix (at most); partials are added in float64. A whole
# chunk in one float32 matmul loses about 1e-6 of the Gram matrix (BLAS sums the long inner dimension in
# float32); runs of at most this length keep it near 1e-8.
GRAM_RUN = 128


def gram_breaks(start: int, period: int, run: int):
    """The run structure of :func:`gram_torch`, checked: ``(start, period, run)`` as ints."""
    if run < 1 or period < 0 or start < 0:
        raise ValueError(f"gram runs need run >= 1, period >= 0 and start >= 0; got run={run}, period={period}, "
                         f"start={start}")
    return int(start), int(period), int(run)


def _run_ids(c0: int, c1: int, period: int, run: int, device) -> torch.Tensor:
    """Index of the run of every column ``c`` in ``[c0, c1)`` (parameter coordinates), counted from ``c0``'s
    run: a run ends before every multiple of ``run`` and every multiple of ``period``."""
    c = torch.arange(c0, c1, dtype=torch.int64, device=device)
    lcm = run * period // math.gcd(run, period)
    ids = c // run + c // period - c // lcm
    return ids - ids[0]


# Rows at least this many runs long are done row by row with batched products (few rows per chunk); shorter
# rows through the padded grid below, in a fixed number of operations per chunk.
_ROW_BY_ROW = 8


def _aligned_partials(d: torch.Tensor, c0: int, run: int) -> torch.Tensor:
    """Float32 partials of ``d`` [R, w] (first column: element ``c0``) over the runs between multiples of ``run``:
    whole runs as one batched product, a partial run where the chunk starts or ends between two multiples
    (a row's ends) as a product of its own; summed in float64."""
    rows, w = d.shape
    out = torch.zeros(rows, rows, dtype=torch.float64, device=d.device)
    head = min(w, (-c0) % run)
    whole = (w - head) // run * run
    if whole:
        runs = d[:, head:head + whole].reshape(rows, whole // run, run).transpose(0, 1)  # [n_runs, R, run]
        out += torch.bmm(runs, runs.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
    for a, z in ((0, head), (head + whole, w)):
        if a < z:
            part = d[:, a:z].unsqueeze(0)
            out += torch.bmm(part, part.transpose(1, 2))[0].double()
    return out


def _gram_f32_partials(d: torch.Tensor, c0: int, period: int, run: int) -> torch.Tensor:
    """``d d^T`` for a float32 [R, w] chunk whose first column is column ``c0`` of its parameter: float32
    partial products over the runs between breaks (every multiple of ``run``, and of ``period`` when
    given), summed in float64. Which arithmetic computes a run's partial depends on ``period``, ``run`` and
    the run's own length only, never on where the run lies in the chunk, so a parameter cut only at breaks
    gives the same partials in any pieces."""
    rows, w = d.shape
    if period == 0 or period % run == 0:
        return _aligned_partials(d, c0, run)  # breaks at multiples of ``run`` only
    if period >= _ROW_BY_ROW * run:
        # Long rows: within a row the breaks are the multiples of ``run``; a few rows per chunk.
        out = torch.zeros(rows, rows, dtype=torch.float64, device=d.device)
        c = c0
        while c < c0 + w:
            end = min(c0 + w, (c // period + 1) * period)
            out += _aligned_partials(d[:, c - c0:end - c0], c, run)
            c = end
        return out
    out = torch.zeros(rows, rows, dtype=torch.float64, device=d.device)
    # Breaks at rows too (a period that is not a multiple of ``run``): each pair's products laid in a grid
    # of zero-padded slots, one per run, as wide as the longest run can be, and summed over each slot: the
    # same reduction for every run.
    width = min(run, period)
    ids = _run_ids(c0, c0 + w, period, run, d.device)
    cols = torch.arange(w, device=d.device)
    starts = torch.ones(w, dtype=torch.bool, device=d.device)
    starts[1:] = ids[1:] != ids[:-1]
    first = torch.cummax(torch.where(starts, cols, 0), dim=0).values
    slot = ids * width + (cols - first)
    n_runs = int(ids[-1]) + 1
    ia, ib = torch.triu_indices(rows, rows, device=d.device)
    grid = torch.zeros(len(ia), n_runs * width, dtype=torch.float32, device=d.device)
    grid[:, slot] = d[ia] * d[ib]
    upper = grid.view(len(ia), n_runs, width).sum(dim=2).double().sum(dim=1)
    out[ia, ib] = upper
    out[ib, ia] = upper
    return out


def gram_torch(x: torch.Tensor, start: int = 0, period: int = 0, run: int = GRAM_RUN
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the centred rows of a chunk: ``G = (x - m)(x - m)^T`` with ``m = mean_k x[k]``.

    Computed without a float64 copy of ``x``: per cache-sized chunk, the differences from the first
    candidate ``E = x[1:] - x[0]`` (exact in float32 for nearby checkpoints, which is where precision
    matters) give float32 partials ``E E^T`` over runs of columns added into a float64 sum (measured on
    nearly parallel fine-tunes: 1e-8 of the float64 Gram); then ``G = C G_0 C`` with the centring matrix
    ``C = I - 11^T / K`` on the K x K matrix, in float64. Any NaN/Inf in ``x`` makes ``G`` non-finite
    (callers may check ``G`` instead of scanning ``x``).

    The runs are fixed by the parameter, not by the call: column ``j`` of ``x`` is element ``start + j`` of its
    (flattened) parameter, and a run ends before every element index that is a multiple of ``run`` or of
    ``period`` (a row length: 0 for none). A parameter cut into pieces only at such points (whole rows, or
    whole quantization groups when ``run`` divides the group size and the parameter starts on a group, as
    in a sharded model's layout and every one-tensor block) gives every piece the same float32 partials as
    the whole parameter, so Gram matrices summed over pieces (ranks holding row ranges) equal one process's
    up to the order of float64 additions.

    Args:
        x: [K, n] float32/float16/bfloat16, one row per candidate.
        start: index in its parameter of ``x``'s first column.
        period: the parameter's row length (elements), or 0.
        run: the longest run of columns in one float32 partial.

    Returns:
        (G [K, K] float64, m [n] float32).
    """
    k, n = check_gram_args(x)
    start, period, run = gram_breaks(start, period, run)
    gram = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    if k == 0:
        return gram, mean.fill_(float("nan"))  # the mean of no rows is undefined
    if k == 1:
        mean.copy_(x[0])
        gram += (x[0].float() * 0).sum()  # 0, or NaN when x holds NaN/Inf
        return gram, mean
    # Chunks end at multiples of a whole number of runs (in the parameter's coordinates): breaks.
    grid = period % run and period < _ROW_BY_ROW * run  # _gram_f32_partials's grid: K (K - 1) / 2 rows
    step = max(run, chunk_cols(k * (k - 1) // 2 if grid else k, 1) // run * run)
    diff = torch.empty(k - 1, min(n, step), dtype=torch.float32, device=x.device)
    g0 = torch.zeros(k - 1, k - 1, dtype=torch.float64, device=x.device)
    c0 = start
    while c0 < start + n:
        c1 = min(start + n, (c0 // step + 1) * step)
        xc = x[:, c0 - start:c1 - start]
        x0 = xc[0] if x.dtype == torch.float32 else xc[0].float()
        d = torch.sub(xc[1:], x0, out=diff[:, : c1 - c0])
        g0 += _gram_f32_partials(d, c0, period, run)
        torch.add(x0, d.sum(dim=0), alpha=1.0 / k, out=mean[c0 - start:c1 - start])
        c0 = c1
    return centred_gram(g0, k), mean


def centred_gram(g0: torch.Tensor, k: int) -> torch.Tensor:
    """``G = C G_0 C`` (``C = I - 11^T / K``) from the float64 Gram ``G_0`` [K-1, K-1] of the differences from
    the first candidate; symmetric. Shared by every backend."""
    gram = torch.zeros(k, k, dtype=torch.float64, device=g0.device)
    centre = torch.eye(k, dtype=torch.float64, device=g0.device) - 1.0 / k
    gram[1:, 1:] = g0
    gram = centre @ gram @ centre
    return (gram + gram.T) / 2


def orth_quantize_torch(
    x: torch.Tensor, mean: torch.Tensor, transform: torch.Tensor, bits: int, group_size: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis rows of a chunk, quantized: ``P = transform @ (x - mean)`` then per-group min/max codes.

    Args:
        x: [K, n] float32/float16/bfloat16 candidates, ``n % group_size == 0``.
        mean: [n] float32 centre.
        transform: [R, K] float32, the Gram-Schmidt coefficients (``P = T D``).
        bits: 1, 2, 4, 8 (packed codes) or 16, 32 (float storage).
        group_size: elements per quantization group (multiple of 8).
        out: optional ``(codes, scales, zeros)`` written in place, e.g. column slices of a whole basis
            (rows may be strided; see ``layout.check_orth_quantize_out``).

    Returns:
        (codes, scales, zeros) in the layout of ``layout.py`` (``out`` when given).
    """
    k, n, rows = check_orth_quantize_args(x, mean, transform, bits, group_size)
    out = check_orth_quantize_out(out, rows, n, bits, group_size, x.device)
    n_groups = 0 if bits in FLOAT_BITS else n // group_size
    if out is not None:
        codes, scales, zeros = out
    else:
        codes = torch.empty(codes_shape(rows, n, bits), dtype=storage_dtype(bits), device=x.device)
        scales = torch.empty(rows, n_groups, dtype=torch.float32, device=x.device)
        zeros = torch.empty(rows, n_groups, dtype=torch.float32, device=x.device)
    if rows == 0 or n == 0:
        return codes, scales, zeros
    step = min(n, chunk_cols(max(k, rows), group_size))
    centred = torch.empty(k, step, dtype=torch.float32, device=x.device)
    basis = torch.empty(rows, step, dtype=torch.float32, device=x.device)
    term = torch.empty(rows, step, dtype=torch.float32, device=x.device)
    t = transform.unsqueeze(2)  # [R, K, 1]
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        xc = torch.sub(x[:, c0:c1], mean[c0:c1], out=centred[:, : c1 - c0])
        # P = T xc as K products and sums, k ascending, each rounded to float32 on its own (not a matmul, whose
        # order BLAS chooses): every backend can then compute the same bits, and so the same codes.
        p = torch.mul(t[:, 0], xc[0], out=basis[:, : c1 - c0])
        for i in range(1, k):
            p += torch.mul(t[:, i], xc[i], out=term[:, : c1 - c0])
        quantize_into(p, bits, group_size, *_slice_basis(codes, scales, zeros, bits, group_size, c0, c1))
    return codes, scales, zeros


def combine_torch(
    mean: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    beta: torch.Tensor,
    group_block: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights in the subspace: ``w[j] = mean[j] + sum_i beta[block(j), i] * P[i, j]``.

    Args:
        mean: [D] float32.
        codes, scales, zeros: the stored basis, R rows and D columns.
        beta: [B, R] float32 coefficients per block.
        group_block: [D // group_size] int32 block id of each group.
        out: optional [D] float32/float16/bfloat16 buffer written in place (default: new float32).

    Returns:
        ``out`` (or a new float32 [D] tensor).
    """
    rows, cols = check_combine_args(mean, codes, scales, zeros, beta, group_block, bits, group_size, out)
    if out is None:
        out = torch.empty(cols, dtype=torch.float32, device=mean.device)
    if cols == 0:
        return out
    # Per-group weights of the codes, for all groups at once (R x D / group_size: small):
    # sum_i beta_i (zero_i + scale_i q_i) = sum_i (beta_i scale_i) q_i + sum_i beta_i zero_i, so the
    # dequantized basis is never formed and each chunk's codes are converted to float once, in cache.
    coef = beta.index_select(0, group_block.long()).T  # [R, n_groups]
    if bits in FLOAT_BITS:
        weight, offset = coef.contiguous(), None
    else:
        weight, offset = coef * scales, (coef * zeros).sum(dim=0)
    ones = torch.ones(1, rows, dtype=torch.float32, device=mean.device)
    step = min(cols, chunk_cols(rows, group_size, STEP_ELEMS))
    q_buf = torch.empty(rows, step, dtype=torch.float32, device=mean.device)
    direct = out.dtype == torch.float32
    d_buf = None if direct else torch.empty(step, dtype=torch.float32, device=mean.device)
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        c = _slice_basis(codes, scales, zeros, bits, group_size, c0, c1)[0]
        g0, g1 = c0 // group_size, c1 // group_size
        q = codes_to_float(c, bits, q_buf[:, : c1 - c0])
        q.view(rows, g1 - g0, group_size).mul_(weight[:, g0:g1].unsqueeze(2))
        # The sum over rows as one GEMV, straight into a float32 out (else into a temporary, cast once).
        delta = out[c0:c1] if direct else d_buf[: c1 - c0]
        torch.matmul(ones, q, out=delta.view(1, -1))
        if offset is not None:
            delta.view(g1 - g0, group_size).add_(offset[g0:g1].unsqueeze(1))
        delta += mean[c0:c1]
        if not direct:
            out[c0:c1] = delta
    return out


def project_torch(
    grad: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_block: torch.Tensor,
    n_blocks: int,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Gradient of the coefficients: ``out[b, i] = sum_{j in block b} P[i, j] * grad[j]``.

    Per-group partial sums are added in group order in float64, so the result does not depend on
    scheduling (deterministic on every backend).

    Args:
        grad: [D] float32/float16/bfloat16, dL/dw over the flat parameter space.
        codes, scales, zeros: the stored basis, R rows and D columns.
        group_block: [D // group_size] int32 block id of each group.
        n_blocks: number of blocks B.

    Returns:
        [B, R] float32.
    """
    rows, cols = check_project_args(grad, codes, scales, zeros, group_block, bits, group_size)
    n_groups = cols // group_size
    partial = torch.empty(rows, n_groups, dtype=torch.float32, device=grad.device)  # per-group dots q . g
    grad_sums = torch.empty(n_groups, dtype=torch.float32, device=grad.device)
    step = min(cols, chunk_cols(rows, group_size, STEP_ELEMS))
    q_buf = torch.empty(rows, step, dtype=torch.float32, device=grad.device)
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        c = _slice_basis(codes, scales, zeros, bits, group_size, c0, c1)[0]
        g0, g1 = c0 // group_size, c1 // group_size
        g = grad[c0:c1].view(g1 - g0, group_size)
        q = codes_to_float(c, bits, q_buf[:, : c1 - c0]).view(rows, g1 - g0, group_size)
        q.mul_(g)  # g is float32, or converted on the fly
        torch.sum(q, dim=2, out=partial[:, g0:g1])
        if bits not in FLOAT_BITS:
            torch.sum(g, dim=1, dtype=torch.float32, out=grad_sums[g0:g1])
    if bits not in FLOAT_BITS:
        # sum_j (zero + scale q_j) g_j = scale * (q . g) + zero * sum_j g_j, for every group at once
        partial.mul_(scales).add_(zeros * grad_sums)
    return reduce_groups(partial, group_block, n_blocks)


def reduce_groups(partial: torch.Tensor, group_block: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Sum per-group partials [R, n_groups] float32 into blocks -> [B, R] float32, in fixed order.

    Shared by every backend. Blocks are contiguous runs of groups; each block's run is summed on its
    own with float64 accumulation (no atomics, so deterministic). A running sum over all groups read
    at the block ends would be one op, but it makes a small block's total the difference of two large
    sums (1.7e-4 relative error next to a block 1e9 times larger) and needs two float64 copies of
    ``partial`` on every step.
    """
    rows = partial.shape[0]
    out = torch.zeros(n_blocks, rows, dtype=torch.float32, device=partial.device)
    start = 0
    for b, n in enumerate(torch.bincount(group_block.long(), minlength=n_blocks).tolist()):
        if n:
            out[b] = partial[:, start:start + n].sum(dim=1, dtype=torch.float64)
        start += n
    return out
