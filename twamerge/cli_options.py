"""Typer commands whose options are generated from the config dataclasses.

A config field that the command line sets carries its spelling in ``metadata`` (``config.option``:
flag, help, bounds, how the typed text becomes the value); :class:`Fields` turns the fields of one
config into Typer options, and :func:`command` registers a function whose signature Typer reads from
those options. The function receives an :class:`Args` and builds each config with ``args.config(Cls)``,
so a setting's name, default, choices and help are written once, in config.py.

Every option is also a key of the project's settings file (``settings.py``): :func:`command` records
what each command takes in :data:`SETTINGS`, and :meth:`Args.apply_settings` fills in, under the
command line, the values a settings file gives (Click says which options the command line set).

Typer reads a command's options from its signature, so :func:`command` builds an ``inspect.Signature``
of ``Annotated[type, typer.Option(...)]`` parameters and sets it on a function taking ``**values``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional

import typer

from .errors import InvalidArgumentError, TwamergeError
from .settings import Setting, SettingsFile

__all__ = ["SETTINGS", "Args", "Fields", "command", "param", "param_name"]

_REQUIRED = inspect.Parameter.empty

#: Every command's options as a settings file names them: ``{"fit": {"epochs": Setting(...), ...}, ...}``.
SETTINGS: dict[str, dict[str, Setting]] = {}


def param_name(flag: str) -> str:
    """The Python name of an option: ``--model-arg`` -> ``model_arg``, ``--greedy/--no-greedy`` -> ``greedy``."""
    return flag.split("/")[0].lstrip("-").replace("-", "_")


def param(name: str, annotation: Any, default: Any = _REQUIRED) -> inspect.Parameter:
    """A command parameter that belongs to no config (``--json``, ``-v``, the checkpoints argument), spelled
    the ordinary Typer way: ``Annotated[type, typer.Option(...)]`` or ``typer.Argument(...)``."""
    is_argument = any(isinstance(m, typer.models.ArgumentInfo) for m in typing.get_args(annotation)[1:])
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if is_argument else inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


@dataclasses.dataclass(frozen=True)
class Fields:
    """The options of one config dataclass: every field with a flag, or the fields ``names``, in that
    order, shown under ``panel`` in ``--help``."""

    cls: type
    panel: str
    names: tuple[str, ...] | None = None

    def fields(self) -> list[dataclasses.Field]:
        flagged = {f.name: f for f in dataclasses.fields(self.cls) if "flag" in f.metadata}
        if self.names is None:
            return list(flagged.values())
        unknown = [n for n in self.names if n not in flagged]
        if unknown:
            raise TypeError(f"{self.cls.__name__} has no command-line field {unknown[0]!r}; "
                            f"those with a flag are {', '.join(flagged)}")
        return [flagged[n] for n in self.names]

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        return [_parameter(f, hints[f.name], self.panel) for f in self.fields()]

    def settings(self) -> list[Setting]:
        """Each option as a settings file gives it: the command line's form (then ``parse``), or the field's own."""
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in self.fields():
            meta = f.metadata
            if "setting" in meta and meta["setting"] is None:  # command line only (settings.COMMAND_LINE_ONLY)
                continue
            forms = (_cli_type(f, hints[f.name], _cli_default(f)),) + ((hints[f.name],) if "parse" in meta else ())
            out.append(Setting(meta.get("setting", _key(meta["flag"])), param_name(meta["flag"]), forms,
                               meta.get("parse"), meta.get("min"), meta.get("max"), meta.get("names_file", False)))
        return out

    def build(self, values: dict[str, Any], parsed: set[str] = frozenset()) -> Any:
        """The config from the parsed ``values``; an option left out (None) keeps the field's default.
        ``parsed`` names the values that already have the field's type (from a settings file): no ``parse``.

        Raises:
            InvalidArgumentError: a value the field's ``parse`` or the config's validation refuses.
        """
        kwargs = {}
        for f in self.fields():
            flag = f.metadata["flag"]
            value = values[param_name(flag)]
            if value is None:
                continue
            if "parse" in f.metadata and param_name(flag) not in parsed:
                try:
                    value = f.metadata["parse"](value)
                except TwamergeError:
                    raise
                except ValueError as exc:
                    raise InvalidArgumentError(f"{flag.split('/')[0]} {value!r}: {exc}") from None
            kwargs[f.name] = value
        try:
            return self.cls(**kwargs)
        except TwamergeError:
            raise
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None


def _key(flag: str) -> str:
    """The settings key of an option: ``--fail-if-worse`` -> ``fail-if-worse``, ``--greedy/--no-greedy`` ->
    ``greedy``."""
    return flag.split("/")[0].lstrip("-")


def _cli_default(f: dataclasses.Field) -> Any:
    if "cli_default" in f.metadata:  # left out on the command line, the command supplies the value (-o)
        return f.metadata["cli_default"]
    if f.default is not dataclasses.MISSING:
        return f.default
    # A field made by a factory (a dict, a list) is built by its ``parse`` from the option, or left to the factory.
    return None if f.default_factory is not dataclasses.MISSING else _REQUIRED


def _cli_type(f: dataclasses.Field, hint: Any, default: Any) -> Any:
    """What Typer parses for field ``f``: ``cli_type``, a ``Literal`` of ``choices``, or the field's type;
    optional (None when left out) where the default is None."""
    meta = f.metadata
    if "cli_type" in meta:
        kind = meta["cli_type"]
    elif "choices" in meta:
        kind = Literal[tuple(meta["choices"])]
    else:
        args = typing.get_args(hint)
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        # ``X | None``: Typer reads X, and an option left out is None.
        kind = next(a for a in args if a is not type(None)) if is_union and type(None) in args else hint
    return Optional[kind] if default is None else kind


def _parameter(f: dataclasses.Field, hint: Any, panel: str) -> inspect.Parameter:
    meta = f.metadata
    decls = [meta["flag"]] + ([meta["short"]] if "short" in meta else [])
    text = meta["help"]() if callable(meta["help"]) else meta["help"]
    bounds = {k: meta[k] for k in ("min", "max", "metavar") if k in meta}
    default = _cli_default(f)
    info = typer.Option(*decls, help=text, rich_help_panel=panel, show_default=default is not _REQUIRED, **bounds)
    return inspect.Parameter(param_name(meta["flag"]), inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[_cli_type(f, hint, default), info])


def _param_setting(p: inspect.Parameter) -> Setting | None:
    """The setting of a parameter of no config (``--json``, ``-v``, ``--fail-if-worse``); None for an argument."""
    kind, *extras = typing.get_args(p.annotation)
    info = next((e for e in extras if isinstance(e, typer.models.OptionInfo)), None)
    if info is None:
        return None
    # In ``Annotated``, typer.Option's positional names start with its ``default`` slot.
    flags = [d for d in (info.default, *info.param_decls) if isinstance(d, str) and d.startswith("--")]
    if info.count:
        return Setting(_key(flags[0]), p.name, (int,), low=0)
    return Setting(_key(flags[0]), p.name, (kind,), low=info.min, high=info.max)


class Args:
    """What a generated command receives: ``args.config(FitConfig)`` builds a config from its options;
    a parameter of no config is an attribute (``args.checkpoints``, ``args.json_out``).

    ``sources`` says where each option that is not at its default came from, by settings key:
    ``"command line"``, the settings file and table (``"pyproject.toml [tool.twamerge.fit]"``), or
    ``"default"`` for a default the command computes (:meth:`set_default`).
    """

    def __init__(self, command: str, values: dict[str, Any], groups: list[Fields], given: set[str]) -> None:
        self.command = command
        self._values = values
        self._groups = {g.cls: g for g in groups}
        self._given = given
        self._from_file: set[str] = set()
        self._key_of = {s.param: s.key for s in SETTINGS[command].values()}
        self.sources: dict[str, str] = {self._key_of[p]: "command line" for p in sorted(given) if p in self._key_of}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def apply_settings(self, file: SettingsFile | None) -> None:
        """Take the values ``file`` gives this command for every option the command line left out.

        Raises:
            InvalidArgumentError: the file has an unknown key or a value of the wrong type (any command's).
        """
        if file is None:
            return
        for name, source in file.resolve(self.command, SETTINGS).items():
            if name in self._given:
                continue
            self._values[name] = source.value
            self._from_file.add(name)
            self.sources[self._key_of[name]] = source.where

    def set_default(self, name: str, value: Any) -> None:
        """Give option ``name``, left out everywhere, the value the command computes (``-o``'s default)."""
        self._values[name] = value
        self.sources[self._key_of[name]] = "default"

    def config(self, cls: type) -> Any:
        group = self._groups[cls]
        try:
            return group.build(self._values, self._from_file)
        except InvalidArgumentError as exc:
            # A value from a settings file that the config refuses: the message names the field; say where it was set.
            for f in group.fields():
                name = param_name(f.metadata["flag"])
                if name in self._from_file and str(exc).startswith(f"{f.name}="):
                    raise InvalidArgumentError(f"{exc} (set by {self._key_of[name]} in "
                                               f"{self.sources[self._key_of[name]]})") from None
            raise


def command(app: typer.Typer, name: str, *parts: Fields | inspect.Parameter
            ) -> Callable[[Callable[[Args], None]], Callable[[Args], None]]:
    """Register ``fn(args)`` as command ``name`` of ``app``, with the options of ``parts`` in order (arguments
    first in the usage line); ``fn``'s docstring is the command's help. Every option is a settings key of
    ``name`` in :data:`SETTINGS`."""
    params = [p for part in parts for p in (part.parameters() if isinstance(part, Fields) else [part])]
    seen: set[str] = set()
    for p in params:
        if p.name in seen:
            raise TypeError(f"command {name!r}: two options are named {p.name!r}")
        seen.add(p.name)
    # Positional arguments first, as Python signatures require; options keep their order.
    params.sort(key=lambda p: p.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD)
    groups = [p for p in parts if isinstance(p, Fields)]
    settings = [s for part in parts
                for s in (part.settings() if isinstance(part, Fields) else [_param_setting(part)]) if s is not None]
    SETTINGS[name] = {s.key: s for s in settings}
    if len(SETTINGS[name]) != len(settings):
        raise TypeError(f"command {name!r}: two options have the same settings key")
    # Typer hands the Click context to a parameter of this type: it tells which options the command line set.
    context = inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

    def register(fn: Callable[[Args], None]) -> Callable[[Args], None]:
        def run(_ctx: typer.Context, **values: Any) -> None:
            # Not DEFAULT (nor a default_map): typed on the command line, even when equal to the default.
            sources = {n: _ctx.get_parameter_source(n) for n in values}
            given = {n for n, s in sources.items() if s is not None and s.name not in ("DEFAULT", "DEFAULT_MAP")}
            fn(Args(name, values, groups, given))

        run.__signature__ = inspect.Signature([*params, context])  # type: ignore[attr-defined]
        run.__doc__, run.__name__ = fn.__doc__, fn.__name__
        app.command(name)(run)
        return fn

    return register
