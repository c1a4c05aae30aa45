"""docs/cli.md, and the check of a README's command synopses, from the commands themselves.

``python -m twamerge.cli_docs > docs/cli.md`` writes every option of every command as ``--help`` has
it (the same Click objects, so the same names, defaults, choices and help); ``tests/test_cli.py``
regenerates it and fails when the file is stale. :func:`check_synopses` lists the options a text's
``twamerge ...`` lines name that the command does not have.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import typer

from .cli import app as _app

__all__ = ["check_synopses", "markdown", "unknown_options"]

_HEADER = """\
# Command-line reference

Every option of every command, generated from the code by `python -m twamerge.cli_docs > docs/cli.md`
(a test fails when this file is stale). The defaults, choices and help come from the settings in
[`twamerge/config.py`](../twamerge/config.py), the same source as `--help` and the library's own
defaults. Every command also takes `-h`/`--help`.
"""


# Typer builds Click-style objects (its own copy of Click): parameters with ``opts``, ``secondary_opts``,
# ``help``, ``default``, ``required``, ``min``/``max`` and the annotation they were made from.
_NAMES = {int: "integer", float: "number", str: "text", Path: "path"}


def _root(app: typer.Typer | None) -> tuple[Any, Any]:
    group = typer.main.get_command(app or _app)
    return group, group.context_class(group, info_name="twamerge")


def _options(params: list[Any]) -> list[Any]:
    return [p for p in params if p.param_type_name == "option" and not p.hidden]


def _cell(text: object) -> str:
    """``text`` in a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(p: Any) -> str:
    """What an option takes: its choices, or its type and bounds; nothing for a switch."""
    if p.is_flag or p.count:
        return "repeatable" if p.count else ""
    if p.metavar:
        return ", ".join(p.metavar.strip("<>").split("|"))
    kind = p.type_descriptor.annotation
    if p.multiple:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) is typing.Literal:
        text = ", ".join(str(c) for c in typing.get_args(kind))
    else:
        text = _NAMES.get(kind, getattr(kind, "__name__", str(kind)))
        if p.min is not None and p.max is not None:
            text += f" from {p.min} to {p.max}"
        elif p.min is not None or p.max is not None:
            text += f" >= {p.min}" if p.max is None else f" <= {p.max}"
    return text + (", repeatable" if p.multiple else "")


def _default(p: Any) -> str:
    if p.required:
        return "required"
    if p.is_flag and p.secondary_opts and p.default is not None:  # None: decided at run time (the help says how)
        return f"`{p.opts[0] if p.default else p.secondary_opts[0]}`"
    if p.default is None or p.is_flag or p.count:
        return ""
    return f"`{p.default}`"


def _names(p: Any) -> str:
    return " / ".join(f"`{o}`" for o in sorted(p.opts, key=len, reverse=True) + p.secondary_opts)


def _options_table(options: list[Any]) -> list[str]:
    lines = ["| Option | Takes | Default | Meaning |", "|---|---|---|---|"]
    for p in options:
        lines.append(f"| {_names(p)} | {_cell(_value(p))} | {_default(p)} | {_cell(p.help or '')} |")
    return lines


def _command(name: str, cmd: Any) -> list[str]:
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    usage = " ".join(["twamerge", name, "[OPTIONS]"]
                     + [p.name.upper() + ("..." if p.nargs == -1 else "") for p in arguments])
    lines = [f"## `twamerge {name}`", "", _cell(cmd.help or ""), "", "```", usage, "```", ""]
    if arguments:
        lines += ["| Argument | Meaning |", "|---|---|"]
        lines += [f"| `{p.name.upper()}` | {_cell(getattr(p, 'help', '') or '')} |" for p in arguments]
        lines.append("")
    # The panels of --help, in the order --help shows them: the ungrouped options first.
    panels: dict[str, list[Any]] = {"Options": []}
    for p in _options(cmd.params):
        panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(p)
    for panel, members in panels.items():
        if members:
            lines += [f"### {panel}", ""] + _options_table(members) + [""]
    return lines


def markdown(app: typer.Typer | None = None) -> str:
    """The reference of every command of ``app`` (default: the ``twamerge`` CLI) as Markdown."""
    group, ctx = _root(app)
    lines = [_HEADER, "## Global options", "", "Given before the command: `twamerge -q fit ...`.", ""]
    lines += _options_table(_options(group.params)) + [""]
    for name in group.list_commands(ctx):
        lines += _command(name, group.get_command(ctx, name))
    return "\n".join(lines).rstrip("\n") + "\n"


# An option as a synopsis writes it: a dash or two and a letter, not inside a word or a path.
_OPTION = re.compile(r"(?<![\w.-])(--?[A-Za-z][\w-]*)")


def _flags(params: list[Any]) -> set[str]:
    return {o for p in _options(params) for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}


def unknown_options(line: str, app: typer.Typer | None = None) -> list[str]:
    """The problems of one synopsis line such as ``twamerge fit CKPT... --val DATA [--json]``: each option
    its command does not take (global options may come before the command), or an unknown command.
    Only what follows ``twamerge`` is read; an empty list means the line is right."""
    group, ctx = _root(app)
    # The command ends at a shell comment, a pipe or the next command.
    line = re.split(r"\s(?:#|\||&&|;)", line, maxsplit=1)[0]
    words = line.split("twamerge", 1)[1].split() if "twamerge" in line else []
    before: list[str] = []
    while words and words[0].startswith("-"):
        before.append(words.pop(0))
    if not words:
        return []
    name, rest = words[0], " ".join(words[1:])
    cmd = group.get_command(ctx, name)
    if cmd is None:
        return [f"twamerge {name}: no such command (the commands: {', '.join(group.list_commands(ctx))})"]
    problems = [f"twamerge: no global option {o}" for o in before if o not in _flags(group.params)]
    problems += [f"twamerge {name}: no option {o}" for o in _OPTION.findall(rest) if o not in _flags(cmd.params)]
    return problems


def check_synopses(text: str, app: typer.Typer | None = None) -> list[str]:
    """The problems (see :func:`unknown_options`) of every synopsis in ``text``, a Markdown file: each line of a
    fenced code block that starts with ``twamerge `` (after an optional ``$ ``), and each inline code span that
    does."""
    lines, fenced = [], False
    # A command continued over several lines with a trailing backslash is one line.
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if fenced and stripped.removeprefix("$ ").startswith("twamerge "):
            lines.append(stripped)
        elif not fenced:
            lines += re.findall(r"`(twamerge [^`]+)`", raw)
    return [problem for line in lines for problem in unknown_options(line, app)]


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
