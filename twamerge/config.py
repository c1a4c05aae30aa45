"""Settings, defined once. A field the command line sets says how in its ``metadata`` (:func:`option`:
the flag, the help, bounds); the CLI generates its options from these fields, so an option's name,
default, choices (the ``Literal`` types below) and help are written in one place, next to the setting.

The defaults were chosen by measurement on the shipped examples (docs/defaults.md has each sweep
and its command); they are expressed in scale-free units, so multiplying every checkpoint by a
constant does not change the learned merge.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .kernels.layout import SUPPORTED_BITS
from .methods import METHODS, by_init, data_free_weights, init_names
from .options import parse_size

# The fit's step budget (docs/defaults.md, "Step budget"): at least MIN_STEPS steps, and past them an early stop
# once the mean fit loss of the last two windows of epochs is no more than STOP_TOL below the best before them.
MIN_STEPS = 150
STOP_TOL = 1e-3

# Tokens per batch of token ids (docs/performance.md, "Language models"). The fit's 8192 is the row default's
# 32 rows at 256 tokens, so rows up to 256 tokens train in the batches the defaults were chosen with. Scoring
# costs less per token in smaller batches on a CPU (less padding; GPT-2 size: 3.2 ms at 2048, 3.8 at 4096,
# 4.4 at 16384); 4096 keeps batches large enough for an accelerator to be busy.
BATCH_TOKENS = 8192
EVAL_BATCH_TOKENS = 4096

BLOCK_PATTERN = re.compile(r"^(global|layer|size:[1-9][0-9]*)$")

Optimizer = Literal["adamw", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "triton", "native", "torch"]
Toggle = Literal["auto", "on", "off"]
Coordinates = Literal["candidates", "weights"]
# Where the fit starts: a fit baseline's merge (methods.init_names: the uniform average, as in the paper; the
# greedy soup; the best candidate).
Init = Literal[init_names()]
# What fit writes: the TWA merge, or the best on the held-out rows of TWA, the greedy soup, the uniform
# average and the best candidate on the fit rows (a guard against losing to picking).
Select = Literal["twa", "best"]
# Learning-rate schedule of the coefficients after the warm-up: cosine to 0, step (/10 at 50% and 75% of
# the steps after the warm-up, as in the paper's TWA runs) or constant.
Schedule = Literal["cosine", "step", "constant"]
KeysMode = Literal["strict", "intersection"]
# Forward/backward under autocast; the coefficients, combine and project stay float32.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
OutDType = Literal["auto", "float32", "float16", "bfloat16", "float64"]


def choices(literal: object) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` type, as strings (what a command line accepts)."""
    return tuple(str(v) for v in typing.get_args(literal))


def _check(cond: bool, name: str, value: object, expected: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid; expected {expected}")


def _check_choice(name: str, value: object, literal: object) -> None:
    allowed = [str(v) for v in typing.get_args(literal)]
    _check(value in typing.get_args(literal), name, value, ", ".join(allowed[:-1]) + " or " + allowed[-1])


def _check_device(device: str) -> None:
    _check(device in typing.get_args(Device) or re.fullmatch(r"cuda:[0-9]+", str(device)) is not None, "device",
           device, "auto, cpu, cuda or cuda:N")


def option(flag: str, help: str | Callable[[], str], **spelling: Any) -> dict[str, Any]:
    """The ``metadata`` of a field the command line sets (read by ``twamerge.cli_options``; no typer here).

    Args:
        flag: ``--name``, or ``--name/--no-name`` for a switch.
        help: the option's help, or a function returning it (for a text that lists names defined in a
            module this one should not import).
        spelling: optional ``short`` (``-o``); ``min``/``max`` (bounds the parser checks and --help shows);
            ``choices`` (when the field's type is not a ``Literal``); ``metavar``; ``cli_type`` (what the
            parser reads when it differs from the field's type) and ``parse`` (text -> the field's value;
            a ``ValueError`` becomes a usage error naming the flag); ``cli_default`` (the command line's
            default when it differs from the field's: None lets the command compute it, as -o does);
            ``setting`` (the key in a settings file when it is not the flag's name, see twamerge.settings);
            ``names_file`` (the value may name a file, ``file.py:name``, or a folder: a settings file's
            are read from its folder).
    """
    return {"flag": flag, "help": help, **spelling}


def _columns(text: str) -> tuple[str, ...] | None:
    """``"a,b"`` -> ``("a", "b")``; an empty text -> None (the default columns)."""
    return tuple(c for c in text.split(",") if c) or None


def _numbers(text: str) -> tuple[float, ...]:
    """``"1, 1,2"`` -> ``(1.0, 1.0, 2.0)``."""
    try:
        values = tuple(float(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise ValueError("expected a comma-separated list of numbers, e.g. 1,1,2") from None
    if not values:
        raise ValueError("expected at least one weight")
    return values


def _key_values(items: list[str]) -> dict:
    # Imported when an option is parsed: the models module is heavier than settings should be, and it
    # (or what it imports) may come to import this one.
    from .models import parse_model_args

    return parse_model_args(items)


def _task_help() -> str:
    from .tasks import HEAD_KINDS, TASK_NAMES  # tasks imports the models; read when the CLI is built

    return (f"auto (a transformers model's head kind from transformers' auto mappings: {HEAD_KINDS}; else the "
            f"label dtype), {', '.join(TASK_NAMES)}, or module:fn returning a twamerge.tasks.Task.")


def _loss_help() -> str:
    from .tasks import TASK_NAMES

    return (f"auto (the task's own loss; the tasks are {', '.join(TASK_NAMES)}, see --task), ce (cross-entropy), "
            "mse, entropy (no labels: the mean prediction entropy, as AdaMerging), or module:function(output, label) "
            "-> mean (it gets the model's whole output: full-vocabulary logits for a language model).")


_DEVICE = option("--device", "auto (CUDA when available), cpu, cuda or cuda:N.", metavar="<auto|cpu|cuda|cuda:N>")


@dataclass(frozen=True)
class DataConfig:
    """Where the validation data is and which columns to use."""

    path: str = field(metadata=option(
        "--val", "Validation data: a datasets.save_to_disk folder, parquet/json/jsonl/csv/arrow files or folders, a "
        ".txt file (one example per line), or a .pt/.safetensors/.npz tensor file.", cli_type=Path, parse=str))
    split: str | None = field(default=None, metadata=option(
        "--split", "Split of a DatasetDict (default: validation, val, valid, test, or the only one)."))
    inputs: tuple[str, ...] | None = field(default=None, metadata=option(
        "--inputs", "Comma-separated input columns (default: every numeric column but the label).", cli_type=str,
        parse=_columns))
    label: str | None = field(default=None, metadata=option(
        "--label", "Label column (default: the first of label, labels, target, y)."))
    text: str | None = field(default=None, metadata=option(
        "--text", "Text column to tokenize (default: the first of text, sentence, content, document, ...)."))
    text_pair: str | None = field(default=None, metadata=option("--text-pair", "Second text column of a pair task."))
    tokenizer: str | None = field(default=None, metadata=option(
        "--tokenizer", "Tokenizer folder (default: the first Hugging Face candidate's).", cli_type=Path, parse=str))
    max_length: int | None = field(default=None, metadata=option(
        "--max-length", "Truncate token sequences to this length (default: max_position_embeddings, at most 512).",
        min=1))
    preprocess: str | None = field(default=None, metadata=option(
        "--preprocess", "module:fn or file.py:fn mapping the raw columns (a dict of lists) to the model's inputs.",
        names_file=True))
    allow_nonfinite_data: bool = field(default=False, metadata=option(
        "--allow-nonfinite-data", "Accept NaN/Inf in --val inputs and labels."))

    def __post_init__(self) -> None:
        _check(self.max_length is None or self.max_length > 0, "max_length", self.max_length, "a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """How to build the model: ``file.py:factory``, ``package.module:factory``, an HF directory, ``timm:NAME``."""

    spec: str | None = field(default=None, metadata=option(
        "--model", "file.py:factory, package.module:factory, timm:NAME, or a Hugging Face config folder "
        "(default: the candidates' own folder when it holds config.json, else model = in [tool.twamerge]); for LoRA "
        "adapters, the base model's folder (default: their base_model_name_or_path).",
        names_file=True))
    args: dict = field(default_factory=dict, metadata=option(
        "--model-arg", "KEY=VALUE for the factory (JSON literal values); repeatable.", cli_type=list[str],
        parse=_key_values, setting="model-args"))
    loss: str = field(default="auto", metadata=option("--loss", _loss_help, names_file=True))
    task: str = field(default="auto", metadata=option("--task", _task_help, names_file=True))
    # Off by default: a candidate folder's Python files are code from wherever the folder came from.
    trust_remote_code: bool = field(default=False, metadata=option(
        "--trust-remote-code", "Run the Python code a Hugging Face folder's auto_map names (modeling_*.py, "
        "tokenization_*.py, ...): only for folders you trust. Without it such a folder is refused. Command line only.",
        setting=None))


@dataclass(frozen=True)
class ReadConfig:
    """How the candidate checkpoints are read (shared by every command that reads them).

    ``ema_key`` names the entry to merge inside torch checkpoints (e.g. ``state_dict_ema``);
    ``keys`` says whether every candidate must have the same keys; ``allow_nonfinite`` accepts NaN/Inf.
    """

    ema_key: str | None = field(default=None, metadata=option(
        "--key", "Entry to merge inside torch checkpoints, e.g. state_dict_ema (dotted paths descend)."))
    keys: KeysMode = field(default="strict", metadata=option(
        "--keys", "strict: all checkpoints have the same keys; intersection: merge the common keys only."))
    allow_nonfinite: bool = field(default=False, metadata=option(
        "--allow-nonfinite", "Accept NaN/Inf in the checkpoints (merged as they are) instead of failing."))

    def __post_init__(self) -> None:
        _check_choice("keys", self.keys, KeysMode)


@dataclass(frozen=True)
class OutputConfig:
    """Everything a command writes, checked together before any work.

    ``dtype`` is the floating dtype of the merged tensors (``auto`` or None: each input's);
    ``max_shard_size`` splits the checkpoint into shards of at most that many bytes.
    """

    path: Path = field(metadata=option(
        "--output", "The merged checkpoint: .safetensors, .pt, or a folder for Hugging Face inputs (default: "
        "merged.safetensors in the working folder; merged/ for Hugging Face or adapter folder candidates).",
        short="-o", cli_default=None))
    force: bool = field(default=False, metadata=option("--force", "Overwrite existing outputs.", short="-f"))
    dtype: str | None = field(default="auto", metadata=option(
        "--dtype", "Output dtype of floating tensors.", choices=typing.get_args(OutDType)))
    max_shard_size: int | None = field(default=None, metadata=option(
        "--max-shard-size", "Split the output into shards of at most this size, e.g. 2GB.", cli_type=str,
        parse=parse_size))
    report: Path | None = field(default=None, metadata=option("--report", "Write the JSON report here."))
    plot: Path | None = field(default=None, metadata=option("--plot", "Draw the alphas and the fit curve (PNG)."))
    # LoRA adapters merge into an adapter by default (docs/adapters.md).
    merge_into_base: bool = field(default=False, metadata=option(
        "--merge-into-base", "LoRA adapters: write the base model with the merged update added (a full model folder) "
        "instead of a merged adapter."))

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        for name in ("report", "plot"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        _check(self.max_shard_size is None or self.max_shard_size > 0, "max_shard_size", self.max_shard_size,
               "a positive number of bytes")

    @classmethod
    def of(cls, output: OutputConfig | str | Path) -> OutputConfig:
        """An ``OutputConfig`` as given, or one for a bare path with every other field at its default."""
        return output if isinstance(output, OutputConfig) else cls(Path(output))


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of the coefficient fit (docs/how-it-works.md, "The method", steps 2-3).

    ``lr`` is in units of the candidates' spread: a step of 1.0 moves a block's weights by the RMS
    distance of the candidates from their mean, which is what makes it scale-free.
    """

    blocks: str = field(default="layer", metadata=option(
        "--blocks", "global, layer (one block per tensor) or size:N."))
    bits: int = field(default=8, metadata=option(
        "--bits", "Basis storage: 1/2/4/8-bit codes or 16/32-bit floats.", choices=SUPPORTED_BITS))
    group_size: int = field(default=128, metadata=option("--group-size", "Elements per quantization group."))
    epochs: int = field(default=10, metadata=option(
        "--epochs", "Passes over the fit split (0: no training, the start point is written).", min=0))
    # A fit's length counted in epochs alone is a few dozen steps on a small --val, too few to reach the best
    # candidate of a run that is still improving (docs/defaults.md, "Step budget").
    min_steps: int = field(default=MIN_STEPS, metadata=option(
        "--min-steps", "Optimizer steps at least (when --epochs > 0), however few rows --val has.", min=0))
    stop_tol: float = field(default=STOP_TOL, metadata=option(
        "--stop-tol", "Past --min-steps and half the planned steps, stop early (after a short decay of the learning "
        "rate) once neither of the last two windows of whole epochs has a mean fit loss below the best earlier "
        "window's by more than this fraction of it; 0: never.", min=0.0))
    lr: float = field(default=0.05, metadata=option("--lr", "Learning rate, in units of the candidates' spread."))
    optimizer: Optimizer = field(default="adamw", metadata=option("--optimizer", "Optimizer of the coefficients."))
    weight_decay: float = field(default=0.0, metadata=option(
        "--weight-decay", "Decoupled weight decay of the coefficients, toward the start point (--init).", min=0.0))
    momentum: float = 0.9
    warmup: float = 0.2
    schedule: Schedule = field(default="cosine", metadata=option(
        "--schedule", "Learning rate after the warm-up: cosine (to 0), step (/10 at 50% and 75% of the steps after "
        "the warm-up, as in the paper) or constant."))
    batch_size: int = field(default=32, metadata=option(
        "--batch-size", "Rows per fit step (and per BatchNorm recalibration batch), at most; token ids are also "
        "bounded by --batch-tokens.", min=1))
    # Scoring only reads the model (inference mode): larger batches cost no gradient memory.
    eval_batch_size: int = field(default=256, metadata=option(
        "--eval-batch-size", "Rows per batch when scoring (inference mode), at most; token ids are also bounded by "
        "--eval-batch-tokens.", min=1))
    # A language model's memory grows with the tokens of a batch, not its rows (docs/performance.md, "Language
    # models"): token-id rows are packed, sorted by length, into batches of at most this many tokens.
    batch_tokens: int = field(default=BATCH_TOKENS, metadata=option(
        "--batch-tokens", "Token ids: tokens per fit step at most (rows x the longest row, padding included; a "
        "longer row is a batch of its own); rows of similar length share a batch. Sizing: docs/performance.md.",
        min=1))
    eval_batch_tokens: int = field(default=EVAL_BATCH_TOKENS, metadata=option(
        "--eval-batch-tokens", "Token ids: tokens per scoring batch at most (inference mode).", min=1))
    holdout: float = field(default=0.2, metadata=option(
        "--holdout", "Fraction of --val kept aside for the report (seeded, stratified).", min=0.0, max=0.95))
    seed: int = field(default=0, metadata=option("--seed", "Seed of the held-out split, the data order and dropout."))
    device: str = field(default="auto", metadata=_DEVICE)
    # None: the TWAMERGE_BACKEND environment variable, read by kernels.dispatch (else auto).
    backend: Backend | None = field(default=None, metadata=option(
        "--backend", "Kernels: auto (Triton on CUDA, C loops compiled on first use on CPU), triton, native (the C "
        "loops), torch (references); default: TWAMERGE_BACKEND, else auto."))
    bn_recalibrate: Toggle = field(default="auto", metadata=option(
        "--bn-recalibrate", "Re-estimate BatchNorm statistics on the fit split (auto: when the model has BatchNorm)."))
    rank_rtol: float = 1e-5
    init: Init = field(default="uniform", metadata=option(
        "--init", "Start point of the fit: the uniform average (as in the paper), the greedy soup, or the best "
        "candidate on the fit split."))
    select: Select = field(default="twa", metadata=option(
        "--select", "What -o holds: the TWA merge, or the best on the held-out rows of TWA, the greedy soup, the "
        "uniform average and the best candidate on the fit split (its held-out figure is then optimistic: it chose "
        "it)."))
    restarts: int = field(default=1, metadata=option(
        "--restarts", "Fit N times with the seeds --seed, --seed+1, ... (data order, dropout) and average the "
        "coefficients.", min=1))
    fit_floor: bool = field(default=True, metadata=option(
        "--fit-floor/--no-fit-floor", "Never end worse than a scored baseline on the fit split: a fit whose "
        "fit-split loss is above the best baseline's continues from it once, and writes it if still above."))
    coordinates: Coordinates = field(default="candidates", metadata=option(
        "--coordinates", "Units of the trained coordinates: candidates (each direction in units of the candidates' "
        "spread along it) or weights (isotropic in weight space, as in the paper)."))
    # The fit baselines a fit may skip (methods.METHODS, those with ``skip``): the greedy soup and every candidate.
    greedy: bool = field(default=True, metadata=option(
        "--greedy/--no-greedy", f"Include the baseline {METHODS['greedy'].summary}."))
    eval_candidates: bool = field(default=True, metadata=option(
        "--candidates/--no-candidates", f"Report {METHODS['candidate'].summary}."))
    # None: auto, on for language models (the rule and its measurement: docs/performance.md, "Language models").
    gradient_checkpointing: bool | None = field(default=None, metadata=option(
        "--gradient-checkpointing/--no-gradient-checkpointing", "Recompute activations in the backward pass: less "
        "memory, one more forward pass per step (Hugging Face models). Default: on for causal language models "
        "whose model supports it, else off."))
    precision: Precision = field(default="auto", metadata=option(
        "--precision", "Autocast of forward and backward: auto (bf16 on a GPU that supports it when the candidates "
        "are 16-bit, else fp32), fp32, bf16, fp16; the coefficients stay float32."))
    # Sharding the model itself over the ranks (FSDP2), not only the basis (docs/how-it-works.md, "Distributed fit").
    shard_model: Toggle = field(default="auto", metadata=option(
        "--shard-model", "Shard the model's weights and gradients over the ranks (FSDP2) as well as the basis, so "
        "that memory per rank falls as ranks are added (auto: on under torchrun with more than one rank)."))

    def __post_init__(self) -> None:
        _check(bool(BLOCK_PATTERN.match(self.blocks)), "blocks", self.blocks, "global, layer or size:N (N > 0)")
        _check(self.bits in SUPPORTED_BITS, "bits", self.bits, "one of " + ", ".join(map(str, SUPPORTED_BITS)))
        _check(self.group_size >= 8 and self.group_size % 8 == 0, "group_size", self.group_size,
               "a positive multiple of 8")
        _check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        _check(self.min_steps >= 0, "min_steps", self.min_steps, "an integer >= 0")
        _check(0 <= self.stop_tol < 1, "stop_tol", self.stop_tol, "a fraction in [0, 1)")
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check_choice("optimizer", self.optimizer, Optimizer)
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(0 <= self.warmup < 1, "warmup", self.warmup, "a fraction in [0, 1)")
        _check_choice("schedule", self.schedule, Schedule)
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _check(self.batch_tokens >= 1, "batch_tokens", self.batch_tokens, "an integer >= 1")
        _check(self.eval_batch_tokens >= 1, "eval_batch_tokens", self.eval_batch_tokens, "an integer >= 1")
        _check(0 <= self.holdout < 1, "holdout", self.holdout, "a fraction in [0, 1)")
        _check_device(self.device)
        if self.backend is not None:
            _check_choice("backend", self.backend, Backend)
        _check_choice("bn_recalibrate", self.bn_recalibrate, Toggle)
        _check_choice("coordinates", self.coordinates, Coordinates)
        _check_choice("init", self.init, Init)
        _check_choice("precision", self.precision, Precision)
        _check_choice("shard_model", self.shard_model, Toggle)
        # The baseline --init starts from must be scored (the greedy soup needs no candidate rows: it scores them).
        start = by_init(self.init)
        if start.skip is not None:
            flag = self.__dataclass_fields__[start.skip.field].metadata.get("flag", f"--no-{start.skip.field}")
            _check(start.enabled(self), "init", self.init, f"{start.skip.what}, which {flag.split('/')[-1]} turns off")
        _check_choice("select", self.select, Select)
        _check(self.select != "best" or self.holdout > 0, "select", self.select,
               "held-out rows to choose on (--holdout > 0)")
        _check(self.restarts >= 1, "restarts", self.restarts, "an integer >= 1")
        _check(0 < self.rank_rtol < 1, "rank_rtol", self.rank_rtol, "in (0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``evaluate_checkpoints`` (``twamerge eval``)."""

    batch_size: int = field(default=64, metadata=option("--batch-size", "Rows per batch (inference mode).", min=1))
    batch_tokens: int = field(default=EVAL_BATCH_TOKENS, metadata=option(
        "--batch-tokens", "Token ids: tokens per batch at most (rows x the longest row, padding included).", min=1))
    device: str = field(default="auto", metadata=_DEVICE)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.batch_tokens >= 1, "batch_tokens", self.batch_tokens, "an integer >= 1")
        _check_device(self.device)


@dataclass(frozen=True)
class InspectConfig:
    """Settings of ``inspect_checkpoints`` (``twamerge inspect``)."""

    similarity: bool = field(default=True, metadata=option(
        "--similarity/--no-similarity", "Compute the pairwise similarity of the centred checkpoints (reads all "
        "weights)."))
    # The basis memory a fit would need: by default at the fit's own group size.
    group_size: int = field(default=FitConfig.group_size, metadata=option(
        "--group-size", "Quantization group for the basis memory estimate.", min=8))


@dataclass(frozen=True)
class AverageConfig:
    """Which data-free average ``average_checkpoints`` (``twamerge average``) writes: the uniform one
    (SWA) when neither ``weights`` nor ``ema`` is given, fixed ``weights``, or an EMA with decay ``ema``."""

    weights: tuple[float, ...] | None = field(default=None, metadata=option(
        "--weights", "Comma-separated weights, one per checkpoint.", cli_type=str, parse=_numbers))
    ema: float | None = field(default=None, metadata=option(
        "--ema", "EMA decay over the checkpoints in the given order.", min=0.0, max=1.0))
    normalize: bool = field(default=True, metadata=option(
        "--normalize/--no-normalize", "Rescale --weights to sum to 1."))
    hash_inputs: bool = field(default=True, metadata=option(
        "--hash/--no-hash", "Compute each input's SHA-256 (on worker threads beside the merge) for the summary and "
        "the output's metadata; --no-hash leaves them out: no provenance hashes in the output, for raw speed."))

    def __post_init__(self) -> None:
        # The merge's own rule (both given, a weight that is not finite, weights summing to 0), applied to the
        # weights as given so that it fails before any checkpoint is read; their count is checked against the
        # checkpoints when they are.
        data_free_weights(len(self.weights) if self.weights else 1, weights=self.weights, ema=self.ema,
                          normalize=self.normalize)
