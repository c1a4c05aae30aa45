"""What a merged folder says about itself: its README.md model card, and the side files it carries.

On tiny Llama fine-tunes saved as a Trainer saves checkpoints (weights, config, tokenizer, and a
training run's state beside them): the card's front matter parses as YAML, its candidates carry
their files' SHA-256, its table every method with the metric's direction, and its command writes
the same folder again; only data-only side files are copied; the tokenizer comes from ``--tokenizer``
or ``--model`` when the candidates have none.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.io.model_card import average_card, fit_card

pytest.importorskip("transformers")
runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "8", "--no-greedy", "--min-steps", "4"]
TRAINER_STATE = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "modeling_helper.py")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def trainer_dirs(lm, tmp_path):
    """The ``lm`` fine-tunes as Trainer checkpoint folders: a training run's state and a stray .py beside them."""
    dirs, val, _ = lm
    out = []
    for i, d in enumerate(dirs):
        copy = shutil.copytree(d, tmp_path / "out" / f"checkpoint-{(i + 1) * 25}")
        for name in TRAINER_STATE:
            (copy / name).write_text('{"global_step": 25}' if name.endswith(".json") else "x")
        out.append(copy)
    return out, val


def test_a_fit_folder_gets_a_card_that_reproduces_it(trainer_dirs, tmp_path, monkeypatch):
    dirs, val = trainer_dirs
    monkeypatch.chdir(tmp_path)  # the card's command uses the paths as given: relative ones, run from here
    rel = [d.relative_to(tmp_path) for d in dirs]
    r = _run("fit", *rel, "--val", val, "-o", "merged", "--report", "r.json", *FAST)
    assert r.exit_code == 0, r.output
    out = tmp_path / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & set(TRAINER_STATE)  # no trainer state (a global_step the merge does not have), no code
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["tags"] == ["merge", "twamerge"]
    report = json.loads((tmp_path / "r.json").read_text())
    for d in dirs:  # every candidate with the SHA-256 of its weights
        assert f"`{d.relative_to(tmp_path)}`" in card and _sha(d / "model.safetensors") in card
    assert "perplexity (lower is better)" in card and f"On {report['heldout_rows']} held-out rows" in card
    for m in report["methods"]:
        row = next(line for line in card.splitlines() if line.startswith(f"| {m['name']} ")
                   or line.startswith(f"| **{m['name']}**"))
        assert f"{m['heldout']['metric']:.4f}" in row and f"{m['heldout']['loss']:.4f}" in row
    assert "| **twa** (written) |" in card
    command = next(line for line in card.splitlines() if line.startswith("twamerge apply"))
    assert command == "twamerge apply r.json " + " ".join(str(p) for p in rel) + " -o merged"
    # The card's own command, run as written, writes the same folder (the card included).
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _run(*shlex.split(command)[1:], "--force")
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_single_file_output_gets_no_card(lm, tmp_path):
    dirs, val, _ = lm
    r = _run("average", *dirs, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_an_average_card_names_its_weights_and_its_command(trainer_dirs, tmp_path, monkeypatch):
    dirs, _ = trainer_dirs
    monkeypatch.chdir(tmp_path)
    r = _run("average", *[d.relative_to(tmp_path) for d in dirs], "--ema", "0.5", "-o", "avg")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "avg" / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "transformers"
    assert "exponential moving average (decay 0.5)" in card and "| 0.5000 |" in card and "| 0.2500 |" in card
    assert not {p.name for p in (tmp_path / "avg").iterdir()} & set(TRAINER_STATE)
    command = next(line for line in card.splitlines() if line.startswith("twamerge average"))
    before = (tmp_path / "avg" / "model.safetensors").read_bytes()
    r = _run(*shlex.split(command)[1:], "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "avg" / "model.safetensors").read_bytes() == before


def test_the_tokenizer_comes_from_tokenizer_or_model(lm, tmp_path):
    from text_fixtures import TOKENIZER_FILES

    dirs, val, _ = lm
    bare = []
    for d in dirs:  # checkpoints saved without tokenizer files
        copy = shutil.copytree(d, tmp_path / "bare" / d.name)
        for name in TOKENIZER_FILES:
            (copy / name).unlink()
        bare.append(copy)
    r = _run("fit", *bare, "--val", val, "-o", tmp_path / "a", "--tokenizer", dirs[0], *FAST, "--epochs", "0")
    assert r.exit_code == 0, r.output
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (dirs[0] / name).read_bytes()
    # The weight files of the Trainer folders, with --model naming one of the folders: its tokenizer and config.
    files = [d / "model.safetensors" for d in dirs]
    r = _run("fit", *files, "--val", val, "--model", dirs[1], "-o", tmp_path / "b", *FAST, "--epochs", "0")
    assert r.exit_code == 0, r.output
    assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= {p.name for p in
                                                                                 (tmp_path / "b").iterdir()}
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (dirs[1] / "tokenizer.json").read_bytes()


def test_cards_stay_valid_whatever_the_names_hold():
    odd = 'base "x"\n- evil: yes | col'
    report = {"candidates": [{"path": "a|b\nc", "sha256": "0" * 64}], "methods": [
        {"name": "twa", "kind": "twa", "fit": {"loss": 1.0, "metric": 0.5}, "heldout": None}],
        "metric_name": "accuracy", "higher_is_better": True, "heldout_rows": 0, "written": {"name": "twa"},
        "settings": {"blocks": "layer", "bits": 8}, "merge": {"block_alphas": [[1.0]]}}
    card = fit_card(report, library_name="peft", base_model=odd)
    assert _front_matter(card) == {"library_name": "peft", "base_model": odd, "tags": ["merge", "twamerge"]}
    assert "accuracy (higher is better)" in card and "`--holdout 0`" in card and "| `a\\|b c` |" in card
    assert "wrote no report" in card  # no report, no apply command to give
    card = average_card({"method": "uniform", "weights": [1.0], "inputs": report["candidates"]}, library_name=None,
                        base_model=None)
    assert _front_matter(card) == {"tags": ["merge", "twamerge"]}
