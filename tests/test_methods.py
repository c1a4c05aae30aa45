"""The method registry: each method declared once with its behaviour, the weights of the data-free ones, the
greedy soup, and a new scored baseline added as one registry entry."""

from __future__ import annotations

import pytest
import torch
from digits_run import fit_digits
from safetensors.torch import load_file

from twamerge.config import FitConfig, Init, choices
from twamerge.errors import InvalidArgumentError
from twamerge.methods import (
    METHODS,
    Method,
    MethodResult,
    contenders,
    data_free_weights,
    ema_weights,
    fit_baselines,
    greedy_soup,
    init_names,
    one_hot,
)


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
    assert init_names() == choices(Init) == ("uniform", "greedy", "best")
    # Each optional baseline is turned off by its own FitConfig field; each says which weights its rows stand for.
    fields = {f for f in FitConfig.__dataclass_fields__}
    for m in fit_baselines():
        assert m.skip is None or (m.skip.field in fields and m.needs_data)
        assert m.row_weights is not None
    assert [m.name for m in fit_baselines()] == ["candidate", "uniform", "greedy"]  # the report's row order
    assert [m.name for m in fit_baselines(FitConfig(greedy=False))] == ["candidate", "uniform"]
    assert [m.name for m in fit_baselines(FitConfig(eval_candidates=False))] == ["uniform", "greedy"]
    assert [m.name for m in contenders()] == ["uniform", "greedy", "candidate"]  # --select best's tie order
    data_free = [m.name for m in METHODS.values() if m.weights is not None]
    assert data_free == ["uniform", "weighted", "ema"] and not any(METHODS[n].needs_data for n in data_free)


def test_an_init_needs_its_baseline_and_the_soup_needs_no_candidate_rows():
    """One rule, in FitConfig, with one message per conflict (the CLI passes the flags through)."""
    with pytest.raises(ValueError, match="init='greedy' is invalid; expected the greedy soup, which --no-greedy"):
        FitConfig(init="greedy", greedy=False)
    with pytest.raises(ValueError, match="init='best' is invalid; expected candidate scores, which --no-candidates"):
        FitConfig(init="best", eval_candidates=False, greedy=False)
    FitConfig(init="greedy", eval_candidates=False)  # the soup scores the candidates itself
    FitConfig(init="uniform", greedy=False, eval_candidates=False)


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


def test_a_new_scored_baseline_is_one_registry_entry(run, tmp_path, monkeypatch):
    """A throwaway baseline registered in METHODS alone is scored, reported, and written by --select best.

    ``ends`` averages the first and last candidates; its score claims a perfect held-out metric so that
    --select best must choose it: the written checkpoint is then its weights' merge (``row_weights``).
    """
    def ends(k: int) -> list[float]:
        return one_hot(k, [0, k - 1])

    def score(s) -> list[MethodResult]:
        scores = s.merge(ends(s.k))
        assert scores["fit"]["n"] > 0 and scores["heldout"]["n"] > 0  # really scored on both splits
        return [MethodResult("ends", "ends", scores["fit"], {**scores["heldout"], "metric": 1.0, "loss": 0.0})]

    monkeypatch.setitem(METHODS, "ends", Method("ends", True, "the first and last candidates averaged", score=score,
                                                row_weights=lambda row, k: ends(k)))
    out = tmp_path / "m.safetensors"
    report = fit_digits(run, out, epochs=0, greedy=False, select="best")
    assert [m["kind"] for m in report["methods"]] == ["candidate"] * len(run.checkpoints) + ["uniform", "ends", "twa"]
    assert report["written"]["kind"] == "ends"
    first, last = load_file(str(run.checkpoints[0])), load_file(str(run.checkpoints[-1]))
    merged = load_file(str(out))
    for key, value in merged.items():
        expected = ((first[key].double() + last[key].double()) / 2).to(value.dtype)
        assert torch.equal(value, expected), key
