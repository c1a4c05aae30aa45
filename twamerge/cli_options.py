"""Typer commands whose options are generated from the config dataclasses.

A config field that the command line sets carries its spelling in ``metadata`` (``config.option``:
flag, help, bounds, how the typed text becomes the value); :class:`Fields` turns the fields of one
config into Typer options, and :func:`command` registers a function whose signature Typer reads from
those options. The function receives an :class:`Args` and builds each config with ``args.config(Cls)``,
so a setting's name, default, choices and help are written once, in config.py.

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

__all__ = ["Args", "Fields", "command", "param", "param_name"]

_REQUIRED = inspect.Parameter.empty


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

    def build(self, values: dict[str, Any]) -> Any:
        """The config from the parsed ``values``; an option left out (None) keeps the field's default.

        Raises:
            InvalidArgumentError: a value the field's ``parse`` or the config's validation refuses.
        """
        kwargs = {}
        for f in self.fields():
            flag = f.metadata["flag"]
            value = values[param_name(flag)]
            if value is None:
                continue
            if "parse" in f.metadata:
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


def _cli_default(f: dataclasses.Field) -> Any:
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


class Args:
    """What a generated command receives: ``args.config(FitConfig)`` builds a config from its options;
    a parameter of no config is an attribute (``args.checkpoints``, ``args.json_out``)."""

    def __init__(self, values: dict[str, Any], groups: list[Fields]) -> None:
        self._values = values
        self._groups = {g.cls: g for g in groups}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def config(self, cls: type) -> Any:
        return self._groups[cls].build(self._values)


def command(app: typer.Typer, name: str, *parts: Fields | inspect.Parameter
            ) -> Callable[[Callable[[Args], None]], Callable[[Args], None]]:
    """Register ``fn(args)`` as command ``name`` of ``app``, with the options of ``parts`` in order (arguments
    first in the usage line); ``fn``'s docstring is the command's help."""
    params = [p for part in parts for p in (part.parameters() if isinstance(part, Fields) else [part])]
    seen: set[str] = set()
    for p in params:
        if p.name in seen:
            raise TypeError(f"command {name!r}: two options are named {p.name!r}")
        seen.add(p.name)
    # Positional arguments first, as Python signatures require; options keep their order.
    params.sort(key=lambda p: p.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD)
    groups = [p for p in parts if isinstance(p, Fields)]

    def register(fn: Callable[[Args], None]) -> Callable[[Args], None]:
        def run(**values: Any) -> None:
            fn(Args(values, groups))

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__doc__, run.__name__ = fn.__doc__, fn.__name__
        app.command(name)(run)
        return fn

    return register
