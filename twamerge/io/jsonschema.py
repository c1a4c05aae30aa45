"""The one validation layer for JSON that twamerge reads (shard indexes, fit reports, HF configs).

``load_json`` reads a file as strict UTF-8, refuses nesting deeper than ``MAX_DEPTH`` before the
parser sees it (a parser recursing 100,000 levels is a crash, not an error), and turns every decode
failure into the caller's error class. ``Fields`` then checks types, sizes, ranges and finiteness
field by field, naming the field (``merge.block_alphas[3][1]``) in the one-line error.
"""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import TwamergeError, one_line

__all__ = ["MAX_DEPTH", "Fields", "load_json", "nesting_depth"]

#: deepest nesting of lists and objects accepted (twamerge's own files are under 10 deep)
MAX_DEPTH = 64
#: largest JSON file read (a report with recalibrated buffers of a large model stays far below it)
MAX_BYTES = 1 << 30

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """Deepest bracket nesting of JSON ``text`` outside strings; stops counting past ``limit``."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def load_json(path: str | Path, what: str, error: type[TwamergeError] = TwamergeError, *,
              max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value in ``path`` (``what`` names it in errors: "shard index", "report").

    Raises:
        ``error``: the file is missing or unreadable, larger than ``max_bytes``, not UTF-8, nested
            deeper than ``max_depth``, or not JSON (numbers too long for Python included).
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: the {what} is not a regular file")
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise error(f"{path}: the {what} is larger than the {max_bytes} bytes a {what} may be")
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({one_line(exc.strerror or exc)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})") from None
    if nesting_depth(text, max_depth) > max_depth:
        raise error(f"{path}: the {what} is nested more than {max_depth} levels deep; not a twamerge {what}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{path}: the {what} is not valid JSON ({one_line(exc)[:200]})") from None


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


class Fields:
    """Field-by-field checks of decoded JSON; every failure is ``error("{source}: {field}: ...")``."""

    def __init__(self, source: str | Path, error: type[TwamergeError] = TwamergeError):
        self.source = str(source)
        self.error = error

    def fail(self, field: str, message: str) -> TwamergeError:
        return self.error(f"{self.source}: {field}: {message}")

    def expected(self, field: str, what: str, value: Any) -> TwamergeError:
        return self.fail(field, f"expected {what}, got {_show(value)}")

    def get(self, obj: dict, key: str, field: str) -> Any:
        if key not in obj:
            raise self.fail(field, "missing")
        return obj[key]

    def object(self, value: Any, field: str, *, max_len: int | None = None) -> dict:
        if not isinstance(value, dict):
            raise self.expected(field, "an object", value)
        if max_len is not None and len(value) > max_len:
            raise self.fail(field, f"has {len(value)} entries, more than {max_len}")
        return value

    def list(self, value: Any, field: str, *, length: int | None = None, min_len: int = 0,
             max_len: int | None = None) -> list:
        if not isinstance(value, list):
            raise self.expected(field, "a list", value)
        if length is not None and len(value) != length:
            raise self.fail(field, f"has {len(value)} entries, expected {length}")
        if len(value) < min_len:
            raise self.fail(field, f"has {len(value)} entries, expected at least {min_len}")
        if max_len is not None and len(value) > max_len:
            raise self.fail(field, f"has {len(value)} entries, more than {max_len}")
        return value

    def string(self, value: Any, field: str, *, max_len: int | None = None, pattern: str | None = None,
               what: str = "a string") -> str:
        if not isinstance(value, str):
            raise self.expected(field, what, value)
        if max_len is not None and len(value) > max_len:
            raise self.fail(field, f"is {len(value)} characters long, more than {max_len}")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise self.expected(field, what, value)
        return value

    def integer(self, value: Any, field: str, lo: int, hi: int) -> int:
        """An int (not a bool, not a float) in ``[lo, hi)``."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.expected(field, f"an integer in [{lo}, {hi})", value)
        if not lo <= value < hi:
            raise self.fail(field, f"{value} is outside [{lo}, {hi})")
        return value

    def number(self, value: Any, field: str, *, bound: float) -> float:
        """A finite int or float with ``|value| <= bound``, as a float."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.expected(field, "a number", value)
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            raise self.fail(field, f"{_show(value)} is not a finite number")
        if abs(x) > bound:
            raise self.fail(field, f"{x:g} is out of range (|x| <= {bound:g})")
        return x

    def numbers(self, value: Any, field: str, *, length: int, bound: float) -> list[float]:
        items = self.list(value, field, length=length)
        return [self.number(v, f"{field}[{i}]", bound=bound) for i, v in enumerate(items)]

    def str_map(self, value: Any, field: str, *, max_len: int | None = None) -> dict[str, str]:
        obj = self.object(value, field, max_len=max_len)
        for k, v in obj.items():
            self.string(v, f"{field}[{k!r}]")
        return obj

