"""The coefficient fit: model parameters as views of one flat buffer, one combine and one project per step.

With ``theta`` the trained coordinates, a step is

    beta = theta * scale               (per direction: see Subspace.step_scale, --coordinates)
    w    = mean + P~^T beta            (combine, written straight into the model's parameters)
    g    = dL/dw                       (ordinary forward + backward, grads land in one flat buffer)
    dL/dtheta = (P~ g) * scale         (project)

Forward and backward use the same quantized basis, so the coefficient gradient is exact for the
subspace that is actually used.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .config import FitConfig
from .data import Batch, epoch_steps, iter_batches
from .distributed import Comm
from .errors import FitError
from .evaluation import Splits
from .precision import autocast
from .subspace import FlatLayout, Subspace
from .tasks import Task

log = logging.getLogger(__name__)


class FlatBinding:
    """Replace the model's merged parameters by views of ``flat`` ([D], ``dtype``); their grads by views of ``grad``.

    ``dtype`` is float32, or bfloat16 when the candidates are stored and the model computes in
    bfloat16 (``--precision bf16``): weights and gradients then take 2 bytes each per parameter,
    while combine and project still accumulate in float32.

    ``layout.names`` are the parameters' names in the model. The original parameters are dropped once
    their values are copied in, so the flat buffer does not sit beside a second copy. Tied parameters
    (one ``Parameter`` reachable under several names) stay tied: every slot that held the old parameter
    receives the new one. ``n_cols`` (at least ``layout.n_cols``) pads both buffers at the end: a
    distributed fit needs ``world_size * chunk`` columns for its collectives.
    """

    def __init__(self, model: nn.Module, layout: FlatLayout, device: torch.device, n_cols: int | None = None,
                 world_size: int = 1, dtype: torch.dtype = torch.float32):
        self.model = model
        self.layout = layout
        self.flat = torch.zeros(max(layout.n_cols, n_cols or 0), dtype=dtype, device=device)
        self.grad = torch.zeros_like(self.flat)
        # This rank's [chunk] slices of the weights and gradients that the collectives gather and
        # scatter. With one rank they are the flat buffers themselves (gather and scatter are then
        # free); with several, separate buffers, since a collective's input may not alias its output.
        if world_size == 1:
            self.local_w, self.local_g = self.flat, self.grad
        else:
            chunk = self.flat.numel() // world_size
            self.local_w = torch.zeros(chunk, dtype=dtype, device=device)
            self.local_g = torch.zeros(chunk, dtype=dtype, device=device)
        slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    slots[id(p)].append((module, attr))
        self._index = {name: i for i, name in enumerate(layout.names)}
        for key in layout.names:
            old = model.get_parameter(key)
            weights = self.param_view(key)
            with torch.no_grad():
                weights.copy_(old.detach())
            new = nn.Parameter(weights)
            new.grad = self.param_view(key, self.grad)
            for module, attr in slots[id(old)]:
                module._parameters[attr] = new

    def param_view(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor | None:
        """Merged parameter ``key`` as a view of ``buffer`` (default: the weights, ``flat``); None for
        other keys. A merge written through these views lands in the model's parameters."""
        i = self._index.get(key)
        if i is None:
            return None
        start = self.layout.offsets[i]
        buffer = self.flat if buffer is None else buffer
        return buffer[start:start + self.layout.numel(i)].view(self.layout.shapes[i])

    def check_grads_in_place(self) -> None:
        """Autograd must accumulate into the flat views; if it replaced a .grad, project would miss it."""
        grad_range = range(self.grad.data_ptr(), self.grad.data_ptr() + self.grad.numel() * self.grad.element_size())
        for name, p in self.model.named_parameters():
            if p.requires_grad and (p.grad is None or p.grad.data_ptr() not in grad_range):
                raise FitError(f"parameter {name}: its gradient left the flat buffer; this torch version breaks "
                               "in-place gradient accumulation (please report it)")

    # What the fit asks of a binding; ``sharding.ShardedBinding`` answers the same for a sharded model.
    sharded = False

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def load_point(self, subspace: Subspace, beta: torch.Tensor, comm: Comm) -> None:
        """Make the merged parameters ``mean + P~^T beta``: combine on this rank's columns, all-gather the rest."""
        subspace.combine(beta.to(self.local_w.device), out=self.local_w[:subspace.mean.numel()])
        comm.all_gather(self.flat, self.local_w)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def coefficient_grad(self, subspace: Subspace, comm: Comm) -> torch.Tensor:
        """This rank's part of ``dL/dbeta`` [B, R]: reduce-scatter the flat gradient, project this rank's columns."""
        comm.reduce_scatter(self.local_g, self.grad)
        return subspace.project(self.local_g[:subspace.mean.numel()])

    def merge(self, cs, weights, *, out_dtype: torch.dtype | None = None,
              progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, torch.Tensor]:
        """``merge.linear_merge`` of the candidates, float32 results straight into the model's parameters."""
        from .merge import linear_merge

        return linear_merge(cs, weights, out_dtype=out_dtype, progress=progress, into=self.param_view)

    def trained_point(self, subspace: Subspace, beta: torch.Tensor) -> torch.Tensor:
        """``mean + P~^T beta`` on this rank's columns, in the gradient buffer (free once training is over)."""
        return subspace.combine(beta, out=self.local_g[:subspace.mean.numel()])

    def quantization_gap(self, subspace: Subspace, trained: torch.Tensor, comm: Comm) -> float:
        return subspace.quantization_gap(self.flat, trained, comm)

    def buffer_bytes(self) -> int:
        """Bytes of the weights and gradients the model's parameters view."""
        return 2 * self.flat.numel() * self.flat.element_size()

    def close(self) -> None:
        """Nothing to release (``ShardedBinding.close`` leaves its process group)."""


@dataclass
class FitOutcome:
    beta: torch.Tensor  # [B, R] float32
    curve: list[float] = field(default_factory=list)  # training loss per step (one entry per step)
    # Wall time of the steps alone (not the optimizer's set-up: torch's first AdamW costs ~2 s once).
    seconds_per_step: float | None = None
    # One entry per run of train_coefficients that made it (restarts, a continuation): {"seed", "budget": the steps
    # planned (step_budget), "steps": the steps taken, "stop": None, or the early stop: {"step": where the fit loss
    # had converged, "window": the steps of each window compared, "improvement": the last window's relative fall
    # of the mean fit loss}}.
    runs: list[dict] = field(default_factory=list)


def step_budget(per_epoch: int, cfg: FitConfig) -> int:
    """The steps of one fit, given the steps of one epoch over the fit rows: ``cfg.epochs`` epochs, and at
    least ``cfg.min_steps`` (when ``cfg.epochs`` > 0: ``--epochs 0`` trains nothing and writes the start point)."""
    if cfg.epochs == 0:
        return 0
    return max(cfg.epochs * per_epoch, cfg.min_steps)


def convergence_window(per_epoch: int, cfg: FitConfig) -> int:
    """Steps per window of the early-stop rule: whole epochs (every fit row counts once, so a window's mean
    training loss is the fit-split loss along the way, with no data-order noise), at least a tenth of
    ``cfg.min_steps``."""
    return per_epoch * max(1, math.ceil(cfg.min_steps / 10 / per_epoch))


class Schedule:
    """The learning-rate factor of every step (:func:`_lr_lambda` over ``total`` steps), which an early stop
    cuts short: :meth:`stop` ends the fit ``tail`` steps later, the factor falling from its value there to 0
    on a half cosine, so the last steps are small whatever the schedule had left."""

    def __init__(self, total: int, warmup: float, schedule: str):
        self.end = total
        self._planned = _lr_lambda(total, warmup, schedule)
        self._stop: tuple[int, int] | None = None  # (first step of the decay, its length)

    def stop(self, step: int, tail: int) -> None:
        self._stop = (step, tail)
        self.end = step + tail

    def __call__(self, step: int) -> float:
        if self._stop is None or step < self._stop[0]:
            return self._planned(step)
        start, tail = self._stop
        return self._planned(start) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / tail)))


def _lr_lambda(total: int, warmup: float, schedule: str = "cosine") -> Callable[[int], float]:
    """Factor of the base learning rate at each step: a linear warm-up over ``round(total * warmup)``
    steps, then ``schedule`` over the remaining steps: cosine (to 0), step (1, then 0.1 from 50% and
    0.01 from 75% of them) or constant (1)."""
    warm = int(round(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_coefficients(
    binding: FlatBinding,
    subspace: Subspace,
    splits: Splits,
    cfg: FitConfig,
    comm: Comm,
    *,
    progress: Callable[[Iterable], Iterable] | None = None,
    theta0: torch.Tensor | None = None,
    amp: torch.dtype | None = None,
) -> FitOutcome:
    """Learn the coefficients by gradient descent on the fit rows (docs/how-it-works.md, "The method", step 3):
    :func:`step_budget` steps, fewer when the loss has converged (:func:`_converged`, ``--stop-tol``).

    ``subspace`` holds this rank's column slice (all columns in one process) and ``binding``
    buffers of ``world_size * chunk`` columns; every global batch (the same shuffle on every rank)
    is split into contiguous shards, one per rank. See :func:`_step`. The fit rows are ``splits.fit``
    (the held-out rows are not read); the device is the binding's. ``amp``: the autocast dtype of
    forward and backward (None: float32).

    Raises:
        FitError: a non-finite loss (naming the step) or an interrupt; nothing is written by the caller.
    """
    data, fit_index, task, device = splits.data, splits.fit, splits.task, binding.device
    n_blocks, rows = subspace.layout.n_blocks, subspace.rows
    # beta = theta * scale; the scale is 0 past a block's rank, so those coordinates never move.
    scale = subspace.step_scale(cfg.coordinates).float().to(device)  # [B, R]
    # theta = 0 is the uniform average (the paper's start); theta0 may start elsewhere (--init).
    start = torch.zeros(n_blocks, rows) if theta0 is None else theta0.float().cpu()
    start = torch.where(scale > 0, start.to(device), torch.zeros_like(scale))
    # The optimizer moves the offset from the start point, so weight decay pulls toward the start
    # (the greedy soup with --init greedy), not toward the uniform average.
    offset = nn.Parameter(torch.zeros_like(scale))
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW([offset], lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD([offset], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    per_epoch = epoch_steps(data, fit_index, cfg.batch_size, cfg.batch_tokens)
    total = step_budget(per_epoch, cfg)
    window = convergence_window(per_epoch, cfg)
    schedule = Schedule(total, cfg.warmup, cfg.schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    outcome = FitOutcome(beta=(start * scale).float())
    stop = None
    # An epoch of token batches can hold a few more steps than epoch_steps counts (never fewer): the loop
    # ends at the budget within these epochs.
    epochs = range(math.ceil(total / per_epoch))
    step = 0
    # Dropout draws from the global RNG: seed it for reproducibility, and restore it afterwards.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        binding.model.train()
        start_time = time.perf_counter()
        try:
            for _ in (progress(epochs) if progress else epochs):
                if step >= schedule.end:
                    break
                for batch in iter_batches(data, fit_index, cfg.batch_size, gen, tokens=cfg.batch_tokens):
                    if step >= schedule.end:
                        break
                    beta = (start + offset.detach()) * scale
                    value, grad = _step(binding, subspace, task, batch, beta, device, comm, (step, total), amp)
                    if not math.isfinite(value):
                        where = f" (summed over {comm.world_size} ranks)" if comm.world_size > 1 else ""
                        raise FitError(f"the loss became {value} at step {step + 1} of {total}{where}; nothing "
                                       "was written (lower --lr, or check the data and model)")
                    offset.grad = grad * scale
                    opt.step()
                    sched.step()
                    outcome.curve.append(value)
                    step += 1
                    if stop is None:
                        stop = _converged(outcome.curve, window, cfg, schedule.end)
                        if stop is not None:
                            schedule.stop(step, window)
        except KeyboardInterrupt:
            raise FitError(f"interrupted at step {step} of {total}; nothing was written") from None
    outcome.beta = ((start + offset.detach()) * scale).float()
    outcome.runs.append({"seed": cfg.seed, "budget": total, "steps": step, "stop": stop})
    if step:
        outcome.seconds_per_step = (time.perf_counter() - start_time) / step
    return outcome


def _converged(curve: list[float], window: int, cfg: FitConfig, end: int) -> dict | None:
    """The early-stop rule (``--stop-tol``), checked at the end of every window of steps past ``--min-steps`` and
    past half the planned steps: the fit loss has converged when neither of the last two windows' mean training
    loss is below the best earlier window's by more than ``stop_tol`` of it. Two windows, and the best before
    them rather than the one just before: the loss along an Adam trajectory swings from window to window, and
    one window that rose is not yet a plateau. Not in the first half of the schedule: at its high learning
    rates the loss stalls and then falls again (a CNN epoch pool stopped at 200 of 500 steps lost 0.3 points
    of test accuracy; at 350, nothing: docs/defaults.md). Never when a decay of one more window would not end
    before the planned last step anyway. Returns the stop (the step, the window, the last improvement) or None."""
    step = len(curve)
    if (cfg.stop_tol <= 0 or step % window or step < max(cfg.min_steps, end // 2, 3 * window)
            or step + window >= end):
        return None
    means = [sum(curve[i:i + window]) / window for i in range(0, step, window)]
    best_before, recent = min(means[:-2]), min(means[-2:])
    improvement = (best_before - recent) / abs(best_before) if best_before else 0.0
    return {"step": step, "window": window, "improvement": improvement} if improvement < cfg.stop_tol else None


def _step(binding: FlatBinding, subspace: Subspace, task: Task, batch: Batch, beta: torch.Tensor,
          device: torch.device, comm: Comm, where: tuple[int, int], amp: torch.dtype | None = None
          ) -> tuple[float, torch.Tensor]:
    """One data-parallel step over this rank's shard of the global batch; returns (global loss, dL/dbeta [B, R]).

    combine on the own slice -> all-gather the weights -> forward/backward on the shard -> reduce-scatter
    the flat gradient -> project the own slice -> all-reduce ``[dL/dbeta, loss]`` with the error flag.
    A sharded model (``sharding.ShardedBinding``) gathers and scatters inside forward and backward
    instead, one FSDP unit at a time, and its rank projects the gradient rows it holds.

    The loss is the mean over the global batch's items (rows, or tokens for a language model): each
    rank divides its shard's loss SUM by the item count of the whole batch (``task.count``, which
    every rank computes from the same global batch), so the ranks' losses and gradients add up to
    those of the full batch; in one process it is the plain mean. A rank that fails keeps taking part
    in the collectives and raises with the others at the final all-reduce. In one process every
    collective is the identity and the own slice is the whole flat buffer.

    The loss is read once, at the end: reading it before ``backward`` would make the host wait for
    the forward pass on a GPU. A non-finite loss gives a useless gradient, and the caller stops.
    """
    binding.load_point(subspace, beta, comm)
    binding.zero_grad()
    error: BaseException | None = None
    loss = torch.zeros((), device=device)
    try:
        items = task.count(batch)  # the global batch's items: the same number on every rank
        lo, hi = comm.shard(batch.rows)
        if hi > lo and items > 0:
            shard = batch.shard(lo, hi).to(device)
            with autocast(device, amp):
                out = task.forward(binding.model, shard.inputs)  # a language model: hidden states, no logits
            loss_sum, _ = task.loss(out, shard)
            loss = loss_sum / items
            loss.backward()
            if where[0] == 0:
                binding.check_grads_in_place()
        elif binding.sharded:
            # Every rank of a sharded model runs every forward and backward (they hold its collectives): one
            # without rows of its own backpropagates the whole batch's loss times zero.
            whole = batch.to(device)
            with autocast(device, amp):
                out = task.forward(binding.model, whole.inputs)
            (task.loss(out, whole)[0] * 0.0).backward()
    except KeyboardInterrupt:
        # Raised here, not converted by the caller: a new exception would lose the mark that all ranks
        # already agreed on it, and the ranks would disagree on the next collective.
        error = FitError(f"interrupted at step {where[0]} of {where[1]}; nothing was written")
    except Exception as exc:
        error = exc
    part = binding.coefficient_grad(subspace, comm)
    payload = torch.cat([part.reshape(-1), loss.detach().float().reshape(1).to(part.device)])
    total = comm.sum(payload, error)
    return float(total[-1]), total[:-1].view_as(part)
