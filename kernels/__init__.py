"""Subspace kernels: gram, orth_quantize, combine, project (installed as ``twamerge.kernels``).

Each op has a torch reference (``reference.py``, the CPU path and test oracle) and a Triton kernel
with the same signature (``triton_gram.py``, ``triton_orth_quantize.py``, ``triton_combine.py``,
``triton_project.py``; named apart from the op functions so importing them never shadows those);
``dispatch.py`` picks one. This package imports nothing from the rest of twamerge, and triton only
lazily, so CPU-only installs work.

dtype policy: candidate tensors may be float32, float16 or bfloat16; centring, the basis transform,
the Gram matrix (float64 across tiles), combine and project all compute in float32 or better;
``combine`` casts once, at the store, to the dtype of its ``out`` buffer. Quantized codes are uint8
in the layout documented in ``layout.py``. Unsupported dtypes raise ``TypeError`` naming the dtype.
"""

from .dispatch import BACKENDS, OPS, BackendUnavailableError, combine, gram, orth_quantize, project, resolve
from .layout import FLOAT_BITS, PACKED_BITS, SUPPORTED_BITS

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FLOAT_BITS",
    "OPS",
    "PACKED_BITS",
    "SUPPORTED_BITS",
    "combine",
    "gram",
    "orth_quantize",
    "project",
    "resolve",
]
