"""Triton ``combine``: ``w[j] = mean[j] + sum_i beta[block(j), i] * dequant(P)[i, j]``.

Twin of :func:`twamerge.kernels.reference.combine_torch`. One pass over the flat parameter space:
each program owns ``BLOCK_G`` whole groups, reads every basis row's packed bytes for them once,
looks the block of each group up in ``group_block`` (so all blocks go in one launch) and casts to
``out``'s dtype at the single store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import GROUP_MAX
from .layout import FLOAT_BITS, check_combine_args

# A program holds one [BLOCK_G, GROUP_PAD] tile; a single group larger than this would spill.
MAX_GROUP = GROUP_MAX


def _configs() -> dict[str, int]:
    """Launch settings: columns per program (padded groups included) and warps."""
    return {"TILE": 4096, "num_warps": 4}


@triton.jit
def _combine_kernel(
    Mean_ptr, Codes_ptr, Scales_ptr, Zeros_ptr, Beta_ptr, GroupBlock_ptr, Out_ptr,
    R, N_GROUPS, GROUP_SIZE,
    stride_cr, stride_sr, stride_bb,
    BLOCK_G: tl.constexpr, GROUP_PAD: tl.constexpr, BITS: tl.constexpr, FLOAT_STORAGE: tl.constexpr,
):
    """Out[cols] = Mean[cols] + sum_r Beta[block(g), r] * (Zeros[r, g] + Scales[r, g] * code[r, cols])."""
    pid = tl.program_id(0).to(tl.int64)
    offs_g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    offs_c = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    g_mask = offs_g < N_GROUPS
    c_mask = g_mask[:, None] & (offs_c[None, :] < GROUP_SIZE)  # [BLOCK_G, GROUP_PAD]
    cols = offs_g[:, None] * GROUP_SIZE + offs_c[None, :]  # [BLOCK_G, GROUP_PAD]
    blk = tl.load(GroupBlock_ptr + offs_g, mask=g_mask, other=0).to(tl.int64)  # [BLOCK_G]
    beta_row = Beta_ptr + blk * stride_bb  # [BLOCK_G] pointers to beta[block(g), 0]
    if not FLOAT_STORAGE:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte_offs = cols // PER_BYTE
        shift = ((cols % PER_BYTE) * BITS).to(tl.int32)
    acc = tl.zeros([BLOCK_G, GROUP_PAD], dtype=tl.float32)
    codes_row = Codes_ptr
    scales_row = Scales_ptr
    zeros_row = Zeros_ptr
    for r in range(0, R):
        b = tl.load(beta_row + r, mask=g_mask, other=0.0)  # [BLOCK_G]
        if FLOAT_STORAGE:
            p = tl.load(codes_row + cols, mask=c_mask, other=0.0).to(tl.float32)
        else:
            byte = tl.load(codes_row + byte_offs, mask=c_mask, other=0).to(tl.int32)
            q = ((byte >> shift) & ((1 << BITS) - 1)).to(tl.float32)  # [BLOCK_G, GROUP_PAD]
            s = tl.load(scales_row + offs_g, mask=g_mask, other=0.0)  # [BLOCK_G]
            z = tl.load(zeros_row + offs_g, mask=g_mask, other=0.0)
            p = z[:, None] + s[:, None] * q
        acc += b[:, None] * p
        codes_row += stride_cr
        scales_row += stride_sr
        zeros_row += stride_sr
    m = tl.load(Mean_ptr + cols, mask=c_mask, other=0.0)
    tl.store(Out_ptr + cols, (m + acc).to(Out_ptr.dtype.element_ty), mask=c_mask)


def combine_triton(
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
        codes, scales, zeros: the stored basis, R rows and D columns (``layout.py``).
        beta: [B, R] float32 coefficients per block.
        group_block: [D // group_size] int32 block id of each group (each < B).
        out: optional [D] float32/float16/bfloat16 buffer written in place (default: new float32).

    Returns:
        ``out`` (or a new float32 [D] tensor); accumulation is float32, cast once at the store.

    Raises:
        TypeError: unsupported dtype. ValueError: bad shapes, bits, group size or devices.
    """
    rows, cols = check_combine_args(mean, codes, scales, zeros, beta, group_block, bits, group_size, out)
    if out is None:
        out = torch.empty(cols, dtype=torch.float32, device=mean.device)
    group_pad = triton.next_power_of_2(group_size)
    if group_pad > MAX_GROUP:
        raise ValueError(f"group_size={group_size} is over the kernel's limit of {MAX_GROUP}")
    n_groups = cols // group_size
    if n_groups == 0:
        return out
    float_storage = bits in FLOAT_BITS
    cfg = _configs()
    block_g = max(1, cfg["TILE"] // group_pad)
    s_arg, z_arg = (codes, codes) if float_storage else (scales, zeros)
    _combine_kernel[(triton.cdiv(n_groups, block_g),)](
        mean, codes, s_arg, z_arg, beta, group_block, out,
        rows, n_groups, group_size,
        codes.stride(0), 0 if float_storage else scales.stride(0), beta.stride(0),
        BLOCK_G=block_g, GROUP_PAD=group_pad, BITS=8 if float_storage else bits, FLOAT_STORAGE=float_storage,
        num_warps=cfg["num_warps"],
    )
    return out
