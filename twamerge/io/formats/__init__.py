"""Checkpoint formats: one module per format, each registering its reader for its file suffixes.

Adding a format: write ``formats/<name>.py`` with a ``Reader`` subclass decorated with
``@register(".suffix")`` and import it below.
"""

from . import safetensors, sharded, torch_pickle  # noqa: F401  (importing registers the readers)
from .base import Entry, Reader, open_reader, reader_suffixes, register

__all__ = ["Entry", "Reader", "open_reader", "reader_suffixes", "register"]
