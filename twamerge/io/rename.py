"""From what a file stores to the clean tensor names a merge uses.

Two steps, both recorded in the rename note shown to users: ``unwrap_state_dict`` finds the state
dict inside a training checkpoint (containers, or ``--key`` for EMA weights), and ``strip_prefixes``
removes the wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``, and the attribute
name a LightningModule puts in front of its model's keys). Everything that knows about a training
framework lives here, not in the readers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = [
    "CONTAINER_KEYS",
    "EMA_HINT_KEYS",
    "STRIP_PREFIXES",
    "is_lightning",
    "log_ema_hints",
    "rename_note",
    "strip_prefixes",
    "unwrap_state_dict",
]

# Containers that hold the model's state dict inside a training checkpoint, most specific first.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Keys that usually hold EMA weights; never chosen implicitly, only mentioned so users find --key.
EMA_HINT_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model", "ema_params")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(
    obj: Any, *, ema_key: str | None = None, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the flat ``{name: Tensor}`` state dict inside a loaded checkpoint object.

    With ``ema_key`` (e.g. ``"state_dict_ema"`` or a dotted path ``"callbacks.ema.weights"``) that
    entry is taken; otherwise the first of ``state_dict``, ``model_state_dict``, ``model``, ``module``
    is descended into while the current dict holds non-tensor values.

    Returns:
        (state dict, the container path taken or None).

    Raises:
        CheckpointError: ``ema_key`` is missing, or the result is not a non-empty dict of tensors.
    """
    taken: list[str] = []
    if ema_key:
        cur = obj
        if isinstance(cur, Mapping) and ema_key in cur:
            parts = [ema_key]
        else:
            parts = ema_key.split(".")
        for part in parts:
            if not isinstance(cur, Mapping) or part not in cur:
                avail = sorted(map(str, cur.keys()))[:12] if isinstance(cur, Mapping) else []
                raise CheckpointError(
                    f"{source}: no entry {ema_key!r} (stopped at {part!r}); available keys there: {avail}"
                )
            cur = cur[part]
            taken.append(part)
        obj = cur
    else:
        while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            nxt = next((c for c in CONTAINER_KEYS if isinstance(obj.get(c), Mapping)), None)
            if nxt is None:
                break
            taken.append(nxt)
            obj = obj[nxt]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, expected a dict of tensors")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            hint = f" (top-level keys: {sorted(map(str, obj.keys()))[:12]})" if not taken else ""
            raise CheckpointError(
                f"{source}: key {k!r} holds a {type(v).__name__}, not a tensor; expected a flat dict of tensors"
                f"{hint}; pass --key NAME to choose the state dict inside the file"
            )
    if not obj:
        raise CheckpointError(f"{source}: holds no tensors")
    return {str(k): v for k, v in obj.items()}, ".".join(taken) or None


def log_ema_hints(obj: Any, path: Path, ema_key: str | None) -> None:
    """Mention EMA weights a file also holds, so users find ``--key`` (they are never taken implicitly)."""
    if isinstance(obj, Mapping) and not ema_key:
        hints = [k for k in EMA_HINT_KEYS if k in obj]
        if hints:
            log.info("%s also holds %s; pass --key %s to merge those weights instead", path, hints, hints[0])


def is_lightning(outer_keys: Collection[str]) -> bool:
    """Whether a checkpoint's top-level keys are those of a PyTorch Lightning checkpoint."""
    return "pytorch-lightning_version" in outer_keys or ("state_dict" in outer_keys and "global_step" in outer_keys)


def strip_prefixes(raw: Sequence[str], *, lightning: bool = False) -> tuple[list[str], list[str]]:
    """Strip the prefixes every name shares: ``module.``/``_orig_mod.`` (repeatedly), then for a
    Lightning checkpoint the attribute name of the wrapped model.

    Returns:
        (clean names in the order of ``raw``, the prefixes stripped in order).
    """
    names = list(raw)
    stripped: list[str] = []
    changed = True
    while changed and names:
        changed = False
        for p in STRIP_PREFIXES:
            if all(n.startswith(p) for n in names):
                names = [n[len(p):] for n in names]
                stripped.append(p)
                changed = True
    # A LightningModule's state dict is its children's, prefixed by the attribute name (``model.``).
    first = names[0].split(".", 1)[0] + "." if names and "." in names[0] else None
    if lightning and first and all(n.startswith(first) and n != first for n in names):
        names = [n[len(first):] for n in names]
        stripped.append(first)
    return names, stripped


def rename_note(path: Path, container: str | None, stripped: list[str], renamed: int) -> dict[str, Any] | None:
    """What the report says about a candidate's renaming, or None when its names were used as stored."""
    if not stripped and not container:
        return None
    return {
        "path": str(path),
        "container": container,
        "stripped_prefixes": stripped,
        "renamed_keys": renamed if stripped else 0,
    }
