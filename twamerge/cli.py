"""The ``twamerge`` command line: parse, call one library function, render.

Results go to stdout (``--json``: exactly one JSON object); logs and progress bars go to stderr and
``-q`` silences them. Exit codes: 0 success, 1 a ``TwamergeError`` (one line, ``error: ...``; a
traceback with ``-v``), 2 a usage error. Anything else is a bug and propagates with its traceback.

Adding a command: decorate a function with ``@app.command()``, wrap the library call in
``with _fail_on_twamerge_error():`` and finish with ``_emit(result, json_out, render)``; use
``_progress("...")`` for a progress-bar wrapper that respects ``-q``.
"""

import contextlib
import enum
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, config
from .config import FitConfig, OutputConfig, ReadConfig, choices
from .errors import InvalidArgumentError, TwamergeError, one_line
from .kernels.layout import SUPPORTED_BITS
from .methods import METHODS

app = typer.Typer(
    name="twamerge",
    help="Merge saved checkpoints: data-free averages and Trainable Weight Averaging (TWA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _State:
    verbose: int = 0
    quiet: bool = False


STATE = _State()


class _StderrHandler(logging.StreamHandler):
    """A stream handler that looks ``sys.stderr`` up at every record, so that a replaced stderr
    (test runners, redirection after start-up) is honoured and a closed one is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def _configure_logging(verbose: int, quiet: bool) -> None:
    pkg = logging.getLogger("twamerge")
    if _HANDLER not in pkg.handlers:
        pkg.addHandler(_HANDLER)
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    pkg.setLevel(level)
    _HANDLER.setLevel(level)
    # -vv also shows what other libraries (torch, datasets, ...) log.
    if verbose >= 2 and not quiet:
        root = logging.getLogger()
        root.setLevel(logging.DEBUG)
        if _HANDLER not in root.handlers:
            root.addHandler(_HANDLER)
            pkg.removeHandler(_HANDLER)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"twamerge {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                         help="More logging (-vv also from other libraries); tracebacks on errors.")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr; no progress bars.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version_callback,
                                          help="Print the version and exit.")] = False,
) -> None:
    STATE.verbose, STATE.quiet = verbose, quiet
    _configure_logging(verbose, quiet)


def _verbose_callback(value: int) -> int:
    if value:
        STATE.verbose = max(STATE.verbose, value)
        _configure_logging(STATE.verbose, STATE.quiet)
    return value


def _quiet_callback(value: bool) -> bool:
    if value:
        STATE.quiet = True
        _configure_logging(STATE.verbose, STATE.quiet)
    return value


# The same -v/-q are accepted after the command name too (`twamerge fit ... -q`), as scripts write them.
VerboseOpt = Annotated[int, typer.Option("-v", "--verbose", count=True, callback=_verbose_callback,
                                         help="More logging; tracebacks on errors.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", callback=_quiet_callback,
                                        help="Only errors on stderr; no progress bars.")]


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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _emit(result: dict[str, Any], json_out: bool, render: Callable[[dict[str, Any], Console], None] | None = None
          ) -> None:
    """Print ``result`` to stdout: one JSON object (strict JSON, NaN/Inf as null) with ``--json``,
    otherwise through ``render`` (or indented JSON when there is no renderer)."""
    if json_out or render is None:
        sys.stdout.write(json.dumps(_jsonable(result), indent=None if json_out else 2, allow_nan=False) + "\n")
        sys.stdout.flush()
        return
    render(result, Console(file=sys.stdout, soft_wrap=True))


def _progress(description: str) -> Callable[[Iterable[Any]], Iterable[Any]] | None:
    """A wrapper that shows a rich progress bar on stderr, or None under ``-q``."""
    if STATE.quiet:
        return None

    def wrap(items: Iterable[Any]) -> Iterable[Any]:
        from rich.progress import track

        items = list(items)
        return track(items, description=description, total=len(items), transient=True,
                     console=Console(file=sys.stderr))

    return wrap


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _choice_enum(name: str, values: Iterable[object]) -> type[enum.Enum]:
    """A str-Enum of ``values`` for Typer's choices; the values themselves are defined in config.py."""
    return enum.Enum(name, {str(v): str(v) for v in values}, type=str)  # type: ignore[return-value]


OutDType = _choice_enum("OutDType", choices(config.OutDType))
KeysMode = _choice_enum("KeysMode", choices(config.KeysMode))
Optimizer = _choice_enum("Optimizer", choices(config.Optimizer))
Coordinates = _choice_enum("Coordinates", choices(config.Coordinates))
Init = _choice_enum("Init", choices(config.Init))
Select = _choice_enum("Select", choices(config.Select))
Schedule = _choice_enum("Schedule", choices(config.Schedule))
Device = _choice_enum("Device", choices(config.Device))
Backend = _choice_enum("Backend", choices(config.Backend))
Toggle = _choice_enum("Toggle", choices(config.Toggle))
Precision = _choice_enum("Precision", choices(config.Precision))
Bits = _choice_enum("Bits", SUPPORTED_BITS)


def _dtype(value: enum.Enum) -> str | None:
    return None if value.value == "auto" else value.value


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    if not values:
        raise typer.BadParameter("give at least one weight", param_hint="--weights")
    return values


CheckpointsArg = Annotated[
    list[Path],
    typer.Argument(help="Checkpoint files, globs or directories (natural order: epoch10 after epoch9).",
                   show_default=False),
]
KeyOpt = Annotated[Optional[str], typer.Option("--key", help="Entry to merge inside torch checkpoints, e.g. "
                                                            "state_dict_ema (dotted paths descend).")]
KeysOpt = Annotated[KeysMode, typer.Option("--keys", help="strict: all checkpoints have the same keys; "
                                                          "intersection: merge the common keys only.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def _render_average(result: dict[str, Any], console: Console) -> None:
    weights = ", ".join(f"{w:.4g}" for w in result["weights"])
    console.print(f"{result['method']} average of {result['count']} checkpoints (weights {weights}), "
                  f"{result['tensors']} tensors, {result['params']:,} parameters, dtype {result['dtype']}")
    for out in result["outputs"]:
        console.print(f"wrote {out['path']}  {_human_bytes(out['bytes'])}  sha256 {out['sha256']}")


@app.command("average")
def average_cmd(
    checkpoints: CheckpointsArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output: .safetensors (default), .pt, or a "
                                                                "directory name for Hugging Face inputs.",
                                         show_default=False)],
    weights: Annotated[Optional[str], typer.Option("--weights", help="Comma-separated weights, one per checkpoint.")
                       ] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", min=0.0, max=1.0,
                                                 help="EMA decay over the checkpoints in the given order.")] = None,
    dtype: Annotated[OutDType, typer.Option("--dtype", help="Output dtype of floating tensors.")] = OutDType("auto"),
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Rescale --weights to sum to 1.")
                         ] = True,
    key: KeyOpt = None,
    keys: KeysOpt = KeysMode("strict"),
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Merge NaN/Inf weights instead of "
                                                                            "failing.")] = False,
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", help="Split the output into shards "
                                                                                   "of at most this size, e.g. 2GB.")
                              ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Average checkpoints without data: uniform (SWA), fixed --weights, or --ema."""
    from .merge import average_checkpoints
    from .options import parse_size

    parsed = _parse_weights(weights)
    if parsed is not None and ema is not None:
        raise typer.BadParameter("give either --weights or --ema, not both", param_hint="--weights/--ema")
    with _fail_on_twamerge_error():
        out = OutputConfig(output, force=force, dtype=_dtype(dtype), max_shard_size=parse_size(max_shard_size))
        result = average_checkpoints(
            checkpoints, out, weights=parsed, ema=ema, normalize=normalize,
            read=ReadConfig(ema_key=key, keys=keys.value, allow_nonfinite=allow_nonfinite),
            progress=_progress("averaging"),
        )
    _emit(result, json_out, _render_average)


def _render_inspect(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{result['count']} checkpoint(s)")
    for col in ("#", "file", "format", "tensors", "params", "dtypes", "size"):
        table.add_column(col, justify="right" if col in ("#", "tensors", "params", "size") else "left")
    for i, f in enumerate(result["files"]):
        dtypes = ", ".join(f"{k}:{v}" for k, v in f["dtypes"].items())
        table.add_row(str(i), Path(f["path"]).name, f["format"], str(f["tensors"]), f"{f['params']:,}", dtypes,
                      _human_bytes(f["bytes"]))
    console.print(table)
    if result["mergeable"]:
        console.print(f"mergeable: yes ({result['merged_tensors']} tensors, {result['float_params']:,} float "
                      "parameters)")
    else:
        console.print(f"mergeable: no: {result['reason']}")
    sim = result["similarity"]
    if sim:
        names = [str(i) for i in range(result["count"])]
        t = Table(title=f"centred checkpoints: cosine similarity / distance (rank {sim['rank']})")
        t.add_column("")
        for n in names:
            t.add_column(n, justify="right")
        for i, n in enumerate(names):
            cells = []
            for j in range(len(names)):
                c, d = sim["cosine"][i][j], sim["distance"][i][j]
                cells.append(f"{'-' if c is None else f'{c:+.3f}'} / {d:.3g}")
            t.add_row(n, *cells)
        console.print(t)
    mem = result["basis_memory"]
    parts = ", ".join(f"{b}-bit {_human_bytes(n)}" for b, n in mem["bytes"].items())
    console.print(f"basis memory ({mem['rows']} rows, groups of {mem['group_size']}): {parts}")


@app.command("inspect")
def inspect_cmd(
    checkpoints: CheckpointsArg,
    key: KeyOpt = None,
    keys: KeysOpt = KeysMode("strict"),
    similarity: Annotated[bool, typer.Option("--similarity/--no-similarity", help="Compute the pairwise "
                                             "similarity of the centred checkpoints (reads all weights).")] = True,
    group_size: Annotated[int, typer.Option("--group-size", min=8, help="Quantization group for the basis "
                                                                        "memory estimate.")] = 128,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Describe checkpoints: formats, sizes, whether they can be merged, diversity, basis memory."""
    from .inspect_ckpt import inspect_checkpoints

    with _fail_on_twamerge_error():
        result = inspect_checkpoints(checkpoints, ema_key=key, keys=keys.value, similarity=similarity,
                                     group_size=group_size, progress=_progress("inspecting"))
    _emit(result, json_out, _render_inspect)


# ---- learned merge: fit / eval / apply -----------------------------------------------------------

# Defaults are defined once, in the config dataclass (config.py imports no torch).
_D = FitConfig()


# Exit code of --fail-if-worse when the learned merge loses to the best candidate: distinct from
# 1 (an error) and 2 (a usage error), so a CI gate can tell them apart.
EXIT_WORSE = 3

ValOpt = Annotated[Path, typer.Option("--val", help="Validation data: a datasets.save_to_disk folder, "
                                      "parquet/json/jsonl/csv/arrow files or folders, a .txt file (one example per "
                                      "line), or a .pt/.safetensors/.npz tensor file.", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="file.py:factory, package.module:factory, "
                                                 "timm:NAME, or a Hugging Face config folder (auto-detected for "
                                                 "HF checkpoint folders).")]
ModelArgOpt = Annotated[Optional[list[str]], typer.Option("--model-arg", help="KEY=VALUE for the factory "
                                                          "(JSON literal values); repeatable.")]
LossOpt = Annotated[str, typer.Option("--loss", help="auto (the task's: cross-entropy, shifted next-token "
                                      "cross-entropy, MSE), ce, mse, entropy (no labels: the mean prediction "
                                      "entropy, as AdaMerging), or module:function(output, label) -> mean.")]
TaskOpt = Annotated[str, typer.Option("--task", help="auto (from config.architectures: ...ForCausalLM, "
                                      "...ForSequenceClassification, ...ForTokenClassification; else the label "
                                      "dtype), classification, causal-lm, token-classification, regression, or "
                                      "module:fn returning a twamerge.tasks.Task.")]
TextOpt = Annotated[Optional[str], typer.Option("--text", help="Text column to tokenize (default: the first of "
                                                "text, sentence, content, document, ...).")]
TextPairOpt = Annotated[Optional[str], typer.Option("--text-pair", help="Second text column of a pair task.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option("--tokenizer", help="Tokenizer folder (default: the first "
                                                      "Hugging Face candidate's).")]
MaxLengthOpt = Annotated[Optional[int], typer.Option("--max-length", min=1, help="Truncate token sequences to "
                                                     "this length (default: max_position_embeddings, at most 512).")]
PreprocessOpt = Annotated[Optional[str], typer.Option("--preprocess", help="module:fn or file.py:fn mapping the "
                                                      "raw columns (a dict of lists) to the model's inputs.")]
InputsOpt = Annotated[Optional[str], typer.Option("--inputs", help="Comma-separated input columns (default: "
                                                  "every numeric column but the label).")]
LabelOpt = Annotated[Optional[str], typer.Option("--label", help="Label column (default: the first of label, "
                                                 "labels, target, y).")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split of a DatasetDict (default: validation, "
                                                 "val, valid, test, or the only one).")]


AllowNonfiniteDataOpt = Annotated[bool, typer.Option("--allow-nonfinite-data", help="Accept NaN/Inf in --val "
                                                   "inputs and labels.")]


def _data_model(val, model, model_arg, loss, inputs, label, split, task="auto", text=None, text_pair=None,
                tokenizer=None, max_length=None, preprocess=None, allow_nonfinite_data=False):
    from .config import DataConfig, ModelConfig
    from .models import parse_model_args

    data = DataConfig(str(val), split=split, label=label,
                      inputs=tuple(c for c in inputs.split(",") if c) if inputs else None, text=text,
                      text_pair=text_pair, tokenizer=str(tokenizer) if tokenizer else None, max_length=max_length,
                      preprocess=preprocess, allow_nonfinite_data=allow_nonfinite_data)
    return data, ModelConfig(model, parse_model_args(model_arg), loss, task)


def _render_fit(result: dict[str, Any], console: Console) -> None:
    console.print(f"wrote {', '.join(result['outputs'])}")
    twa = next(m for m in result["methods"] if m["kind"] == "twa")
    split = "heldout" if result["heldout_rows"] else "fit"
    console.print(f"twa {result['metric_name']} on the {split} split: {twa[split]['metric']:.4f} "
                  f"(best candidate: {result['best_candidate']})")
    if result["written"]["kind"] != "twa":
        console.print(f"--select best: wrote {result['written']['name']}, the best on the held-out split")


def _print_table(report: dict[str, Any]) -> None:
    if STATE.quiet:
        return
    console = Console(file=sys.stderr)
    metric = report["metric_name"]
    better = "higher" if report.get("higher_is_better", True) else "lower"
    table = Table(title=f"{metric}, {better} is better (held-out: {report['heldout_rows']} rows, "
                        f"fit: {report['data']['fit_rows']} rows)")
    for col in ("method", f"fit {metric}", f"held-out {metric}", "held-out loss"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in report["methods"]:
        fit_, held = row.get("fit") or {}, row.get("heldout") or {}
        name = row["name"] + (f" ({len(row['ingredients'])} ingredients)" if row.get("ingredients") else "")
        table.add_row(name, f"{fit_['metric']:.4f}" if fit_ else "-", f"{held['metric']:.4f}" if held else "-",
                      f"{held['loss']:.4f}" if held else "-",
                      style="bold" if row["name"] == report["written"]["name"] else None)
    console.print(table)
    sub = report["subspace"]
    console.print(f"basis: {sub['rows']} rows x {sub['n_params']:,} params at {sub['bits']} bits = "
                  f"{_human_bytes(sub['basis_bytes'])}; {sub['dropped_directions']} directions dropped; "
                  f"quantization gap {sub['quantization_gap']:.2e}; "
                  f"{report['fit']['steps']} steps in {report['timings'].get('fit', 0):.1f} s")
    if not report["heldout_rows"]:
        console.print("[yellow]--holdout 0: every figure is on the data the coefficients were fit on[/yellow]")


@app.command("fit")
def fit_cmd(
    checkpoints: CheckpointsArg,
    val: ValOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="Merged checkpoint: .safetensors (default), .pt, "
                                         "or a folder for Hugging Face inputs.", show_default=False)],
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    loss: LossOpt = "auto",
    task: TaskOpt = "auto",
    inputs: InputsOpt = None,
    label: LabelOpt = None,
    split: SplitOpt = None,
    text: TextOpt = None,
    text_pair: TextPairOpt = None,
    tokenizer: TokenizerOpt = None,
    max_length: MaxLengthOpt = None,
    preprocess: PreprocessOpt = None,
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.95,
                                           help="Fraction of --val kept aside for the report (seeded, stratified).")
                       ] = _D.holdout,
    blocks: Annotated[str, typer.Option("--blocks", help="global, layer (one block per tensor) or size:N.")] = _D.blocks,
    bits: Annotated[Bits, typer.Option("--bits", help="Basis storage: 1/2/4/8-bit codes or 16/32-bit floats.")
                    ] = Bits(str(_D.bits)),
    group_size: Annotated[int, typer.Option("--group-size", help="Elements per quantization group.")] = _D.group_size,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="Passes over the fit split.")] = _D.epochs,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate, in units of the candidates' spread.")] = _D.lr,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer")] = Optimizer(_D.optimizer),
    schedule: Annotated[Schedule, typer.Option("--schedule", help="Learning rate after the warm-up: cosine (to "
                                               "0), step (/10 at 50% and 75% of the steps after the warm-up, as in "
                                               "the paper) or "
                                               "constant.")] = Schedule(_D.schedule),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per fit step (and per "
                                            "BatchNorm recalibration batch).")] = _D.batch_size,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", min=1, help="Rows per batch when scoring "
                                                 "(inference mode).")] = _D.eval_batch_size,
    seed: Annotated[int, typer.Option("--seed")] = _D.seed,
    device: Annotated[Device, typer.Option("--device")] = Device(_D.device),
    precision: Annotated[Precision, typer.Option("--precision", help="Autocast of forward and backward: auto "
                                                 "(bf16 on a GPU that supports it when the candidates are 16-bit, "
                                                 "else fp32), fp32, bf16, fp16; the coefficients stay float32.")
                         ] = Precision(_D.precision),
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Kernels: auto (Triton on CUDA, C loops "
                                                       "compiled on first use on CPU), triton, native (the C loops), "
                                                       "torch (references); default: TWAMERGE_BACKEND, else auto.")] = None,
    bn_recalibrate: Annotated[Toggle, typer.Option("--bn-recalibrate", help="Re-estimate BatchNorm statistics on "
                                                   "the fit split (auto: when the model has BatchNorm).")
                              ] = Toggle(_D.bn_recalibrate),
    coordinates: Annotated[Coordinates, typer.Option("--coordinates", help="Units of the trained coordinates: "
                                                     "candidates (each direction in units of the candidates' "
                                                     "spread along it) or weights (isotropic in weight space, "
                                                     "as in the paper).")] = Coordinates(_D.coordinates),
    init: Annotated[Init, typer.Option("--init", help="Start point of the fit: the uniform average (as in the "
                                       "paper), the greedy soup, or the best candidate on the fit split.")
                    ] = Init(_D.init),
    select: Annotated[Select, typer.Option("--select", help="What -o holds: the TWA merge, or the best on the "
                                           "held-out rows of TWA, the greedy soup, the uniform average and the "
                                           "best candidate on the fit split (its held-out figure is then "
                                           "optimistic: it chose it).")] = Select(_D.select),
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="Decoupled weight decay of the "
                                                "coefficients, toward the start point (--init).")] = _D.weight_decay,
    restarts: Annotated[int, typer.Option("--restarts", min=1, help="Fit N times with the seeds --seed, --seed+1, "
                                          "... (data order, dropout) and average the coefficients.")] = _D.restarts,
    greedy: Annotated[bool, typer.Option("--greedy/--no-greedy", help="Include the baseline "
                                         f"{METHODS['greedy'].summary}.")] = _D.greedy,
    candidates: Annotated[bool, typer.Option("--candidates/--no-candidates", help="Score "
                                             f"{METHODS['candidate'].summary} (needed for the greedy soup).")
                          ] = _D.eval_candidates,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations "
                                                         "in the backward pass: less memory, one more forward "
                                                         "pass per step (Hugging Face models).")] = _D.gradient_checkpointing,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the alphas and the fit curve (PNG).")] = None,
    fail_if_worse: Annotated[bool, typer.Option("--fail-if-worse", help=f"Exit {EXIT_WORSE} when the written merge "
                                                "loses to the best candidate on held-out data.")] = False,
    dtype: Annotated[OutDType, typer.Option("--dtype", help="Output dtype of floating tensors.")] = OutDType("auto"),
    key: KeyOpt = None,
    keys: KeysOpt = KeysMode("strict"),
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Accept NaN/Inf in checkpoints.")
                               ] = False,
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", help="Shard the output, e.g. 2GB.")
                              ] = None,
    allow_nonfinite_data: AllowNonfiniteDataOpt = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Learn the averaging coefficients on validation data (TWA) and write the merged checkpoint."""
    from .options import parse_size
    from .pipeline import fit

    with _fail_on_twamerge_error():
        try:
            cfg = FitConfig(blocks=blocks, bits=int(bits.value), group_size=group_size, epochs=epochs, lr=lr,
                            optimizer=optimizer.value, schedule=schedule.value, batch_size=batch_size,
                            eval_batch_size=eval_batch_size,
                            holdout=holdout, seed=seed,
                            device=device.value, backend=backend.value if backend else None,
                            bn_recalibrate=bn_recalibrate.value, init=init.value, coordinates=coordinates.value,
                            weight_decay=weight_decay, restarts=restarts, select=select.value,
                            greedy=greedy and candidates, eval_candidates=candidates,
                            gradient_checkpointing=gradient_checkpointing, precision=precision.value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        data_cfg, model_cfg = _data_model(val, model, model_arg, loss, inputs, label, split, task, text, text_pair,
                                          tokenizer, max_length, preprocess, allow_nonfinite_data)
        out = OutputConfig(output, force=force, dtype=_dtype(dtype), max_shard_size=parse_size(max_shard_size),
                           report=report, plot=plot)
        result = fit(checkpoints, val=data_cfg, model=model_cfg, output=out, cfg=cfg,
                     read=ReadConfig(ema_key=key, keys=keys.value, allow_nonfinite=allow_nonfinite),
                     progress=_progress("fitting"))
    _print_table(result)
    summary = {k: v for k, v in result.items() if k not in ("merge",)}
    summary["alphas"] = result["merge"]["block_alphas"]
    _emit(summary, json_out, _render_fit)
    if fail_if_worse and result["written"]["at_least_best"] is False:
        typer.echo(f"error: {result['written']['name']} loses to the best candidate ({result['best_candidate']}) "
                   "on held-out data", err=True)
        raise typer.Exit(EXIT_WORSE)


def _render_eval(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{result['rows']} rows")
    for col in ("checkpoint", "loss", result["metric_name"]):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for row in result["checkpoints"]:
        table.add_row(row["path"], f"{row['loss']:.4f}", f"{row['metric']:.4f}")
    console.print(table)


@app.command("eval")
def eval_cmd(
    checkpoints: CheckpointsArg,
    val: ValOpt,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    loss: LossOpt = "auto",
    task: TaskOpt = "auto",
    inputs: InputsOpt = None,
    label: LabelOpt = None,
    split: SplitOpt = None,
    text: TextOpt = None,
    text_pair: TextPairOpt = None,
    tokenizer: TokenizerOpt = None,
    max_length: MaxLengthOpt = None,
    preprocess: PreprocessOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    device: Annotated[Device, typer.Option("--device")] = Device(_D.device),
    key: KeyOpt = None,
    allow_nonfinite_data: AllowNonfiniteDataOpt = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Loss and metric of each checkpoint on all rows of --val."""
    from .pipeline import evaluate_checkpoints

    with _fail_on_twamerge_error():
        data_cfg, model_cfg = _data_model(val, model, model_arg, loss, inputs, label, split, task, text, text_pair,
                                          tokenizer, max_length, preprocess, allow_nonfinite_data)
        result = evaluate_checkpoints(checkpoints, val=data_cfg, model=model_cfg, batch_size=batch_size,
                                      device=device.value, read=ReadConfig(ema_key=key))
    _emit(result, json_out, _render_eval)


@app.command("apply")
def apply_cmd(
    report: Annotated[Path, typer.Argument(help="The JSON report of a fit (--report).", show_default=False)],
    checkpoints: CheckpointsArg,
    output: Annotated[Path, typer.Option("-o", "--output", show_default=False, help="Merged checkpoint.")],
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Re-emit a fit's merge from its saved coefficients (no data or model needed)."""
    from .options import parse_size
    from .pipeline import apply_report

    with _fail_on_twamerge_error():
        out = OutputConfig(output, force=force, max_shard_size=parse_size(max_shard_size))
        result = apply_report(report, checkpoints, out)
    _emit(result, json_out, lambda r, c: c.print(f"wrote {', '.join(r['outputs'])}"))


def main() -> None:
    """Console-script entry point (``twamerge``, ``python -m twamerge``, ``torchrun -m twamerge``)."""
    from .distributed import launched_by_torchrun

    if not launched_by_torchrun():
        app()
        return
    # A torchrun rank ends without interpreter shutdown. Gloo's worker threads outlive
    # destroy_process_group, and one that releases a collective's Python tensor while the
    # interpreter shuts down aborts the process (SIGABRT instead of our exit code; see
    # distributed._wait). Everything the command writes is complete and renamed into place before
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
