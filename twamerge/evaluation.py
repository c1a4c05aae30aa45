"""Scoring a model on the validation rows, and BatchNorm recalibration.

Every figure in a report comes from :func:`evaluate`: the task's sums (loss, metric numerator,
items: rows or tokens) over a set of rows, added over ranks (each rank scores its contiguous share;
one process is a world of one), then divided once. :class:`Scorer` is what the fit's stages use:
it loads a state into the bound model, re-estimates BatchNorm statistics on the fit rows when
asked, and scores both splits. :func:`probe` sends one batch forward before anything expensive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import TensorData, iter_batches
from .distributed import Comm
from .errors import ModelError, TwamergeError
from .models import HiddenStates, call_model, output_tensor
from .precision import autocast
from .sharding import balance_forwards, copy_into, scoring_mode
from .tasks import Task

# A state to load: a mapping, or (key, tensor) pairs produced one at a time so that a whole
# candidate never sits in memory beside the model.
State = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass
class Splits:
    """The validation data and its seeded split into the rows the fit sees and the held-out rows."""

    data: TensorData
    fit: torch.Tensor  # row indices, int64
    heldout: torch.Tensor  # row indices, int64 (empty with --holdout 0)
    task: Task


@torch.no_grad()
def load_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the model's parameters and buffers, one tensor at a time (unknown keys ignored).

    A tensor that already is the model's (a view of the fit's flat buffer) is left as it is.
    """
    targets = model.state_dict(keep_vars=True)
    for key, value in state.items() if isinstance(state, Mapping) else state:
        target = targets.get(key)
        if target is not None:
            copy_into(target, value)  # a sharded model's parameter takes its rows


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: TensorData, index: torch.Tensor, batch_size: int,
                          device: torch.device, amp: torch.dtype | None = None, tokens: int | None = None) -> bool:
    """Re-estimate BatchNorm running statistics on ``index`` (as SWA's update_bn), in batches of at most
    ``batch_size`` rows and ``tokens`` tokens. Returns whether any BN exists."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
    was_training = model.training
    model.train()
    for batch in iter_batches(data, index, batch_size, tokens=tokens):
        with autocast(device, amp):
            call_model(model, batch.to(device).inputs)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return True


def evaluate(model: nn.Module, data: TensorData, index: torch.Tensor, task: Task, batch_size: int,
             device: torch.device, comm: Comm, amp: torch.dtype | None = None, tokens: int | None = None) -> dict:
    """Mean loss and metric of ``model`` over the rows ``index`` (eval mode): ``{"loss", "metric", "n"}``.

    Batches hold at most ``batch_size`` rows and, for token ids, ``tokens`` tokens (padding included;
    ``data.batch_rows``). ``n`` counts the task's items (rows, or tokens for a language model). Each rank scores its
    contiguous share of ``index``; the sums ``[loss, metric numerator, items]`` are added over
    ranks, so every rank returns the figures of the whole of ``index``. A failure on any rank
    raises on every rank. Runs in inference mode (a sharded model: ``sharding.scoring_mode``, and as
    many forward passes on every rank, ``sharding.balance_forwards``).
    """
    with scoring_mode(model):
        lo, hi = comm.shard(index.numel())
        error: BaseException | None = None
        sums = [0.0, 0.0, 0.0]
        try:
            sums = _sums(model, data, index[lo:hi], task, batch_size, device, amp, tokens)
            with autocast(device, amp):
                balance_forwards(model, data, index, batch_size, tokens, comm, lambda x: _forward(task, model, x), device)
        except (Exception, KeyboardInterrupt) as exc:
            error = exc
        total = comm.sum(torch.tensor(sums, dtype=torch.float64), error)
    return task.finish(float(total[0]), float(total[1]), int(round(float(total[2]))))


def _forward(task: Task, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """A forward pass whose result is dropped (``balance_forwards``): a sharded model's hidden states, which the
    task leaves to its loss (``models.HiddenStates.apply``), are computed here, so the rank runs the forward."""
    out = task.forward(model, inputs)
    if isinstance(out, HiddenStates) and out.states is None:
        out.apply(lambda states: None)


def _sums(model: nn.Module, data: TensorData, index: torch.Tensor, task: Task, batch_size: int,
          device: torch.device, amp: torch.dtype | None = None, tokens: int | None = None) -> list[float]:
    """``[loss sum, metric numerator, items]`` over ``index`` on this rank."""
    model.eval()
    total = [0.0, 0.0, 0.0]
    for batch in iter_batches(data, index, batch_size, tokens=tokens):
        batch = batch.to(device)
        with autocast(device, amp):
            out = task.forward(model, batch.inputs)
        for i, value in enumerate(task.sums(out, batch)):
            total[i] += float(value)
    return total


class Scorer:
    """Loads states into the fit's model, recalibrates BatchNorm when asked, and scores both splits.

    BatchNorm statistics are re-estimated in batches of the fit's ``batch_size`` rows and ``batch_tokens``
    tokens (the batches the model trains with); scoring runs in batches of ``eval_batch_size`` rows and
    ``eval_batch_tokens`` tokens (token budgets apply to token ids; None: rows only). Every rank loads
    the whole state (the forward needs every weight) and recalibrates BatchNorm on the whole fit split,
    identically; scoring is split across ranks and summed.
    """

    def __init__(self, model: nn.Module, splits: Splits, batch_size: int, device: torch.device,
                 recalibrate: bool, comm: Comm, amp: torch.dtype | None = None, eval_batch_size: int | None = None,
                 batch_tokens: int | None = None, eval_batch_tokens: int | None = None):
        self.model, self.splits = model, splits
        self.batch_size, self.device, self.recalibrate = batch_size, device, recalibrate
        self.eval_batch_size = eval_batch_size or batch_size
        self.batch_tokens, self.eval_batch_tokens = batch_tokens, eval_batch_tokens
        self.comm, self.amp = comm, amp

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
            recalibrate_batchnorm(self.model, self.splits.data, self.splits.fit, self.batch_size, self.device,
                                  self.amp, self.batch_tokens)

    def score(self, split: str) -> dict | None:
        """``{"loss", "metric", "n"}`` on the ``fit`` or ``heldout`` rows; None when there are none."""
        idx = self.splits.fit if split == "fit" else self.splits.heldout
        if idx.numel() == 0:
            return None
        return evaluate(self.model, self.splits.data, idx, self.splits.task, self.eval_batch_size, self.device,
                        self.comm, self.amp, self.eval_batch_tokens)

    def score_both(self) -> dict:
        """``{"fit": ..., "heldout": ...}``: the scores of the loaded state on both splits."""
        return {"fit": self.score("fit"), "heldout": self.score("heldout")}


# Rows of the probe's batch: enough to see padding, few enough that a large model answers in seconds
# (a whole fit batch of a GPT-2-sized model took a minute on one CPU thread).
PROBE_ROWS = 4


@torch.no_grad()
def probe(model: nn.Module, data: TensorData, index: torch.Tensor, task: Task, batch_size: int,
          device: torch.device, amp: torch.dtype | None = None, tokens: int | None = None) -> None:
    """One batch through the model (forward only) and the task, then every label against the model's outputs.

    Run before anything expensive, so that data the model cannot take fails in seconds, in one line. The
    batch is the first of ``index`` in batches of at most ``batch_size`` and :data:`PROBE_ROWS` rows and
    ``tokens`` tokens: with a token budget, the longest rows.

    Raises:
        ModelError: the model rejects the batch (naming the columns, shapes and dtypes sent, and the
            model's own complaint) or its output does not fit the labels.
        DataError: a label the model cannot predict (out of range, other than -100).
    """
    batch = next(iter_batches(data, index, min(batch_size, PROBE_ROWS), tokens=tokens)).to(device)
    model.eval()
    try:
        with autocast(device, amp):
            out = task.forward(model, batch.inputs)
    except TwamergeError:
        raise
    except Exception as exc:
        raise ModelError(f"{type(model).__name__} rejects a batch of {batch.describe()}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:400]}") from exc
    labels = data.label_values()
    try:
        if isinstance(out, HiddenStates):
            n_outputs: int | None = out.head.n_outputs
        else:
            pred = output_tensor(out)
            n_outputs = pred.shape[-1] if pred.dim() >= 1 else None
        # Every label first, so that a label out of range is named as the worst of the data, not of this batch.
        if labels is not None and n_outputs is not None:
            task.check_labels(labels, n_outputs)
        task.sums(out, batch)
    except TwamergeError:
        raise
    except Exception as exc:
        raise ModelError(f"the {task.name} loss cannot be computed on the output of {type(model).__name__} for a "
                         f"batch of {batch.describe()}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
                         ) from exc
