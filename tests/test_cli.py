"""The CLI as a script sees it: stdout/stderr separation, exit codes, one-line errors, no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_fixtures import small_state_dict, write_variants
from helpers import assert_close
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from twamerge.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _pair(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(small_state_dict(i), str(paths[-1]))
    return paths


def test_import_is_light():
    code = "import sys, twamerge; print(sorted(m for m in ('typer', 'rich', 'triton', 'click') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_average_json_end_to_end_against_numpy(tmp_path):
    paths, sds = write_variants(tmp_path / "in")
    out = tmp_path / "avg.safetensors"
    r = _run("average", *paths, "-o", out, "--weights", "1,1,1,2", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert summary["method"] == "weighted" and summary["weights"] == pytest.approx([0.2, 0.2, 0.2, 0.4])
    assert "wrote" in r.stderr  # logs go to stderr
    merged = load_file(str(out))
    for key, t in merged.items():
        if t.is_floating_point():
            ref = sum(w * sd[key].double().numpy() for w, sd in zip([0.2, 0.2, 0.2, 0.4], sds))
            assert_close(key, torch.from_numpy(ref.astype(np.float32)), t)
    assert summary["outputs"][0]["sha256"] in r.stderr

    r = _run("inspect", *paths, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["mergeable"] and info["count"] == 4 and set(info["basis_memory"]["bytes"]) == {"1", "2", "4", "8"}


def test_average_no_hash_leaves_the_input_hashes_out(tmp_path):
    from safetensors import safe_open

    paths = _pair(tmp_path)
    r = _run("average", *paths, "-o", tmp_path / "o.safetensors", "--no-hash", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [sorted(s) for s in summary["inputs"]] == [["format", "path"]] * 2
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        assert [sorted(s) for s in json.loads(f.metadata()["twamerge.sources"])] == [["format", "path"]] * 2
    r = _run("average", *paths, "-o", tmp_path / "h.safetensors", "--json")  # hashing is the default
    assert [len(s["sha256"]) for s in json.loads(r.stdout)["inputs"]] == [64, 64]


def test_quiet_and_human_output(tmp_path):
    paths = _pair(tmp_path)
    r = _run("-q", "average", *paths, "-o", tmp_path / "o.pt", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and "wrote" in r.stdout
    assert torch.load(tmp_path / "o.pt", weights_only=True)["fc.weight"].dtype == torch.float16
    r = _run("-q", "inspect", *paths)
    assert r.exit_code == 0 and "mergeable: yes" in r.stdout and "basis memory" in r.stdout


def _bad_inputs(tmp_path: Path) -> dict[str, list]:
    good = _pair(tmp_path)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "trunc.safetensors").write_bytes(good[0].read_bytes()[:30])
    torch.save({"w": torch.zeros(1), "p": _Payload(tmp_path / "marker")}, d / "evil.pt")
    shape = small_state_dict(2)
    shape["fc.weight"] = torch.zeros(10, 7)
    save_file(shape, str(d / "shape.safetensors"))
    missing = small_state_dict(3)
    del missing["fc.bias"]
    save_file(missing, str(d / "missing.safetensors"))
    torch.save({**small_state_dict(4), "note": "text"}, d / "nontensor.pt")
    nan = small_state_dict(5)
    nan["conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(d / "nan.safetensors"))
    (tmp_path / "afile").write_text("x")
    return {
        "truncated": [good[0], d / "trunc.safetensors"],
        "malicious": [good[0], d / "evil.pt"],
        "shapes": [good[0], d / "shape.safetensors"],
        "missing": [good[0], d / "missing.safetensors"],
        "non-tensor": [good[0], d / "nontensor.pt"],
        "nonfinite": [good[0], d / "nan.safetensors"],
        "one": [good[0]],
        "zero": [str(tmp_path / "nothing-*.safetensors")],
        "duplicate": [good[0], good[0]],
        "unwritable": good + ["--output-override", tmp_path / "afile" / "o.safetensors"],
    }


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


EXPECT = {
    "truncated": "not a readable safetensors file",
    "malicious": "refusing to unpickle",
    "shapes": "'fc.weight' is [10, 8] float32",
    "missing": "lacks 1 keys",
    "non-tensor": "key 'note' holds a str",
    "nonfinite": "holds 1 NaN",
    "one": "need at least 2 checkpoints, got 1",
    "zero": "matches no checkpoint files",
    "duplicate": "more than once",
    "unwritable": "is not a directory",
}


@pytest.mark.parametrize("case", list(EXPECT))
def test_bad_input_one_line_error_exit_1_no_output(tmp_path, case):
    args = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "merged.safetensors"
    if "--output-override" in args:
        i = args.index("--output-override")
        args, out = args[:i], args[i + 1]
    r = _run("average", *args, "-o", out)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and EXPECT[case] in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not Path(out).exists() and not (tmp_path / "marker").exists()
    if Path(out).parent.is_dir():
        assert [p.name for p in Path(out).parent.iterdir()] == []


def test_allow_nonfinite_proceeds(tmp_path):
    paths = _bad_inputs(tmp_path)["nonfinite"]
    r = _run("-q", "average", *paths, "-o", tmp_path / "o.safetensors", "--allow-nonfinite", "--json")
    assert r.exit_code == 0, r.output
    assert load_file(str(tmp_path / "o.safetensors"))["conv.weight"].isnan().sum() == 1


def test_existing_output_needs_force(tmp_path):
    paths = _pair(tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    r = _run("average", *paths, "-o", out)
    assert r.exit_code == 1 and "--force" in r.stderr and out.read_bytes() == b"keep me"
    r = _run("-q", "average", *paths, "-o", out, "--force")
    assert r.exit_code == 0 and "fc.weight" in load_file(str(out))


def test_verbose_shows_traceback(tmp_path):
    paths = _pair(tmp_path)
    r = _run("-v", "average", paths[0], "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("args", [
    ["average", "--bogus"],
    ["average", "-o", "o.safetensors"],  # no checkpoints (-o has a default: tests/test_settings.py)
    ["average", "a", "b", "-o", "o.safetensors", "--weights", "1,x"],
    ["average", "a", "b", "-o", "o.safetensors", "--weights", "1,1", "--ema", "0.9"],
    ["average", "a", "b", "-o", "o.safetensors", "--ema", "1.5"],
    ["average", "a", "b", "-o", "o.safetensors", "--dtype", "int8"],
])
def test_usage_errors_exit_2(args):
    r = _run(*args)
    assert r.exit_code == 2, r.output


def test_weight_count_mismatch_is_a_usage_error(tmp_path):
    paths = _pair(tmp_path)
    r = _run("average", *paths, "-o", tmp_path / "o.safetensors", "--weights", "1,2,3")
    assert r.exit_code == 2 and "got 3 weights for 2 checkpoints" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).with_name("twamerge")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("twamerge ")
    # Real stdio: stdout is exactly one JSON object, logs and progress go to stderr.
    paths = _pair(tmp_path)
    r = subprocess.run([str(exe), "average", *map(str, paths), "-o", str(tmp_path / "o.safetensors"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["count"] == 2 and len(r.stdout.strip().splitlines()) == 1
    assert "sha256" in r.stderr


# ---- the options are generated from the configs -------------------------------------------------------------------

def _command(name: str):
    import typer

    group = typer.main.get_command(app)
    return group.get_command(group.context_class(group), name)


def test_docs_cli_md_is_up_to_date():
    from twamerge.cli_docs import markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert doc.read_text() == markdown(), "docs/cli.md is stale: run python -m twamerge.cli_docs > docs/cli.md"


@pytest.mark.parametrize("name, configs", [
    ("fit", ("DataConfig", "ModelConfig", "ReadConfig", "FitConfig", "OutputConfig")),
    ("eval", ("DataConfig", "ModelConfig", "EvalConfig")),
    ("average", ("AverageConfig", "ReadConfig")),
    ("inspect", ("InspectConfig",)),
])
def test_every_field_with_a_flag_is_an_option_with_the_field_s_default(name, configs):
    import dataclasses

    from twamerge import config

    options = {o: p for p in _command(name).params if p.param_type_name == "option" for o in p.opts}
    for cls in (getattr(config, c) for c in configs):
        for f in dataclasses.fields(cls):
            if "flag" not in f.metadata:
                continue
            p = options[f.metadata["flag"].split("/")[0]]
            expected = None if f.default is dataclasses.MISSING else f.default
            assert p.default == expected, (name, f.name, p.default, expected)
            assert p.help and p.help == (f.metadata["help"]() if callable(f.metadata["help"]) else f.metadata["help"])


def test_eval_and_inspect_defaults_are_the_config_s():
    from twamerge.config import EvalConfig, FitConfig, InspectConfig

    def default(cmd, flag):
        return next(p.default for p in _command(cmd).params if flag in getattr(p, "opts", ()))

    assert default("eval", "--batch-size") == EvalConfig().batch_size == 64
    assert default("inspect", "--group-size") == InspectConfig().group_size == FitConfig().group_size == 128
    assert default("fit", "--batch-size") == FitConfig().batch_size


def test_task_and_loss_help_list_the_task_names():
    from twamerge.tasks import TASK_NAMES

    helps = {p.opts[0]: p.help for p in _command("eval").params if p.param_type_name == "option"}
    for name in TASK_NAMES:
        assert name in helps["--task"] and name in helps["--loss"]


def test_device_takes_a_cuda_index_and_refuses_an_unknown_one(tmp_path):
    r = _run("eval", tmp_path / "a.safetensors", "--val", tmp_path / "v", "--device", "cuda:1")
    # Past the options: on a machine without CUDA the device is refused, else the missing file is.
    assert r.exit_code == 1 and "is invalid" not in r.stderr, r.output
    r = _run("eval", tmp_path / "a.safetensors", "--val", tmp_path / "v", "--device", "tpu")
    assert r.exit_code == 2 and r.stderr.strip() == "error: device='tpu' is invalid; expected auto, cpu, cuda or cuda:N"


@pytest.mark.parametrize("flags, error", [
    (["--no-greedy", "--init", "greedy"], "init='greedy' is invalid; expected the greedy soup, which --no-greedy "
                                          "turns off"),
    (["--no-candidates", "--init", "best"], "init='best' is invalid; expected candidate scores, which "
                                            "--no-candidates turns off"),
    (["--no-candidates", "--init", "greedy"], None),  # the greedy soup scores the candidates itself
])
def test_init_rules_are_the_config_s_one_line_each(tmp_path, flags, error):
    r = _run("fit", tmp_path / "a.safetensors", "--val", tmp_path / "v", "-o", tmp_path / "m.safetensors", *flags)
    lines = r.stderr.strip().splitlines()
    if error is None:  # accepted: it fails later, on the missing checkpoint
        assert r.exit_code == 1 and "init=" not in r.stderr and lines[-1].startswith("error: "), r.output
    else:
        assert r.exit_code == 2 and lines == [f"error: {error}"], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, error", [
    (["--weights", "1,1", "--ema", "0.9"], "give either weights or an EMA decay, not both"),
    (["--weights", "1,x"], "--weights '1,x': expected a comma-separated list of numbers"),
    (["--weights", "1,-1"], "sum to 0"),
    (["--max-shard-size", "lots"], "size 'lots' is not a byte count"),
])
def test_average_settings_are_refused_before_any_checkpoint_is_read(tmp_path, args, error):
    """The checkpoints do not exist: a usage error (exit 2) proves the check came first."""
    r = _run("average", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "o.safetensors", *args)
    assert r.exit_code == 2 and r.stderr.count("error:") == 1 and error in r.stderr, r.output


def test_check_synopses_names_the_options_a_command_lacks():
    from twamerge.cli_docs import check_synopses

    good = """Run it:

```
twamerge fit CKPT... --val DATA --model SPEC -o OUT [--no-greedy] [--json]   # a --comment is not read
$ twamerge -q average CKPT... -o OUT [--weights w1,w2,...] [--ema DECAY] [--dtype] [--force]
twamerge eval CKPT... --val DATA \\
    --batch-size 8
```

then `twamerge inspect CKPT... --no-similarity --group-size 64`; `twamerge` alone is fine.
"""
    assert check_synopses(good) == []
    bad = good.replace("[--json]", "[--jsn]").replace("--batch-size 8", "--eval-batch-size 8")
    bad = bad.replace("-q average", "--quite average") + "\n`twamerge merge CKPT...`\n"
    assert check_synopses(bad) == [
        "twamerge fit: no option --jsn", "twamerge: no global option --quite", "twamerge eval: no option "
        "--eval-batch-size", "twamerge merge: no such command (the commands: average, inspect, fit, eval, apply)"]


def test_options_are_built_from_named_fields_only():
    from twamerge.cli_options import Fields
    from twamerge.config import FitConfig

    assert [p.name for p in Fields(FitConfig, "Fit", ("lr", "seed")).parameters()] == ["lr", "seed"]
    with pytest.raises(TypeError, match="FitConfig has no command-line field 'momentum'"):
        Fields(FitConfig, "Fit", ("momentum",)).parameters()


def test_every_baseline_the_registry_can_skip_has_a_switch():
    """A fit baseline with ``skip`` is turned off by its FitConfig field's --no- flag, which the errors name."""
    import dataclasses

    from twamerge.config import FitConfig
    from twamerge.methods import METHODS

    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    offs = {o for p in _command("fit").params if p.param_type_name == "option" for o in p.secondary_opts}
    skips = [m.skip for m in METHODS.values() if m.skip is not None]
    assert skips
    for skip in skips:
        on, off = fields[skip.field].metadata["flag"].split("/")
        assert off == on.replace("--", "--no-", 1) and off in offs


def test_readme_and_docs_synopses_name_only_options_that_exist():
    """Every ``twamerge ...`` line of the README and docs/ (code blocks and inline code) uses real commands and options."""
    from twamerge.cli_docs import check_synopses

    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        assert check_synopses(page.read_text()) == [], page
