"""Checkpoint I/O: find candidate files, read them one tensor at a time, validate, write merges.

Layout (one job per module):

- ``formats/``: the ``Reader`` interface and its suffix registry; one module per on-disk format.
- ``discovery``: paths, globs and directories -> an ordered list of candidates.
- ``rename``: containers and wrapper prefixes -> clean tensor names.
- ``validate``: candidates agree on keys/shapes/dtypes; the NaN/Inf policy.
- ``candidates``: ``Candidate``, ``CheckpointSet``, ``open_candidates``, ``open_checkpoints``.
- ``hashing``: SHA-256 of inputs, fed by the reads a merge does anyway.
- ``stats``: per-file counts of bytes read (for tests).
- ``writer`` and ``atomic``: atomic, reproducible outputs.
"""

from .atomic import AtomicWrite, atomic_file, refuse_existing
from .candidates import Candidate, CheckpointSet, open_candidates, open_checkpoints
from .discovery import HF_WEIGHT_NAMES, expand_paths
from .formats import Reader, open_reader, reader_suffixes, register
from .hashing import StreamingHasher, sha256_file
from .rename import strip_prefixes, unwrap_state_dict
from .stats import count_reads, reset_read_stats, stats
from .validate import check_finite, validate_candidates
from .writer import check_output, save_safetensors, write_checkpoint

__all__ = [
    "HF_WEIGHT_NAMES",
    "AtomicWrite",
    "Candidate",
    "CheckpointSet",
    "Reader",
    "StreamingHasher",
    "atomic_file",
    "check_finite",
    "check_output",
    "count_reads",
    "expand_paths",
    "open_candidates",
    "open_checkpoints",
    "open_reader",
    "reader_suffixes",
    "refuse_existing",
    "register",
    "reset_read_stats",
    "save_safetensors",
    "sha256_file",
    "stats",
    "strip_prefixes",
    "unwrap_state_dict",
    "validate_candidates",
    "write_checkpoint",
]
