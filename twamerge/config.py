"""Settings of a fit, defined once. CLI options map 1:1 to these fields and take their defaults here.

The defaults were chosen by measurement on the shipped examples (see README, "Choosing the
defaults"); they are expressed in scale-free units, so multiplying every checkpoint by a constant
does not change the learned merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BLOCK_PATTERN = re.compile(r"^(global|layer|size:[1-9][0-9]*)$")
SUPPORTED_BITS = (1, 2, 4, 8, 16, 32)


def _check(cond: bool, name: str, value: object, expected: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid; expected {expected}")


@dataclass(frozen=True)
class DataConfig:
    """Where the validation data is and which columns to use."""

    path: str
    split: str | None = None
    inputs: tuple[str, ...] | None = None
    label: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """How to build the model: ``file.py:factory``, ``package.module:factory``, an HF directory, ``timm:NAME``."""

    spec: str | None = None
    args: dict = field(default_factory=dict)
    loss: str = "auto"


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
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup: float = 0.2
    batch_size: int = 32
    holdout: float = 0.2
    seed: int = 0
    device: str = "auto"
    # None: the TWAMERGE_BACKEND environment variable, read by kernels.dispatch (else auto).
    backend: str | None = None
    bn_recalibrate: str = "auto"
    rank_rtol: float = 1e-5
    init: str = "uniform"
    coordinates: str = "candidates"
    greedy: bool = True
    eval_candidates: bool = True

    def __post_init__(self) -> None:
        _check(bool(BLOCK_PATTERN.match(self.blocks)), "blocks", self.blocks, "global, layer or size:N (N > 0)")
        _check(self.bits in SUPPORTED_BITS, "bits", self.bits, "one of 1, 2, 4, 8, 16, 32")
        _check(self.group_size >= 8 and self.group_size % 8 == 0, "group_size", self.group_size,
               "a positive multiple of 8")
        _check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check(self.optimizer in ("adamw", "sgd"), "optimizer", self.optimizer, "adamw or sgd")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(0 <= self.warmup < 1, "warmup", self.warmup, "a fraction in [0, 1)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(0 <= self.holdout < 1, "holdout", self.holdout, "a fraction in [0, 1)")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", self.device,
               "auto, cpu, cuda or cuda:N")
        _check(self.backend in (None, "auto", "triton", "torch"), "backend", self.backend, "auto, triton or torch")
        _check(self.bn_recalibrate in ("auto", "on", "off"), "bn_recalibrate", self.bn_recalibrate, "auto, on or off")
        _check(self.coordinates in ("weights", "candidates"), "coordinates", self.coordinates,
               "weights or candidates")
        _check(self.init in ("uniform", "greedy", "best"), "init", self.init, "uniform, greedy or best")
        _check(self.init != "greedy" or self.greedy, "init", self.init, "the greedy soup, which --no-greedy turns off")
        _check(self.init == "uniform" or self.eval_candidates or self.greedy, "init", self.init,
               "candidate scores, which --no-candidates turns off")
        _check(0 < self.rank_rtol < 1, "rank_rtol", self.rank_rtol, "in (0, 1)")
