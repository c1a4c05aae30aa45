"""Values users type on the command line or pass as plain strings: byte sizes and dtype names.

Kept apart from the checkpoint I/O so that parsing ``--max-shard-size 2GiB`` or ``--dtype bf16``
does not depend on how files are read or written.
"""

from __future__ import annotations

import re

import torch

from .errors import InvalidArgumentError

__all__ = ["dtype_name", "parse_dtype", "parse_size"]

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"bf16"``, ``"float32"``, ... (or a torch dtype, or None) into a floating torch dtype.

    Raises:
        InvalidArgumentError: the name is not a supported floating dtype.
    """
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise InvalidArgumentError(f"output dtype {dtype_name(value)} is not a floating dtype")
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key in ("", "auto", "none", "same"):
        return None
    if key not in _DTYPE_NAMES:
        raise InvalidArgumentError(
            f"unknown dtype {value!r}; expected one of float32, float16, bfloat16, float64"
        )
    return _DTYPE_NAMES[key]


def parse_size(value: int | str | None) -> int | None:
    """Parse a byte count such as ``5000000``, ``"500MB"``, ``"2GiB"`` or ``"5G"`` (None stays None).

    Raises:
        InvalidArgumentError: the text is not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise InvalidArgumentError(f"size {value!r} is not a byte count; write e.g. 500MB, 2GiB or 1000000")
        base = 1024 if m.group(3) else 1000
        power = " kmgt".index(m.group(2).lower() or " ")
        size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise InvalidArgumentError(f"size {value!r} must be positive")
    return size
