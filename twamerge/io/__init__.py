"""Checkpoint I/O: find candidate files, read them one tensor at a time, validate, write merges.

Layout (one job per module):

- ``formats/``: the ``Reader`` interface and its suffix registry; one module per on-disk format;
  ``formats/checks``: every tensor read is dense, strided and of a supported dtype, and torch zips
  hold every byte their storages declare.
- ``jsonschema``: the one validation layer for JSON read from disk (shard indexes, reports): UTF-8,
  depth, sizes, types, ranges, finite numbers, the field named in the error.
- ``discovery``: paths, globs and directories -> an ordered list of candidates.
- ``rename``: containers and wrapper prefixes -> clean tensor names.
- ``validate``: candidates agree on keys/shapes/dtypes; the NaN/Inf policy.
- ``candidates``: ``Candidate``, ``CheckpointSet``, ``open_candidates``, ``open_checkpoints``.
- ``hashing``: SHA-256 of inputs on worker threads beside the reads, and of outputs as written.
- ``stats``: per-file counts of bytes read (for tests).
- ``writer`` and ``atomic``: atomic, reproducible outputs; every destination checked before any work,
  and all of a command's files committed together (or none).
- ``adapters``: PEFT LoRA adapter folders as candidates (read as the adapted models on their base),
  checked to agree, and written back as one adapter.
- ``model_card``: the ``README.md`` a merged folder gets.
"""

from .atomic import AtomicWrite, atomic_file, refuse_existing
from .candidates import Candidate, CheckpointSet, open_candidates, open_checkpoints
from .discovery import HF_WEIGHT_NAMES, expand_paths
from .formats import Reader, open_reader, reader_suffixes, register
from .hashing import FileHash, sha256_file
from .rename import strip_prefixes, unwrap_state_dict
from .stats import count_reads, reset_read_stats, stats
from .validate import check_finite, validate_candidates
from .writer import check_output, save_safetensors, write_checkpoint

__all__ = [
    "HF_WEIGHT_NAMES",
    "AtomicWrite",
    "Candidate",
    "CheckpointSet",
    "FileHash",
    "Reader",
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
