"""Triton ``project``: ``out[b, i] = sum_{j in block b} dequant(P)[i, j] * grad[j]``.

Twin of :func:`twamerge.kernels.reference.project_torch`. One pass over the flat parameter space:
each program owns ``BLOCK_G`` whole groups, reads ``grad`` and every basis row's packed bytes for
them once and writes one float32 partial per (row, group). No atomics: the block totals come from
:func:`reference.reduce_groups` (each block's groups summed in float64), the same code the reference
uses, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import GROUP_MAX
from .layout import FLOAT_BITS, check_project_args
from .reference import reduce_groups

# A program holds one [BLOCK_G, GROUP_PAD] tile; a single group larger than this would spill.
MAX_GROUP = GROUP_MAX


def _configs() -> dict[str, int]:
    """Launch settings: columns per program (padded groups included) and warps."""
    return {"TILE": 4096, "num_warps": 4}


@triton.jit
def _project_kernel(
    Grad_ptr, Codes_ptr, Scales_ptr, Zeros_ptr, Part_ptr,
    R, N_GROUPS, GROUP_SIZE,
    stride_cr, stride_sr, stride_pr,
    BLOCK_G: tl.constexpr, GROUP_PAD: tl.constexpr, BITS: tl.constexpr, FLOAT_STORAGE: tl.constexpr,
):
    """Part[r, g] = sum_{j in group g} (Zeros[r, g] + Scales[r, g] * code[r, j]) * Grad[j]."""
    pid = tl.program_id(0).to(tl.int64)
    offs_g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    offs_c = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    g_mask = offs_g < N_GROUPS
    c_mask = g_mask[:, None] & (offs_c[None, :] < GROUP_SIZE)  # [BLOCK_G, GROUP_PAD]
    cols = offs_g[:, None] * GROUP_SIZE + offs_c[None, :]  # [BLOCK_G, GROUP_PAD]
    # Zero outside the groups, so padded lanes add nothing whatever the basis there decodes to.
    g = tl.load(Grad_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)  # [BLOCK_G, GROUP_PAD]
    if not FLOAT_STORAGE:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte_offs = cols // PER_BYTE
        shift = ((cols % PER_BYTE) * BITS).to(tl.int32)
    codes_row = Codes_ptr
    scales_row = Scales_ptr
    zeros_row = Zeros_ptr
    part_row = Part_ptr
    for _r in range(0, R):
        if FLOAT_STORAGE:
            p = tl.load(codes_row + cols, mask=c_mask, other=0.0).to(tl.float32)
        else:
            byte = tl.load(codes_row + byte_offs, mask=c_mask, other=0).to(tl.int32)
            q = ((byte >> shift) & ((1 << BITS) - 1)).to(tl.float32)  # [BLOCK_G, GROUP_PAD]
            s = tl.load(scales_row + offs_g, mask=g_mask, other=0.0)  # [BLOCK_G]
            z = tl.load(zeros_row + offs_g, mask=g_mask, other=0.0)
            p = z[:, None] + s[:, None] * q
        tl.store(part_row + offs_g, tl.sum(p * g, axis=1), mask=g_mask)
        codes_row += stride_cr
        scales_row += stride_sr
        zeros_row += stride_sr
        part_row += stride_pr


def project_triton(
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

    Args:
        grad: [D] float32/float16/bfloat16, dL/dw over the flat parameter space.
        codes, scales, zeros: the stored basis, R rows and D columns (``layout.py``).
        group_block: [D // group_size] int32 block id of each group.
        n_blocks: number of blocks B.

    Returns:
        [B, R] float32: float32 partials per (row, group), summed per block in float64.

    Raises:
        TypeError: unsupported dtype. ValueError: bad shapes, bits, group size or devices.
    """
    rows, cols = check_project_args(grad, codes, scales, zeros, group_block, bits, group_size)
    group_pad = triton.next_power_of_2(group_size)
    if group_pad > MAX_GROUP:
        raise ValueError(f"group_size={group_size} is over the kernel's limit of {MAX_GROUP}")
    n_groups = cols // group_size
    partial = torch.empty(rows, n_groups, dtype=torch.float32, device=grad.device)
    if rows and n_groups:
        float_storage = bits in FLOAT_BITS
        cfg = _configs()
        block_g = max(1, cfg["TILE"] // group_pad)
        s_arg, z_arg = (codes, codes) if float_storage else (scales, zeros)
        _project_kernel[(triton.cdiv(n_groups, block_g),)](
            grad, codes, s_arg, z_arg, partial,
            rows, n_groups, group_size,
            codes.stride(0), 0 if float_storage else scales.stride(0), partial.stride(0),
            BLOCK_G=block_g, GROUP_PAD=group_pad, BITS=8 if float_storage else bits,
            FLOAT_STORAGE=float_storage,
            num_warps=cfg["num_warps"],
        )
    return reduce_groups(partial, group_block, n_blocks)
