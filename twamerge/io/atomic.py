"""Write outputs atomically: under a temporary name in the destination folder, renamed when complete.

Every output of twamerge (checkpoints, shards, indexes, model directories, reports, plots) goes
through ``AtomicWrite``, so an interrupted run never leaves a half-written file under the final
name, and a failed one leaves no temporaries. ``refuse_existing`` is the one "exists without
--force" check.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

__all__ = ["AtomicWrite", "atomic_file", "refuse_existing"]


def refuse_existing(path: str | Path, what: str | None = None, *, force: bool = False) -> None:
    """Raise ``OutputError`` when ``path`` exists and ``force`` is not set.

    ``what`` names a side output ("report", "plot") in the message; without it the path is the output.
    """
    path = Path(path)
    if force or not path.exists():
        return
    if what:
        raise OutputError(f"{path}: {what} exists; pass --force to overwrite it")
    raise OutputError(f"{path} already exists; pass --force to overwrite it or choose another output")


class AtomicWrite:
    """Stage files (or one directory) beside their final paths; ``commit`` renames them into place.

    Files are renamed in the order they were staged (put an index last), and if one rename fails the
    files already renamed are removed again. A staged directory replaces the final one as a whole.
    Leaving the ``with`` block without ``commit`` (an error, an interrupt) removes every temporary.
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._dir: tuple[Path, Path] | None = None

    def __enter__(self) -> AtomicWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def file(self, final: str | Path, *, suffix: str = ".tmp") -> Path:
        """A new empty temporary file in ``final``'s folder, to be renamed to ``final``."""
        final = Path(final)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
        os.close(fd)
        self._files.append((Path(tmp), final))
        return Path(tmp)

    def directory(self, final: str | Path) -> Path:
        """A new empty temporary directory beside ``final``, to replace ``final`` on commit."""
        if self._dir is not None:
            raise RuntimeError("one staged directory per AtomicWrite")
        final = Path(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        self._dir = (tmp, final)
        return tmp

    @property
    def staged(self) -> list[tuple[Path, Path]]:
        """(temporary, final) pairs of the staged files."""
        return list(self._files)

    def commit(self) -> None:
        """Rename everything staged into place."""
        done: list[Path] = []
        try:
            for tmp, final in self._files:
                os.replace(tmp, final)
                done.append(final)
        except BaseException:
            for f in done:
                f.unlink(missing_ok=True)
            raise
        self._files = []
        if self._dir is not None:
            tmp, final = self._dir
            old = None
            if final.exists():
                # Moved aside, not deleted first: until the new directory is in place the old one survives.
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
                os.replace(final, old / "x")
            os.replace(tmp, final)
            self._dir = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove what was staged and not committed."""
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        self._files = []
        if self._dir is not None:
            shutil.rmtree(self._dir[0], ignore_errors=True)
            self._dir = None


@contextmanager
def atomic_file(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed."""
    with AtomicWrite() as aw:
        tmp = aw.file(path, suffix=suffix)
        yield tmp
        aw.commit()
