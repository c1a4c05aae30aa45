"""Scoring: loss and metric sums over rows (and ranks), BatchNorm recalibration, the Scorer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twamerge.data import TensorData
from twamerge.distributed import SingleProcess
from twamerge.evaluation import Scorer, Splits, evaluate, has_batchnorm, recalibrate_batchnorm
from twamerge.tasks import Classification


def _data(n=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorData({"x": torch.randn(n, 6, generator=gen), "label": torch.randint(0, 3, (n,), generator=gen)},
                      ("x",), "label", "t")


def test_evaluate_is_the_mean_over_rows_whatever_the_batch_size():
    torch.manual_seed(0)
    model, data = nn.Linear(6, 3), _data()
    objective = Classification()
    logits = model(data.columns["x"])
    loss = nn.functional.cross_entropy(logits, data.columns["label"]).item()
    acc = int((logits.argmax(1) == data.columns["label"]).sum()) / 50
    for batch in (7, 50, 64):
        score = evaluate(model, data, torch.arange(50), objective, batch, torch.device("cpu"), SingleProcess())
        assert score["n"] == 50
        assert score["loss"] == pytest.approx(loss, rel=1e-6) and score["metric"] == pytest.approx(acc, abs=1e-12)


def test_a_failure_inside_the_model_is_raised_as_is():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate(Broken(), _data(), torch.arange(10), Classification(), 4, torch.device("cpu"),
                 SingleProcess())


def test_batchnorm_recalibration_uses_the_given_rows():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    data = _data()
    assert has_batchnorm(model) and not has_batchnorm(nn.Linear(2, 2))
    rows = torch.arange(20)
    assert recalibrate_batchnorm(model, data, rows, 100, torch.device("cpu"))
    h = model[0](data.columns["x"][rows]).detach()
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-6)
    assert torch.allclose(model[1].running_var, h.var(0), atol=1e-5)
    assert not recalibrate_batchnorm(nn.Linear(6, 3), data, rows, 100, torch.device("cpu"))


def test_scorer_loads_states_and_scores_both_splits():
    data = _data()
    splits = Splits(data, torch.arange(40), torch.arange(40, 50), Classification())
    model = nn.Linear(6, 3)
    scorer = Scorer(model, splits, 16, torch.device("cpu"), recalibrate=False, comm=SingleProcess())
    zero = {"weight": torch.zeros(3, 6), "bias": torch.tensor([0.0, 5.0, 0.0])}
    scorer.load(lambda: zero, recalibrate=True)
    assert torch.equal(model.bias.detach(), zero["bias"])
    both = scorer.score_both()
    labels = data.columns["label"]
    assert both["fit"]["metric"] == pytest.approx(float((labels[:40] == 1).float().mean()))
    assert both["heldout"]["n"] == 10
    empty = Splits(data, torch.arange(50), torch.empty(0, dtype=torch.long), splits.task)
    assert Scorer(model, empty, 16, torch.device("cpu"), False, SingleProcess()).score("heldout") is None
