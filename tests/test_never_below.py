"""TWA reaches at least the best baseline on its own fit rows (issue 22): the step budget, the fit floor, and the
warning when the written merge loses to the best candidate on held-out rows."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch
from digits_run import MODEL_SPEC, make_digits_run
from safetensors.torch import load_file
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.config import DataConfig, FitConfig, ModelConfig, OutputConfig
from twamerge.pipeline import fit, loss_warnings

pipeline = importlib.import_module("twamerge.pipeline")

# What a fit did before issue 22: 10 epochs however few rows --val has, no early stop, no floor.
OLD = dict(min_steps=0, stop_tol=0.0, fit_floor=False)


@pytest.fixture(scope="module")
def improving(tmp_path_factory):
    """A run that is still improving: the first 4 epochs at a low learning rate (the last is the best candidate,
    1.38 test loss against 2.24 for the first), and a small --val (150 rows: 120 fit rows, 4 steps per epoch)."""
    return make_digits_run(tmp_path_factory.mktemp("improving"), epochs=4, lr=0.01, val_rows=150)


def _fit(run, out, **cfg):
    return fit(run.checkpoints, val=DataConfig(str(run.val)), model=ModelConfig(MODEL_SPEC),
               output=OutputConfig(out), cfg=FitConfig(**cfg))


def _fit_losses(report):
    rows = {m["name"]: m["fit"]["loss"] for m in report["methods"] if m["kind"] != "twa"}
    twa = next(m for m in report["methods"] if m["kind"] == "twa")
    return twa["fit"]["loss"], rows


def test_on_a_still_improving_run_twa_ends_at_or_below_every_candidate_on_its_fit_rows(improving, tmp_path):
    # The old length (10 epochs of 4 steps) stops short: above the last checkpoint, inside its own search space.
    old_twa, baselines = _fit_losses(_fit(improving, tmp_path / "old.safetensors", **OLD))
    assert old_twa > baselines["epoch4.safetensors"] == min(baselines.values())
    report = _fit(improving, tmp_path / "new.safetensors")
    twa, baselines = _fit_losses(report)
    assert twa <= min(baselines.values())
    # The defaults alone get there (150 steps); the floor had nothing to do, and the report says so.
    assert report["fit"]["steps"] == FitConfig().min_steps == 150
    assert report["fit"]["runs"] == [{"seed": 0, "budget": 150, "steps": 150, "stop": None, "start": "uniform"}]
    last = baselines["epoch4.safetensors"]
    assert report["fit"]["floor"] == {"best_baseline": "epoch4.safetensors", "best_fit_loss": last,
                                      "twa_fit_loss": twa, "action": "kept"}


def test_a_fit_that_ends_above_a_baseline_continues_from_it(improving, tmp_path):
    """Too small a learning rate to leave the uniform average: the fit ends above the last checkpoint, continues
    from it, and ends below it; both runs are reported, the held-out rows are scored once, for the merge kept."""
    report = _fit(improving, tmp_path / "m.safetensors", lr=0.002, min_steps=40)
    twa, baselines = _fit_losses(report)
    floor = report["fit"]["floor"]
    assert floor["action"] == "continued" and floor["best_baseline"] == "epoch4.safetensors"
    assert floor["twa_fit_loss"] > floor["best_fit_loss"] >= floor["continued_fit_loss"] == twa
    assert [r["start"] for r in report["fit"]["runs"]] == ["uniform", "epoch4.safetensors"]
    assert report["fit"]["steps"] == 80 and twa <= min(baselines.values())


def test_a_continuation_that_still_ends_above_writes_the_baseline(improving, tmp_path, monkeypatch):
    """Fits that end at the uniform average whatever they learn (their coefficients are replaced by 0): the
    continuation from the last checkpoint ends above it too, so TWA's merge is that checkpoint, written exactly,
    with its scores."""
    real = pipeline.train_coefficients

    def stuck(*args, **kwargs):
        outcome = real(*args, **kwargs)
        outcome.beta = torch.zeros_like(outcome.beta)  # beta = 0: the uniform average, whatever was learned
        return outcome

    monkeypatch.setattr(pipeline, "train_coefficients", stuck)
    out = tmp_path / "m.safetensors"
    report = _fit(improving, out, min_steps=20)
    assert report["fit"]["floor"]["action"] == "returned" and len(report["fit"]["runs"]) == 2
    rows = {m["name"]: m for m in report["methods"]}
    assert rows["twa"]["fit"] == rows["epoch4.safetensors"]["fit"]
    assert rows["twa"]["heldout"] == rows["epoch4.safetensors"]["heldout"]
    written, last = load_file(str(out)), load_file(str(improving.checkpoints[-1]))
    assert written.keys() == last.keys() and all(torch.equal(written[k], last[k]) for k in last)
    assert report["merge"]["block_alphas"] == [[0.0, 0.0, 0.0, 1.0]] * 4


def test_epochs_0_writes_the_start_point_and_the_loss_is_said(improving, tmp_path, caplog):
    """--epochs 0 trains nothing and the floor leaves the start point alone; the uniform average of a run that is
    still improving loses to its last checkpoint on the held-out rows: one warning naming both figures, in the
    log and in the report."""
    with caplog.at_level(logging.WARNING, logger="twamerge"):
        report = _fit(improving, tmp_path / "m.safetensors", epochs=0)
    assert report["fit"]["steps"] == 0 and report["fit"]["floor"] is None
    rows = {m["name"]: m for m in report["methods"]}
    assert rows["twa"]["fit"] == rows["uniform"]["fit"]
    twa, best = rows["twa"]["heldout"]["metric"], rows[report["best_candidate"]]["heldout"]["metric"]
    assert report["written"]["at_least_best"] is False and twa < best
    [line] = report["warnings"]
    assert f"{twa:.4f}" in line and f"{best:.4f}" in line and report["best_candidate"] in line
    assert "--select best" in line and "--fail-if-worse" in line
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "written merge" in
            r.getMessage()] == [line]


def test_no_warning_when_the_written_merge_is_at_least_the_best_candidate():
    report = {"written": {"name": "twa", "kind": "twa", "at_least_best": True}}
    assert loss_warnings(report) == []
    report = {"written": {"name": "twa", "kind": "twa", "at_least_best": False}, "heldout_rows": 0,
              "metric_name": "perplexity", "higher_is_better": False, "best_candidate": "b",
              "methods": [{"name": "a", "kind": "candidate", "fit": {"metric": 9.0}, "heldout": None},
                          {"name": "b", "kind": "candidate", "fit": {"metric": 7.0}, "heldout": None},
                          {"name": "twa", "kind": "twa", "fit": {"metric": 7.5}, "heldout": None}]}
    [line] = loss_warnings(report)
    assert "perplexity 7.5000 on the fit rows (--holdout 0), worse than the best candidate b (7.0000)" in line


def test_the_command_line_says_it_on_stderr_and_json_carries_it(improving, tmp_path):
    r = CliRunner().invoke(app, ["fit", *map(str, improving.checkpoints), "--val", str(improving.val), "--model",
                                 MODEL_SPEC, "-o", str(tmp_path / "m.safetensors"), "--epochs", "0", "--json"])
    assert r.exit_code == 0, r.output
    [line] = json.loads(r.stdout)["warnings"]
    assert line in r.stderr and "--select best" in line
