"""Project settings (twamerge/settings.py) and the plain command `twamerge fit ckpts/*.safetensors --val data/`:
the settings file is found and read, checked against every command's options, applied under the command line,
recorded in the report; the model is found where the candidates are; -o has a default."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_fixtures import small_state_dict
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.cli_options import SETTINGS
from twamerge.errors import InvalidArgumentError, ModelError
from twamerge.models import model_folder
from twamerge.prepare import hf_dirs
from twamerge.settings import find_settings, load_settings, read_settings

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "project"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _project(root: Path, text: str, name: str = "pyproject.toml") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
    return root


def _pair(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        paths.append(folder / f"c{i}.safetensors")
        save_file(small_state_dict(i), str(paths[-1]))
    return paths


def _error(r) -> str:
    """The one ``error:`` line, last on stderr (log lines may come before it)."""
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.output
    return errors[0]


# ---- finding and reading the file ----------------------------------------------------------------------------------

def test_the_nearest_folder_with_settings_wins_and_a_pyproject_without_the_table_is_passed_by(tmp_path):
    _project(tmp_path, "[tool.twamerge]\nseed = 1\n")
    _project(tmp_path / "a", "[project]\nname = 'x'\n")  # no [tool.twamerge]: not a settings file
    (tmp_path / "a" / "b").mkdir()
    assert find_settings(tmp_path / "a" / "b") == tmp_path / "pyproject.toml"
    _project(tmp_path / "a", "seed = 2\n", name="twamerge.toml")
    assert find_settings(tmp_path / "a" / "b") == tmp_path / "a" / "twamerge.toml"
    # In one folder, twamerge.toml wins over the pyproject.toml table.
    _project(tmp_path / "a", "[tool.twamerge]\nseed = 3\n")
    assert find_settings(tmp_path / "a") == tmp_path / "a" / "twamerge.toml"


def test_no_settings_file_is_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if find_settings() is not None:  # a settings file above the temporary folder would be read too
        pytest.skip(f"{find_settings()} is above the temporary folder")
    assert read_settings(None) is None


@pytest.mark.parametrize("name, text, error", [
    ("pyproject.toml", "[project]\nname = 'x'\n", "pyproject.toml: no [tool.twamerge] table"),
    ("pyproject.toml", "[tool.twamerge\n", "pyproject.toml: not valid TOML"),
    ("ci.toml", "epochs = \n", "ci.toml: not valid TOML"),
])
def test_a_file_that_is_not_settings_is_one_error_naming_it(tmp_path, name, text, error):
    path = _project(tmp_path, text, name) / name
    with pytest.raises(InvalidArgumentError, match=re.escape(error)):
        load_settings(path)


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    r = _run("inspect", tmp_path / "a.safetensors", "--config", tmp_path / "nope.toml")
    assert r.exit_code == 2 and "nope.toml: cannot read the settings" in _error(r)


# ---- values: types, forms, bounds ----------------------------------------------------------------------------------

def _resolve(tmp_path: Path, text: str, command: str = "fit") -> dict:
    path = _project(tmp_path, text) / "pyproject.toml"
    return {k: s.value for k, s in load_settings(path).resolve(command, SETTINGS).items()}


@pytest.mark.parametrize("text, param, value", [
    ('model-args = {width = 256, act = "relu"}', "model_arg", {"width": 256, "act": "relu"}),
    ('model-args = ["width=256", "act=relu"]', "model_arg", {"width": 256, "act": "relu"}),
    ('max-shard-size = "2GB"', "max_shard_size", 2_000_000_000),
    ("max-shard-size = 4096", "max_shard_size", 4096),
    ('inputs = "x,y"', "inputs", ("x", "y")),
    ('inputs = ["x", "y"]', "inputs", ("x", "y")),
    ("bits = 4", "bits", 4),
    ("lr = 1", "lr", 1.0),
    ("greedy = false", "greedy", False),
    ("fail-if-worse = true", "fail_if_worse", True),
    ('init = "greedy"', "init", "greedy"),
    ("verbose = 1", "verbose", 1),
])
def test_a_value_is_the_option_s_type_in_its_command_line_or_its_own_form(tmp_path, monkeypatch, text, param, value):
    monkeypatch.chdir(tmp_path)
    got = _resolve(tmp_path, f"[tool.twamerge.fit]\n{text}\n")
    assert got == {param: value} and type(got[param]) is type(value)


@pytest.mark.parametrize("text, error", [
    ('[tool.twamerge.fit]\nepochs = "ten"', '[tool.twamerge.fit]: epochs = "ten": expected an integer >= 0'),
    ("[tool.twamerge.fit]\nepochs = 3.0", "epochs = 3.0: expected an integer >= 0"),
    ("[tool.twamerge.fit]\nepochs = -1", "epochs = -1: expected an integer >= 0"),
    ("[tool.twamerge.fit]\nholdout = 0.99", "holdout = 0.99: expected a number from 0.0 to 0.95"),
    ("[tool.twamerge.fit]\nbits = true", 'bits = true: expected one of 1, 2, 4, 8, 16 or 32'),
    ("[tool.twamerge.fit]\nbits = 3", 'bits = 3: expected one of 1, 2, 4, 8, 16 or 32'),
    ('[tool.twamerge.fit]\ninit = "mean"', 'init = "mean": expected one of "uniform", "greedy" or "best"'),
    ('[tool.twamerge.fit]\ngreedy = "no"', 'greedy = "no": expected true or false'),
    ("[tool.twamerge]\nmodel-args = 3", "[tool.twamerge]: model-args = 3: expected a list of strings or a table"),
    ('[tool.twamerge]\nmax-shard-size = "lots"', "max-shard-size = \"lots\": size 'lots' is not a byte count"),
    ("[tool.twamerge]\noutput = 1", "output = 1: expected a path (a string)"),
    # A shared key must suit every command that has it; the error says which does not.
    ("[tool.twamerge]\ngroup-size = 4", "group-size = 4: expected an integer >= 8 (for twamerge inspect)"),
    ("[tool.twamerge.fit]\nepoch = 3", "[tool.twamerge.fit]: unknown key 'epoch' (not an option of twamerge fit); "
                                       "did you mean epochs?"),
    ("[tool.twamerge]\nfail_if_worse = true", "[tool.twamerge]: unknown key 'fail_if_worse' (not an option of any "
                                              "twamerge command); did you mean fail-if-worse?"),
    # Every command's table is checked, whichever command runs.
    ("[tool.twamerge.eval]\nepochs = 3", "[tool.twamerge.eval]: unknown key 'epochs' (not an option of twamerge "
                                         "eval)"),
    ("[tool.twamerge]\nfit = 3", "[tool.twamerge]: fit = 3: expected a table of the options of twamerge fit"),
    ('[tool.twamerge]\nconfig = "other.toml"', 'config = "other.toml": a settings file cannot name another'),
    # A repository's settings must not switch on running a candidate folder's code.
    ("[tool.twamerge.fit]\ntrust-remote-code = true", "trust-remote-code is accepted on the command line only"),
])
def test_a_wrong_key_or_type_is_one_usage_error_naming_file_key_and_what_was_expected(tmp_path, monkeypatch, text,
                                                                                     error):
    monkeypatch.chdir(_project(tmp_path, text + "\n"))
    paths = _pair(tmp_path / "ckpts")
    r = _run("average", *paths)
    assert r.exit_code == 2 and _error(r).startswith("error: pyproject.toml [tool.twamerge") and error in _error(r)
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_value_the_config_refuses_says_where_it_was_set(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, "[tool.twamerge.fit]\nlr = -1\n"))
    r = _run("fit", tmp_path / "a.safetensors", "--val", tmp_path / "v")
    assert r.exit_code == 2 and _error(r) == ("error: lr=-1.0 is invalid; expected a positive number (set by lr in "
                                              "pyproject.toml [tool.twamerge.fit])")


# ---- applied under the command line ------------------------------------------------------------------------------

def _weights(path: Path) -> float:
    """The share of the second candidate in an average of the two ``_pair`` files (their fc.bias differ)."""
    merged, a, b = (load_file(str(p))["fc.bias"].double() for p in (path, *_pair(path.parent / "_ref")))
    return float(((merged - a) @ (b - a)) / ((b - a) @ (b - a)))


def test_settings_apply_per_command_over_shared_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, """\
[tool.twamerge]
output = "shared.safetensors"
val = "data/"          # an option of fit and eval: shared keys go to the commands that have them
weights = "1,1"

[tool.twamerge.average]
output = "out/average.safetensors"
weights = [1, 3]
normalize = false
"""))
    paths = _pair(tmp_path / "ckpts")
    r = _run("-q", "average", *paths, "--normalize", "--json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out" / "average.safetensors"  # [tool.twamerge.average] over [tool.twamerge]
    assert json.loads(r.stdout)["outputs"][0]["path"] == str(Path("out/average.safetensors"))
    # --normalize, typed on the command line though it is the default, wins over the file's normalize = false.
    assert _weights(out) == pytest.approx(0.75, abs=1e-5)
    # What the command line leaves out still comes from the file: normalize = false, so 1,1 is a sum.
    r = _run("-q", "average", *paths, "--weights", "1,1", "-o", "cli.safetensors")
    assert r.exit_code == 0, r.output
    a, b = (load_file(str(p))["fc.bias"] for p in paths)
    assert load_file("cli.safetensors")["fc.bias"].allclose(a + b)


def test_paths_in_the_file_are_read_from_its_folder(tmp_path, monkeypatch):
    _project(tmp_path, '[tool.twamerge.average]\noutput = "out/avg.safetensors"\n')
    paths = _pair(tmp_path / "ckpts")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    r = _run("-q", "average", *paths)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "avg.safetensors").is_file() and not (tmp_path / "sub" / "out").exists()


def test_config_file_replaces_the_discovered_one(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, '[tool.twamerge.average]\noutput = "found.safetensors"\n'))
    _project(tmp_path / "ci", '[average]\noutput = "ci.safetensors"\n', name="ci.toml")
    paths = _pair(tmp_path / "ckpts")
    r = _run("-q", "average", *paths, "--config", tmp_path / "ci" / "ci.toml")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ci" / "ci.safetensors").is_file() and not (tmp_path / "found.safetensors").exists()


def test_the_output_defaults_to_merged_safetensors_and_is_not_overwritten_without_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = _pair(tmp_path / "ckpts")
    r = _run("-q", "average", *paths)
    assert r.exit_code == 0 and (tmp_path / "merged.safetensors").is_file(), r.output
    before = (tmp_path / "merged.safetensors").read_bytes()
    r = _run("average", *paths, "--weights", "1,3")
    assert r.exit_code == 1 and "--force" in _error(r)
    assert (tmp_path / "merged.safetensors").read_bytes() == before
    r = _run("-q", "average", *paths, "--weights", "1,3", "--force")
    assert r.exit_code == 0 and (tmp_path / "merged.safetensors").read_bytes() != before


def test_output_help_says_the_default():
    r = _run("fit", "--help")
    assert "merged.safetensors" in " ".join(r.stdout.replace("│", " ").split())


# ---- the model found where it is -------------------------------------------------------------------------------

def test_a_candidate_file_in_a_folder_with_config_json_names_that_folder(tmp_path):
    a, b = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["X"], "hidden_size": 8,
                                                   "_name_or_path": str(d)}))
        (d / "model.safetensors").write_bytes(b"")
    files = [a / "model.safetensors", b / "model.safetensors"]
    assert model_folder(files) == a and model_folder([a, b]) == a  # files or folders alike
    assert hf_dirs(files) == [a, b] and hf_dirs([a / "model.safetensors", a / "model.safetensors"]) == [a]
    # Who saved it and with which version is not a difference; a hyper-parameter is.
    (b / "config.json").write_text(json.dumps({"architectures": ["X"], "hidden_size": 16}))
    with pytest.raises(ModelError, match=r"checkpoint-2/model.safetensors: .*checkpoint-2/config.json differs from "
                                         r".*checkpoint-1/config.json \(hidden_size: 16 vs 8\)"):
        model_folder(files)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(b"")
    with pytest.raises(ModelError, match=r"bare.safetensors: no config.json in its folder, while .*checkpoint-1 has"):
        model_folder([files[0], bare])
    assert model_folder([bare]) is None


def test_no_model_anywhere_is_one_error_naming_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if find_settings() is not None:
        pytest.skip(f"{find_settings()} is above the temporary folder")
    paths = _pair(tmp_path / "ckpts")
    r = _run("fit", *paths, "--val", tmp_path / "data")
    assert r.exit_code == 1, r.output
    line = _error(r)
    assert "folder with config.json" in line and "--model" in line and "model = " in line and "[tool.twamerge]" in line


def test_hf_candidate_files_build_model_and_tokenizer_from_their_folders(clf, tmp_path):
    """`twamerge eval ft*/model.safetensors --val val.jsonl`: no --model, no --tokenizer, the same scores as the
    folders themselves."""
    dirs, val, _, _ = clf
    files = [d / "model.safetensors" for d in dirs]
    by_folder = _run("-q", "eval", *dirs, "--val", val, "--json")
    by_file = _run("-q", "eval", *files, "--val", val, "--json")
    assert by_folder.exit_code == 0 and by_file.exit_code == 0, by_file.output
    scores = [[c["loss"] for c in json.loads(r.stdout)["checkpoints"]] for r in (by_folder, by_file)]
    assert scores[0] == scores[1]
    # One folder whose config differs: the first candidate that differs is named.
    odd = tmp_path / "odd"
    shutil.copytree(dirs[1], odd)
    config = json.loads((odd / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.5
    (odd / "config.json").write_text(json.dumps(config))
    r = _run("eval", files[0], odd / "model.safetensors", "--val", val)
    assert r.exit_code == 1 and f"{odd / 'model.safetensors'}: " in _error(r) and "hidden_dropout_prob" in _error(r)


# ---- exactly `twamerge fit ckpts/*.safetensors --val data/` ----------------------------------------------------------

def test_the_plain_command_runs_as_typed_in_the_example_project(tmp_path):
    """examples/project (the `make demo` project): its pyproject.toml names the model, so the command line carries
    nothing else; the merge goes to the default output, and the report says where each setting came from."""
    spec = importlib.util.spec_from_file_location("project_train", EXAMPLE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    project = train.main(["--out", str(tmp_path / "project"), "--epochs", "4"])
    exe = Path(sys.executable).with_name("twamerge")
    twamerge = shlex.quote(str(exe)) if exe.exists() else f"{shlex.quote(sys.executable)} -m twamerge"
    line = "twamerge fit ckpts/*.safetensors --val data/"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(line.replace("twamerge", twamerge, 1), shell=True, cwd=project, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (project / "merged.safetensors").is_file()
    report = json.loads((project / "report.json").read_text())
    assert len(report["candidates"]) == 4 and report["candidates"][0]["path"] == "ckpts/epoch_01.safetensors"
    assert report["model"]["spec"] == "model.py:build" and report["model"]["args"] == {"hidden": 64}
    assert report["setting_sources"] == {
        "val": "command line",
        "model": "pyproject.toml [tool.twamerge]",
        "model-args": "pyproject.toml [tool.twamerge]",
        "report": "pyproject.toml [tool.twamerge.fit]",
        "holdout": "pyproject.toml [tool.twamerge.fit]",
        "output": "default",
    }
    assert report["settings"]["holdout"] == 0.25 and report["heldout_rows"] > 0
