"""The coefficient fit: parameters as views of one flat buffer, and the step every rank runs."""

from __future__ import annotations

import gc
import importlib
import math
import weakref
from dataclasses import replace

import torch
from helpers import assert_close
from torch import nn

from twamerge.config import FitConfig
from twamerge.data import Batch, TensorData
from twamerge.distributed import SingleProcess
from twamerge.evaluation import Splits
from twamerge.fit import FlatBinding, Schedule, _lr_lambda, _step, step_budget, train_coefficients
from twamerge.subspace import StackedCandidates, build_subspace, make_layout
from twamerge.tasks import Classification

fitmod = importlib.import_module("twamerge.fit")  # `twamerge.fit` the attribute is the function


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=True)
        self.head.weight = self.emb.weight  # tied, as language models do

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def _setup(k=4, seed=0):
    torch.manual_seed(seed)
    model = Tied()
    names = [n for n, _ in model.named_parameters()]  # tied weight listed once
    stacks = {n: p.detach().unsqueeze(0) + 0.1 * torch.randn(k, *p.shape) for n, p in model.named_parameters()}
    layout = make_layout(names, [tuple(p.shape) for _, p in model.named_parameters()], "layer", 8)
    sub = build_subspace(StackedCandidates(stacks), layout, bits=32)
    return model, layout, sub


def test_binding_makes_parameters_views_keeps_ties_and_drops_the_originals():
    model, layout, _ = _setup()
    old = weakref.ref(model.emb.weight)
    binding = FlatBinding(model, layout, torch.device("cpu"))
    gc.collect()
    assert old() is None  # the flat buffer does not sit beside a second copy of the weights
    assert model.head.weight is model.emb.weight
    for i, name in enumerate(layout.names):
        p = model.get_parameter(name)
        assert p.data_ptr() == binding.flat[layout.offsets[i]:].data_ptr()
        assert p.grad.data_ptr() == binding.grad[layout.offsets[i]:].data_ptr()


def test_one_process_step_is_combine_forward_backward_project():
    """The step a distributed rank runs, with one rank, is the textbook step on the whole batch."""
    model, layout, sub = _setup()
    binding = FlatBinding(model, layout, torch.device("cpu"))
    x, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 10, (8,))
    beta = torch.randn(layout.n_blocks, sub.rows) * 0.1
    assert binding.local_w is binding.flat and binding.local_g is binding.grad  # one rank: no copies
    loss, grad = _step(binding, sub, Classification(), Batch({"x": x}, y), beta, torch.device("cpu"), SingleProcess(),
                       (0, 1))

    ref = Tied()
    w = sub.combine(beta, out=torch.empty(layout.n_cols))
    with torch.no_grad():
        for i, name in enumerate(layout.names):
            ref.get_parameter(name).copy_(w[layout.offsets[i]:layout.offsets[i] + layout.numel(i)].view(
                layout.shapes[i]))
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    g = torch.zeros(layout.n_cols)
    for i, name in enumerate(layout.names):
        g[layout.offsets[i]:layout.offsets[i] + layout.numel(i)] = ref.get_parameter(name).grad.reshape(-1)
    assert loss == float(ref_loss.detach())
    assert_close("dL/dbeta", sub.project(g), grad)


def _all_rows(data: TensorData) -> Splits:
    """The toy data's 64 rows, all of them fit rows."""
    return Splits(data, torch.arange(64), torch.empty(0, dtype=torch.long), Classification())


def test_train_coefficients_lowers_the_loss_and_is_seeded():
    model, layout, sub = _setup()
    gen = torch.Generator().manual_seed(0)
    data = TensorData({"x": torch.randint(0, 10, (64, 3), generator=gen),
                       "label": torch.randint(0, 10, (64,), generator=gen)}, ("x",), "label", "t")
    cfg = FitConfig(epochs=5, batch_size=16, lr=0.1, min_steps=0)
    runs = []
    for _ in range(2):
        model, layout, sub = _setup()
        binding = FlatBinding(model, layout, torch.device("cpu"))
        runs.append(train_coefficients(binding, sub, _all_rows(data), cfg, SingleProcess()))
    a, b = runs
    assert len(a.curve) == 20
    assert torch.equal(a.beta, b.beta) and a.curve == b.curve
    assert sum(a.curve[-4:]) < sum(a.curve[:4])


def _toy_fit(cfg, theta0=None):
    model, layout, sub = _setup()
    gen = torch.Generator().manual_seed(0)
    data = TensorData({"x": torch.randint(0, 10, (64, 3), generator=gen),
                       "label": torch.randint(0, 10, (64,), generator=gen)}, ("x",), "label", "t")
    binding = FlatBinding(model, layout, torch.device("cpu"))
    return sub, train_coefficients(binding, sub, _all_rows(data), cfg, SingleProcess(), theta0=theta0)


def test_weight_decay_pulls_toward_the_start_point_not_the_uniform_average():
    """The optimizer moves the offset from --init's start: a strong decay keeps the fit at the start."""
    sub, _ = _toy_fit(FitConfig(epochs=0))
    scale = sub.step_scale("candidates").float()
    theta0 = torch.where(scale > 0, torch.full_like(scale, 0.7), torch.zeros_like(scale))
    free = _toy_fit(FitConfig(epochs=5, batch_size=16, lr=0.1, min_steps=0), theta0)[1].beta
    held = _toy_fit(FitConfig(epochs=5, batch_size=16, lr=0.1, weight_decay=5.0, min_steps=0), theta0)[1].beta
    start = theta0 * scale
    assert (held - start).norm() < 0.3 * (free - start).norm()
    assert start.norm() > 0.5 * free.norm()  # far from uniform (beta = 0): decay toward 0 would show


def test_lr_schedules_after_the_warm_up():
    """20 steps, warm-up 0.2 (4 steps: 1/4..4/4), then 16 steps: step = /10 at 50% and 75% of those 16."""
    warm = [0.25, 0.5, 0.75, 1.0]
    step = [_lr_lambda(20, 0.2, "step")(s) for s in range(20)]
    assert_close_list(step, warm + [1.0] * 8 + [0.1] * 4 + [0.01] * 4)
    assert_close_list([_lr_lambda(20, 0.2, "constant")(s) for s in range(20)], warm + [1.0] * 16)
    cos = [_lr_lambda(20, 0.2, "cosine")(s) for s in range(21)]
    assert cos[:5] == warm + [1.0] and abs(cos[12] - 0.5) < 1e-12 and cos[20] < 1e-12
    assert cos == [_lr_lambda(20, 0.2)(s) for s in range(21)]  # cosine stays the default
    # No warm-up: the decays fall at exactly 50% and 75% of the steps.
    assert_close_list([_lr_lambda(8, 0.0, "step")(s) for s in range(8)], [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_train_coefficients_follows_the_schedule():
    """The optimizer's learning rate at each step is cfg.lr times the schedule's factor."""
    model, layout, sub = _setup()
    gen = torch.Generator().manual_seed(0)
    data = TensorData({"x": torch.randint(0, 10, (64, 3), generator=gen),
                       "label": torch.randint(0, 10, (64,), generator=gen)}, ("x",), "label", "t")
    seen = []
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    cfg = FitConfig(epochs=2, batch_size=16, lr=0.1, warmup=0.0, schedule="step", min_steps=0)
    torch.optim.AdamW.step = spy
    try:
        train_coefficients(FlatBinding(model, layout, torch.device("cpu")), sub, _all_rows(data), cfg, SingleProcess())
    finally:
        torch.optim.AdamW.step = orig
    assert_close_list(seen, [0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def assert_close_list(a, b, tol=1e-12):
    assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), (a, b)


def _lr_spy(monkeypatch) -> list[float]:
    """The learning rate of every optimizer step, as AdamW sees it."""
    seen: list[float] = []
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


def test_the_step_budget_is_epochs_raised_to_min_steps_and_epochs_0_trains_nothing():
    """64 fit rows in batches of 16 are 4 steps per epoch: 2 epochs are 8 steps, raised to --min-steps."""
    cfg = FitConfig(epochs=2, batch_size=16, stop_tol=0.0)
    assert step_budget(4, replace(cfg, min_steps=0)) == 8
    assert step_budget(4, replace(cfg, min_steps=50)) == 50
    assert step_budget(400, replace(cfg, min_steps=50)) == 800  # a large --val: epochs decide
    assert step_budget(4, replace(cfg, epochs=0, min_steps=50)) == 0  # --epochs 0: the start point as it is
    sub, out = _toy_fit(replace(cfg, min_steps=50, lr=0.1))
    assert len(out.curve) == 50 and out.runs == [{"seed": 0, "budget": 50, "steps": 50, "stop": None}]
    # The schedule spans the whole budget: warm-up over the first 20% (10 steps), cosine to 0 at step 50.
    assert_close_list([Schedule(50, 0.2, "cosine")(s) for s in range(50)], [_lr_lambda(50, 0.2)(s) for s in range(50)])
    sub, none = _toy_fit(replace(cfg, epochs=0, min_steps=50))
    assert none.curve == [] and torch.equal(none.beta, torch.zeros_like(none.beta))


def _flat_loss(monkeypatch, losses):
    """Make every step report the next of ``losses`` (a zero gradient): the early stop sees only these."""
    values = iter(losses)

    def step(binding, subspace, task, batch, beta, *args, **kwargs):
        return next(values), torch.zeros_like(beta)

    monkeypatch.setattr(fitmod, "_step", step)


def test_the_fit_stops_early_once_the_loss_of_a_window_no_longer_falls(monkeypatch):
    """4 steps per epoch, --min-steps 40, 20 epochs: windows of 4 steps (whole epochs, at least 40 / 10 steps),
    80 steps planned. A flat loss has converged at the first check past --min-steps and half the plan (step
    40: neither of the last two windows is below the best before them); the fit then decays its learning rate
    to 0 over one more window and ends at step 44 of the 80 planned."""
    cfg = FitConfig(epochs=20, batch_size=16, lr=0.1, min_steps=40, warmup=0.0, schedule="constant")
    _flat_loss(monkeypatch, [1.0] * 80)
    seen = _lr_spy(monkeypatch)
    _, out = _toy_fit(cfg)
    assert len(out.curve) == 44 and out.runs[0]["budget"] == 80
    assert out.runs[0]["stop"] == {"step": 40, "window": 4, "improvement": 0.0}
    assert_close_list(seen[:41], [0.1] * 41)
    tail = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 4)]
    assert_close_list(seen[41:], tail)  # the last step's rate: 0.1 * 0.5 * (1 + cos(3 pi / 4))


def test_a_loss_that_still_falls_or_stop_tol_0_runs_the_whole_budget(monkeypatch):
    """Windows of 4 steps, checked from step 40 (--min-steps, and half of the 80 planned). A loss falling by 2%
    per window (4% over the two windows the rule looks at, above the 0.1% of --stop-tol) never stops; neither
    does a flat one under --stop-tol 0; a fall of 0.03% per window (0.06% over two) stops at the first check.
    A loss that swings, one window up and the next one down to a new best, is still falling: it runs on. With
    400 steps planned, a flat loss runs half of them before the rule may stop it."""
    cfg = FitConfig(epochs=20, batch_size=16, lr=0.1, min_steps=40, stop_tol=1e-3)
    _flat_loss(monkeypatch, [0.98 ** (i // 4) for i in range(80)])
    assert len(_toy_fit(cfg)[1].curve) == 80
    _flat_loss(monkeypatch, [1.0] * 80)
    assert len(_toy_fit(replace(cfg, stop_tol=0.0))[1].curve) == 80
    _flat_loss(monkeypatch, [0.9997 ** (i // 4) for i in range(80)])
    out = _toy_fit(cfg)[1]
    assert out.runs[0]["stop"]["step"] == 40 and abs(out.runs[0]["stop"]["improvement"] - (1 - 0.9997 ** 2)) < 1e-9
    # Window means 1.0, 1.1, 0.95, 1.05, 0.9, ...: every other window rises, yet each fall sets a new best.
    _flat_loss(monkeypatch, [(1.1 if (i // 4) % 2 else 1.0) * 0.95 ** (i // 8) for i in range(80)])
    assert len(_toy_fit(cfg)[1].curve) == 80
    _flat_loss(monkeypatch, [1.0] * 400)
    assert _toy_fit(replace(cfg, epochs=100))[1].runs[0]["stop"]["step"] == 200
