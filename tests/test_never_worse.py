"""benchmarks/never_worse.py cannot rot: every option fitted and scored on a small real pool, the held-out picks
made from the stored reports only, and a rerun that fits nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from digits_run import MODEL_SPEC, make_digits_run

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("never_worse", ROOT / "benchmarks" / "never_worse.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["never_worse"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_option_is_scored_and_a_rerun_fits_nothing(tmp_path, monkeypatch):
    nw = _module()
    pool = tmp_path / "pools" / "digits_tiny"
    make_digits_run(pool, epochs=4)
    (pool / "pool.json").write_text(json.dumps({"name": "digits_tiny", "model": MODEL_SPEC, "in_tests": True,
                                                "checkpoints": "epoch*.safetensors", "description": "4 epochs"}))
    out, md = tmp_path / "out", tmp_path / "page.md"
    nw.main(["--pools", str(tmp_path / "pools"), "--out", str(out), "--md", str(md)])
    res = json.loads((out / "digits_tiny.json").read_text())
    assert set(nw.SHOWN) <= set(res["test"]) and all(0 <= v <= 1 for v in res["test"].values())
    assert res["k"] == 4 and res["test_rows"] == 447
    # The greedy-span fit's candidates are the default fit's greedy ingredients (or it is the greedy soup itself).
    greedy = next(r for r in res["fits"]["twa"]["methods"] if r["kind"] == "greedy")
    span = res["fits"]["greedy_span"]
    assert span["ingredients"] == greedy["ingredients"]
    if "same_as" in span:
        assert span["same_as"] == "greedy" and len(greedy["ingredients"]) == 1
    else:
        assert span["k"] == len(greedy["ingredients"]) >= 2
    assert res["select_span_choice"] in ("greedy_span", res["select_choice"])
    # The study's select is what `fit --select best` writes on the same pool (same seed, so the same split).
    from twamerge import DataConfig, FitConfig, ModelConfig, fit

    ckpts = sorted(pool.glob("epoch*.safetensors"))
    report = fit(ckpts, val=DataConfig(str(pool / "val")), model=ModelConfig(MODEL_SPEC),
                 output=tmp_path / "select.safetensors", cfg=FitConfig(select="best"))
    written = report["written"]
    assert res["select_choice"] == (written["kind"] if written["kind"] != "candidate"
                                    else f"candidate {written['name']}")
    page = md.read_text()
    assert "| digits_tiny | 4 | 447 |" in page and "| twa |" in page and "digits_tiny" in page.split("## Pools")[1]

    def no_fit(*args, **kwargs):
        raise AssertionError("a rerun with every option stored must not fit")

    monkeypatch.setattr(nw, "fit", no_fit)
    nw.main(["--pools", str(tmp_path / "pools"), "--out", str(out)])
    # A study of some options written as a marked section: the page above it is kept, a rerun replaces the section.
    for _ in range(2):
        nw.main(["--pools", str(tmp_path / "pools"), "--out", str(out), "--options", "twa,old", "--md", str(md),
                 "--section", "Step budget"])
    again = md.read_text()
    assert again.startswith(page) and again.count("<!-- section: Step budget -->") == 1
    section = again[len(page):]
    assert "## Step budget" in section and "| twa | old | select | select_any |" in section
    assert "init_greedy" not in section  # fitted for the page above, not asked for here
    assert "python benchmarks/pools.py --only digits_tiny" in section and "--options twa,old" in section


def test_data_size_aware_blocks_rule():
    nw = _module()
    # 10 fit rows per fitted coefficient, K - 1 coefficients per block.
    assert nw.rows_blocks(359, 20, 6, 26_000) == "global"  # 359 // 190 = 1 block
    assert nw.rows_blocks(800, 5, 4, 100_000) == "layer"  # 20 blocks >= 4 tensors
    assert nw.rows_blocks(96, 2, 20, 1_000) == "size:112"  # 9 blocks of at least 1000 / 9 parameters


def test_pools_commands_group_kinds_by_seeds():
    nw = _module()
    names = ["digits_s0", "digits_s1", "lm_trainer_s1", "fmnist_cnn16_s1", "fmnist_cnn16_s0", "minilm_soup"]
    assert nw.pools_commands([{"name": n} for n in names]) == [
        "python benchmarks/pools.py --seeds 0,1 --only digits,fmnist_cnn16",
        "python benchmarks/pools.py --seeds 1 --only lm_trainer",
        "python examples/finetune_soup/run.py --out runs/finetune_soup --variants layer:8"]
