"""The method registry: each method declared once, the weights of the data-free ones, the greedy soup."""

from __future__ import annotations

import pytest
import torch

from twamerge.config import FitConfig, Init, choices
from twamerge.errors import InvalidArgumentError
from twamerge.methods import BASELINES, METHODS, data_free_weights, ema_weights, greedy_soup, one_hot


def test_ema_weights_recurrence():
    w = ema_weights(5, 0.9)
    assert sum(w) == pytest.approx(1.0)
    x = torch.randn(5)
    e = x[0]
    for j in range(1, 5):
        e = 0.9 * e + 0.1 * x[j]
    assert float(sum(wi * xi for wi, xi in zip(w, x))) == pytest.approx(float(e), rel=1e-6)


def test_data_free_weights_choose_the_method():
    assert data_free_weights(4) == ("uniform", [0.25] * 4)
    assert data_free_weights(2, weights=[1.0, 3.0]) == ("weighted", [0.25, 0.75])
    assert data_free_weights(2, weights=[1.0, 3.0], normalize=False) == ("weighted", [1.0, 3.0])
    assert data_free_weights(3, ema=0.5)[0] == "ema"
    with pytest.raises(InvalidArgumentError, match="not both"):
        data_free_weights(2, weights=[1, 1], ema=0.5)
    with pytest.raises(InvalidArgumentError, match="sum to 0"):
        data_free_weights(2, weights=[1, -1])
    with pytest.raises(InvalidArgumentError, match="got 3 weights"):
        data_free_weights(2, weights=[1, 1, 1])


def test_registry_drives_init_and_the_skip_flags():
    # Every --init value names a registered method, and every registered start point is an --init value.
    assert {m.init for m in METHODS.values() if m.init} == set(choices(Init))
    # Each optional baseline is turned off by its own FitConfig field.
    fields = {f for f in FitConfig.__dataclass_fields__}
    for m in BASELINES:
        assert m.skip_field is None or m.skip_field in fields
        assert m.needs_data or m.skip_field is None
    cfg = FitConfig(greedy=False)
    assert [m.name for m in BASELINES if m.enabled(cfg)] == ["candidate", "uniform"]
    assert not any(m.needs_data for m in METHODS.values() if m.name in ("uniform", "weighted", "ema"))


def test_greedy_soup_adds_only_strict_improvements():
    # Candidate 2 is best alone; adding 0 helps, adding 1 does not.
    scores = {(2,): 0.5, (0, 2): 0.7, (0, 1, 2): 0.6}
    tried = []

    def try_soup(weights):
        chosen = tuple(i for i, w in enumerate(weights) if w > 0)
        tried.append(chosen)
        return {"fit": {"metric": scores[chosen]}, "heldout": None}

    kept = []
    soup, accepted = greedy_soup([2, 0, 1], {"metric": 0.5}, 3, try_soup, lambda a, b: a["metric"] > b["metric"],
                                 on_accept=lambda r: kept.append(r["fit"]["metric"]) or {**r, "heldout": "scored"})
    assert soup == [2, 0] and accepted["fit"]["metric"] == 0.7 and accepted["heldout"] == "scored"
    assert kept == [0.7]  # only the kept trial is completed
    assert tried == [(0, 2), (0, 1, 2)]
    assert one_hot(3, [0, 2]) == [0.5, 0.0, 0.5]
    # Nothing improves: the soup is the first candidate alone, and no trial is reported as accepted.
    soup, accepted = greedy_soup([0, 1], {"metric": 1.0}, 2, lambda w: {"fit": {"metric": 0.0}},
                                 lambda a, b: a["metric"] > b["metric"])
    assert soup == [0] and accepted is None
