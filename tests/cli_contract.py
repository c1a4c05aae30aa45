"""The error contract every command keeps, checked the same way by the hostile-input tests.

A refused command exits 1 (or 2 for a usage error), prints exactly one stderr line starting with
``error:``, and leaves every file as it was: ``snapshot`` records a folder before and after.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: regular files by content hash, links by target, folders as such."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_error_line(code: int, stderr: str, output: str = "") -> None:
    assert code in (1, 2), f"exit {code}: {output or stderr}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr or output
