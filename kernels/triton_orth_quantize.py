"""Triton ``orth_quantize``: ``P = T (x - m)``, then per-group min/max quantization and packing.

Twin of :func:`twamerge.kernels.reference.orth_quantize_torch` (same signature, outputs and layout;
see ``layout.py``). One program owns ``BLOCK_G`` whole groups of columns for every candidate, so
the candidates are read once and the basis rows never leave registers before they are packed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import ORTH_QUANTIZE_MAX_TILE
from .layout import FLOAT_BITS, check_orth_quantize_args, check_orth_quantize_out, codes_shape, storage_dtype

# The [K_PAD, BLOCK_G, GROUP_PAD] candidate tile is held in registers; past this it would spill
# far enough to be slower than the reference, so larger problems must be split by the caller.
MAX_TILE = ORTH_QUANTIZE_MAX_TILE


def _configs() -> dict[str, int]:
    """Launch settings: elements of the candidate tile per program, and warps."""
    return {"TILE": 8192, "num_warps": 8}


@triton.jit
def _orth_quantize_kernel(
    X_ptr, Mean_ptr, T_ptr, Codes_ptr, Scales_ptr, Zeros_ptr,
    K, R, N_GROUPS, GROUP_SIZE,
    stride_xk, stride_tr, stride_cr, stride_sr, stride_zr,
    K_PAD: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_PAD: tl.constexpr,
    BITS: tl.constexpr, FLOAT_STORAGE: tl.constexpr,
):
    """codes/scales/zeros[r, g] <- quantize(sum_k T[r, k] * (X[k, cols(g)] - mean[cols(g)]))."""
    pid = tl.program_id(0).to(tl.int64)
    offs_g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    offs_c = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    offs_k = tl.arange(0, K_PAD).to(tl.int64)  # [K_PAD]
    g_mask = offs_g < N_GROUPS
    c_mask = g_mask[:, None] & (offs_c[None, :] < GROUP_SIZE)  # [BLOCK_G, GROUP_PAD]
    k_mask = offs_k < K
    cols = offs_g[:, None] * GROUP_SIZE + offs_c[None, :]  # [BLOCK_G, GROUP_PAD]

    x_mask = k_mask[:, None, None] & c_mask[None, :, :]
    x = tl.load(X_ptr + offs_k[:, None, None] * stride_xk + cols[None, :, :], mask=x_mask, other=0.0)
    m = tl.load(Mean_ptr + cols, mask=c_mask, other=0.0)  # [BLOCK_G, GROUP_PAD]
    xc = x.to(tl.float32) - m[None, :, :]  # [K_PAD, BLOCK_G, GROUP_PAD]

    t_row = T_ptr
    codes_row = Codes_ptr
    scales_row = Scales_ptr
    zeros_row = Zeros_ptr
    for _r in range(0, R):
        t = tl.load(t_row + offs_k, mask=k_mask, other=0.0)  # [K_PAD]
        p = tl.sum(t[:, None, None] * xc, axis=0)  # [BLOCK_G, GROUP_PAD]
        if FLOAT_STORAGE:
            tl.store(codes_row + cols, p.to(Codes_ptr.dtype.element_ty), mask=c_mask)
        else:
            PER_BYTE: tl.constexpr = 8 // BITS
            levels = tl.full([BLOCK_G], (1 << BITS) - 1, tl.float32)
            lo = tl.min(tl.where(c_mask, p, float("inf")), axis=1)  # [BLOCK_G]
            hi = tl.max(tl.where(c_mask, p, float("-inf")), axis=1)
            # Groups past the end have lo = +inf; zero them before any arithmetic.
            lo = tl.where(g_mask, lo, 0.0)
            hi = tl.where(g_mask, hi, 0.0)
            # layout.py's expressions, in its order; div_rn because the default fp32 division
            # on NVIDIA is approximate, and exact codes need IEEE division like torch's.
            scale = tl.math.div_rn(hi - lo, levels)
            positive = scale > 0
            safe = tl.where(positive, scale, 1.0)
            inv = tl.where(positive, tl.math.div_rn(tl.full([BLOCK_G], 1.0, tl.float32), safe), 0.0)
            q = tl.floor((p - lo[:, None]) * inv[:, None] + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), levels[:, None])  # [BLOCK_G, GROUP_PAD]
            if BITS == 8:
                # 8-bit codes are the bytes: no shifts, no sum.
                tl.store(codes_row + cols, q.to(tl.uint8), mask=c_mask)
            else:
                q3 = tl.reshape(q.to(tl.uint8), [BLOCK_G, GROUP_PAD // PER_BYTE, PER_BYTE])
                shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)  # [PER_BYTE]
                # The codes of one byte occupy disjoint bits, so their sum is their OR (and fits a byte).
                packed = tl.sum(q3 << shifts[None, None, :], axis=2).to(tl.uint8)  # [BLOCK_G, GROUP_PAD // PER_BYTE]
                offs_b = tl.arange(0, GROUP_PAD // PER_BYTE)
                b_mask = g_mask[:, None] & (offs_b[None, :] < GROUP_SIZE // PER_BYTE)
                b_offs = offs_g[:, None] * (GROUP_SIZE // PER_BYTE) + offs_b[None, :]
                tl.store(codes_row + b_offs, packed, mask=b_mask)
            tl.store(scales_row + offs_g, scale, mask=g_mask)
            tl.store(zeros_row + offs_g, lo, mask=g_mask)
        t_row += stride_tr
        codes_row += stride_cr
        scales_row += stride_sr
        zeros_row += stride_zr


def orth_quantize_triton(
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
        out: optional ``(codes, scales, zeros)`` written in place (rows may be strided).

    Returns:
        (codes, scales, zeros) in the layout of ``layout.py`` (``out`` when given); codes uint8 [R, n * bits // 8]
        (float16/float32 [R, n] for bits 16/32), scales and zeros float32 [R, n // group_size].

    Raises:
        TypeError: unsupported dtype. ValueError: bad shapes, bits, group size, devices, or a
        candidate tile larger than ``MAX_TILE``.
    """
    k, n, rows = check_orth_quantize_args(x, mean, transform, bits, group_size)
    k_pad = triton.next_power_of_2(max(k, 1))
    group_pad = triton.next_power_of_2(group_size)
    if k_pad * group_pad > MAX_TILE:
        raise ValueError(
            f"K={k} candidates x group_size={group_size} needs a {k_pad}x{group_pad} tile, over the limit of "
            f"{MAX_TILE} elements; use a smaller group_size or fewer candidates per call"
        )
    out = check_orth_quantize_out(out, rows, n, bits, group_size, x.device)
    float_storage = bits in FLOAT_BITS
    n_groups = n // group_size
    if out is not None:
        codes, scales, zeros = out
    else:
        codes = torch.empty(codes_shape(rows, n, bits), dtype=storage_dtype(bits), device=x.device)
        scales = torch.empty(rows, 0 if float_storage else n_groups, dtype=torch.float32, device=x.device)
        zeros = torch.empty(rows, 0 if float_storage else n_groups, dtype=torch.float32, device=x.device)
    if rows == 0 or n_groups == 0:
        return codes, scales, zeros
    cfg = _configs()
    block_g = max(1, cfg["TILE"] // (k_pad * group_pad))
    grid = (triton.cdiv(n_groups, block_g),)
    # Float storage never touches scales/zeros; pass codes so no empty (null) pointer reaches the launch.
    s_arg, z_arg = (codes, codes) if float_storage else (scales, zeros)
    _orth_quantize_kernel[grid](
        x, mean, transform, codes, s_arg, z_arg,
        k, rows, n_groups, group_size,
        x.stride(0), transform.stride(0), codes.stride(0), 0 if float_storage else scales.stride(0),
        0 if float_storage else zeros.stride(0),
        K_PAD=k_pad, BLOCK_G=block_g, GROUP_PAD=group_pad,
        BITS=bits if not float_storage else 8, FLOAT_STORAGE=float_storage,
        num_warps=cfg["num_warps"],
        # Exact codes need (x - lo) * inv + 0.5 rounded twice, as torch does, not fused into an FMA.
        enable_fp_fusion=False,
    )
    return codes, scales, zeros
