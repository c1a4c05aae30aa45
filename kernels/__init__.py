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

Why this folder shadows nothing: ``kernels/`` sits at the top of the checkout (the project's layout), and a
process started there has the checkout root first on ``sys.path``, so a plain ``import kernels`` would find this
folder before Hugging Face's ``kernels`` package (which transformers imports). The code below runs only when the
folder is imported under that top-level name: it hands the import over to the installed package of that name, or
raises ModuleNotFoundError when none is installed, so nothing of this repository is ever a top-level ``kernels``.
"""

if __name__ != "twamerge.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    # The import statement returns sys.modules[name] after this file runs, so the installed package replaces us.
    _installed = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _installed
    _spec.loader.exec_module(_installed)
else:
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
