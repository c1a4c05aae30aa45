"""Turn the paths users give (files, globs, directories, model folders) into an ordered candidate list.

Order matters (an EMA runs over it, reports list it), so each glob or directory is sorted naturally
(``epoch10`` after ``epoch9``), and so is a numbered series however it is given: a shell expands
``out/checkpoint-*`` in lexical order (``checkpoint-100`` before ``checkpoint-25``) into separate
arguments, which are put back in the order of their numbers, and the log says so. Names that are
not one series (``final.pt best.pt``) keep the order given.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .formats import reader_suffixes
from .formats.sharded import indexed_shards

__all__ = ["HF_WEIGHT_NAMES", "config_folder", "expand_paths", "hf_weight_file", "is_adapter_dir", "is_checkpoint_file",
           "is_model_dir", "out_of_natural_order"]

# Weight files of a Hugging Face model directory, in order of preference.
HF_WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


log = logging.getLogger(__name__)
_REORDERED: set[tuple[Path, ...]] = set()  # the lists whose reordering the log has reported


def _natural_key(path: Path) -> list[Any]:
    # re.split with a capture group alternates text and digits, so int and str never meet in a comparison.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def _series(path: Path) -> str:
    """The name of the series a path belongs to: the path with each number replaced by ``#``
    (``out/checkpoint-#`` for every ``out/checkpoint-N``)."""
    return re.sub(r"\d+", "#", str(path).lower())


def _in_natural_order(paths: list[Path]) -> list[Path]:
    """``paths`` with each numbered series in natural order, in the places its members were given.

    Candidates of one series (:func:`_series`) are sorted by their numbers among themselves; the
    others, and the positions each series occupies, stay as given.
    """
    places: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        places.setdefault(_series(p), []).append(i)
    out = list(paths)
    for positions in places.values():
        for i, p in zip(positions, sorted((paths[i] for i in positions), key=_natural_key)):
            out[i] = p
    return out


def out_of_natural_order(items: Sequence[str | Path]) -> tuple[Path, Path] | None:
    """``(a, b)`` when ``a`` was given before ``b`` although natural order puts ``b`` first (the first such
    pair; :func:`expand_paths` then swaps them); None when the candidates are given in natural order."""
    given = _given_order(items)
    for a, b in zip(given, _in_natural_order(given)):
        if a != b:
            return a, b
    return None


def is_model_dir(path: Path) -> bool:
    """A directory in Hugging Face layout: it holds one of ``HF_WEIGHT_NAMES``."""
    return path.is_dir() and any((path / name).is_file() for name in HF_WEIGHT_NAMES)


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter folder (``adapter_config.json``): one candidate, read by ``io.adapters``."""
    return path.is_dir() and (path / "adapter_config.json").is_file()


def hf_weight_file(directory: Path) -> Path | None:
    """The weight file (or index) a Hugging Face model directory is read from, or None."""
    return next((directory / n for n in HF_WEIGHT_NAMES if (directory / n).is_file()), None)


def config_folder(path: Path) -> Path | None:
    """The Hugging Face folder of a candidate: the candidate itself when it is a folder with config.json, the
    folder of a candidate file that holds one (a Trainer's ``checkpoint-500/model.safetensors``), else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


def is_checkpoint_file(path: Path) -> bool:
    """A file some registered reader opens, by its suffix."""
    return path.is_file() and path.name.lower().endswith(reader_suffixes())


def _drop_indexed_shards(paths: list[Path]) -> list[Path]:
    """Remove shard files that an index in the same list already covers (a glob catches both)."""
    shards: set[Path] = set()
    for p in paths:
        if p.name.endswith(".index.json") and p.is_file():
            # A malformed index covers nothing: it stays a candidate, and opening it names the fault.
            shards.update(s.resolve() for s in indexed_shards(p) or [])
    return [p for p in paths if p.resolve() not in shards]


def _expand_dir(directory: Path) -> list[Path]:
    if is_model_dir(directory) or is_adapter_dir(directory):
        return [directory]
    found = [p for p in directory.iterdir() if is_checkpoint_file(p) or is_model_dir(p) or is_adapter_dir(p)]
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
    ``.index.json``) or a PEFT adapter folder (``adapter_config.json``) is one candidate; any other
    directory contributes the checkpoint files, model and adapter folders inside it. Each glob or
    directory is sorted naturally (``epoch10`` after ``epoch9``); the order of the arguments
    themselves is kept, except that a numbered series (``checkpoint-N``) is always in natural order
    wherever its members are given (logged when that reorders them).
    Shards covered by an index are dropped.

    Raises:
        CheckpointError: a path does not exist, a glob matches nothing, a directory holds no
            checkpoints, or the same file is given twice.
    """
    given = _given_order(items)
    out = _in_natural_order(given)
    if out != given and tuple(given) not in _REORDERED:
        # Said once per list: a command expands its arguments in more than one place.
        _REORDERED.add(tuple(given))
        a, b = next((a, b) for a, b in zip(given, out) if a != b)
        log.info("candidates put in natural order (%s was given before %s): %s", a, b,
                 ", ".join(str(p) for p in out[:8]) + (f", ... ({len(out)} in all)" if len(out) > 8 else ""))
    return out


def _given_order(items: Sequence[str | Path]) -> list[Path]:
    """The candidates ``items`` name, in the order given (each glob or directory sorted naturally)."""
    out: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.exists():
            out.extend(_expand_dir(path) if path.is_dir() else [path])
        elif glob.has_magic(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            matches = [m for m in matches if is_checkpoint_file(m) or is_model_dir(m) or is_adapter_dir(m)]
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
