"""Hostile and broken input (issue 11): one case per class, each through the CLI.

The contract every case is held to (``assert_refused``): exit 1 or 2, exactly one stderr line and
it starts with ``error:``, and no file under the test's folder is created, changed or removed.
The generated cases live in ``test_hostile_props.py``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from ckpt_fixtures import small_state_dict
from cli_contract import assert_one_error_line, snapshot
from safetensors.torch import save_file
from typer.testing import CliRunner

from twamerge.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


# -- the contract -----------------------------------------------------------------------------------


def run_cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(root: Path, *args, contains: str | None = None) -> str:
    before = snapshot(root)
    r = run_cli("-q", *args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"exception escaped: {r.exception!r}") from r.exception
    assert_one_error_line(r.exit_code, r.stderr, r.output)
    assert snapshot(root) == before, "files were created, changed or removed"
    if contains is not None:
        assert contains in r.stderr, r.stderr
    return r.stderr


def pair(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        paths.append(folder / f"c{i}.safetensors")
        save_file(small_state_dict(i), str(paths[-1]))
    return paths


def sharded(folder: Path, weight_map: object, name: str = "model.safetensors.index.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(small_state_dict(0), str(folder / "shard.safetensors"))
    index = folder / name
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


# -- shard indexes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_map", [["a", "b"], "shard.safetensors", None, 3, {"conv.weight": 7},
                                        {"conv.weight": ["shard.safetensors"]}, {}])
def test_index_weight_map_of_the_wrong_type(tmp_path, weight_map):
    index = sharded(tmp_path / "s", weight_map)
    (other,) = pair(tmp_path / "p")[:1]
    assert_refused(tmp_path, "average", index, other, "-o", tmp_path / "o.safetensors", contains="weight_map")


@pytest.mark.parametrize("as_glob", [False, True])
def test_stray_malformed_index_in_a_plain_folder(tmp_path, as_glob):
    folder = tmp_path / "d"
    pair(folder)
    (folder / "stray.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    arg = f"{folder}/*" if as_glob else folder
    assert_refused(tmp_path, "average", arg, "-o", tmp_path / "o.safetensors")
    assert_refused(tmp_path, "inspect", arg)


@pytest.mark.parametrize("target", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors"])
def test_index_pointing_outside_its_folder(tmp_path, target):
    save_file(small_state_dict(0), str(tmp_path / "outside.safetensors"))
    if target == "ABS":
        target = str(tmp_path / "outside.safetensors")
    index = sharded(tmp_path / "s", {k: target for k in small_state_dict(0)})
    other = pair(tmp_path / "p")[0]
    err = assert_refused(tmp_path, "average", index, other, "-o", tmp_path / "o.safetensors")
    assert "outside" in err


def test_index_naming_itself_or_another_index(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    a, b = folder / "a.index.json", folder / "b.index.json"
    a.write_text(json.dumps({"weight_map": {"x": "a.index.json"}}))
    other = pair(tmp_path / "p")[0]
    assert_refused(tmp_path, "average", a, other, "-o", tmp_path / "o.safetensors", contains="index")
    a.write_text(json.dumps({"weight_map": {"x": "b.index.json"}}))
    b.write_text(json.dumps({"weight_map": {"x": "a.index.json"}}))
    assert_refused(tmp_path, "average", a, other, "-o", tmp_path / "o.safetensors", contains="index")


def test_deeply_nested_json_index_and_report(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    index = tmp_path / "deep.safetensors.index.json"
    index.write_text('{"weight_map": ' + deep + "}")
    paths = pair(tmp_path / "p")
    assert_refused(tmp_path, "average", index, paths[0], "-o", tmp_path / "o.safetensors", contains="deep")
    report = tmp_path / "r.json"
    report.write_text('{"report_version": 1, "merge": ' + deep + "}")
    assert_refused(tmp_path, "apply", report, *paths, "-o", tmp_path / "o.safetensors", contains="deep")


# -- tensors that are not dense and strided, of a dtype twamerge can write -------------------------


def _odd_tensors() -> dict[str, object]:
    return {
        "sparse_coo": lambda: torch.randn(8, 3, 3, 3).to_sparse(),
        "sparse_csr": lambda: torch.randn(10, 8).to_sparse_csr(),
        "meta": lambda: torch.empty(10, 8, device="meta"),
        "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        "quantized": lambda: torch.quantize_per_tensor(torch.randn(10, 8), 0.1, 0, torch.qint8),
        "complex64": lambda: torch.randn(10, 8, dtype=torch.complex64),
        "float8_e4m3fnuz": lambda: torch.randn(10, 8).to(torch.float8_e4m3fnuz),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", list(_odd_tensors()))
def test_torch_file_with_an_odd_tensor(tmp_path, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i in range(2):
        sd = small_state_dict(i)
        sd["fc.weight"] = _odd_tensors()[kind]()
        paths.append(folder / f"c{i}.pt")
        torch.save(sd, paths[-1])
    err = assert_refused(tmp_path, "average", *paths, "-o", tmp_path / "o.safetensors", contains="fc.weight")
    assert_refused(tmp_path, "inspect", *paths)
    assert "fc.weight" in err


def _short_storage_zip(path: Path) -> None:
    """A torch zip whose storage record for ``fc.weight`` holds 16 of the 320 bytes the tensor declares."""
    sd = small_state_dict(0)
    torch.save(sd, path)
    with zipfile.ZipFile(path) as z:
        records = {i.filename: z.read(i.filename) for i in z.infolist()}
    target = next(n for n, data in records.items() if "/data/" in n and len(data) == 320)
    records[target] = records[target][:16]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)


def test_torch_zip_with_a_short_storage_record(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = folder / "bad.pt"
    _short_storage_zip(bad)
    good = folder / "good.pt"
    torch.save(small_state_dict(1), good)
    assert_refused(tmp_path, "average", bad, good, "-o", tmp_path / "o.safetensors", contains="bytes")


# -- apply reports ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """Two candidates and a report an apply accepts (written by hand in the fit's format)."""
    root = tmp_path_factory.mktemp("apply")
    paths = pair(root / "in")
    sys.path.insert(0, str(ROOT))
    from twamerge.io import open_checkpoints

    with open_checkpoints(paths) as cs:
        keys = cs.keys
        for k in keys:
            cs.get(0, k), cs.get(1, k)
        sources = cs.sources()
    report = {
        "report_version": 1,
        "candidates": sources,
        "merge": {"key_block": {k: 0 for k in keys if k != "bn.num_batches_tracked"},
                  "block_alphas": [[0.25, 0.75]], "default_alphas": [0.5, 0.5], "out_dtype": None,
                  "recalibrated_buffers": "", "metadata": {"twamerge.method": "twa"}},
    }
    return root, paths, report


def _mutate(report: dict, path: tuple, value: object) -> dict:
    report = json.loads(json.dumps(report))
    *parents, last = path
    node = report
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return report


_DELETE = object()
_BAD_REPORT_FIELDS = [
    (("candidates", 0, "sha256"), _DELETE), (("candidates", 0, "sha256"), 5), (("candidates",), {"a": 1}),
    (("candidates",), []), (("candidates", 0), "x"), (("merge", "block_alphas"), "x"), (("merge", "block_alphas"), []),
    (("merge", "block_alphas", 0), [0.5]), (("merge", "block_alphas", 0, 0), "0.5"),
    (("merge", "block_alphas", 0, 0), 1e300), (("merge", "block_alphas", 0, 0), None),
    (("merge", "block_alphas", 0, 0), True), (("merge", "key_block", "fc.weight"), 1),
    (("merge", "key_block", "fc.weight"), -1), (("merge", "key_block", "fc.weight"), 0.5),
    (("merge", "key_block", "fc.weight"), "0"), (("merge", "key_block"), []), (("merge", "default_alphas"), [0.5]),
    (("merge", "default_alphas", 0), float("nan")), (("merge", "out_dtype"), "int8"), (("merge", "out_dtype"), 3),
    (("merge", "metadata", "twamerge.method"), 3), (("merge", "metadata"), "x"),
    (("merge", "recalibrated_buffers"), 7), (("merge", "recalibrated_buffers"), "!!notbase64"),
    (("merge", "recalibrated_buffers"), base64.b64encode(b"junk").decode()), (("merge",), None),
    (("report_version",), "1"), (("merge", "block_alphas", 0, 0), 10**30),
]


@pytest.mark.parametrize("field,value", _BAD_REPORT_FIELDS,
                         ids=[".".join(map(str, f)) + f"={v!r}"[:30] for f, v in _BAD_REPORT_FIELDS])
def test_apply_report_with_a_bad_field(applied, tmp_path, field, value):
    root, paths, report = applied
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps(_mutate(report, field, value)))
    err = assert_refused(tmp_path, "apply", bad, *paths, "-o", tmp_path / "o.safetensors")
    assert str(bad) in err


def test_apply_report_sanity_passes(applied, tmp_path):
    root, paths, report = applied
    good = tmp_path / "r.json"
    good.write_text(json.dumps(report))
    r = run_cli("apply", good, *paths, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.output


def test_apply_report_huge_number_and_not_utf8(applied, tmp_path):
    root, paths, report = applied
    bad = tmp_path / "r.json"
    text = json.dumps(report).replace("0.25", "1" + "0" * 400, 1)
    bad.write_text(text)
    assert_refused(tmp_path, "apply", bad, *paths, "-o", tmp_path / "o.safetensors")
    bad.write_bytes(json.dumps(report).encode().replace(b"twa", b"tw\xff", 1))
    assert_refused(tmp_path, "apply", bad, *paths, "-o", tmp_path / "o.safetensors", contains="UTF-8")


def test_apply_recalibrated_buffer_of_the_wrong_shape(applied, tmp_path):
    from safetensors.torch import save as st_save

    root, paths, report = applied
    for blob in ({"bn.running_mean": torch.zeros(3)}, {"nope": torch.zeros(8)},
                 {"bn.running_mean": torch.zeros(8, dtype=torch.float64)}):
        rep = json.loads(json.dumps(report))
        rep["merge"]["recalibrated_buffers"] = base64.b64encode(st_save(blob)).decode()
        bad = tmp_path / "r.json"
        bad.write_text(json.dumps(rep))
        assert_refused(tmp_path, "apply", bad, *paths, "-o", tmp_path / "o.safetensors")


# -- output names and destinations -----------------------------------------------------------------


def test_output_name_too_long(tmp_path):
    paths = pair(tmp_path / "in")
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / ("x" * 300 + ".safetensors"), contains="long")
    # A name that fits, but whose temporary name or index would not.
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / ("x" * 240 + ".safetensors"),
                   "--max-shard-size", "1KB", contains="long")


def test_output_is_the_current_folder(tmp_path, monkeypatch):
    paths = pair(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    assert_refused(tmp_path, "average", *paths, "-o", ".", "--force")
    assert_refused(tmp_path, "average", *paths, "-o", "..", "--force")
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / "in", "--force")


def test_nothing_overwritten_without_force(tmp_path):
    paths = pair(tmp_path / "in")
    meta = tmp_path / "out.pt.metadata.json"
    meta.write_text("mine")
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / "out.pt", contains="metadata")
    meta.unlink()
    shard = tmp_path / "big-00001-of-00002.safetensors"
    shard.write_text("mine")
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / "big.safetensors", "--max-shard-size", "1KB")
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / "big.safetensors")
    shard.unlink()
    link = tmp_path / "l.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    assert_refused(tmp_path, "average", *paths, "-o", link, contains="symlink")
    link2 = tmp_path / "l2.safetensors"
    link2.symlink_to(paths[0])
    assert_refused(tmp_path, "average", *paths, "-o", link2, contains="symlink")


def test_symlink_output_replaced_with_force(tmp_path):
    paths = pair(tmp_path / "in")
    link = tmp_path / "l.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    r = run_cli("average", *paths, "-o", link, "--force")
    assert r.exit_code == 0, r.output
    assert not link.is_symlink() and link.is_file() and not (tmp_path / "nowhere").exists()


def _subprocess(code: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def test_file_size_limit_while_writing_pt(tmp_path):
    paths = pair(tmp_path / "in")
    before = snapshot(tmp_path)
    code = f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        sys.argv = ["twamerge", "-q", "average", {str(paths[0])!r}, {str(paths[1])!r}, "-o", {str(tmp_path / 'o.pt')!r}]
        from twamerge.cli import main
        main()
    """
    p = _subprocess(code, tmp_path)
    assert_one_error_line(p.returncode, p.stderr)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_during_a_write_leaves_nothing(tmp_path, sig):
    paths = pair(tmp_path / "in")
    before = snapshot(tmp_path)
    # The signal at its default action, as in a terminal: under nohup SIGHUP arrives ignored, and the
    # tool rightly keeps a caller's choice (io.atomic.signals_as_interrupt), so the write would finish.
    code = f"""
        import os, signal, sys, time
        signal.signal(signal.{sig}, signal.SIG_DFL)
        import twamerge.io.writer as w
        def save(tensors, path, metadata, pieces=None):
            with open(path, "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.{sig})
            time.sleep(30)
        w.save_safetensors = save
        sys.argv = ["twamerge", "-q", "average", {str(paths[0])!r}, {str(paths[1])!r}, "-o", {str(tmp_path / 'o.safetensors')!r}]
        from twamerge.cli import main
        main()
    """
    p = _subprocess(code, tmp_path)
    assert_one_error_line(p.returncode, p.stderr)
    assert snapshot(tmp_path) == before


def test_interrupt_right_after_the_temporary_file_is_created(tmp_path, monkeypatch):
    import twamerge.io.atomic as atomic

    paths = pair(tmp_path / "in")
    real_os = atomic.os

    class _Os:
        def __getattr__(self, name):
            return getattr(real_os, name)

        @staticmethod
        def close(fd):
            real_os.close(fd)
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "os", _Os())
    assert_refused(tmp_path, "average", *paths, "-o", tmp_path / "o.safetensors")


# -- fit: the outputs as one transaction, non-finite data ------------------------------------------


def test_fit_report_that_cannot_be_written_leaves_the_old_checkpoint(run, tmp_path):
    from digits_run import MODEL_SPEC

    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old checkpoint")
    fast = ["--epochs", "1", "--batch-size", "128", "--no-greedy", "--no-candidates"]
    assert_refused(tmp_path, "fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", out,
                   "--report", out, "--force", *fast)
    (tmp_path / "rdir").mkdir()
    assert_refused(tmp_path, "fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", out,
                   "--report", tmp_path / "rdir", "--force", *fast)


def test_fit_commit_failure_restores_every_old_file(run, tmp_path, monkeypatch):
    """The report's rename fails after the checkpoint's: the old checkpoint comes back."""
    from digits_run import MODEL_SPEC

    import twamerge.io.atomic as atomic

    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    out.write_bytes(b"old checkpoint")
    report.write_text("old report")
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst) == report and Path(src).name.startswith(".r.json.") and not str(src).endswith(".old"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(atomic.os, "replace", replace)
    assert_refused(tmp_path, "fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", out,
                   "--report", report, "--force", "--epochs", "1", "--no-greedy", "--no-candidates")


def _load_data(cfg):
    """--val as the fit prepares it for a plain nn.Module (model-ready inputs and label)."""
    from torch import nn

    from twamerge.config import ModelConfig
    from twamerge.prepare import ModelContext, load_inputs

    class Net(nn.Module):
        def forward(self, x):
            return x

    return load_inputs(cfg, ModelConfig(), ModelContext(Net(), []))[0]


def test_nonfinite_val_rows_are_refused(tmp_path):
    from twamerge.config import DataConfig
    from twamerge.errors import DataError

    load_data = _load_data

    x = torch.randn(50, 4)
    x[37, 2] = float("nan")
    y = torch.randint(0, 3, (50,))
    f = tmp_path / "val.pt"
    torch.save({"x": x, "label": y}, f)
    with pytest.raises(DataError, match=r"x.*row 37"):
        load_data(DataConfig(str(f)))
    assert load_data(DataConfig(str(f), allow_nonfinite_data=True)).n == 50
    yf = torch.randn(50)
    yf[3] = float("inf")
    torch.save({"x": torch.randn(50, 4), "target": yf}, f)
    with pytest.raises(DataError, match=r"target.*row 3"):
        load_data(DataConfig(str(f)))
    import numpy as np

    z = tmp_path / "val.npz"
    np.savez(z, x=np.ones((5, 4), np.complex64), label=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"'x' is complex"):
        load_data(DataConfig(str(z)))


def test_nonfinite_heldout_row_through_the_cli(run, tmp_path):
    """A NaN row in --val: before, it could land in the held-out split and every held-out loss was NaN."""
    from digits_run import MODEL_SPEC

    from twamerge.config import DataConfig

    data = _load_data(DataConfig(str(run.val)))
    cols = {k: v.clone() for k, v in data.columns.items()}
    x = cols[data.inputs[0]].float()
    x[-1].view(-1)[0] = float("nan")
    cols[data.inputs[0]] = x
    val = tmp_path / "in" / "val.pt"
    val.parent.mkdir()
    torch.save(cols, val)
    err = assert_refused(tmp_path, "fit", *run.checkpoints, "--val", val, "--model", MODEL_SPEC, "-o",
                         tmp_path / "m.safetensors", "--epochs", "1", "--no-greedy", "--no-candidates")
    assert f"row {data.n - 1}" in err
