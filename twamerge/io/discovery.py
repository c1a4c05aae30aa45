"""Turn the paths users give (files, globs, directories, model folders) into an ordered candidate list.

Order matters (an EMA runs over it, reports list it), so each glob or directory is sorted naturally
(``epoch10`` after ``epoch9``) while the arguments keep their own order.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .formats import reader_suffixes

__all__ = ["HF_WEIGHT_NAMES", "expand_paths", "hf_weight_file", "is_checkpoint_file", "is_model_dir"]

# Weight files of a Hugging Face model directory, in order of preference.
HF_WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _natural_key(path: Path) -> list[Any]:
    # re.split with a capture group alternates text and digits, so int and str never meet in a comparison.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def is_model_dir(path: Path) -> bool:
    """A directory in Hugging Face layout: it holds one of ``HF_WEIGHT_NAMES``."""
    return path.is_dir() and any((path / name).is_file() for name in HF_WEIGHT_NAMES)


def hf_weight_file(directory: Path) -> Path | None:
    """The weight file (or index) a Hugging Face model directory is read from, or None."""
    return next((directory / n for n in HF_WEIGHT_NAMES if (directory / n).is_file()), None)


def is_checkpoint_file(path: Path) -> bool:
    """A file some registered reader opens, by its suffix."""
    return path.is_file() and path.name.lower().endswith(reader_suffixes())


def _drop_indexed_shards(paths: list[Path]) -> list[Path]:
    """Remove shard files that an index in the same list already covers (a glob catches both)."""
    shards: set[Path] = set()
    for p in paths:
        if p.name.endswith(".index.json") and p.is_file():
            try:
                weight_map = json.loads(p.read_text()).get("weight_map", {})
            except (OSError, ValueError):
                continue
            shards.update((p.parent / f).resolve() for f in set(weight_map.values()))
    return [p for p in paths if p.resolve() not in shards]


def _expand_dir(directory: Path) -> list[Path]:
    if is_model_dir(directory):
        return [directory]
    found = [p for p in directory.iterdir() if is_checkpoint_file(p) or is_model_dir(p)]
    found = _drop_indexed_shards(sorted(found, key=_natural_key))
    if not found:
        raise CheckpointError(
            f"directory {directory} holds no checkpoints (looked for *.safetensors, *.pt, *.pth, *.bin, *.ckpt, "
            f"*.index.json and model directories with {HF_WEIGHT_NAMES[1]} or {HF_WEIGHT_NAMES[3]})"
        )
    return found


def expand_paths(items: Sequence[str | Path]) -> list[Path]:
    """Expand globs and directories into an ordered list of candidate checkpoints.

    A directory in Hugging Face layout (``model.safetensors``, ``pytorch_model.bin`` or their
    ``.index.json``) is one candidate; any other directory contributes the checkpoint files and model
    directories inside it. Each glob or directory is sorted naturally (``epoch10`` after ``epoch9``);
    the order of the arguments themselves is kept. Shards covered by an index are dropped.

    Raises:
        CheckpointError: a path does not exist, a glob matches nothing, a directory holds no
            checkpoints, or the same file is given twice.
    """
    out: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.exists():
            out.extend(_expand_dir(path) if path.is_dir() else [path])
        elif glob.has_magic(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            matches = [m for m in matches if is_checkpoint_file(m) or is_model_dir(m)]
            if not matches:
                raise CheckpointError(f"pattern {text!r} matches no checkpoint files")
            out.extend(_drop_indexed_shards(sorted(matches, key=_natural_key)))
        else:
            raise CheckpointError(f"{text}: no such file or directory")
    seen: dict[Path, Path] = {}
    for p in out:
        key = p.resolve()
        if key in seen:
            raise CheckpointError(
                f"{p} is given more than once (also as {seen[key]}); each candidate must be a distinct file"
            )
        seen[key] = p
    return out
