"""Write outputs atomically: under a temporary name in the destination folder, renamed when complete.

Every output of twamerge (checkpoints, shards, indexes, model directories, reports, plots) goes
through ``AtomicWrite``, so an interrupted run never leaves a half-written file under the final
name, and a failed one leaves no temporaries. ``refuse_existing`` is the one "exists without
--force" check.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

__all__ = ["AtomicWrite", "atomic_file", "check_name_length", "refuse_existing", "signals_as_interrupt"]

# A temporary or backup name is ".{name}.{8 hex}.tmp" / ".old": the final name plus this many bytes.
TEMP_NAME_OVERHEAD = 14


def refuse_existing(path: str | Path, what: str | None = None, *, force: bool = False) -> None:
    """Raise ``OutputError`` when ``path`` exists (a symlink, even a dangling one, included) and
    ``force`` is not set.

    ``what`` names a side output ("report", "plot") in the message; without it the path is the output.
    """
    path = Path(path)
    if force or not os.path.lexists(path):
        return
    if path.is_symlink():
        raise OutputError(f"{path} is a symlink (to {os.readlink(path)}); pass --force to replace the link "
                          "(its target is left alone) or choose another output")
    if what:
        raise OutputError(f"{path}: {what} exists; pass --force to overwrite it")
    raise OutputError(f"{path} already exists; pass --force to overwrite it or choose another output")


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_name_length(path: str | Path, what: str = "output") -> None:
    """Raise ``OutputError`` when ``path``'s name, or the temporary name it is written under, is too long."""
    path = Path(path)
    limit = _name_max(path.parent.absolute())
    size = len(os.fsencode(path.name))
    if size + TEMP_NAME_OVERHEAD > limit:
        raise OutputError(f"{what} {str(path)[:80]}...: the file name is {size} bytes long; with the temporary "
                          f"name it is written under it must stay within {limit - TEMP_NAME_OVERHEAD} bytes")


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like SIGINT does, so the cleanup
    that runs for Ctrl-C (temporaries removed, old outputs restored) runs for them too.

    Only in the main thread, and only for signals left at their default action (a caller's own
    handler is kept).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sibling(final: Path, suffix: str) -> Path:
    return final.parent / f".{final.name}.{secrets.token_hex(4)}{suffix}"


class AtomicWrite:
    """Stage files (or one directory) beside their final paths; ``commit`` renames them into place.

    One ``AtomicWrite`` is one transaction: files are renamed in the order they were staged (put an
    index last), a staged directory comes after them, and files marked ``obsolete`` are removed. Every
    file a commit replaces or removes is kept under a backup name until the whole commit has
    succeeded, so a failure part-way (a full disk, an interrupt) puts every old file back.
    Leaving the ``with`` block without ``commit`` (an error, an interrupt) removes every temporary;
    temporaries are registered before they are created, so an interrupt cannot leak one.
    SIGTERM and SIGHUP are handled like SIGINT while the block runs.
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._dir: tuple[Path, Path] | None = None
        self._obsolete: list[Path] = []
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> AtomicWrite:
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(signals_as_interrupt())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.discard()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    def file(self, final: str | Path, *, suffix: str = ".tmp") -> Path:
        """A new empty temporary file in ``final``'s folder, to be renamed to ``final``."""
        final = Path(final)
        while True:
            tmp = _sibling(final, suffix)
            self._files.append((tmp, final))  # registered first: discard() removes it whatever happens next
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._files.pop()
                continue
            except BaseException:
                self._files.pop()
                raise
            os.close(fd)
            return tmp

    def directory(self, final: str | Path) -> Path:
        """A new empty temporary directory beside ``final``, to replace ``final`` on commit."""
        if self._dir is not None:
            raise RuntimeError("one staged directory per AtomicWrite")
        final = Path(final)
        while True:
            tmp = _sibling(final, ".tmp")
            self._dir = (tmp, final)
            try:
                os.mkdir(tmp, 0o700)
            except FileExistsError:
                self._dir = None
                continue
            except BaseException:
                self._dir = None
                raise
            return tmp

    def obsolete(self, path: str | Path) -> None:
        """Remove ``path`` as part of the commit (a stale shard of the output this one replaces)."""
        self._obsolete.append(Path(path))

    @property
    def staged(self) -> list[tuple[Path, Path]]:
        """(temporary, final) pairs of the staged files."""
        return list(self._files)

    def commit(self) -> None:
        """Rename everything staged into place, all or nothing."""
        # (final, its backup name or None, the temporary that replaces it or None for an obsolete file);
        # each step is recorded before it is taken, so an interrupt anywhere can be undone.
        undo: list[tuple[Path, Path | None, Path | None]] = []
        steps = [(tmp, final) for tmp, final in self._files]
        steps += [(None, p) for p in self._obsolete if p not in {f for _, f in self._files}]
        if self._dir is not None:
            steps.append(self._dir)
        try:
            for tmp, final in steps:
                is_file = tmp is not None and (tmp, final) != self._dir
                if is_file and os.path.isdir(final) and not os.path.islink(final):
                    raise OutputError(f"{final} is a directory; it is not replaced by a file")
                backup = _sibling(final, ".old") if os.path.lexists(final) else None
                undo.append((final, backup, tmp))
                if backup is not None:
                    os.replace(final, backup)
                if tmp is not None:
                    os.replace(tmp, final)
        except BaseException:
            self._rollback(undo)
            raise
        self._files, self._dir, self._obsolete = [], None, []
        for _, backup, _ in undo:
            if backup is None:
                continue
            if backup.is_dir() and not backup.is_symlink():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink(missing_ok=True)

    @staticmethod
    def _rollback(undo: list[tuple[Path, Path | None, Path | None]]) -> None:
        for final, backup, tmp in reversed(undo):
            try:
                placed = tmp is not None and not os.path.lexists(tmp) and os.path.lexists(final)
                if backup is not None and not os.path.lexists(backup):
                    continue  # the old file was never moved: it is still in place
                if placed:
                    os.replace(final, tmp)  # the new file or directory back to its temporary name (discarded)
                if backup is not None:
                    os.replace(backup, final)
            except OSError:
                pass

    def discard(self) -> None:
        """Remove what was staged and not committed."""
        for tmp, _ in self._files:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        self._files = []
        if self._dir is not None:
            shutil.rmtree(self._dir[0], ignore_errors=True)
            self._dir = None
        self._obsolete = []


@contextmanager
def atomic_file(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed."""
    with AtomicWrite() as aw:
        tmp = aw.file(path, suffix=suffix)
        yield tmp
        aw.commit()
