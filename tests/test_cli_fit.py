"""`twamerge fit`, `eval` and `apply` as a script calls them: stdout/stderr, exit codes, side outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from digits_run import MODEL_SPEC
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from twamerge.cli import EXIT_WORSE, app

runner = CliRunner()
FAST = ["--epochs", "2", "--batch-size", "64"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_fit_json_report_plot_then_apply_and_eval(run, tmp_path):
    out, report, plot = tmp_path / "m.safetensors", tmp_path / "r.json", tmp_path / "a.png"
    r = _run("fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", out, "--report", report,
             "--plot", plot, "--json", "-q", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # exactly one JSON object
    assert len(summary["alphas"]) == 4 and summary["outputs"] == [str(out)]
    assert r.stderr == ""  # -q after the command silences logs and the table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(report.read_text())["merge"]["block_alphas"] == summary["alphas"]
    again = tmp_path / "again.safetensors"
    r = _run("apply", report, *run.checkpoints, "-o", again, "--json")
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()
    r = _run("eval", out, "--val", run.test, "--model", MODEL_SPEC, "--json")
    assert r.exit_code == 0, r.output
    assert 0.5 < json.loads(r.stdout)["checkpoints"][0]["metric"] <= 1


def test_existing_plot_is_refused_before_any_work(run, tmp_path):
    plot = tmp_path / "a.png"
    plot.write_bytes(b"keep")
    r = _run("fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", tmp_path / "m.safetensors",
             "--plot", plot, *FAST)
    assert r.exit_code == 1 and "plot exists" in r.stderr
    assert plot.read_bytes() == b"keep" and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("name", ["plotfile", "a.xyz"])
def test_plot_without_an_image_suffix_is_refused_before_any_work(run, tmp_path, name):
    r = _run("fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", tmp_path / "m.safetensors",
             "--report", tmp_path / "r.json", "--plot", tmp_path / name, *FAST)
    assert r.exit_code == 1 and "a plot needs an image suffix" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bits_3_is_a_usage_error(run, tmp_path):
    r = _run("fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", tmp_path / "m.safetensors",
             "--bits", "3")
    assert r.exit_code == 2 and not (tmp_path / "m.safetensors").exists()


def test_fail_if_worse_exits_with_its_own_code(run, tmp_path):
    """A candidate of random weights drags the uniform average (zero fit steps: TWA = uniform) below the best."""
    noise = {k: torch.randn_like(v) * 5 for k, v in load_file(str(run.checkpoints[-1])).items()}
    bad = tmp_path / "noise.safetensors"
    save_file(noise, str(bad))
    out = tmp_path / "m.safetensors"
    r = _run("fit", run.checkpoints[-1], bad, "--val", run.val, "--model", MODEL_SPEC, "-o", out, "--epochs", "0",
             "--fail-if-worse", "-q")
    assert r.exit_code == EXIT_WORSE, r.output
    assert "loses to the best candidate" in r.stderr
    assert Path(out).exists()  # the gate reports; the merge and its report are still written for inspection
