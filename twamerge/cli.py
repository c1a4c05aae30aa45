"""The ``twamerge`` command line: parse, build the configs, call one library function, render.

Results go to stdout (``--json``: exactly one JSON object); logs and progress bars go to stderr and
``-q`` silences them. Exit codes: 0 success, 1 a ``TwamergeError`` (one line, ``error: ...``; a
traceback with ``-v``), 2 a usage error (a bad option, or a value a config refuses). Anything else is
a bug and propagates with its traceback.

The options come from the config dataclasses (``config.option`` metadata, see ``cli_options``); the
output from ``render``. Every option may also come from the project's settings (``[tool.twamerge]`` in
the nearest pyproject.toml, a twamerge.toml, or ``--config FILE``; see ``settings``), under the command
line. Adding a command: ``@_command("name", CHECKPOINTS, Fields(SomeConfig, "Panel"))`` on a function of
``args``, wrap the library call in ``with _fail_on_twamerge_error():`` (building the configs inside it)
and finish with ``emit(result, args.json_out, renderer)``.
"""

import contextlib
import functools
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__, render
from .cli_options import Args, Fields, command, param
from .config import (
    AverageConfig,
    DataConfig,
    EvalConfig,
    FitConfig,
    InspectConfig,
    ModelConfig,
    OutputConfig,
    ReadConfig,
)
from .errors import InvalidArgumentError, TwamergeError, one_line
from .render import configure_logging, emit, progress
from .settings import read_settings

app = typer.Typer(
    name="twamerge",
    help="Merge saved checkpoints: data-free averages and Trainable Weight Averaging (TWA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Exit code of --fail-if-worse when the learned merge loses to the best candidate: distinct from
# 1 (an error) and 2 (a usage error), so a CI gate can tell them apart.
EXIT_WORSE = 3


class _State:
    verbose: int = 0
    quiet: bool = False


STATE = _State()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"twamerge {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[int, typer.Option(
        "-v", "--verbose", count=True, help="More logging (-vv also from other libraries); tracebacks on errors.")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr; no progress bars.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version_callback,
                                          help="Print the version and exit.")] = False,
) -> None:
    STATE.verbose, STATE.quiet = verbose, quiet
    configure_logging(verbose, quiet)


def _verbose_callback(value: int) -> int:
    if value:
        STATE.verbose = max(STATE.verbose, value)
        configure_logging(STATE.verbose, STATE.quiet)
    return value


def _quiet_callback(value: bool) -> bool:
    if value:
        STATE.quiet = True
        configure_logging(STATE.verbose, STATE.quiet)
    return value


# Parameters of no config. The same -v/-q are accepted after the command name too (`twamerge fit ... -q`).
CHECKPOINTS = param("checkpoints", Annotated[list[Path], typer.Argument(
    help="Checkpoint files, globs or directories (natural order: epoch10 after epoch9).", show_default=False)])
COMMON = (
    param("config_file", Annotated[Optional[Path], typer.Option(
        "--config", metavar="FILE", show_default=False,
        help="Settings from this TOML file (a pyproject.toml's [tool.twamerge], or a twamerge.toml); default: the "
             "nearest twamerge.toml or pyproject.toml with [tool.twamerge], from the working folder up. The command "
             "line wins over it.")], None),
    param("json_out", Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")], False),
    param("verbose", Annotated[int, typer.Option("-v", "--verbose", count=True, callback=_verbose_callback,
                                                 help="More logging; tracebacks on errors.")], 0),
    param("quiet", Annotated[bool, typer.Option("-q", "--quiet", callback=_quiet_callback,
                                                help="Only errors on stderr; no progress bars.")], False),
)
DATA, MODEL = Fields(DataConfig, "Data"), Fields(ModelConfig, "Model")


@contextlib.contextmanager
def _fail_on_twamerge_error() -> Iterator[None]:
    """Turn a ``TwamergeError`` into one ``error: ...`` line on stderr and exit 1 (2 for an
    ``InvalidArgumentError``, which is a usage error); with ``-v`` the traceback comes first.

    SIGTERM and SIGHUP are handled like Ctrl-C inside: the command's cleanup runs (nothing partial is
    left) and the interrupt is reported as one ``error:`` line, exit 1."""
    from .io.atomic import signals_as_interrupt

    try:
        with signals_as_interrupt():
            yield
    except TwamergeError as err:
        if STATE.verbose:
            traceback.print_exc(file=sys.stderr)
        typer.echo(f"error: {one_line(err)}", err=True)
        raise typer.Exit(2 if isinstance(err, InvalidArgumentError) else 1) from None
    except KeyboardInterrupt as err:
        what = f" ({err.args[0]})" if err.args and isinstance(err.args[0], str) else ""
        typer.echo(f"error: interrupted{what}; nothing was written", err=True)
        raise typer.Exit(1) from None


def _command(name: str, *parts: Fields | inspect.Parameter
             ) -> Callable[[Callable[[Args], None]], Callable[[Args], None]]:
    """``command`` of the app with the common options, whose function runs once the project's settings are in
    ``args`` (under the command line) and their -v/-q, if any, are applied."""
    def register(fn: Callable[[Args], None]) -> Callable[[Args], None]:
        @functools.wraps(fn)
        def with_settings(args: Args) -> None:
            with _fail_on_twamerge_error():
                args.apply_settings(read_settings(args.config_file))
            _verbose_callback(args.verbose)
            _quiet_callback(args.quiet)
            from_file = [f"{key} ({where})" for key, where in args.sources.items() if where != "command line"]
            if from_file:
                logging.getLogger(__name__).info("settings: %s", ", ".join(from_file))
            fn(args)

        return command(app, name, *parts, *COMMON)(with_settings)

    return register


def default_output(checkpoints: list[Path]) -> Path:
    """Where -o goes when neither the command line nor the settings say: ``merged.safetensors`` in the working
    folder, or the folder ``merged`` when the candidates are Hugging Face or LoRA adapter folders (a loadable
    model or adapter folder)."""
    from .io.discovery import expand_paths

    try:
        first = expand_paths(checkpoints)[0]
    except (TwamergeError, IndexError):  # the command's own reading of the candidates names the fault
        return Path("merged.safetensors")
    folder = first.is_dir() and any((first / name).is_file() for name in ("config.json", "adapter_config.json"))
    return Path("merged") if folder else Path("merged.safetensors")


def _output(args: Args) -> OutputConfig:
    if args.output is None:
        args.set_default("output", default_output(args.checkpoints))
    return args.config(OutputConfig)


@_command("average", CHECKPOINTS, Fields(AverageConfig, "Average"), Fields(ReadConfig, "Checkpoints"),
          Fields(ModelConfig, "Model", ("spec",)),
          Fields(OutputConfig, "Output", ("path", "force", "dtype", "max_shard_size", "merge_into_base")))
def average_cmd(args: Args) -> None:
    """Average checkpoints without data: uniform (SWA), fixed --weights, or --ema."""
    from .merge import average_checkpoints

    with _fail_on_twamerge_error():
        avg = args.config(AverageConfig)
        result = average_checkpoints(args.checkpoints, _output(args), weights=avg.weights, ema=avg.ema,
                                     normalize=avg.normalize, hash_inputs=avg.hash_inputs,
                                     read=args.config(ReadConfig), progress=progress("averaging", STATE.quiet),
                                     model=args.config(ModelConfig).spec)
    emit(result, args.json_out, render.average_summary)


@_command("inspect", CHECKPOINTS, Fields(ReadConfig, "Checkpoints", ("ema_key", "keys")),
          Fields(InspectConfig, "Inspect"))
def inspect_cmd(args: Args) -> None:
    """Describe checkpoints: formats, sizes, whether they can be merged, diversity, basis memory."""
    from .inspect_ckpt import inspect_checkpoints

    with _fail_on_twamerge_error():
        read, cfg = args.config(ReadConfig), args.config(InspectConfig)
        result = inspect_checkpoints(args.checkpoints, ema_key=read.ema_key, keys=read.keys,
                                     similarity=cfg.similarity, group_size=cfg.group_size,
                                     progress=progress("inspecting", STATE.quiet))
    emit(result, args.json_out, render.inspect_summary)


FAIL_IF_WORSE = param("fail_if_worse", Annotated[bool, typer.Option(
    "--fail-if-worse", rich_help_panel="Output",
    help=f"Exit {EXIT_WORSE} when the written merge loses to the best candidate on held-out data.")], False)


@_command("fit", CHECKPOINTS, DATA, MODEL, Fields(ReadConfig, "Checkpoints"), Fields(FitConfig, "Fit"),
          Fields(OutputConfig, "Output"), FAIL_IF_WORSE)
def fit_cmd(args: Args) -> None:
    """Learn the averaging coefficients on validation data (TWA) and write the merged checkpoint."""
    from .pipeline import fit

    with _fail_on_twamerge_error():
        cfg = args.config(FitConfig)
        result = fit(args.checkpoints, val=args.config(DataConfig), model=args.config(ModelConfig),
                     output=_output(args), cfg=cfg, read=args.config(ReadConfig),
                     progress=progress("fitting", STATE.quiet), sources=args.sources)
    if not STATE.quiet:
        render.fit_table(result, Console(file=sys.stderr))
    summary = {k: v for k, v in result.items() if k != "merge"}
    summary["alphas"] = result["merge"]["block_alphas"]
    emit(summary, args.json_out, render.fit_summary)
    if args.fail_if_worse and result["written"]["at_least_best"] is False:
        typer.echo(f"error: {result['written']['name']} loses to the best candidate ({result['best_candidate']}) "
                   "on held-out data", err=True)
        raise typer.Exit(EXIT_WORSE)


@_command("eval", CHECKPOINTS, DATA, MODEL, Fields(ReadConfig, "Checkpoints", ("ema_key",)),
          Fields(EvalConfig, "Evaluation"))
def eval_cmd(args: Args) -> None:
    """Loss and metric of each checkpoint on all rows of --val."""
    from .pipeline import evaluate_checkpoints

    with _fail_on_twamerge_error():
        cfg = args.config(EvalConfig)
        result = evaluate_checkpoints(args.checkpoints, val=args.config(DataConfig), model=args.config(ModelConfig),
                                      batch_size=cfg.batch_size, device=cfg.device, read=args.config(ReadConfig),
                                      batch_tokens=cfg.batch_tokens)
    emit(result, args.json_out, render.eval_table)


@_command("apply", param("report", Annotated[Path, typer.Argument(
    help="The JSON report of a fit (--report).", show_default=False)]), CHECKPOINTS,
          Fields(ModelConfig, "Model", ("spec",)),
          Fields(OutputConfig, "Output", ("path", "force", "max_shard_size", "merge_into_base")))
def apply_cmd(args: Args) -> None:
    """Re-emit a fit's merge from its saved coefficients (no data or model needed)."""
    from .pipeline import apply_report

    with _fail_on_twamerge_error():
        result = apply_report(args.report, args.checkpoints, _output(args), model=args.config(ModelConfig).spec)
    emit(result, args.json_out, render.apply_summary)


def main() -> None:
    """Console-script entry point (``twamerge``, ``python -m twamerge``, ``torchrun -m twamerge``)."""
    from .distributed import launched_by_torchrun

    if not launched_by_torchrun():
        app()
        return
    # A torchrun rank ends without interpreter shutdown. Gloo's worker threads outlive
    # destroy_process_group, and one that releases a collective's Python tensor while the
    # interpreter shuts down aborts the process (SIGABRT instead of our exit code; see
    # distributed.wait_collective). Everything the command writes is complete and renamed into place before
    # it returns, so only the streams and the log handlers need flushing.
    try:
        app()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
