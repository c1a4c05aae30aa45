"""Mixed precision of the forward and backward passes (``--precision``).

Only the model's forward and backward run under autocast; the trained coefficients stay float32,
combine and project accumulate in float32, and losses are summed in float32 (``tasks``). The flat
weights and gradients are bfloat16 only when every merged candidate tensor is stored in bfloat16 and
the model computes in it (``pipeline.flat_dtype``); else float32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .errors import TwamergeError

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device, stored: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype for ``--precision name`` (None: plain float32).

    ``auto`` is bf16 on a GPU that supports it when the candidates are stored in 16 bits (they were
    trained so; float32 would double the activation memory for nothing), else float32; on a CPU
    always float32 (CPU autocast is slower than float32 for most models).

    Raises:
        TwamergeError: bf16 or fp16 asked for on a device that cannot run it.
    """
    if name == "fp32":
        return None
    if name == "auto":
        if device.type == "cuda" and stored in (torch.bfloat16, torch.float16) and torch.cuda.is_bf16_supported():
            log.info("--precision auto: bf16 autocast (the candidates are %s)", str(stored).replace("torch.", ""))
            return torch.bfloat16
        return None
    dtype = _DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise TwamergeError(f"--precision {name}: this GPU does not support bfloat16; use fp16 or fp32")
    if device.type == "cpu" and dtype == torch.float16:
        raise TwamergeError(f"--precision {name}: float16 autocast needs a GPU; use bf16 or fp32 on a CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
