"""No code from a candidate folder runs unless --trust-remote-code says so.

A folder whose config.json (or tokenizer_config.json) has an ``auto_map`` loads only by importing the
folder's own Python files; transformers, left to decide, asks on a terminal and runs them on "y". The
folders here hold such files, each writing a marker when it is imported: the marker must never appear
without the flag, with the command run on a pseudo-terminal that answers "y" to any question, and
must appear with it.
"""

from __future__ import annotations

import ast
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_fixtures import minilm_dir
from text_fixtures import VOCAB, sentences, write_jsonl
from typer.testing import CliRunner

from twamerge.cli import app

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _marker_line(marker: Path, name: str) -> str:
    return f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"


def _llama(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / name, folder / name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``model``: two Llama checkpoints whose config.json names a custom config and model class (in
    configuration_x.py and modeling_x.py, which subclass Llama's); ``tokenizer``: two plain Llama
    checkpoints whose tokenizer_config.json names a custom tokenizer class (tokenization_x.py)."""
    root = tmp_path_factory.mktemp("remote")
    marker = root / "marker"
    out = {"root": root, "marker": marker, "model": [], "tokenizer": []}
    for i in range(2):
        d = root / "model" / f"ft{i + 1}"
        _llama(d, i)
        config = json.loads((d / "config.json").read_text())
        config.update(model_type="x-llama", architectures=["XForCausalLM"],
                      auto_map={"AutoConfig": "configuration_x.XConfig",
                                "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
        (d / "config.json").write_text(json.dumps(config))
        (d / "configuration_x.py").write_text(_marker_line(marker, "configuration_x") + (
            "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = 'x-llama'\n"))
        (d / "modeling_x.py").write_text(_marker_line(marker, "modeling_x") + (
            "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
            "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"))
        out["model"].append(d)
        d = root / "tokenizer" / f"ft{i + 1}"
        _llama(d, i)
        tok_config = json.loads((d / "tokenizer_config.json").read_text())
        tok_config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
        (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
        (d / "tokenization_x.py").write_text(_marker_line(marker, "tokenization_x") + (
            "from transformers import BertTokenizer\n\n\nclass XTokenizer(BertTokenizer):\n    pass\n"))
        out["tokenizer"].append(d)
    out["val"] = write_jsonl(root / "val.jsonl", [{"text": t} for t in sentences(12)])
    return out


def _env(folders) -> dict[str, str]:
    # Where transformers would copy the folder's code to import it: inside the test's folder, never ~/.cache.
    return {**os.environ, "HF_MODULES_CACHE": str(folders["root"] / "modules"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run ``python -m twamerge ARGS`` with stdin, stdout and stderr on a pseudo-terminal that answers "y" to
    anything it is asked; its exit code and everything it printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "twamerge", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    os.write(master, b"y\n")  # typed ahead: an input() call reads it at once
    seen, answered, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
                if seen.count(b"[y/N]") > answered:  # transformers' question: say yes again
                    answered += 1
                    os.write(master, b"y\n")
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, seen.decode(errors="replace").replace("\r\n", "\n")


def _one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_folder_with_custom_model_code_is_refused_on_a_terminal_answering_yes(folders, tmp_path):
    out = tmp_path / "merged"
    code, output = _on_a_terminal(["fit", *map(str, folders["model"]), "--val", str(folders["val"]), "-o", str(out),
                                   "--epochs", "0", "--json"], _env(folders))
    assert code == 1, output
    error = _one_error(output)
    assert "config.json: auto_map AutoConfig: configuration_x.XConfig is Python code from that folder" in error
    assert "--trust-remote-code" in error and "trust_remote_code=True" not in output
    assert "Do you wish to run the custom code" not in output and "[y/N]" not in output
    assert not folders["marker"].exists() and not out.exists()


def test_a_folder_with_a_custom_tokenizer_is_refused_on_a_terminal_answering_yes(folders, tmp_path):
    code, output = _on_a_terminal(["eval", str(folders["tokenizer"][0]), "--val", str(folders["val"]), "--json"],
                                  _env(folders))
    assert code == 1, output
    error = _one_error(output)
    assert ("tokenizer_config.json: auto_map AutoTokenizer: tokenization_x.XTokenizer is Python code from that "
            "folder, which twamerge runs only with --trust-remote-code") in error
    assert "[y/N]" not in output and not folders["marker"].exists()


def test_trust_remote_code_runs_the_folders_code(folders, tmp_path):
    """The opt-in works: the folder's classes are imported (the markers), the model is the folder's class, and
    its task comes from the auto_map (AutoModelForCausalLM: a causal LM)."""
    try:
        r = subprocess.run([sys.executable, "-m", "twamerge", "eval", str(folders["model"][0]), "--val",
                            str(folders["val"]), "--json", "--trust-remote-code"], capture_output=True, text=True,
                           env=_env(folders), cwd=ROOT, timeout=240)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["task"] == "causal-lm"
        assert "--trust-remote-code: running modeling_x.XForCausalLM" in r.stderr
        assert {"configuration_x", "modeling_x"} <= set(folders["marker"].read_text().split())
    finally:
        folders["marker"].unlink(missing_ok=True)  # the other tests check that nothing wrote it


def test_average_reads_no_code_and_copies_no_python_file(folders, tmp_path):
    out = tmp_path / "merged"
    r = CliRunner().invoke(app, ["average", *map(str, folders["model"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file()
    assert not list(out.glob("*.py")), sorted(p.name for p in out.iterdir())
    assert not folders["marker"].exists()


def test_every_transformers_loading_call_says_trust_remote_code():
    """Left unset, transformers decides (and asks on a terminal): every from_pretrained call in twamerge passes
    trust_remote_code explicitly."""
    calls = []
    for path in sorted((ROOT / "twamerge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "from_pretrained":
                calls.append((str(path.relative_to(ROOT)), node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 3  # config, tokenizer, image processor
    assert not [(name, line) for name, line, keywords in calls if "trust_remote_code" not in keywords]
