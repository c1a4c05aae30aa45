"""The report of a fit, built by a pure function from the stages' results: no fit needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from twamerge.config import FitConfig
from twamerge.report import (
    BasisSummary,
    DataSummary,
    MergeRecord,
    MethodResult,
    best_candidate,
    best_on_heldout,
    build_report,
)


def _score(metric: float, loss: float | None = None, n: int = 10) -> dict:
    return {"loss": metric if loss is None else loss, "metric": metric, "n": n}


def _report(methods: list[MethodResult], *, higher: bool, heldout_rows: int = 10,
            written: MethodResult | None = None) -> dict:
    basis = BasisSummary(block_keys=[["a.weight"], ["a.bias"]], ranks=[2, 1], dropped=[0, 1], spread=[0.5, 0.1],
                         n_params=12, n_cols=32, rows=2, bits=8, group_size=16, basis_bytes=96,
                         quantization_gap=1e-3)
    merge = MergeRecord(key_block={"a.weight": 0, "a.bias": 1}, block_alphas=[[0.2, 0.3, 0.5], [1 / 3] * 3],
                        default_alphas=[0.25, 0.3, 0.45], out_dtype=None, recalibrated_buffers="",
                        metadata={"twamerge.method": "twa"})
    return build_report(settings=FitConfig(), data=DataSummary("val/", 50, 40, heldout_rows, ["x"], "label"),
                        model={"spec": "m.py:build", "args": {}, "loss": "auto"},
                        candidates=[{"path": f"c{i}", "format": "safetensors", "sha256": "0" * 64} for i in range(3)],
                        metric_name="accuracy" if higher else "loss", higher_is_better=higher, methods=methods,
                        basis=basis, curve=[2.0, 1.5, 1.25], merge=merge, outputs=["m.safetensors"],
                        timings={"fit": 1.0}, memory={"cpu_peak_rss_bytes": 1}, written=written)


def _rows(fit_metrics, held_metrics, twa_fit, twa_held):
    rows = [MethodResult(f"c{i}", "candidate", _score(f), None if h is None else _score(h))
            for i, (f, h) in enumerate(zip(fit_metrics, held_metrics))]
    return rows + [MethodResult("uniform", "uniform", _score(0.0), _score(0.0)),
                   MethodResult("twa", "twa", _score(twa_fit), None if twa_held is None else _score(twa_held))]


@pytest.mark.parametrize("higher, twa_held, best, beats", [
    (True, 0.9, "c1", True),     # accuracy: c1 (0.8) is best; TWA 0.9 beats it
    (True, 0.8, "c1", True),     # a tie counts as at least as good
    (True, 0.7, "c1", False),
    (False, 0.05, "c2", True),   # a loss: lower is better, c2 (0.1) is best
    (False, 0.2, "c2", False),
])
def test_best_candidate_and_the_gate_follow_the_metric_direction(higher, twa_held, best, beats):
    report = _report(_rows([0.5, 0.5, 0.5], [0.3, 0.8, 0.1], 0.5, twa_held), higher=higher)
    assert report["best_candidate"] == best and report["twa_at_least_best"] is beats
    json.dumps(report, allow_nan=False)  # plain JSON


def test_without_heldout_rows_the_fit_split_decides():
    report = _report(_rows([0.2, 0.9, 0.4], [None] * 3, 0.95, None), higher=True, heldout_rows=0)
    assert report["heldout_rows"] == 0 and report["best_candidate"] == "c1" and report["twa_at_least_best"] is True


def test_no_candidate_rows_means_no_gate():
    report = _report([MethodResult("uniform", "uniform", _score(0.5), _score(0.5)),
                      MethodResult("twa", "twa", _score(0.6), _score(0.6))], higher=True)
    assert report["best_candidate"] is None and report["twa_at_least_best"] is None


def test_blocks_fit_curve_and_merge_sections():
    report = _report(_rows([0.5] * 3, [0.5] * 3, 0.5, 0.5), higher=True)
    assert [b["keys"] for b in report["blocks"]] == [["a.weight"], ["a.bias"]]
    assert report["blocks"][0]["alphas"] == [0.2, 0.3, 0.5] and report["blocks"][1]["dropped"] == 1
    assert report["subspace"]["dropped_directions"] == 1 and report["subspace"]["quantization_gap"] == 1e-3
    assert report["fit"] == {"steps": 3, "curve": [2.0, 1.5, 1.25], "final_loss": 1.25, "seconds_per_step": None}
    assert set(report["merge"]) == {"key_block", "block_alphas", "default_alphas", "out_dtype",
                                    "recalibrated_buffers", "metadata"}
    assert report["settings"]["blocks"] == "layer" and report["data"]["fit_rows"] == 40
    assert "distributed" not in report


def test_best_candidate_takes_the_first_of_equals():
    rows = [MethodResult(f"c{i}", "candidate", _score(0.5), _score(0.5)) for i in range(3)]
    assert best_candidate(rows, "heldout", True).name == "c0"
    assert best_candidate(rows, "heldout", False).name == "c0"


def test_the_gate_of_the_written_merge_is_its_own():
    """--select best may write another row than TWA: ``written.at_least_best`` (what --fail-if-worse reads)
    is that row's comparison with the best candidate, not TWA's."""
    rows = _rows([0.5, 0.5, 0.5], [0.3, 0.8, 0.1], 0.5, 0.9)
    uniform = next(r for r in rows if r.kind == "uniform")  # held-out 0.0, below c1's 0.8
    report = _report(rows, higher=True, written=uniform)
    assert report["twa_at_least_best"] is True
    assert report["written"]["name"] == "uniform" and report["written"]["at_least_best"] is False
    assert _report(rows, higher=True)["written"]["at_least_best"] is True  # TWA's own, by default


def test_select_best_ties_go_to_twa_then_the_merges_then_the_lone_candidate():
    """``best_on_heldout`` compares TWA with what each fit baseline puts forward (the best candidate on the
    fit split, not on held-out rows); on equal held-out figures the earlier of TWA, uniform, greedy,
    candidate wins: a greedy soup of one ingredient ties with that candidate and is preferred."""
    same = _score(0.7, loss=0.3)
    rows = [MethodResult("c0", "candidate", _score(0.9), same),
            MethodResult("c1", "candidate", _score(0.1), _score(0.99)),
            MethodResult("uniform", "uniform", _score(0.5), _score(0.6)),
            MethodResult("greedy", "greedy", _score(0.9), same),
            MethodResult("twa", "twa", _score(0.5), _score(0.6))]
    assert best_on_heldout(rows, True).name == "greedy"  # c1 is best held-out, but c0 is the fit split's pick
    assert best_on_heldout([*rows[:3], rows[4]], True).name == "c0"
    assert best_on_heldout([rows[0], rows[2], rows[4]], False).name == "twa"  # lower is better: TWA, then uniform


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_is_this_process_not_its_launcher():
    """A process exec'd by a launcher that peaked at 400 MB (torchrun's ranks are started so) reports its
    own peak: ``ru_maxrss`` would carry the launcher's over exec."""
    child = "import json; from twamerge.report import peak_memory; print(json.dumps(peak_memory()))"
    launcher = ("import os, sys; big = bytearray(400 * 2**20); big[::4096] = b'x' * len(big[::4096]); "
                f"os.execv(sys.executable, [sys.executable, '-c', {child!r}])")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout)["cpu_peak_rss_bytes"]
    assert 0 < peak < 350 * 2**20
