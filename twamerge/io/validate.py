"""Checks before and during a merge: candidates agree on keys, shapes and dtypes; tensors are finite.

Agreement is checked once, on the headers, before any arithmetic; finiteness per tensor as it is
read (NaN/Inf anywhere would poison every merged value it touches).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointMismatchError, NonFiniteError
from ..options import dtype_name
from .formats.base import Entry

log = logging.getLogger(__name__)

__all__ = ["KEY_MODES", "check_finite", "validate_candidates"]

KEY_MODES = ("strict", "intersection")


class _HasEntries(Protocol):
    path: Path
    entries: Mapping[str, Entry]


def _fmt_entry(e: Entry) -> str:
    return f"{list(e[0])} {dtype_name(e[1])}"


def validate_candidates(cands: Sequence[_HasEntries], mode: str) -> tuple[list[str], list[str]]:
    """Return (merged keys in the first candidate's order, dropped keys); raise on disagreement.

    ``mode`` is ``"strict"`` (every candidate has the same keys) or ``"intersection"`` (the common
    keys are merged, the rest logged and returned as dropped).

    Raises:
        CheckpointMismatchError: keys differ in strict mode, no key is common, or shapes/dtypes differ.
    """
    ref = cands[0]
    common = [k for k in ref.entries if all(k in c.entries for c in cands[1:])]
    dropped = sorted(set().union(*(c.entries for c in cands)) - set(common))
    if mode == "strict" and dropped:
        parts = []
        for c in cands[1:]:
            missing = [k for k in ref.entries if k not in c.entries]
            extra = [k for k in c.entries if k not in ref.entries]
            if missing or extra:
                parts.append(
                    f"{c.path.name} lacks {len(missing)} keys of {ref.path.name} {missing[:3]} "
                    f"and has {len(extra)} it lacks {extra[:3]}"
                )
        raise CheckpointMismatchError(
            "checkpoints disagree on keys: " + "; ".join(parts[:4])
            + ("; ..." if len(parts) > 4 else "")
            + "; pass --keys intersection to merge only the common keys"
        )
    if not common:
        raise CheckpointMismatchError("the checkpoints share no tensor names; nothing to merge")
    bad = []
    for k in common:
        for c in cands[1:]:
            if c.entries[k] != ref.entries[k]:
                bad.append(
                    f"{k!r} is {_fmt_entry(ref.entries[k])} in {ref.path.name} but {_fmt_entry(c.entries[k])} "
                    f"in {c.path.name}"
                )
                break
    if bad:
        raise CheckpointMismatchError(
            f"checkpoints disagree on shapes or dtypes of {len(bad)} tensors: " + "; ".join(bad[:3])
            + ("; ..." if len(bad) > 3 else "")
            + "; they must come from the same architecture (cast with --dtype only changes the output)"
        )
    if dropped:
        log.warning("merging the %d common keys; %d keys not in every checkpoint are left out, e.g. %s",
                    len(common), len(dropped), dropped[:3])
    return common, dropped


def check_finite(t: torch.Tensor, path: Path, key: str) -> torch.Tensor:
    """Return ``t``; raise when a floating tensor holds NaN or Inf.

    Raises:
        NonFiniteError: naming the file, the key and the counts.
    """
    if t.dtype.is_floating_point:
        # isfinite is not implemented for the 1-byte float8 types: check them in float32.
        check = t if t.dtype.itemsize > 1 else t.float()
        finite = torch.isfinite(check)
        if not bool(finite.all()):
            n_nan = int(check.isnan().sum())
            n_inf = int((~finite).sum()) - n_nan
            raise NonFiniteError(
                f"{path}: tensor {key!r} holds {n_nan} NaN and {n_inf} Inf values; "
                "drop that checkpoint or pass --allow-nonfinite to merge anyway"
            )
    return t
