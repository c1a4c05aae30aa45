"""Pure-torch references of the four subspace ops: the CPU path and the oracle for the Triton kernels.

Each function has exactly the signature, output shapes and dtypes of its Triton twin
(``<op>_triton``). Work is done in column chunks into bounded temporaries, so no full float
copy of a packed basis is ever made. See ``layout.py`` for the storage format.
"""

from __future__ import annotations

import torch

from .layout import (
    FLOAT_BITS,
    check_bits,
    check_combine_args,
    check_gram_args,
    check_orth_quantize_args,
    check_project_args,
    codes_shape,
    storage_dtype,
)

# Columns handled per step. Temporaries are about R * CHUNK_COLS * 4 bytes.
CHUNK_COLS = 1 << 18


def pack_codes_torch(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``q`` uint8 [R, n] (values < 2**bits) into uint8 [R, n * bits // 8]."""
    per_byte = 8 // bits
    rows, n = q.shape
    q = q.view(rows, n // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * bits
    return (q << shifts).sum(dim=2).to(torch.uint8)


def unpack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes_torch`: uint8 [R, m] -> uint8 [R, m * 8 // bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
    mask = (1 << bits) - 1
    return ((codes.unsqueeze(2) >> shifts) & mask).reshape(codes.shape[0], -1)


def quantize_torch(p: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float32 basis chunk ``p`` [R, n] (n % group_size == 0) into (codes, scales, zeros)."""
    check_bits(bits)
    rows, n = p.shape
    if bits in FLOAT_BITS:
        empty = torch.empty(rows, 0, dtype=torch.float32, device=p.device)
        return p.to(storage_dtype(bits)).contiguous(), empty, empty.clone()
    grouped = p.view(rows, n // group_size, group_size)
    lo = grouped.amin(dim=2)
    hi = grouped.amax(dim=2)
    levels = float((1 << bits) - 1)
    # A tensor divisor, not a Python float: with a scalar divisor CUDA torch multiplies by the
    # rounded reciprocal, which is off by one ulp for most groups and breaks exact code parity.
    scale = (hi - lo) / torch.full_like(hi, levels)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.floor((grouped - lo.unsqueeze(2)) * inv.unsqueeze(2) + 0.5).clamp_(0, levels)
    codes = pack_codes_torch(q.to(torch.uint8).view(rows, n), bits)
    return codes, scale.contiguous(), lo.contiguous()


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


def _codes_by_group(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes (or float storage) of a column chunk as float32 [n_groups, R, G] (a strided view, no copy
    beyond the conversion to float)."""
    q = codes.float() if bits in FLOAT_BITS else unpack_codes_torch(codes, bits).float()
    rows, n = q.shape
    return q.view(rows, n // group_size, group_size).transpose(0, 1)


def _chunks(cols: int, group_size: int):
    step = max(group_size, CHUNK_COLS // group_size * group_size)
    for c0 in range(0, cols, step):
        yield c0, min(cols, c0 + step)


def _slice_basis(codes, scales, zeros, bits, group_size, c0, c1):
    if bits in FLOAT_BITS:
        return codes[:, c0:c1], scales, zeros
    b0, b1 = c0 * bits // 8, c1 * bits // 8
    g0, g1 = c0 // group_size, c1 // group_size
    return codes[:, b0:b1], scales[:, g0:g1], zeros[:, g0:g1]


def gram_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the centred rows of a chunk: ``G = (x - m)(x - m)^T`` with ``m = mean_k x[k]``.

    Args:
        x: [K, n] float32/float16/bfloat16, one row per candidate.

    Returns:
        (G [K, K] float64, m [n] float32).
    """
    k, n = check_gram_args(x)
    gram = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    for c0 in range(0, n, CHUNK_COLS):
        c1 = min(n, c0 + CHUNK_COLS)
        chunk = x[:, c0:c1].to(torch.float64)
        m = chunk.mean(dim=0)
        mean[c0:c1] = m
        centred = chunk - m
        gram += centred @ centred.T
    return gram, mean


def orth_quantize_torch(
    x: torch.Tensor, mean: torch.Tensor, transform: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis rows of a chunk, quantized: ``P = transform @ (x - mean)`` then per-group min/max codes.

    Args:
        x: [K, n] float32/float16/bfloat16 candidates, ``n % group_size == 0``.
        mean: [n] float32 centre.
        transform: [R, K] float32, the Gram-Schmidt coefficients (``P = T D``).
        bits: 1, 2, 4, 8 (packed codes) or 16, 32 (float storage).
        group_size: elements per quantization group (multiple of 8).

    Returns:
        (codes, scales, zeros) in the layout of ``layout.py``.
    """
    _, n, rows = check_orth_quantize_args(x, mean, transform, bits, group_size)
    n_groups = 0 if bits in FLOAT_BITS else n // group_size
    codes = torch.empty(codes_shape(rows, n, bits), dtype=storage_dtype(bits), device=x.device)
    scales = torch.empty(rows, n_groups, dtype=torch.float32, device=x.device)
    zeros = torch.empty(rows, n_groups, dtype=torch.float32, device=x.device)
    for c0, c1 in _chunks(n, group_size):
        p = transform @ (x[:, c0:c1].float() - mean[c0:c1])
        c, s, z = quantize_torch(p, bits, group_size)
        out_c, out_s, out_z = _slice_basis(codes, scales, zeros, bits, group_size, c0, c1)
        out_c.copy_(c)
        out_s.copy_(s)
        out_z.copy_(z)
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
    for c0, c1 in _chunks(cols, group_size):
        c, s, z = _slice_basis(codes, scales, zeros, bits, group_size, c0, c1)
        g0, g1 = c0 // group_size, c1 // group_size
        coef = beta[group_block[g0:g1].long()].T  # [R, n_groups]
        q = _codes_by_group(c, bits, group_size)  # [n_groups, R, G]
        if bits in FLOAT_BITS:
            delta = torch.bmm(coef.T.unsqueeze(1), q).squeeze(1)
        else:
            # sum_i beta_i (zero_i + scale_i q_i) = sum_i (beta_i scale_i) q_i + sum_i beta_i zero_i: the
            # dequantized basis is never formed, one batched matmul per chunk does the work.
            delta = torch.bmm((coef * s).T.unsqueeze(1), q).squeeze(1) + (coef * z).sum(dim=0).unsqueeze(1)
        out[c0:c1] = mean[c0:c1] + delta.reshape(-1)
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
    partial = torch.empty(rows, cols // group_size, dtype=torch.float32, device=grad.device)
    for c0, c1 in _chunks(cols, group_size):
        c, s, z = _slice_basis(codes, scales, zeros, bits, group_size, c0, c1)
        g0, g1 = c0 // group_size, c1 // group_size
        g = grad[c0:c1].float().view(g1 - g0, group_size)
        q = _codes_by_group(c, bits, group_size)  # [n_groups, R, G]
        dots = torch.bmm(q, g.unsqueeze(2)).squeeze(2).T  # [R, n_groups]
        # sum_j (zero + scale q_j) g_j = scale * (q . g) + zero * sum_j g_j
        partial[:, g0:g1] = dots if bits in FLOAT_BITS else dots * s + z * g.sum(dim=1)
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
