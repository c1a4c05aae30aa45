"""twamerge fit / eval / apply through the library, on a real training run (digits): the recipe end to end."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from digits_run import FAST, MODEL_SPEC, fit_digits, make_digits_run
from helpers import assert_close
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twamerge.config import DataConfig, FitConfig, ModelConfig, OutputConfig
from twamerge.errors import FitError, OutputError, TwamergeError
from twamerge.pipeline import apply_report, evaluate_checkpoints, fit

_fit = fit_digits


def test_fit_writes_merge_and_report(run, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = _fit(run, out)
    assert out.exists() and (tmp_path / "merged.json").exists()
    kinds = [m["kind"] for m in report["methods"]]
    assert kinds.count("candidate") == 6 and {"uniform", "greedy", "twa"} <= set(kinds)
    alphas = torch.tensor(report["merge"]["block_alphas"])
    assert alphas.shape == (4, 6)  # layer blocks: fc1.weight, fc1.bias, fc2.weight, fc2.bias
    assert torch.allclose(alphas.sum(1), torch.ones(4, dtype=alphas.dtype), atol=1e-9)
    # The file holds exactly sum_k alpha_k c_k (per block), written from the original checkpoints.
    merged = load_file(str(out))
    cands = [load_file(str(p)) for p in run.checkpoints]
    for block in report["blocks"]:
        for key in block["keys"]:
            expect = sum(a * c[key].double() for a, c in zip(block["alphas"], cands)).float()
            assert torch.allclose(merged[key], expect, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["twamerge.method"] == "twa" and json.loads(meta["twamerge.alphas"]) == report["merge"]["block_alphas"]
    assert len(json.loads(meta["twamerge.sources"])) == 6 and meta["format"] == "pt"
    # The quantized subspace point that was trained and the exact merge are close at 8 bits.
    assert report["subspace"]["quantization_gap"] < 0.05
    # Held-out: the learned merge is no worse than the uniform average (small tolerance for noise).
    held = {m["name"]: m["heldout"]["metric"] for m in report["methods"]}
    assert held["twa"] >= held["uniform"] - 0.01


def test_fit_is_deterministic(run, tmp_path):
    a = _fit(run, tmp_path / "a.safetensors", greedy=False, eval_candidates=False)
    b = _fit(run, tmp_path / "b.safetensors", greedy=False, eval_candidates=False)
    assert a["merge"]["block_alphas"] == b["merge"]["block_alphas"]


def test_scale_free_defaults(tmp_path):
    """Checkpoints multiplied by 100 (and a model that divides by 100) learn the same alphas."""
    base = make_digits_run(tmp_path / "x1", epochs=4)
    scaled = make_digits_run(tmp_path / "x100", epochs=4, scale=0.01)
    ra = fit(base.checkpoints, val=DataConfig(str(base.val)), model=ModelConfig(MODEL_SPEC),
             output=tmp_path / "a.safetensors", cfg=FitConfig(**FAST, greedy=False, eval_candidates=False))
    rb = fit(scaled.checkpoints, val=DataConfig(str(scaled.val)), model=ModelConfig(MODEL_SPEC, {"scale": 0.01}),
             output=tmp_path / "b.safetensors", cfg=FitConfig(**FAST, greedy=False, eval_candidates=False))
    a = torch.tensor(ra["merge"]["block_alphas"])
    b = torch.tensor(rb["merge"]["block_alphas"])
    assert (a - 0.25).abs().max() > 1e-3  # something was learned
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()


@pytest.mark.parametrize("dtype", [None, "float64"])
def test_apply_reproduces_the_output_bit_for_bit(run, tmp_path, dtype):
    out = tmp_path / "fit.safetensors"
    fit(run.checkpoints, val=DataConfig(str(run.val)), model=ModelConfig(MODEL_SPEC),
        output=OutputConfig(out, report=tmp_path / "fit.json", dtype=dtype), cfg=FitConfig(**FAST, greedy=False))
    assert load_file(str(out))["fc1.weight"].dtype == (torch.float64 if dtype else torch.float32)
    again = tmp_path / "applied.safetensors"
    apply_report(tmp_path / "fit.json", run.checkpoints, again)
    assert out.read_bytes() == again.read_bytes()


def test_apply_refuses_other_checkpoints(run, tmp_path):
    _fit(run, tmp_path / "fit.safetensors", greedy=False, eval_candidates=False)
    # Another file in the last candidate's place (reversing the list no longer differs: discovery puts
    # epoch-numbered names in natural order).
    other = tmp_path / "other.safetensors"
    shutil.copy2(run.checkpoints[0], other)
    with pytest.raises(TwamergeError, match="SHA-256"):
        apply_report(tmp_path / "fit.json", [*run.checkpoints[:-1], other], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda r: "{not json", "the report is not valid JSON"),
    (lambda r: json.dumps({**r, "report_version": 0}), "not a twamerge fit report"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "candidates"}), "candidates: missing"),
    (lambda r: json.dumps({**r, "merge": {k: v for k, v in r["merge"].items() if k != "key_block"}}),
     "merge.key_block: missing"),
])
def test_apply_refuses_a_damaged_report(run, tmp_path, edit, match):
    _fit(run, tmp_path / "fit.safetensors", greedy=False, eval_candidates=False)
    report = json.loads((tmp_path / "fit.json").read_text())
    (tmp_path / "bad.json").write_text(edit(report))
    with pytest.raises(TwamergeError, match=match):
        apply_report(tmp_path / "bad.json", run.checkpoints, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_batchnorm_is_recalibrated_and_apply_keeps_it(tmp_path):
    run = make_digits_run(tmp_path / "bn", epochs=4, batchnorm=True)
    out = tmp_path / "bn.safetensors"
    # No holdout and one batch: the re-estimated statistics are exactly those of fc1's output on all rows.
    report = fit(run.checkpoints, val=DataConfig(str(run.val)), model=ModelConfig(MODEL_SPEC, {"batchnorm": True}),
                 output=OutputConfig(out, report=tmp_path / "bn.json"), cfg=FitConfig(epochs=3, batch_size=1000, holdout=0.0))
    merged = load_file(str(out))
    import datasets

    x = torch.tensor(datasets.load_from_disk(str(run.val))["x"])
    h = x @ merged["fc1.weight"].T + merged["fc1.bias"]
    assert_close("running_mean", h.mean(0), merged["bn.running_mean"], atol=1e-5, rtol=1e-5)
    assert_close("running_var", h.var(0), merged["bn.running_var"], atol=1e-5, rtol=1e-5)
    cands = [load_file(str(p)) for p in run.checkpoints]
    plain_average = sum(c["bn.running_var"] for c in cands) / len(cands)
    assert not torch.allclose(merged["bn.running_var"], plain_average)  # re-estimated, not averaged
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    assert report["merge"]["recalibrated_buffers"]
    apply_report(tmp_path / "bn.json", run.checkpoints, tmp_path / "again.safetensors")
    assert out.read_bytes() == (tmp_path / "again.safetensors").read_bytes()


def test_eval_scores_each_checkpoint_on_all_rows(run):
    res = evaluate_checkpoints(run.checkpoints[-2:], val=DataConfig(str(run.test)), model=ModelConfig(MODEL_SPEC))
    assert res["metric_name"] == "accuracy" and len(res["checkpoints"]) == 2
    assert all(c["n"] == res["rows"] and 0.5 < c["metric"] <= 1 for c in res["checkpoints"])


def test_holdout_zero_says_so(run, tmp_path):
    report = _fit(run, tmp_path / "h0.safetensors", holdout=0.0, greedy=False, eval_candidates=False)
    assert report["heldout_rows"] == 0
    assert all(m["heldout"] is None for m in report["methods"])


@pytest.mark.parametrize("calls, match", [(3, "interrupted before the output was written"),
                                          (12, "interrupted at step")])
def test_interrupt_writes_nothing(run, tmp_path, calls, match):
    """Ctrl-C while scoring the baselines (call 3) or while training (call 12: the probe batch takes 1
    call and scoring the uniform average 3 (360 + 90 rows in eval batches of 256), training starts after
    them) leaves no output."""
    out = tmp_path / "m.safetensors"
    with pytest.raises(FitError, match=match):
        _fit(run, out, model_args={"interrupt_at": calls}, greedy=False, eval_candidates=False)
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_existing_output_needs_force(run, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="--force"):
        _fit(run, out)
    assert out.read_bytes() == b"precious"


def test_triton_interpreter_backend_gives_the_torch_alphas(run, tmp_path):
    """The whole fit with every op on the Triton kernels (interpreted on CPU) matches the torch references."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    ckpts = run.checkpoints[-3:]
    kw = dict(checkpoints=ckpts, epochs=1, greedy=False, eval_candidates=False, bits=4)
    a = _fit(run, tmp_path / "torch.safetensors", backend="torch", **kw)
    b = _fit(run, tmp_path / "triton.safetensors", backend="triton", **kw)
    assert torch.allclose(torch.tensor(a["merge"]["block_alphas"]), torch.tensor(b["merge"]["block_alphas"]),
                          atol=1e-4)


@pytest.mark.parametrize("init", ["best", "greedy"])
def test_init_starts_the_fit_at_a_baseline(run, tmp_path, init):
    """With no training steps the merge is the start point itself: the best candidate or the greedy soup."""
    report = _fit(run, tmp_path / f"{init}.safetensors", init=init, epochs=0, bits=32)
    methods = {m["name"]: m for m in report["methods"]}
    if init == "best":
        best = max((m for m in report["methods"] if m["kind"] == "candidate"), key=lambda m: m["fit"]["metric"])
        weights = [1.0 if m["name"] == best["name"] else 0.0 for m in report["methods"] if m["kind"] == "candidate"]
    else:
        chosen = methods["greedy"]["ingredients"]
        names = [m["name"] for m in report["methods"] if m["kind"] == "candidate"]
        weights = [1 / len(chosen) if n in chosen else 0.0 for n in names]
    alphas = torch.tensor(report["merge"]["block_alphas"])
    assert torch.allclose(alphas, torch.tensor(weights, dtype=alphas.dtype).expand_as(alphas), atol=1e-4)
    assert methods["twa"]["heldout"]["metric"] == pytest.approx(
        methods[best["name"]]["heldout"]["metric"] if init == "best" else methods["greedy"]["heldout"]["metric"])


def test_restarts_average_the_coefficients_of_fits_with_successive_seeds(run, tmp_path, monkeypatch):
    """--restarts 2 trains with seeds 0 and 1 (data order) on the same fit rows and merges the mean coefficients."""
    from twamerge import pipeline

    fits, merged = [], []
    real_train, real_merge = pipeline.train_coefficients, pipeline.merge_stage

    def train_spy(binding, subspace, splits, cfg, *rest, **kwargs):
        outcome = real_train(binding, subspace, splits, cfg, *rest, **kwargs)
        fits.append((cfg.seed, outcome.beta.clone()))
        return outcome

    def merge_spy(run, trained):
        merged.append(trained.beta.clone())
        return real_merge(run, trained)

    monkeypatch.setattr(pipeline, "train_coefficients", train_spy)
    monkeypatch.setattr(pipeline, "merge_stage", merge_spy)
    kw = dict(epochs=1, greedy=False, eval_candidates=False, bits=32)
    single = _fit(run, tmp_path / "one.safetensors", **kw)
    both = _fit(run, tmp_path / "both.safetensors", restarts=2, **kw)
    assert [seed for seed, _ in fits] == [0, 0, 1]
    (_, alone), (_, first), (_, second) = fits
    assert torch.equal(alone, first)  # the first restart is the plain fit
    assert not torch.allclose(first, second, atol=1e-4)
    assert torch.equal(merged[1], (first + second) / 2)
    assert len(both["fit"]["curve"]) == len(single["fit"]["curve"]) > 0
    assert both["data"]["fit_rows"] == single["data"]["fit_rows"]


def test_init_greedy_without_candidate_rows_starts_at_the_soup(run, tmp_path):
    """The library may keep the greedy soup and drop the candidates' rows: the start still finds its ingredients."""
    report = _fit(run, tmp_path / "g.safetensors", init="greedy", eval_candidates=False, epochs=0, bits=32)
    assert not [m for m in report["methods"] if m["kind"] == "candidate"]
    chosen = next(m for m in report["methods"] if m["kind"] == "greedy")["ingredients"]
    names = [Path(p).name for p in run.checkpoints]
    alphas = torch.tensor(report["merge"]["block_alphas"])
    weights = torch.tensor([1 / len(chosen) if n in chosen else 0.0 for n in names], dtype=alphas.dtype)
    assert torch.allclose(alphas, weights.expand_as(alphas), atol=1e-4)


def test_candidates_with_the_same_file_name_start_at_the_right_one(run, tmp_path):
    """Rows name candidates by file name, which folders can repeat: --init best picks its weights by index."""
    import shutil

    same = []
    for i, path in enumerate(run.checkpoints):
        (tmp_path / f"run{i}").mkdir()
        same.append(tmp_path / f"run{i}" / "model.safetensors")
        shutil.copy(path, same[-1])
    report = _fit(run, tmp_path / "m.safetensors", checkpoints=same, init="best", epochs=0, bits=32)
    rows = [m for m in report["methods"] if m["kind"] == "candidate"]
    best = max(range(len(rows)), key=lambda i: rows[i]["fit"]["metric"])
    assert best > 0 and {m["name"] for m in rows} == {"model.safetensors"}
    alphas = torch.tensor(report["merge"]["block_alphas"])
    assert torch.allclose(alphas[:, best], torch.ones(len(alphas), dtype=alphas.dtype), atol=1e-4)


def test_forced_triton_without_a_gpu_is_a_typed_error(run, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from twamerge.errors import BackendUnavailableError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "m.safetensors"
    with pytest.raises(BackendUnavailableError, match="--backend triton needs CUDA tensors"):
        _fit(run, out, backend="triton", device="cpu")
    assert not out.exists()


def test_forced_c_kernels_and_their_limits(run, tmp_path):
    """--backend native fits like the references; for a float basis, which the C loops do not take, it is a
    typed error before any work."""
    from twamerge.errors import BackendUnavailableError

    kw = dict(checkpoints=run.checkpoints[-3:], epochs=1, greedy=False, eval_candidates=False, bits=4)
    a = _fit(run, tmp_path / "torch.safetensors", backend="torch", **kw)
    b = _fit(run, tmp_path / "native.safetensors", backend="native", **kw)
    assert torch.allclose(torch.tensor(a["merge"]["block_alphas"]), torch.tensor(b["merge"]["block_alphas"]),
                          atol=1e-4)
    out = tmp_path / "float.safetensors"
    with pytest.raises(BackendUnavailableError, match="bits=32"):
        _fit(run, out, backend="native", **{**kw, "bits": 32})
    assert not out.exists()


@pytest.mark.parametrize("candidates, reads", [(False, 2), (True, 3)])
def test_each_candidate_is_read_as_often_as_the_readme_says(run, tmp_path, candidates, reads):
    """docs/how-it-works.md, "Reads of the candidate files": the subspace build (one read: each layer
    block's K copies fit in memory) and the written merge, plus one read of each candidate to score it;
    the uniform baseline is the subspace mean and reads nothing. Each input is hashed once, on the
    hashing threads, straight from the file (every byte of it, not the reads' tensors)."""
    from twamerge.io import count_reads, hashing

    # A digest remembered from an earlier test of the same files would be reused without hashing them.
    hashing._SHA_CACHE.clear()
    with count_reads() as counts:
        report = _fit(run, tmp_path / "m.safetensors", greedy=False, eval_candidates=candidates)
    for path, source in zip(run.checkpoints, report["candidates"]):
        data_bytes = sum(t.numel() * t.element_size() for t in load_file(str(path)).values())
        assert counts.bytes_read[path.resolve()] == reads * data_bytes, path.name
        assert counts.hash_bytes_read[path.resolve()] == path.stat().st_size, path.name
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_greedy_trials_read_no_candidate_file(run, tmp_path, monkeypatch):
    """The greedy soup's trials are points of the subspace: the read counter shows no candidate byte while they
    run, and each trial is one combine and one scoring pass of the fit rows. The soup chosen is then merged
    once from its ingredients' files and scored as the row's figures."""
    from twamerge import methods
    from twamerge.evaluation import Scorer
    from twamerge.io import count_reads
    from twamerge.subspace import Subspace

    during, calls = {}, []
    real_soup, real_combine, real_score = methods.greedy_soup, Subspace.combine, Scorer.score

    def soup_spy(order, *args, **kwargs):
        before = dict(counts.bytes_read)
        calls.clear()
        result = real_soup(order, *args, **kwargs)
        during["bytes"] = {p: n - before.get(p, 0) for p, n in counts.bytes_read.items() if n != before.get(p, 0)}
        during["calls"], during["trials"] = list(calls), len(order) - 1
        return result

    monkeypatch.setattr(methods, "greedy_soup", soup_spy)
    monkeypatch.setattr(Subspace, "combine",
                        lambda self, *a, **k: calls.append("combine") or real_combine(self, *a, **k))
    monkeypatch.setattr(Scorer, "score", lambda self, split: calls.append(split) or real_score(self, split))
    with count_reads() as counts:
        report = _fit(run, tmp_path / "m.safetensors")
    greedy = next(m for m in report["methods"] if m["kind"] == "greedy")
    assert during["bytes"] == {}  # not one candidate byte while the trials run
    trials = during["trials"]
    assert during["calls"].count("combine") == during["calls"].count("fit") == trials == len(run.checkpoints) - 1
    assert during["calls"].count("heldout") == 0  # only the soup chosen is scored on them, after the trials
    # Outside the trials: the subspace build, scoring the candidate, the written merge; and the soup chosen.
    for i, path in enumerate(run.checkpoints):
        data_bytes = sum(t.numel() * t.element_size() for t in load_file(str(path)).values())
        assert counts.bytes_read[path.resolve()] == (3 + (i in greedy["indices"])) * data_bytes, path.name
    sub, gap = greedy["subspace"], greedy["subspace_gap"]
    assert gap == {"loss": sub["heldout"]["loss"] - greedy["heldout"]["loss"],
                   "metric": sub["heldout"]["metric"] - greedy["heldout"]["metric"]}
    assert abs(gap["loss"]) < 0.05 * greedy["heldout"]["loss"]  # 8 bits: the subspace soup is close to the exact one


def test_bf16_candidates_fit_with_bf16_flat_buffers(run, tmp_path):
    """bf16 candidates with --precision bf16: the model's weights and gradients live in bf16 flat buffers
    (2 + 2 bytes per parameter instead of 4 + 4), the merge is written in bf16, and it still learns."""
    from twamerge.fit import FlatBinding

    bf16 = []
    for i, p in enumerate(run.checkpoints):
        sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(p)).items()}
        bf16.append(tmp_path / f"b{i}.safetensors")
        save_file(sd, str(bf16[-1]))
    seen = {}
    original = FlatBinding.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["flat"], seen["grad"] = self.flat.dtype, self.grad.dtype
        seen["params"] = {p.dtype for p in self.model.parameters()}

    FlatBinding.__init__ = spy
    try:
        out = tmp_path / "m.safetensors"
        report = _fit(run, out, checkpoints=bf16, greedy=False, eval_candidates=False, precision="bf16")
    finally:
        FlatBinding.__init__ = original
    assert seen == {"flat": torch.bfloat16, "grad": torch.bfloat16, "params": {torch.bfloat16}}
    assert report["memory"]["flat_buffer_bytes"] == 2 * 2 * report["subspace"]["n_cols"]
    merged = load_file(str(out))
    assert merged["fc1.weight"].dtype == torch.bfloat16
    alphas = torch.tensor(report["merge"]["block_alphas"])
    assert (alphas - 1 / len(bf16)).abs().max() > 1e-3  # the coefficients moved
    held = {m["name"]: m["heldout"]["metric"] for m in report["methods"]}
    assert held["twa"] >= held["uniform"] - 0.03


def test_held_out_rows_are_never_used_to_fit_or_choose(run, tmp_path, monkeypatch):
    """Training batches, BatchNorm re-estimation and every score that decides something (the greedy soup's
    trials, --init best) use the fit rows; the held-out rows are only ever scored for the report."""
    import importlib

    evaluation = importlib.import_module("twamerge.evaluation")
    fitmod = importlib.import_module("twamerge.fit")  # `twamerge.fit` the attribute is the function
    used: dict[str, set[int]] = {"train": set(), "recalibrate": set()}
    real_iter = fitmod.iter_batches

    def spy_train(data, index, *args, **kwargs):
        used["train"].update(index.tolist())
        return real_iter(data, index, *args, **kwargs)

    real_recal, real_eval = evaluation.recalibrate_batchnorm, evaluation.evaluate
    scored_sets: list[frozenset[int]] = []

    def spy_recal(model, data, index, *args, **kwargs):
        used["recalibrate"].update(index.tolist())
        return real_recal(model, data, index, *args, **kwargs)

    def spy_eval(model, data, index, *args, **kwargs):
        scored_sets.append(frozenset(index.tolist()))
        return real_eval(model, data, index, *args, **kwargs)

    monkeypatch.setattr(fitmod, "iter_batches", spy_train)
    monkeypatch.setattr(evaluation, "recalibrate_batchnorm", spy_recal)
    monkeypatch.setattr(evaluation, "evaluate", spy_eval)
    bn = make_digits_run(tmp_path / "bn", epochs=4, batchnorm=True)
    report = fit_digits(bn, tmp_path / "m.safetensors", model_args={"batchnorm": True}, init="best")
    n, held = report["data"]["rows"], report["heldout_rows"]
    assert used["train"] and used["recalibrate"] and used["train"] == used["recalibrate"]
    heldout_rows = set(range(n)) - used["train"]
    assert len(heldout_rows) == held
    # Every scored set is either exactly the fit rows or exactly the held-out rows: nothing mixes them.
    assert set(scored_sets) == {frozenset(used["train"]), frozenset(heldout_rows)}
    # Held-out scores: one per reported figure (candidates, uniform, the greedy soup exact and in the subspace,
    # TWA), nothing more.
    rows_with_heldout = sum(m["heldout"] is not None for m in report["methods"])
    greedy = next(m for m in report["methods"] if m["kind"] == "greedy")
    assert greedy["subspace"]["heldout"] is not None
    assert scored_sets.count(frozenset(heldout_rows)) == rows_with_heldout + 1


def test_select_best_writes_the_best_baseline_on_held_out_rows_and_apply_repeats_it(tmp_path):
    """--select best: with a random candidate in the pool and no training steps, TWA is the (poor) uniform
    average, so the greedy soup or the best candidate is written, as it was scored: a soup's BatchNorm
    statistics re-estimated, a candidate's file as it is. ``apply`` writes the same bytes."""
    from twamerge.report import decode_tensors

    bn = make_digits_run(tmp_path / "bn", epochs=4, batchnorm=True)
    first = load_file(str(bn.checkpoints[0]))
    noise = {k: (10 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in first.items()}
    save_file(noise, str(tmp_path / "bn" / "noise.safetensors"))
    ckpts = [*bn.checkpoints, tmp_path / "bn" / "noise.safetensors"]
    out = tmp_path / "m.safetensors"
    report = fit_digits(bn, out, model_args={"batchnorm": True}, checkpoints=ckpts, epochs=0, select="best")
    rows = {m["name"]: m for m in report["methods"]}
    written = report["written"]
    assert written["kind"] in ("greedy", "candidate") and written["chosen_on_heldout"]
    contenders = [rows["twa"], rows["greedy"], rows["uniform"],
                  max((m for m in report["methods"] if m["kind"] == "candidate"), key=lambda m: m["fit"]["metric"])]
    best = max(contenders, key=lambda m: (m["heldout"]["metric"], -m["heldout"]["loss"]))
    assert written["name"] == best["name"]
    assert best["heldout"]["metric"] > rows["twa"]["heldout"]["metric"]
    merged = load_file(str(out))
    names = [Path(p).name for p in ckpts]
    ingredients = rows["greedy"]["ingredients"] if written["kind"] == "greedy" else [written["name"]]
    sources = [load_file(str(ckpts[names.index(n)])) for n in ingredients]
    buffers = decode_tensors(report["merge"]["recalibrated_buffers"])
    for key, value in merged.items():
        if written["kind"] == "candidate":
            assert torch.equal(value, sources[0][key]), key
        elif key in buffers:
            assert torch.equal(value, buffers[key]), key  # re-estimated, as scored
        elif value.is_floating_point():
            mean = torch.stack([s[key].double() for s in sources]).mean(0).float()
            assert torch.allclose(value, mean, atol=1e-6), key
    assert bool(buffers) == (written["kind"] == "greedy")
    again = tmp_path / "again.safetensors"
    apply_report(out.with_suffix(".json"), ckpts, again)
    assert again.read_bytes() == out.read_bytes()
