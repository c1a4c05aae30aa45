"""Scoring a model on the validation rows, and BatchNorm recalibration.

Every figure in a report comes from :func:`evaluate`: the sums of loss and correct rows over a set
of rows, added over ranks (each rank scores its contiguous share; one process is a world of one),
then divided once. :class:`Scorer` is what the fit's stages use: it loads a state into the bound
model, re-estimates BatchNorm statistics on the fit rows when asked, and scores both splits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import TensorData, iter_batches
from .distributed import Comm
from .models import Objective, call_model

# A state to load: a mapping, or (key, tensor) pairs produced one at a time so that a whole
# candidate never sits in memory beside the model.
State = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass
class Splits:
    """The validation data and its seeded split into the rows the fit sees and the held-out rows."""

    data: TensorData
    fit: torch.Tensor  # row indices, int64
    heldout: torch.Tensor  # row indices, int64 (empty with --holdout 0)
    objective: Objective


@torch.no_grad()
def load_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the model's parameters and buffers, one tensor at a time (unknown keys ignored).

    A tensor that already is the model's (a view of the fit's flat buffer) is left as it is.
    """
    targets = model.state_dict(keep_vars=True)
    for key, value in state.items() if isinstance(state, Mapping) else state:
        target = targets.get(key)
        if target is not None and not (target.data_ptr() == value.data_ptr() and target.dtype == value.dtype):
            target.copy_(value)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: TensorData, index: torch.Tensor, batch_size: int,
                          device: torch.device) -> bool:
    """Re-estimate BatchNorm running statistics on ``index`` (as SWA's update_bn). Returns whether any BN exists."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
    was_training = model.training
    model.train()
    for inputs, _ in iter_batches(data, index, batch_size):
        call_model(model, {k: v.to(device) for k, v in inputs.items()})
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return True


@torch.inference_mode()
def evaluate(model: nn.Module, data: TensorData, index: torch.Tensor, objective: Objective, batch_size: int,
             device: torch.device, comm: Comm) -> dict:
    """Mean loss and metric of ``model`` over the rows ``index`` (eval mode): ``{"loss", "metric", "n"}``.

    Each rank scores its contiguous share of ``index``; the sums of loss, correct rows and rows are
    added over ranks, so every rank returns the figures of the whole of ``index``. A failure on any
    rank raises on every rank.
    """
    lo, hi = comm.shard(index.numel())
    error: BaseException | None = None
    sums = [0.0, 0.0, 0.0]
    try:
        sums = _sums(model, data, index[lo:hi], objective, batch_size, device)
    except (Exception, KeyboardInterrupt) as exc:
        error = exc
    total = comm.sum(torch.tensor(sums, dtype=torch.float64), error)
    n = int(round(float(total[2])))
    loss = float(total[0]) / max(n, 1)
    metric = round(float(total[1])) / max(n, 1) if objective.classification else loss
    return {"loss": loss, "metric": metric, "n": n}


def _sums(model: nn.Module, data: TensorData, index: torch.Tensor, objective: Objective, batch_size: int,
          device: torch.device) -> list[float]:
    """``[sum of row losses, correct rows, rows]`` over ``index`` on this rank."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for inputs, label in iter_batches(data, index, batch_size):
        label = label.to(device)
        out = call_model(model, {k: v.to(device) for k, v in inputs.items()})
        rows = label.shape[0]
        total_loss += float(objective.loss_fn(out, label)) * rows
        if objective.classification:
            correct += objective.correct(out, label)
        n += rows
    return [total_loss, float(correct), float(n)]


class Scorer:
    """Loads states into the fit's model, recalibrates BatchNorm when asked, and scores both splits.

    BatchNorm statistics are re-estimated in batches of the fit's ``batch_size`` (the batches the
    model trains with); scoring runs in batches of ``eval_batch_size``. Every rank loads the whole state (the forward needs every weight) and recalibrates BatchNorm on
    the whole fit split, identically; scoring is split across ranks and summed.
    """

    def __init__(self, model: nn.Module, splits: Splits, batch_size: int, device: torch.device,
                 recalibrate: bool, comm: Comm, eval_batch_size: int | None = None):
        self.model, self.splits = model, splits
        self.batch_size, self.device, self.recalibrate = batch_size, device, recalibrate
        self.eval_batch_size = eval_batch_size or batch_size
        self.comm = comm

    def load(self, state: State | Callable[[], State], *, recalibrate: bool) -> None:
        """Load ``state`` (or what ``state()`` returns, e.g. a generator of pairs) into the model; a missing key
        keeps its value."""
        with self.comm.phase("load"):
            load_state(self.model, state() if callable(state) else state)
            if recalibrate:
                self.recalibrate_now()

    def recalibrate_now(self) -> None:
        """Re-estimate BatchNorm statistics on the fit rows (when the fit recalibrates at all)."""
        if self.recalibrate:
            recalibrate_batchnorm(self.model, self.splits.data, self.splits.fit, self.batch_size, self.device)

    def score(self, split: str) -> dict | None:
        """``{"loss", "metric", "n"}`` on the ``fit`` or ``heldout`` rows; None when there are none."""
        idx = self.splits.fit if split == "fit" else self.splits.heldout
        if idx.numel() == 0:
            return None
        return evaluate(self.model, self.splits.data, idx, self.splits.objective, self.eval_batch_size, self.device,
                        self.comm)

    def score_both(self) -> dict:
        """``{"fit": ..., "heldout": ...}``: the scores of the loaded state on both splits."""
        return {"fit": self.score("fit"), "heldout": self.score("heldout")}
