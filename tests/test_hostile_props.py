"""Property-based hostile inputs (issue 11): generated damage to every reader, through the CLI.

Each test draws a damaged or crafted input (single and sharded safetensors, torch zips and legacy
pickles, shard indexes, fit reports, --val data files), runs the command a user would, and holds
the outcome to the contract: either a clean success, or exit 1/2 with exactly one stderr line that
starts with ``error:`` and not one file created, changed or removed. Pickle payloads would create a
marker file if they ever ran; the marker must never appear. Cases that can only be refused (an
escaping shard, a NaN in the data, a payload) must be refused.

Profiles (registered in ``tests/conftest.py``): the suite runs the seeded, bounded ``ci`` profile
(``derandomize=True``, a few dozen examples per test, well under two minutes in all on two cores).
For a soak run::

    PYTHONPATH=. python -m pytest tests/test_hostile_props.py --hypothesis-profile soak

(``soak``: 1000 random examples per test, not derandomized; ``TWAMERGE_SOAK_EXAMPLES`` changes the count).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import struct
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import torch
from ckpt_fixtures import small_state_dict
from cli_contract import assert_one_error_line, snapshot
from hypothesis import assume, given
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from typer.testing import CliRunner

from twamerge.cli import app

runner = CliRunner()
MLP = str(Path(__file__).resolve().parent / "assets" / "mlp.py") + ":build"


# -- the contract -----------------------------------------------------------------------------------


def outcome(root: Path, *args, must_fail: bool = False, marker: Path | None = None) -> object:
    """Run the CLI; assert a clean success or a clean refusal (see the module docstring)."""
    before = snapshot(root)
    r = runner.invoke(app, ["-q", *map(str, args)])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"{args[0]}: exception escaped: {r.exception!r}") from r.exception
    if marker is not None:
        assert not marker.exists(), "a pickle payload ran"
    if r.exit_code == 0 and not must_fail:
        return r
    assert_one_error_line(r.exit_code, r.stderr, r.output)
    assert snapshot(root) == before, "a refused command changed files"
    return r


# -- inputs -----------------------------------------------------------------------------------------


@cache
def _valid_safetensors() -> bytes:
    return st_save(small_state_dict(0))


@cache
def _valid_torch_zip() -> bytes:
    buf = io.BytesIO()
    torch.save(small_state_dict(0), buf)
    return buf.getvalue()


def _workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="hostile-")


def _with_partner(folder: Path, name: str, data: bytes) -> list[Path]:
    """The damaged file and a valid second candidate, in ``folder/in``."""
    inp = folder / "in"
    inp.mkdir()
    (inp / name).write_bytes(data)
    save_file(small_state_dict(1), str(inp / "zz_good.safetensors"))
    return [inp / name, inp / "zz_good.safetensors"]


def _damage(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "zero"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "zero":
        lo = draw(st.integers(0, len(data) - 1))
        return data[:lo] + bytes(draw(st.integers(1, 64))) + data[lo + 64:]
    if kind == "splice":
        lo = draw(st.integers(0, len(data)))
        return data[:lo] + draw(st.binary(min_size=1, max_size=64)) + data[lo:]
    out = bytearray(data)
    for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
        out[pos] ^= draw(st.integers(1, 255))
    return bytes(out)


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=False),
                        st.sampled_from([1e300, -1e300, 10**400]), st.text(max_size=12))
json_values = st.recursive(json_leaves, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)


# -- safetensors ------------------------------------------------------------------------------------


@given(st.data())
def test_damaged_safetensors(data):
    with _workdir() as d:
        root = Path(d)
        damaged = _damage(_valid_safetensors(), data.draw)
        paths = _with_partner(root, "a.safetensors", damaged)
        outcome(root, "average", *paths, "-o", root / "o.safetensors")


st_entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "F8_E8M0", "C64", "F4",
                                        "U64"]), st.text(max_size=6), json_leaves),
    "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), json_leaves),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 2**40), max_size=3), json_leaves),
})


@given(header=st.one_of(st.dictionaries(st.sampled_from(["conv.weight", "fc.bias", "__metadata__", "x"]),
                                         st.one_of(st_entries, json_values), max_size=4), json_values),
       payload=st.binary(max_size=256), fake_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_crafted_safetensors_header(header, payload, fake_len):
    blob = json.dumps(header).encode()
    head = struct.pack("<Q", len(blob) if fake_len is None else fake_len)
    with _workdir() as d:
        root = Path(d)
        paths = _with_partner(root, "a.safetensors", head + blob + payload)
        outcome(root, "average", *paths, "-o", root / "o.safetensors")
        outcome(root, "inspect", *paths)


# -- shard indexes ----------------------------------------------------------------------------------


shard_names = st.one_of(st.sampled_from(["shard.safetensors", "../outside.safetensors", "/etc/passwd",
                                         "model.safetensors.index.json", "other.index.json", "missing.safetensors",
                                         "sub/../../outside.safetensors", "", ".", "a\x00b", "x" * 300]),
                        json_leaves)


@given(weight_map=st.one_of(json_values, st.dictionaries(st.sampled_from(list(small_state_dict(0))), shard_names,
                                                         min_size=1)),
       extra=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
       as_folder=st.booleans())
def test_crafted_shard_index(weight_map, extra, as_folder):
    with _workdir() as d:
        root = Path(d)
        (root / "outside.safetensors").write_bytes(_valid_safetensors())
        s = root / "s"
        s.mkdir()
        (s / "shard.safetensors").write_bytes(_valid_safetensors())
        (s / "other.index.json").write_text(json.dumps({"weight_map": {"conv.weight": "model.safetensors.index.json"}}))
        index = s / "model.safetensors.index.json"
        index.write_text(json.dumps({**extra, "weight_map": weight_map}))
        partner = root / "p.safetensors"
        save_file(small_state_dict(1), str(partner))
        escapes = isinstance(weight_map, dict) and any(
            isinstance(v, str) and (".." in v or v.startswith("/") or v.endswith(".index.json"))
            for v in weight_map.values())
        target = s if as_folder else index
        outcome(root, "average", target, partner, "-o", root / "o.safetensors", must_fail=escapes)


# -- torch zips and legacy pickles ------------------------------------------------------------------


@given(st.data())
def test_damaged_torch_zip(data):
    raw = _valid_torch_zip()
    short = not data.draw(st.booleans())
    if not short:
        damaged = _damage(raw, data.draw)
    else:  # a storage record cut short, the zip rewritten consistently around it
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            records = {i.filename: z.read(i.filename) for i in z.infolist()}
        target = data.draw(st.sampled_from(sorted(n for n in records if "/data/" in n)))
        records[target] = records[target][: data.draw(st.integers(0, max(0, len(records[target]) - 1)))]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, content in records.items():
                z.writestr(name, content)
        damaged = buf.getvalue()
    with _workdir() as d:
        root = Path(d)
        paths = _with_partner(root, "a.pt", damaged)
        outcome(root, "average", *paths, "-o", root / "o.safetensors", must_fail=short)


class _Payload:
    """Pickles as a call that would create ``marker``: the file must never appear."""

    def __init__(self, kind: str, marker: Path):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        import builtins
        import os as os_mod
        import subprocess

        if self.kind == "open":
            return builtins.open, (self.marker, "w")
        if self.kind == "system":
            return os_mod.system, (f"touch {self.marker}",)
        if self.kind == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w')",)
        if self.kind == "eval":
            return builtins.eval, (f"open({self.marker!r}, 'w')",)
        return subprocess.call, (["touch", self.marker],)


@given(kind=st.sampled_from(["open", "system", "exec", "eval", "subprocess"]),
       where=st.sampled_from(["top", "state_dict", "value", "list"]),
       fmt=st.sampled_from(["zip", "legacy", "raw"]), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
       as_val=st.booleans())
def test_pickle_payload_never_runs(kind, where, fmt, protocol, as_val):
    with _workdir() as d:
        root = Path(d)
        marker = root / "PWNED"
        p = _Payload(kind, marker)
        sd = small_state_dict(0)
        obj = {"top": p, "state_dict": {"state_dict": {**sd, "extra": p}}, "value": {**sd, "fc.bias": p},
               "list": [p, sd]}[where]
        buf = io.BytesIO()
        if fmt == "raw":
            buf.write(pickle.dumps(obj, protocol=protocol))
        else:
            torch.save(obj, buf, _use_new_zipfile_serialization=fmt == "zip", pickle_protocol=max(protocol, 2))
        assert not marker.exists()
        if as_val:
            val = root / "in" / "val.pt"
            val.parent.mkdir()
            val.write_bytes(buf.getvalue())
            model = _tiny_model(root / "in")
            outcome(root, "eval", model, "--val", val, "--model", MLP, *_MODEL_ARGS, must_fail=True, marker=marker)
        else:
            paths = _with_partner(root, "a.pt", buf.getvalue())
            outcome(root, "average", *paths, "-o", root / "o.safetensors", must_fail=True, marker=marker)
            outcome(root, "inspect", *paths, must_fail=True, marker=marker)


# -- apply reports ----------------------------------------------------------------------------------


@cache
def _report_fixture() -> tuple[Path, list[Path], dict]:
    root = Path(tempfile.mkdtemp(prefix="hostile-report-"))
    paths = []
    for i in range(2):
        paths.append(root / f"c{i}.safetensors")
        save_file(small_state_dict(i), str(paths[-1]))
    sources = [{"path": str(p), "format": "safetensors", "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
               for p in paths]
    keys = [k for k in small_state_dict(0) if k != "bn.num_batches_tracked"]
    blob = base64.b64encode(st_save({"bn.running_mean": torch.zeros(8)})).decode()
    report = {"report_version": 1, "candidates": sources,
              "merge": {"key_block": {k: i % 2 for i, k in enumerate(keys)}, "block_alphas": [[0.25, 0.75], [0.5, 0.5]],
                        "default_alphas": [0.5, 0.5], "out_dtype": None, "recalibrated_buffers": blob,
                        "metadata": {"twamerge.method": "twa"}}}
    return root, paths, report


_REPORT_PATHS = [("report_version",), ("candidates",), ("candidates", 0), ("candidates", 1, "sha256"),
                 ("candidates", 0, "path"), ("merge",), ("merge", "block_alphas"), ("merge", "block_alphas", 1),
                 ("merge", "block_alphas", 0, 1), ("merge", "default_alphas"), ("merge", "default_alphas", 0),
                 ("merge", "key_block"), ("merge", "key_block", "fc.weight"), ("merge", "key_block", "new"),
                 ("merge", "out_dtype"), ("merge", "recalibrated_buffers"), ("merge", "metadata"),
                 ("merge", "metadata", "twamerge.method")]

report_values = st.one_of(json_values, st.sampled_from([-1, 2, 10**9, 0.5, 1e300, 1e7, "float16", "int8", "",
                                                       "AAAA", [0.5], [[0.5, 0.5]], 10**401]),
                          st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()))


@given(edits=st.lists(st.tuples(st.sampled_from(_REPORT_PATHS), report_values), min_size=1, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=200)), deep=st.integers(0, 3))
def test_crafted_apply_report(edits, raw, deep):
    base_root, paths, report = _report_fixture()
    report = json.loads(json.dumps(report))
    for path, value in edits:
        node = report
        try:
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass
    text = json.dumps(report)
    if deep:
        text = '{"report_version": 1, "merge": ' + "[" * 10**deep * 30 + "]" * 10**deep * 30 + "}"
    with _workdir() as d:
        root = Path(d)
        rep = root / "r.json"
        rep.write_bytes(raw if raw is not None else text.encode())
        r = outcome(root, "apply", rep, *paths, "-o", root / "o.safetensors")
        if r.exit_code == 0:
            from safetensors.torch import load_file

            merged = load_file(str(root / "o.safetensors"))
            assert all(bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point())


# -- --val data -------------------------------------------------------------------------------------

_MODEL_ARGS = ["--model-arg", "n_in=4", "--model-arg", "hidden=4", "--model-arg", "n_out=3"]


def _tiny_model(folder: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hostile_mlp", MLP.rsplit(":", 1)[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    path = folder / "m.safetensors"
    save_file(module.build(n_in=4, hidden=4, n_out=3).state_dict(), str(path))
    return path


@given(n=st.integers(4, 40), bad=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 4),
                                                    st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                                          max_size=3),
       fmt=st.sampled_from([".pt", ".npz", ".safetensors"]), float_label=st.booleans(),
       x_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.complex64]))
def test_val_data_with_nonfinite_or_odd_values(n, bad, fmt, float_label, x_dtype):
    x = torch.randn(n, 4)
    y = torch.randn(n, 3) if float_label else torch.randint(0, 3, (n,))
    first = {}
    for row, col, value in bad:
        row = row % n
        if col == 4:
            if not float_label:
                continue
            y[row, 0] = value
            first["label"] = min(first.get("label", n), row)
        else:
            x[row, col] = value
            first["x"] = min(first.get("x", n), row)
    x = x.to(x_dtype)
    assume(not (x_dtype == torch.complex64 and fmt == ".safetensors"))
    with _workdir() as d:
        root = Path(d)
        inp = root / "in"
        inp.mkdir()
        val = inp / f"val{fmt}"
        if fmt == ".pt":
            torch.save({"x": x, "label": y}, val)
        elif fmt == ".npz":
            np.savez(val, x=x.numpy(), label=y.numpy())
        else:
            save_file({"x": x, "label": y}, str(val))
        model = _tiny_model(inp)
        loss = ["--loss", "mse"] if float_label else []
        must_fail = bool(first) or x_dtype == torch.complex64
        r = outcome(root, "eval", model, "--val", val, "--model", MLP, *_MODEL_ARGS, *loss, must_fail=must_fail)
        if first and x_dtype != torch.complex64:
            column = "x" if "x" in first else "label"
            assert f"'{column}'" in r.stderr and f"first row {first[column]}" in r.stderr, r.stderr
