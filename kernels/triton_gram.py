"""Triton ``gram``: ``G = (x - m)(x - m)^T`` over a chunk, with the column mean ``m`` fused.

Twin of :func:`twamerge.kernels.reference.gram_torch`. Each program walks a fixed run of column
tiles, writes the column means of its tiles and keeps one float32 Gram partial in registers; the
launcher adds the partials in float64 in program order, so the result does not depend on
scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import GRAM_MAX_K, interpreting
from .layout import check_gram_args

# Candidates are padded to a power of two >= 16 (the smallest tl.dot operand); the [K_PAD, BLOCK_N]
# tile lives in registers, so the count is bounded.
MAX_K = GRAM_MAX_K


def _configs(device: torch.device) -> dict[str, int]:
    """Launch settings: elements per [K_PAD, BLOCK_N] tile, target program count, warps."""
    if interpreting() or device.type != "cuda":
        # Each interpreted program costs about a millisecond; a few long ones are cheapest.
        return {"TILE": 8192, "PROGRAMS": 4, "num_warps": 4}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return {"TILE": 8192, "PROGRAMS": 4 * sms, "num_warps": 8}


@triton.jit
def _gram_kernel(
    X_ptr, Mean_ptr, Part_ptr,
    K, N, TILES_PER_PROG,
    stride_xk, stride_pp,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Part[pid] = sum over this program's tiles of (X - mean)(X - mean)^T; Mean[cols] = mean_k X."""
    pid = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, K_PAD).to(tl.int64)  # [K_PAD]
    k_mask = offs_k < K
    acc = tl.zeros([K_PAD, K_PAD], dtype=tl.float32)
    for t in range(0, TILES_PER_PROG):
        offs_n = (pid * TILES_PER_PROG + t) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_mask = offs_n < N
        mask = k_mask[:, None] & n_mask[None, :]  # [K_PAD, BLOCK_N]
        x = tl.load(X_ptr + offs_k[:, None] * stride_xk + offs_n[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)  # [K_PAD, BLOCK_N]
        mean = tl.sum(x, axis=0) / K  # [BLOCK_N]
        tl.store(Mean_ptr + offs_n, mean, mask=n_mask)
        xc = tl.where(mask, x - mean[None, :], 0.0)  # [K_PAD, BLOCK_N]
        # ieee: TF32 would lose the digits that separate nearly collinear checkpoints.
        acc = tl.dot(xc, tl.trans(xc), acc, input_precision="ieee")  # [K_PAD, K_PAD]
    offs_j = tl.arange(0, K_PAD)
    tl.store(Part_ptr + pid * stride_pp + offs_k[:, None] * K_PAD + offs_j[None, :], acc)


def gram_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the centred rows of a chunk: ``G = (x - m)(x - m)^T`` with ``m = mean_k x[k]``.

    Args:
        x: [K, n] float32/float16/bfloat16, one row per candidate.

    Returns:
        (G [K, K] float64, m [n] float32). Tiles accumulate in float32, partials add in float64.

    Raises:
        TypeError: unsupported dtype. ValueError: not 2-D, not contiguous, or K > ``MAX_K``.
    """
    k, n = check_gram_args(x)
    if k > MAX_K:
        raise ValueError(f"x has K={k} candidate rows; the gram kernel handles at most {MAX_K} per call")
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    if k == 0 or n == 0:
        # Same answer as the reference: an empty sum, and the mean of no rows is undefined.
        return torch.zeros(k, k, dtype=torch.float64, device=x.device), mean.fill_(float("nan"))
    cfg = _configs(x.device)
    k_pad = max(16, triton.next_power_of_2(k))
    block_n = max(16, cfg["TILE"] // k_pad)
    n_tiles = triton.cdiv(n, block_n)
    tiles_per_prog = triton.cdiv(n_tiles, cfg["PROGRAMS"])
    n_prog = triton.cdiv(n_tiles, tiles_per_prog)
    part = torch.empty(n_prog, k_pad, k_pad, dtype=torch.float32, device=x.device)
    _gram_kernel[(n_prog,)](
        x, mean, part,
        k, n, tiles_per_prog,
        x.stride(0), part.stride(0),
        K_PAD=k_pad, BLOCK_N=block_n,
        num_warps=cfg["num_warps"],
    )
    gram = part.to(torch.float64).sum(dim=0)[:k, :k].contiguous()
    return gram, mean
