"""Settings, defined once. The CLI options map 1:1 to these fields, take their defaults here and
their choices from the ``Literal`` types below (``choices``), so a choice is written in one place.

The defaults were chosen by measurement on the shipped examples (see README, "Choosing the
defaults"); they are expressed in scale-free units, so multiplying every checkpoint by a constant
does not change the learned merge.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .kernels.layout import SUPPORTED_BITS

BLOCK_PATTERN = re.compile(r"^(global|layer|size:[1-9][0-9]*)$")

Optimizer = Literal["adamw", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "triton", "native", "torch"]
Toggle = Literal["auto", "on", "off"]
Coordinates = Literal["candidates", "weights"]
# Where the fit starts: the uniform average (the paper), the greedy soup, or the best candidate.
Init = Literal["uniform", "greedy", "best"]
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


@dataclass(frozen=True)
class DataConfig:
    """Where the validation data is and which columns to use."""

    path: str
    split: str | None = None
    inputs: tuple[str, ...] | None = None
    label: str | None = None
    # Text: the column(s) to tokenize (default: found by name), the tokenizer folder (default: the
    # first Hugging Face candidate's), and the length sequences are truncated to (default: the
    # model's max_position_embeddings, at most 512).
    text: str | None = None
    text_pair: str | None = None
    tokenizer: str | None = None
    max_length: int | None = None
    # ``module:fn`` or ``file.py:fn`` mapping the raw columns (a dict of lists) to the model's inputs.
    preprocess: str | None = None
    allow_nonfinite_data: bool = False  # accept NaN/Inf in the inputs and labels

    def __post_init__(self) -> None:
        _check(self.max_length is None or self.max_length > 0, "max_length", self.max_length, "a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """How to build the model: ``file.py:factory``, ``package.module:factory``, an HF directory, ``timm:NAME``."""

    spec: str | None = None
    args: dict = field(default_factory=dict)
    loss: str = "auto"
    # auto (from config.architectures, else the label dtype), a name of tasks.TASK_NAMES, or module:fn.
    task: str = "auto"


@dataclass(frozen=True)
class ReadConfig:
    """How the candidate checkpoints are read (shared by every command that reads them).

    ``ema_key`` names the entry to merge inside torch checkpoints (e.g. ``state_dict_ema``);
    ``keys`` says whether every candidate must have the same keys; ``allow_nonfinite`` accepts NaN/Inf.
    """

    ema_key: str | None = None
    keys: KeysMode = "strict"
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        _check_choice("keys", self.keys, KeysMode)


@dataclass(frozen=True)
class OutputConfig:
    """Everything a command writes, checked together before any work.

    ``dtype`` is the floating dtype of the merged tensors (None or ``auto``: each input's);
    ``max_shard_size`` splits the checkpoint into shards of at most that many bytes.
    """

    path: Path
    force: bool = False
    dtype: str | None = None
    max_shard_size: int | None = None
    report: Path | None = None
    plot: Path | None = None

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
    """Hyper-parameters of the coefficient fit (DESIGN section 2).

    ``lr`` is in units of the candidates' spread: a step of 1.0 moves a block's weights by the RMS
    distance of the candidates from their mean, which is what makes it scale-free.
    """

    blocks: str = "layer"
    bits: int = 8
    group_size: int = 128
    epochs: int = 10
    lr: float = 0.05
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup: float = 0.2
    schedule: Schedule = "cosine"
    batch_size: int = 32
    # Scoring only reads the model (inference mode): larger batches cost no gradient memory.
    eval_batch_size: int = 256
    holdout: float = 0.2
    seed: int = 0
    device: str = "auto"
    # None: the TWAMERGE_BACKEND environment variable, read by kernels.dispatch (else auto).
    backend: Backend | None = None
    bn_recalibrate: Toggle = "auto"
    rank_rtol: float = 1e-5
    init: Init = "uniform"
    select: Select = "twa"
    # Fits from different data orders (seed, seed + 1, ...) whose coefficients are averaged.
    restarts: int = 1
    coordinates: Coordinates = "candidates"
    # The optional baselines of the report (methods.BASELINES): the greedy soup and every candidate.
    greedy: bool = True
    eval_candidates: bool = True
    # Recompute activations in the backward pass (Hugging Face models and modules with the same method).
    gradient_checkpointing: bool = False
    # auto: bf16 on a GPU that supports it when the candidates are stored in 16 bits, else fp32.
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        _check(bool(BLOCK_PATTERN.match(self.blocks)), "blocks", self.blocks, "global, layer or size:N (N > 0)")
        _check(self.bits in SUPPORTED_BITS, "bits", self.bits, "one of " + ", ".join(map(str, SUPPORTED_BITS)))
        _check(self.group_size >= 8 and self.group_size % 8 == 0, "group_size", self.group_size,
               "a positive multiple of 8")
        _check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check_choice("optimizer", self.optimizer, Optimizer)
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(0 <= self.warmup < 1, "warmup", self.warmup, "a fraction in [0, 1)")
        _check_choice("schedule", self.schedule, Schedule)
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _check(0 <= self.holdout < 1, "holdout", self.holdout, "a fraction in [0, 1)")
        _check(self.device in typing.get_args(Device) or self.device.startswith("cuda:"), "device", self.device,
               "auto, cpu, cuda or cuda:N")
        _check(self.backend is None or self.backend in typing.get_args(Backend), "backend", self.backend,
               "auto, triton or torch")
        _check_choice("bn_recalibrate", self.bn_recalibrate, Toggle)
        _check_choice("coordinates", self.coordinates, Coordinates)
        _check_choice("init", self.init, Init)
        _check_choice("precision", self.precision, Precision)
        _check(self.init != "greedy" or self.greedy, "init", self.init, "the greedy soup, which --no-greedy turns off")
        _check(self.init != "best" or self.eval_candidates, "init", self.init,
               "candidate scores, which --no-candidates turns off")
        _check_choice("select", self.select, Select)
        _check(self.select != "best" or self.holdout > 0, "select", self.select,
               "held-out rows to choose on (--holdout > 0)")
        _check(self.restarts >= 1, "restarts", self.restarts, "an integer >= 1")
        _check(0 < self.rank_rtol < 1, "rank_rtol", self.rank_rtol, "in (0, 1)")
