"""The one place that decides between the Triton kernels and the torch references.

Inputs to the decision: the explicit ``backend`` argument (from config or ``--backend``), else the
``TWAMERGE_BACKEND`` environment variable, whether triton imports, and where the tensor lives
(CUDA, or CPU under ``TRITON_INTERPRET=1``).

* ``auto``: Triton for CUDA tensors when triton imports; the torch reference otherwise. The
  choice and its reason are logged once per op.
* ``triton``: Triton or :class:`BackendUnavailableError` (never a quiet fallback). CPU tensors are
  accepted only under ``TRITON_INTERPRET=1``.
* ``torch``: always the reference.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

from . import reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
OPS = ("gram", "orth_quantize", "combine", "project")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run. Re-raised by twamerge as its own typed error."""


def env_backend() -> str:
    value = os.environ.get("TWAMERGE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TWAMERGE_BACKEND={value!r}; expected one of {', '.join(BACKENDS)}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_status: tuple[bool, str] | None = None


def triton_status() -> tuple[bool, str]:
    """(importable, reason). Cached: importing triton is slow."""
    global _triton_status
    if _triton_status is None:
        try:
            importlib.import_module("triton")
            _triton_status = (True, "triton imports")
        except Exception as exc:  # ImportError, or a broken install raising anything
            _triton_status = (False, f"triton does not import ({type(exc).__name__}: {exc})")
    return _triton_status


_logged: set[tuple[str, str]] = set()


def _log_once(op: str, choice: str, reason: str) -> None:
    if (op, choice) not in _logged:
        _logged.add((op, choice))
        log.info("kernel %s: using %s (%s)", op, choice, reason)


def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for running ``op`` on ``device``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    backend = (backend or env_backend()).lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        _log_once(op, "torch", "requested")
        return "torch"
    ok, why = triton_status()
    runnable_here = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if backend == "triton":
        if not ok:
            raise BackendUnavailableError(f"--backend triton was requested but {why}; pass --backend torch")
        if not runnable_here:
            raise BackendUnavailableError(
                f"--backend triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); tensors are on {device}; "
                "pass --backend torch"
            )
        _log_once(op, "triton", "requested")
        return "triton"
    if ok and device.type == "cuda":
        _log_once(op, "triton", "auto: CUDA tensor and triton imports")
        return "triton"
    _log_once(op, "torch", "auto: " + (why if not ok else f"tensor on {device}, not CUDA"))
    return "torch"


def _impl(op: str, device: torch.device, backend: str | None) -> Callable:
    if resolve(op, device, backend) == "torch":
        return getattr(reference, f"{op}_torch")
    module = importlib.import_module(f"{__package__}.triton_{op}")
    return getattr(module, f"{op}_triton")


def gram(x, *, backend: str | None = None):
    """Dispatching :func:`reference.gram_torch`."""
    return _impl("gram", x.device, backend)(x)


def orth_quantize(x, mean, transform, bits, group_size, out=None, *, backend: str | None = None):
    """Dispatching :func:`reference.orth_quantize_torch`."""
    return _impl("orth_quantize", x.device, backend)(x, mean, transform, bits, group_size, out)


def combine(mean, codes, scales, zeros, beta, group_block, bits, group_size, out=None, *, backend: str | None = None):
    """Dispatching :func:`reference.combine_torch`."""
    return _impl("combine", mean.device, backend)(mean, codes, scales, zeros, beta, group_block, bits, group_size, out)


def project(grad, codes, scales, zeros, group_block, n_blocks, bits, group_size, *, backend: str | None = None):
    """Dispatching :func:`reference.project_torch`."""
    return _impl("project", grad.device, backend)(grad, codes, scales, zeros, group_block, n_blocks, bits, group_size)
