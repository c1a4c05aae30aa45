"""LoRA adapters (PEFT folders) as candidates, checked against PEFT's own arithmetic.

Real adapters written by ``peft`` on a tiny Llama (text_fixtures): their effective weights as PEFT
computes them (``merge_and_unload``), the merged adapters loaded back with
``PeftModel.from_pretrained``, PEFT's ``add_weighted_adapter(combination_type="cat")`` for the same
weights, and the one-line errors for adapters that cannot be merged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from twamerge.cli import app

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
runner = CliRunner()
TARGETS = ["q_proj", "v_proj"]
TOL = 1e-6


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _base_model(base: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(base), local_files_only=True)


def _save_adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA adapter of ``base`` with random factors (B too: PEFT starts it at zero)."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0, **lora}
    model = peft.get_peft_model(_base_model(base), peft.LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return out


def _effective(model) -> dict[str, torch.Tensor]:
    """The weights PEFT computes for a PeftModel: its adapter merged into the base by PEFT itself."""
    return {k: v.detach().double() for k, v in model.merge_and_unload().state_dict().items()}


def _peft_cat(base: Path, adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """PEFT's own weighted merge of ``adapters`` (``add_weighted_adapter``, ``combination_type="cat"``)."""
    model = peft.PeftModel.from_pretrained(_base_model(base), str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "merged", combination_type="cat")
    model.set_adapter("merged")
    return _effective(model)


def _loaded(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return _effective(peft.PeftModel.from_pretrained(_base_model(base), str(adapter)))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A tiny Llama base folder with tokenizer files, three rank-4 adapters of it (the second with another
    lora_alpha, the third with rsLoRA: three scalings), and text rows."""
    import transformers
    from ckpt_fixtures import minilm_dir
    from text_fixtures import TOKENIZER_FILES, sentences, tiny_config, write_jsonl

    root = tmp_path_factory.mktemp("loras")
    torch.manual_seed(0)
    base = root / "base"
    transformers.LlamaForCausalLM(tiny_config("causal-lm")).save_pretrained(str(base))
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / name, base / name)
    adapters = [_save_adapter(base, root / "lora1", 1), _save_adapter(base, root / "lora2", 2, lora_alpha=16),
                _save_adapter(base, root / "lora3", 3, use_rslora=True)]
    val = write_jsonl(root / "val.jsonl", [{"text": t} for t in sentences(24)])
    return base, adapters, val


def test_each_adapter_reads_as_the_model_peft_makes_of_it(loras):
    from twamerge.io.adapters import AdapterSet, open_inputs

    base, adapters, _ = loras
    with open_inputs(adapters) as cs:
        assert isinstance(cs, AdapterSet) and cs.base_dir == base
        assert sorted({k.split(".")[-2] for k in cs.adapted}) == TARGETS and len(cs.adapted) == 4
        for i, a in enumerate(adapters):
            ref = _loaded(base, a)
            assert set(cs.keys) <= set(ref)
            for key in cs.keys:
                got = cs.get(i, key).double()
                if key in cs.adapted:  # W + s B A, as PEFT computes it
                    assert float((got - ref[key]).abs().max()) < TOL, (a.name, key)
                    assert not torch.equal(got, cs.get((i + 1) % 3, key).double())
                else:  # the base's own tensor, untouched
                    assert torch.equal(got, ref[key]), key


def test_eval_scores_an_adapter_as_the_model_peft_merges(loras, tmp_path):
    base, adapters, val = loras
    merged = peft.PeftModel.from_pretrained(_base_model(base), str(adapters[2])).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(base / name, tmp_path / "merged" / name)
    scores = []
    for candidate in (adapters[2], tmp_path / "merged"):
        r = _run("eval", candidate, "--val", val, "--json")
        assert r.exit_code == 0, r.output
        scores.append(json.loads(r.stdout)["checkpoints"][0])
    assert scores[0]["n"] == scores[1]["n"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-6)


def test_average_writes_the_adapter_peft_cat_makes(loras, tmp_path):
    from safetensors.torch import load_file

    base, adapters, _ = loras
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / "avg"
    r = _run("average", *adapters, "--weights", "5,3,2", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["adapters"]["rank"] == 4 and summary["adapters"]["modules"] == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 12, False)
    assert config["base_model_name_or_path"] == str(base) and sorted(config["target_modules"]) == TARGETS
    factors = load_file(str(out / "adapter_model.safetensors"))
    assert {tuple(t.shape) for k, t in factors.items() if "lora_A" in k} == {(12, 32)}
    # The merged adapter loads in PEFT, and its effect is PEFT's own cat merge of the same weights.
    mine, ref = _loaded(base, out), _peft_cat(base, adapters, weights)
    assert set(mine) == set(ref)
    for key in ref:
        assert float((mine[key] - ref[key]).abs().max()) < TOL, key
    # ... which is base + sum_k w_k s_k B_k A_k, each adapter's update taken from PEFT.
    each = [_loaded(base, a) for a in adapters]
    plain = {k: v.detach().double() for k, v in _base_model(base).state_dict().items()}
    for key in ref:
        expected = plain[key] + sum(w * (e[key] - plain[key]) for w, e in zip(weights, each))
        assert float((mine[key] - expected).abs().max()) < TOL, key
    # The base is not needed for an adapter output: nothing but the adapters was hashed or written.
    assert [s["sha256"] for s in summary["inputs"]] == [
        hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest() for a in adapters]


def test_average_into_the_base_and_ema(loras, tmp_path):
    import transformers

    base, adapters, _ = loras
    full, lora = tmp_path / "full", tmp_path / "ema"
    for out, extra in ((full, ["--merge-into-base"]), (lora, [])):
        r = _run("average", *adapters, "--ema", "0.5", "-o", out, *extra, "-q")
        assert r.exit_code == 0, r.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in full.iterdir()}
    assert not (full / "adapter_config.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(str(full), local_files_only=True)
    mine = {k: v.detach().double() for k, v in model.state_dict().items()}
    ref = _loaded(base, lora)  # the same EMA written as an adapter, merged by PEFT
    for key in ref:
        assert float((mine[key] - ref[key]).abs().max()) < TOL, key
    assert json.loads((lora / "adapter_config.json").read_text())["r"] == 12


def test_fit_writes_an_adapter_whose_effect_is_the_learned_merge(loras, tmp_path):
    from safetensors import safe_open

    base, adapters, val = loras
    out, report = tmp_path / "merged", tmp_path / "r.json"
    r = _run("fit", *adapters, "--val", val, "-o", out, "--report", report, "--epochs", "1", "--batch-size", "8",
             "--no-greedy", "--min-steps", "4", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["adapters"]["base_dir"] == str(base) and [c["format"] for c in rep["candidates"]] == ["peft-lora"] * 3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12
    assert (out / "tokenizer.json").is_file()  # the tokenizer the data used: the base's (the adapters have none)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["twamerge.method"] == "twa"
    # Every adapted module: base + sum_k alpha_k s_k B_k A_k with the alphas of its block, as PEFT loads it.
    alphas, key_block = rep["merge"]["block_alphas"], rep["merge"]["key_block"]
    mine = _loaded(base, out)
    plain = {k: v.detach().double() for k, v in _base_model(base).state_dict().items()}
    each = [_loaded(base, a) for a in adapters]
    adapted = [k for k in plain if any(f".{t}." in k for t in TARGETS)]
    assert len(adapted) == 4
    for key in plain:
        w = alphas[key_block[key]] if key in key_block else None
        if key in adapted:
            assert len({round(x, 9) for x in w}) > 1  # learned per block, not uniform
            expected = plain[key] + sum(a * (e[key] - plain[key]) for a, e in zip(w, each))
        else:
            expected = plain[key]
        assert float((mine[key] - expected).abs().max()) < TOL, key
    # apply writes the same adapter again, byte for byte; and the same merge into the base.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _run("apply", report, *adapters, "-o", out, "--force", "-q")
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    full = tmp_path / "full"
    r = _run("apply", report, *adapters, "-o", full, "--merge-into-base", "-q")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    merged = load_file(str(full / "model.safetensors"))
    for key in adapted:
        assert float((merged[key].double() - mine[key]).abs().max()) < TOL, key


def _cli_error(*args) -> str:
    r = _run(*args)
    assert r.exit_code != 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    return lines[0]


def test_adapters_that_differ_are_refused_naming_the_difference(loras, tmp_path):
    base, adapters, val = loras
    other_targets = _save_adapter(base, tmp_path / "kv", 7, target_modules=["k_proj", "v_proj"])
    assert "adapt different modules" in (e := _cli_error("average", adapters[0], other_targets, "-o", tmp_path / "o"))
    assert "k_proj" in e or "q_proj" in e
    rank8 = _save_adapter(base, tmp_path / "r8", 8, r=8)
    assert "different ranks (r=4 and r=8)" in _cli_error("average", adapters[0], rank8, "-o", tmp_path / "o")
    # Another base: a copy of the base folder elsewhere is a different base_model_name_or_path.
    shutil.copytree(base, tmp_path / "base2")
    moved = shutil.copytree(adapters[1], tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base2")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    e = _cli_error("fit", adapters[0], moved, "--val", val, "-o", tmp_path / "o")
    assert "different bases" in e and "base2" in e
    assert not (tmp_path / "o").exists()


def test_the_base_comes_from_model_when_it_is_not_local(loras, tmp_path):
    base, adapters, val = loras
    hub = []
    for a in adapters[:2]:
        copy = shutil.copytree(a, tmp_path / a.name)
        config = json.loads((copy / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
        (copy / "adapter_config.json").write_text(json.dumps(config))
        hub.append(copy)
    e = _cli_error("fit", *hub, "--val", val, "-o", tmp_path / "o", "--epochs", "0")
    assert "'meta-llama/Llama-3.2-1B' (base_model_name_or_path) is not a local folder; pass --model BASE_DIR" in e
    assert "--model BASE_DIR" in _cli_error("average", *hub, "--merge-into-base", "-o", tmp_path / "o")
    r = _run("average", *hub, "-o", tmp_path / "a", "-q")  # an adapter output needs no base
    assert r.exit_code == 0, r.output
    r = _run("average", *hub, "--merge-into-base", "--model", base, "-o", tmp_path / "b", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_what_cannot_be_merged_is_a_one_line_error(loras, tmp_path):
    base, adapters, _ = loras
    dora = _save_adapter(base, tmp_path / "dora", 9, use_dora=True)
    assert "use_dora=true (DoRA" in _cli_error("average", adapters[0], dora, "-o", tmp_path / "o")
    assert "is a LoRA adapter and" in _cli_error("average", adapters[0], base, "-o", tmp_path / "o")
    e = _cli_error("average", *adapters, "-o", tmp_path / "o.safetensors")
    assert "adapter folder" in e and "--merge-into-base" in e
    assert "sum to 2" in _cli_error("average", *adapters, "--weights", "1,0.5,0.5", "--no-normalize", "-o",
                                    tmp_path / "o")
    assert not any(tmp_path.glob("o*"))


def test_inspect_describes_adapters_as_adapters(loras, tmp_path):
    base, adapters, _ = loras
    r = _run("inspect", *adapters, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["mergeable"] is True and info["adapters"]["base_dir"] == str(base)
    assert [f["format"] for f in info["files"]] == ["peft-lora"] * 3
    assert [f["lora"]["scaling"] for f in info["files"]] == [2.0, 4.0, 4.0]  # 8/4, 16/4, 8/sqrt(4)
    assert info["similarity"]["rank"] == 2
    r = _run("inspect", adapters[0], _save_adapter(base, tmp_path / "r8", 8, r=8), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["mergeable"] is False and "different ranks" in info["reason"]


def test_conv1d_embedding_and_whole_tensors(tmp_path):
    """GPT-2: LoRA on its Conv1D attention (fan_in_fan_out: the update is (B A)^T) and on the token embedding
    (lora_embedding_A/B), with a module saved whole (modules_to_save); merged, loaded by PEFT, merged into the base."""
    import transformers

    base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=32, bos_token_id=0,
                                                         eos_token_id=0)).save_pretrained(str(base))

    def load():
        return transformers.GPT2LMHeadModel.from_pretrained(str(base), local_files_only=True)

    adapters = []
    for i in range(3):
        model = peft.get_peft_model(load(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "wte"],
                                                             modules_to_save=["ln_f"], fan_in_fan_out=True))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(tmp_path / f"a{i}"))
        adapters.append(tmp_path / f"a{i}")
    weights = [0.5, 0.3, 0.2]
    for out, extra in ((tmp_path / "out", []), (tmp_path / "full", ["--merge-into-base"])):
        r = _run("average", *adapters, "--weights", "5,3,2", "-o", out, "-q", *extra)
        assert r.exit_code == 0, r.output

    def effective(model):
        return {k: v.detach().double() for k, v in model.merge_and_unload().state_dict().items()}

    mine = effective(peft.PeftModel.from_pretrained(load(), str(tmp_path / "out")))
    each = [effective(peft.PeftModel.from_pretrained(load(), str(a))) for a in adapters]
    plain = {k: v.detach().double() for k, v in load().state_dict().items()}
    changed = [k for k in plain if any(not torch.equal(e[k], plain[k]) for e in each)]
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight"} <= set(changed)
    full = {k: v.detach().double() for k, v in
            transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "full"), local_files_only=True)
            .state_dict().items()}
    for key in plain:
        expected = plain[key] + sum(w * (e[key] - plain[key]) for w, e in zip(weights, each))
        assert float((mine[key] - expected).abs().max()) < TOL, key
        assert float((full[key] - expected).abs().max()) < TOL, key


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_merge_into_the_base_records_the_base_sha256(loras, tmp_path):
    """The base is part of what a merge into it is made of: its SHA-256 is in the fit's report, in the metadata and
    the model card of every --merge-into-base output (fit, apply, average), and apply refuses another base."""
    import transformers

    base, adapters, val = loras
    base_sha = _sha(base / "model.safetensors")
    report = tmp_path / "r.json"
    r = _run("fit", *adapters, "--val", val, "-o", tmp_path / "lora", "--report", report, "--epochs", "0",
             "--no-greedy", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(report.read_text())["adapters"]["base_sha256"] == base_sha
    # The adapter output holds no base weights: no base in its metadata (apply's adapter needs no base either).
    assert "twamerge.base" not in _metadata(tmp_path / "lora" / "adapter_model.safetensors")

    full = tmp_path / "full"
    r = _run("apply", report, *adapters, "-o", full, "--merge-into-base", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base"] == {"path": str(base), "sha256": base_sha}
    assert json.loads(_metadata(full / "model.safetensors")["twamerge.base"]) == {"path": str(base),
                                                                                  "sha256": base_sha}
    assert f"(weights SHA-256 `{base_sha}`)" in (full / "README.md").read_text()

    # fit --merge-into-base records it too, and apply of its report writes the same bytes again.
    fit_full, report2 = tmp_path / "fit_full", tmp_path / "r2.json"
    r = _run("fit", *adapters, "--val", val, "-o", fit_full, "--report", report2, "--epochs", "0", "--no-greedy",
             "--merge-into-base", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(_metadata(fit_full / "model.safetensors")["twamerge.base"])["sha256"] == base_sha
    before = {p.name: p.read_bytes() for p in fit_full.iterdir()}
    r = _run("apply", report2, *adapters, "-o", fit_full, "--merge-into-base", "--force", "-q")
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in fit_full.iterdir()} == before

    # Another base (same shapes, other weights): apply refuses it, naming both hashes' starts.
    other = transformers.LlamaForCausalLM.from_pretrained(str(base), local_files_only=True)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(str(tmp_path / "other"))
    other_sha = _sha(tmp_path / "other" / "model.safetensors")
    for rep in (report, report2):
        e = _cli_error("apply", rep, *adapters, "-o", tmp_path / "o", "--merge-into-base", "--model",
                       tmp_path / "other")
        assert f"SHA-256 {other_sha[:12]}... differs from the fit's base ({base_sha[:12]}..." in e, e
    bad = json.loads(report.read_text())
    bad["adapters"]["base_sha256"] = "not a hash"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert "not 64 hex digits" in _cli_error("apply", tmp_path / "bad.json", *adapters, "-o", tmp_path / "o",
                                             "--merge-into-base")
    assert not (tmp_path / "o").exists()

    # average --merge-into-base: the summary and the metadata; --no-hash leaves every hash out.
    avg = tmp_path / "avg"
    r = _run("average", *adapters, "-o", avg, "--merge-into-base", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base"]["sha256"] == base_sha
    assert json.loads(_metadata(avg / "model.safetensors")["twamerge.base"])["sha256"] == base_sha
    assert base_sha in (avg / "README.md").read_text()
    r = _run("average", *adapters, "-o", tmp_path / "nohash", "--merge-into-base", "--no-hash", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base"] is None
    assert "twamerge.base" not in _metadata(tmp_path / "nohash" / "model.safetensors")


def test_eval_scores_adapters_of_different_ranks_in_one_command(loras, tmp_path):
    """A merged adapter (rank K r) is scored beside its candidates (rank r): eval needs one base, not one rank."""
    base, adapters, val = loras
    out = tmp_path / "avg"
    assert _run("average", *adapters, "-o", out, "-q").exit_code == 0
    r = _run("eval", adapters[0], out, "--val", val, "--json")
    assert r.exit_code == 0, r.output
    both = json.loads(r.stdout)["checkpoints"]
    alone = json.loads(_run("eval", out, "--val", val, "--json").stdout)["checkpoints"]
    assert [c["path"] for c in both] == [str(adapters[0]), str(out)]
    assert both[1]["loss"] == pytest.approx(alone[0]["loss"], rel=1e-6) and both[0]["loss"] != both[1]["loss"]
    # Merging them is still refused: a merge of adapters needs one rank.
    assert "different ranks (r=4 and r=12)" in _cli_error("average", adapters[0], out, "-o", tmp_path / "o")
