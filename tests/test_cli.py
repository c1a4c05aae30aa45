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
    ["average", "a.safetensors"],  # no -o
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
