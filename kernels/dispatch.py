"""Subspace kernels: gram, orth_quantize, combine, project (installed as ``twamerge.kernels``; this module
is their one public entry, ``twamerge.kernels.dispatch``).

Each op has a torch reference (``reference.py``, the CPU path and test oracle) and a Triton kernel
with the same signature (``triton_gram.py``, ``triton_orth_quantize.py``, ``triton_combine.py``,
``triton_project.py``; named apart from the op functions so importing them never shadows those);
``dispatch.py`` picks one. This package imports nothing from the rest of twamerge, and triton only
lazily, so CPU-only installs work.

dtype policy: candidate tensors may be float32, float16 or bfloat16; centring, the basis transform,
the Gram matrix (float64 across tiles), combine and project all compute in float32 or better;
``combine`` casts once, at the store, to the dtype of its ``out`` buffer. Quantized codes are uint8
in the layout documented in ``layout.py``. Unsupported dtypes raise ``TypeError`` naming the dtype.

``kernels/`` has no ``__init__.py`` on purpose: a process started in the checkout has the root first on
``sys.path``, and a regular package of that name would hide Hugging Face's ``kernels`` (which transformers
imports). A folder without one is at most a namespace portion, which loses to any installed package.

The one place that decides between the Triton kernels, the C kernels and the torch references.

Inputs to the decision: the explicit ``backend`` argument (from config or ``--backend``), else the
``TWAMERGE_BACKEND`` environment variable, whether triton imports, whether the C kernels build
(``native.py``), and where the tensor lives (CUDA, or CPU under ``TRITON_INTERPRET=1``).

* ``auto``: Triton for CUDA tensors when triton imports; on CPU the C kernels (all four ops) when
  they build, the torch reference otherwise. The choice and its reason are logged once per op.
* ``triton``: Triton or :class:`BackendUnavailableError` (never a quiet fallback). CPU tensors are
  accepted only under ``TRITON_INTERPRET=1``.
* ``native``: the C kernels or :class:`BackendUnavailableError`.
* ``torch``: always the reference.

Sizes and dtypes matter too: each Triton kernel has limits (:func:`triton_limit`; e.g. the gram
kernel holds all K candidates of a tile in registers) and the C kernels take packed codes and
float32 or bfloat16 inputs (``native.unsupported``). Past a limit, ``auto`` runs the reference
(logged once per op with the reason) and a forced backend raises :class:`BackendUnavailableError`
naming it.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

from . import native, reference
from .layout import stacked

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "native", "torch")
OPS = ("gram", "orth_quantize", "combine", "project")
NATIVE_OPS = OPS


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run. Re-raised by twamerge as its own typed error."""


# Limits of the Triton kernels, defined here (the kernel modules import them) so dispatch can check
# them without importing triton.
GRAM_MAX_K = 256  # candidates padded to a power of two >= 16, a [K_PAD, BLOCK_N] tile in registers
ORTH_QUANTIZE_MAX_TILE = 1 << 16  # next_pow2(K) * next_pow2(group_size) candidate elements per program
GROUP_MAX = 1 << 14  # next_pow2(group_size) for combine and project


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def triton_limit(op: str, *, k: int | None = None, group_size: int | None = None) -> str | None:
    """Why the Triton kernel of ``op`` cannot take these sizes, or None when it can.

    Args:
        k: candidates (rows of ``x``) for gram and orth_quantize.
        group_size: quantization group for orth_quantize, combine and project.
    """
    if op == "gram" and k is not None and k > GRAM_MAX_K:
        return f"the Triton gram kernel takes at most {GRAM_MAX_K} candidates; K={k}"
    if op == "orth_quantize" and k is not None and group_size is not None:
        tile = _next_pow2(max(k, 1)) * _next_pow2(group_size)
        if tile > ORTH_QUANTIZE_MAX_TILE:
            return (f"the Triton orth_quantize kernel takes at most {ORTH_QUANTIZE_MAX_TILE} elements per "
                    f"next_pow2(K) x next_pow2(group_size) tile; K={k}, group_size={group_size} needs {tile}")
    if op in ("combine", "project") and group_size is not None and _next_pow2(group_size) > GROUP_MAX:
        return f"the Triton {op} kernel takes group_size up to {GROUP_MAX}; group_size={group_size}"
    return None


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


def resolve(op: str, device: torch.device, backend: str | None = None, *, k: int | None = None,
            group_size: int | None = None, bits: int | None = None, dtype: torch.dtype | None = None) -> str:
    """Return ``"triton"``, ``"native"`` or ``"torch"`` for running ``op`` on ``device``.

    Sizes as in :func:`triton_limit`; ``bits`` and ``dtype`` (of gram's and orth_quantize's ``x``, combine's
    ``out`` or project's ``grad``) as in ``native.unsupported``.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    backend = (backend or env_backend()).lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        _log_once(op, "torch", "requested")
        return "torch"
    if backend == "native":
        return _resolve_native(op, device, bits, dtype)
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
        limit = triton_limit(op, k=k, group_size=group_size)
        if limit:
            raise BackendUnavailableError(f"--backend triton was requested but {limit}; pass --backend auto or torch")
        _log_once(op, "triton", "requested")
        return "triton"
    if device.type == "cuda":
        limit = triton_limit(op, k=k, group_size=group_size) if ok else None
        if limit:
            _log_once(op, "torch", "auto: " + limit)
            return "torch"
        if ok:
            _log_once(op, "triton", "auto: CUDA tensor and triton imports")
            return "triton"
        _log_once(op, "torch", "auto: " + why)
        return "torch"
    if device.type == "cpu" and op in NATIVE_OPS:
        problem = _native_problem(op, bits, dtype)
        if problem is None:
            _log_once(op, "native", "auto: CPU tensor, compiled C kernels")
            return "native"
        _log_once(op, "torch", "auto: " + problem)
        return "torch"
    _log_once(op, "torch", f"auto: tensor on {device}" + ("" if op in NATIVE_OPS else f", no C kernel for {op}"))
    return "torch"


def _resolve_native(op: str, device: torch.device, bits: int | None, dtype: torch.dtype | None) -> str:
    if op not in NATIVE_OPS:
        _log_once(op, "torch", f"--backend native: no C kernel for {op}")
        return "torch"
    if device.type != "cpu":
        raise BackendUnavailableError(f"--backend native runs on CPU tensors; tensors are on {device}")
    problem = _native_problem(op, bits, dtype)
    if problem is not None:
        raise BackendUnavailableError(f"--backend native was requested but {problem}; pass --backend auto or torch")
    _log_once(op, "native", "requested")
    return "native"


def _native_problem(op: str, bits: int | None, dtype: torch.dtype | None) -> str | None:
    """Why the C kernel of ``op`` cannot run these arguments (they are unsupported, or the library does
    not build here), or None when it can."""
    problem = native.unsupported(op, bits=bits, dtype=dtype)
    if problem is None:
        built, why = native.status()
        problem = None if built else why
    return problem


def _impl(op: str, device: torch.device, backend: str | None, **sizes) -> Callable:
    choice = resolve(op, device, backend, **sizes)
    if choice == "torch":
        return getattr(reference, f"{op}_torch")
    if choice == "native":
        return getattr(native, f"{op}_native")
    module = importlib.import_module(f"{__package__}.triton_{op}")
    return getattr(module, f"{op}_triton")


def gram(x, start: int = 0, period: int = 0, run: int = reference.GRAM_RUN, *, backend: str | None = None):
    """Dispatching :func:`reference.gram_torch`. ``x`` may be a :class:`layout.Rows` (the C kernel reads its
    rows in place; other backends stack them). The Triton kernel takes runs of its own, relative to ``x``'s
    first column (``start``, ``period`` and ``run`` are the CPU backends')."""
    choice = resolve("gram", x.device, backend, k=x.shape[0], dtype=x.dtype)
    if choice == "native":
        return native.gram_native(x, start, period, run)
    if choice == "torch":
        return reference.gram_torch(stacked(x), start, period, run)
    return importlib.import_module(f"{__package__}.triton_gram").gram_triton(stacked(x))


def orth_quantize(x, mean, transform, bits, group_size, out=None, *, backend: str | None = None):
    """Dispatching :func:`reference.orth_quantize_torch`; ``x`` may be a :class:`layout.Rows`, as for :func:`gram`."""
    impl = _impl("orth_quantize", x.device, backend, k=x.shape[0], group_size=group_size, bits=bits, dtype=x.dtype)
    return impl(x if impl is native.orth_quantize_native else stacked(x), mean, transform, bits, group_size, out)


def combine(mean, codes, scales, zeros, beta, group_block, bits, group_size, out=None, *, backend: str | None = None):
    """Dispatching :func:`reference.combine_torch`."""
    impl = _impl("combine", mean.device, backend, group_size=group_size, bits=bits,
                 dtype=torch.float32 if out is None else out.dtype)
    return impl(mean, codes, scales, zeros, beta, group_block, bits, group_size, out)


def project(grad, codes, scales, zeros, group_block, n_blocks, bits, group_size, *, backend: str | None = None):
    """Dispatching :func:`reference.project_torch`."""
    impl = _impl("project", grad.device, backend, group_size=group_size, bits=bits, dtype=grad.dtype)
    return impl(grad, codes, scales, zeros, group_block, n_blocks, bits, group_size)
