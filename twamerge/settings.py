"""Project settings: the options of any command, read from a TOML file next to the code.

Where they are read from (the first found):

1. ``--config FILE``: a ``pyproject.toml`` (its ``[tool.twamerge]`` table) or any other TOML file
   (its top level, laid out like ``twamerge.toml``);
2. else, from the working folder up to the root (as ruff and pytest look), the first folder holding
   ``twamerge.toml`` or a ``pyproject.toml`` with a ``[tool.twamerge]`` table; ``twamerge.toml``
   wins in a folder that has both.

Layout: the keys are the commands' options without the dashes (``--fail-if-worse`` is
``fail-if-worse``; a switch such as ``--greedy/--no-greedy`` is ``greedy = false``; ``--model-arg``
is the table ``model-args``). Keys of ``[tool.twamerge]`` are shared by every command that has the
option; a command's own table (``[tool.twamerge.fit]``) comes over them. Options given on the
command line win over both. Each value has the type the option takes (``epochs = 3``, ``init =
"greedy"``, ``report = "report.json"``); an option the command line spells as text keeps that form
too (``max-shard-size = "2GB"``, ``inputs = "x,y"``), and where its setting is a list or a table the
TOML form is taken as well (``inputs = ["x", "y"]``, ``model-args = {width = 256}``). Relative paths
(and the file of a ``file.py:name`` spec) are read from the settings file's folder, so the same file
works from any subfolder.

Every key is checked against every command when the file is read: an unknown key, a value of the
wrong type or out of bounds is one line naming the file, the table, the key and what was expected.
What the commands take comes from :mod:`twamerge.cli_options` (one :class:`Setting` per option,
made from the config fields' metadata); this module imports neither typer nor torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidArgumentError, TwamergeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library (a dependency on Python 3.10)
    import tomli as tomllib

__all__ = ["PYPROJECT", "OWN_FILE", "Setting", "SettingsFile", "find_settings", "load_settings", "read_settings"]

log = logging.getLogger(__name__)

PYPROJECT = "pyproject.toml"
OWN_FILE = "twamerge.toml"
_CONFIG_KEY = "config"  # the option --config FILE, which chooses the file

# Options a settings file may not give (cli_options skips fields whose metadata says setting=None).
COMMAND_LINE_ONLY = frozenset({"trust-remote-code"})


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a settings file may give one option of a command.

    Attributes:
        key: the key in the file (``fail-if-worse``).
        param: the command's parameter it sets (``fail_if_worse``).
        forms: the types a value may have, in order: what the command line reads (parsed with
            ``parse`` when there is one), then the setting's own type when ``parse`` makes another.
        parse: text (or the first form) -> the setting's value; a ``ValueError`` says what is wrong.
        low, high: bounds of a number.
        names_file: the value is a spec that may name a file (``file.py:name``) or a folder.
    """

    key: str
    param: str
    forms: tuple[Any, ...]
    parse: Callable[[Any], Any] | None = None
    low: float | None = None
    high: float | None = None
    names_file: bool = False


@dataclasses.dataclass(frozen=True)
class Source:
    """One setting as the file gives it, for the command that runs."""

    value: Any
    where: str  # ``pyproject.toml [tool.twamerge.fit]``: the file and the table, for errors and the report


@dataclasses.dataclass
class SettingsFile:
    """A settings file's table of twamerge settings: shared keys, and one table per command."""

    path: Path
    table: dict[str, Any]
    in_pyproject: bool

    @property
    def name(self) -> str:
        """The file as errors and the report name it: relative to the working folder when it is inside it."""
        try:
            rel = os.path.relpath(self.path)
        except ValueError:  # another drive (Windows)
            return str(self.path)
        return rel if not rel.startswith("..") else str(self.path)

    def where(self, command: str | None) -> str:
        """``pyproject.toml [tool.twamerge]`` / ``pyproject.toml [tool.twamerge.fit]`` / ``twamerge.toml [fit]``."""
        if self.in_pyproject:
            return f"{self.name} [tool.twamerge{'.' + command if command else ''}]"
        return f"{self.name} [{command}]" if command else self.name

    def resolve(self, command: str, options: Mapping[str, Mapping[str, Setting]]) -> dict[str, Source]:
        """The values this file gives ``command``, by parameter name: its own table over the shared keys.

        Every key of the file is checked, for every command (a mistake for ``eval`` is reported by
        ``fit`` too, so a project's settings fail as soon as any command reads them).

        Args:
            command: the command that runs.
            options: every command's settings by key (``cli_options.SETTINGS``).

        Raises:
            InvalidArgumentError: an unknown key, a value of the wrong type, a table that is not one.
        """
        base = self._base()
        shared = {k: v for k, v in self.table.items() if not (k in options and isinstance(v, dict))}
        for key, value in self.table.items():
            if key in options and not isinstance(value, dict):
                raise self._error(None, key, value, f"expected a table of the options of twamerge {key}")
        resolved: dict[str, dict[str, Source]] = {name: {} for name in options}
        for key, value in shared.items():
            if key == _CONFIG_KEY:
                raise self._error(None, key, value, "a settings file cannot name another (--config is for the "
                                  "command line)")
            takers = [name for name, opts in options.items() if key in opts]
            if not takers:
                every = {k for opts in options.values() for k in opts}
                raise self._unknown(None, key, every | set(options))
            for name in takers:
                setting = options[name][key]
                try:
                    converted = self._convert(setting, value, None, base)
                except InvalidArgumentError as exc:
                    # Commands may bound one key differently (--group-size of fit and of inspect): say whose.
                    raise InvalidArgumentError(f"{exc} (for twamerge {name})" if len(takers) > 1 else str(exc)
                                               ) from None
                resolved[name][setting.param] = Source(converted, self.where(None))
        for name in options:
            for key, value in self.table.get(name, {}).items():
                if key == _CONFIG_KEY:
                    raise self._error(name, key, value, "a settings file cannot name another (--config is for the "
                                      "command line)")
                if key not in options[name]:
                    raise self._unknown(name, key, set(options[name]))
                setting = options[name][key]
                resolved[name][setting.param] = Source(self._convert(setting, value, name, base), self.where(name))
        return resolved[command]

    # -- values ---------------------------------------------------------------------------------------

    def _base(self) -> Path | None:
        """The folder relative paths are read from; None when it is the working folder (paths stay as written)."""
        folder = self.path.parent.resolve()
        return None if folder == Path.cwd().resolve() else folder

    def _convert(self, setting: Setting, value: Any, command: str | None, base: Path | None) -> Any:
        """``value`` as the option's setting: the first form it has, parsed when that is the command line's."""
        for i, form in enumerate(setting.forms):
            try:
                out = _as(form, value, base)
            except _Mismatch:
                continue
            if i == 0 and setting.parse is not None:
                try:
                    out = setting.parse(out)
                except TwamergeError as exc:
                    raise self._error(command, setting.key, value, str(exc)) from None
                except ValueError as exc:
                    raise self._error(command, setting.key, value, str(exc)) from None
            if setting.names_file and isinstance(out, str):
                out = _spec_from(base, out)
            if isinstance(out, (int, float)) and not isinstance(out, bool) and not _within(setting, out):
                break
            return out
        raise self._error(command, setting.key, value, "expected " + describe(setting))

    def _error(self, command: str | None, key: str, value: Any, what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{self.where(command)}: {key} = {_toml(value)}: {what}")

    def _unknown(self, command: str | None, key: str, known: set[str]) -> InvalidArgumentError:
        if key in COMMAND_LINE_ONLY:
            return InvalidArgumentError(f"{self.where(command)}: {key} is accepted on the command line only "
                                        f"(--{key}): a settings file travels with a repository and must not "
                                        "switch on running the candidate folders' code")
        # ``fail_if_worse`` or ``--epochs``: the spelling of a known key, said as such.
        near = difflib.get_close_matches(key.strip("-").replace("_", "-"), sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        whose = f"an option of twamerge {command}" if command else "an option of any twamerge command"
        return InvalidArgumentError(f"{self.where(command)}: unknown key {key!r} (not {whose}){hint}")


def _within(setting: Setting, number: float) -> bool:
    return (setting.low is None or number >= setting.low) and (setting.high is None or number <= setting.high)


class _Mismatch(Exception):
    """A value that is not of a form."""


def _as(form: Any, value: Any, base: Path | None) -> Any:
    """``value`` (as TOML gives it) as a value of type ``form``, or ``_Mismatch``. Paths are read from ``base``."""
    origin, args = typing.get_origin(form), typing.get_args(form)
    if origin in (typing.Union, types.UnionType):
        for arm in (a for a in args if a is not type(None)):
            try:
                return _as(arm, value, base)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        # TOML's true is not the choice 1: the type must match as well as the value.
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        raise _Mismatch
    if origin in (list, tuple) or form in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch
        items = [_as(args[0], v, base) for v in value] if args else list(value)
        return tuple(items) if (origin or form) is tuple else items
    if origin is dict or form is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if form is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if form is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if form is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if form is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if form is Path:
        if not isinstance(value, str) or not value:
            raise _Mismatch
        return Path(value) if base is None or Path(value).is_absolute() else base / value
    raise TypeError(f"no settings rule for values of type {form!r}")


def _spec_from(base: Path | None, spec: str) -> str:
    """A spec read relative to the settings file's folder: ``model.py:build`` names ``base/model.py``, ``hf/`` a
    folder there; a module (``pkg.mod:fn``), ``timm:NAME`` or ``auto`` stays as written."""
    if base is None:
        return spec
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py") and not Path(target).is_absolute():
        return f"{base / target}:{attr}"
    if not sep and (base / spec).is_dir():
        return str(base / spec)
    return spec


def describe(setting: Setting) -> str:
    """What a value of ``setting`` may be, for errors: ``an integer >= 1``, ``one of "cosine", "step" or ...``."""
    texts = [_describe(form) for form in setting.forms]
    text = " or ".join(dict.fromkeys(texts))
    if setting.low is not None and setting.high is not None:
        text += f" from {setting.low} to {setting.high}"
    elif setting.low is not None:
        text += f" >= {setting.low}"
    elif setting.high is not None:
        text += f" <= {setting.high}"
    return text


def _describe(form: Any) -> str:
    origin, args = typing.get_origin(form), typing.get_args(form)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        shown = [_toml(a) for a in args]
        return "one of " + ", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0]
    if origin in (list, tuple) or form in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or form is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (a string)"}.get(form, getattr(form, "__name__", str(form)))


def _plural(form: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", Path: "paths", bool: "booleans"}.get(
        form, f"values ({_describe(form)})")


def _toml(value: Any) -> str:
    """A value as TOML writes it (strings in double quotes, true/false), for errors."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # a date or time
        return str(value)


# -- finding and reading the file ---------------------------------------------------------------------


def find_settings(start: Path | None = None) -> Path | None:
    """The settings file of the folder ``start`` (default: the working folder) or its nearest parent: a
    ``twamerge.toml``, or a ``pyproject.toml`` with a ``[tool.twamerge]`` table; None when there is none.

    Raises:
        InvalidArgumentError: a ``pyproject.toml`` on the way that is not valid TOML (whether it holds
            twamerge's settings cannot be told).
    """
    folder = (start or Path.cwd()).resolve()
    for here in (folder, *folder.parents):
        own, pyproject = here / OWN_FILE, here / PYPROJECT
        has_table = pyproject.is_file() and "twamerge" in _read_toml(pyproject).get("tool", {})
        if own.is_file():
            if has_table:
                log.warning("%s: [tool.twamerge] is not read, %s in the same folder is", pyproject, own)
            return own
        if has_table:
            return pyproject
    return None


def load_settings(path: Path) -> SettingsFile:
    """Read a settings file: the ``[tool.twamerge]`` table of a ``pyproject.toml``, the top level of any other.

    Raises:
        InvalidArgumentError: the file cannot be read, is not TOML, or a pyproject.toml without the table.
    """
    path = Path(path)
    doc = _read_toml(path)
    if path.name != PYPROJECT:
        return SettingsFile(path, doc, in_pyproject=False)
    table = doc.get("tool", {}).get("twamerge")
    if not isinstance(table, dict):
        raise InvalidArgumentError(f"{path}: no [tool.twamerge] table")
    return SettingsFile(path, table, in_pyproject=True)


def read_settings(config: Path | None) -> SettingsFile | None:
    """The settings a command reads: ``config`` (``--config FILE``) when given, else the nearest file; None if none."""
    path = Path(config) if config is not None else find_settings()
    return None if path is None else load_settings(path)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise InvalidArgumentError(f"{path}: cannot read the settings ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"{path}: not valid TOML ({exc})") from None
