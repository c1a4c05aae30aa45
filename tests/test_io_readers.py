"""io.formats, io.rename, io.candidates: reading every format, renaming, pickle safety, the registry, read counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckpt_fixtures import small_state_dict, write_variants
from safetensors.torch import save_file

from twamerge.errors import CheckpointError
from twamerge.io import open_checkpoints, unwrap_state_dict


def test_reads_every_format_and_reports_renames(tmp_path):
    paths, sds = write_variants(tmp_path)
    with open_checkpoints(paths) as cs:
        assert len(cs) == 4 and cs.paths == paths
        assert set(cs.keys) == set(sds[0])
        assert cs.formats == ["torch", "safetensors", "safetensors-sharded", "torch"]
        for key in cs.keys:
            assert cs.shape(key) == tuple(sds[0][key].shape) and cs.dtype(key) == sds[0][key].dtype
            for i in range(4):
                assert torch.equal(cs.get(i, key), sds[i][key]), (i, key)
            assert torch.equal(cs.stack(key), torch.stack([sd[key] for sd in sds]))
        renamed = {Path(r["path"]).name: r for r in cs.renamed}
        assert renamed["ddp.pt"]["stripped_prefixes"] == ["module."]
        assert renamed["compiled.safetensors"]["stripped_prefixes"] == ["_orig_mod."]
        assert renamed["lightning.ckpt"]["container"] == "state_dict"
        assert renamed["lightning.ckpt"]["stripped_prefixes"] == ["model."]
        sources = cs.sources()
        assert [s["format"] for s in sources] == cs.formats
        assert all(len(s["sha256"]) == 64 for s in sources)
        assert cs.hf_dir is None


def test_ema_key_selects_ema_weights(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    ema_a, ema_b = small_state_dict(2), small_state_dict(3)
    torch.save({"state_dict": a, "state_dict_ema": ema_a, "epoch": 1}, tmp_path / "a.pth")
    torch.save({"state_dict": b, "state_dict_ema": ema_b, "epoch": 2}, tmp_path / "b.pth")
    paths = [tmp_path / "a.pth", tmp_path / "b.pth"]
    with open_checkpoints(paths) as cs:
        assert torch.equal(cs.get(0, "fc.weight"), a["fc.weight"])
    with open_checkpoints(paths, ema_key="state_dict_ema") as cs:
        assert torch.equal(cs.get(1, "fc.weight"), ema_b["fc.weight"])
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        open_checkpoints(paths, ema_key="ema")


def test_unwrap_nested_containers():
    sd = {"w": torch.ones(1)}
    out, taken = unwrap_state_dict({"model": {"module": {"w": sd["w"]}, "step": 1}, "optimizer": {}})
    assert taken == "model" or taken == "model.module"
    assert list(out) == ["w"]


def test_truncated_and_corrupted_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(small_state_dict(0), str(good))
    data = good.read_bytes()
    (tmp_path / "trunc_header.safetensors").write_bytes(data[:20])
    (tmp_path / "trunc_data.safetensors").write_bytes(data[:-16])
    bad_json = bytearray(data)
    bad_json[10:14] = b"\xff\xfe{{"
    (tmp_path / "bad_json.safetensors").write_bytes(bytes(bad_json))
    for name in ("trunc_header", "trunc_data", "bad_json"):
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: not a readable safetensors file"):
            open_checkpoints([good, tmp_path / f"{name}.safetensors"])


def test_truncated_torch_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(small_state_dict(0), good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: not a readable torch checkpoint"):
        open_checkpoints([good, tmp_path / "trunc.pt"])


class _Payload:
    """Unpickling this would run ``os.system`` and create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, evil)
    assert not marker.exists()
    blocked = torch.serialization.get_unsafe_globals_in_checkpoint(str(evil))
    assert blocked, "the payload should need an unsafe global"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    with pytest.raises(CheckpointError) as e:
        open_checkpoints([tmp_path / "ok.safetensors", evil])
    assert not marker.exists()
    msg = str(e.value)
    assert "refusing to unpickle" in msg and all(g in msg for g in blocked) and "\n" not in msg


def test_non_tensor_value_is_an_error(tmp_path):
    torch.save({"w": torch.zeros(2), "note": "hello"}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="key 'note' holds a str, not a tensor"):
        open_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])


def test_a_format_registered_in_a_test_is_picked_up(tmp_path, monkeypatch):
    """A new format is one Reader subclass and one ``register`` line; discovery and candidates find it."""
    import json

    from twamerge.io import Reader, expand_paths, open_candidates, register
    from twamerge.io.formats import base

    monkeypatch.setattr(base, "_BY_SUFFIX", dict(base._BY_SUFFIX))  # the registration ends with the test

    @register(".tj")
    class JsonTensors(Reader):
        format = "json-tensors"

        def __init__(self, path, ema_key=None):
            self.files = [path]
            self._data = {k: torch.tensor(v) for k, v in json.loads(path.read_text()).items()}

        def entries(self):
            return {k: (tuple(v.shape), v.dtype) for k, v in self._data.items()}

        def read(self, key):
            return self._data[key].clone()

    for name, v in (("a", 1.0), ("b", 3.0)):
        (tmp_path / f"{name}.tj").write_text(json.dumps({"module.w": [v, v]}))
    assert [p.name for p in expand_paths([tmp_path])] == ["a.tj", "b.tj"]
    with open_checkpoints([tmp_path]) as cs:
        assert cs.formats == ["json-tensors"] * 2 and cs.keys == ["w"]  # renaming applies to any format
        assert torch.equal(cs.stack("w"), torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
        assert torch.equal(cs.get_slice(1, "w", 1, 2), torch.tensor([3.0]))  # the base class's read_range
    (cand,) = open_candidates([tmp_path / "a.tj"])
    assert cand.format == "json-tensors" and cand.rename_note["stripped_prefixes"] == ["module."]
    cand.close()


def test_open_candidates_is_public_and_does_not_cross_check(tmp_path):
    import twamerge
    from twamerge.io import Candidate, open_candidates, validate_candidates

    assert twamerge.open_candidates is open_candidates
    a, b = small_state_dict(0), small_state_dict(1)
    b["fc.weight"] = torch.zeros(10, 9)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({f"module.{k}": v for k, v in b.items()}, str(tmp_path / "b.safetensors"))
    cands = open_candidates([tmp_path / "a.safetensors", str(tmp_path / "b.safetensors")])
    try:
        assert all(isinstance(c, Candidate) for c in cands)
        assert set(cands[1].entries) == set(a) and cands[1].raw_of["fc.weight"] == "module.fc.weight"
        assert cands[1].entries["fc.weight"] == ((10, 9), torch.float32)
        assert torch.equal(cands[1].read("fc.bias"), b["fc.bias"])
        from twamerge.errors import CheckpointMismatchError

        with pytest.raises(CheckpointMismatchError, match="'fc.weight'"):
            validate_candidates(cands, "strict")
    finally:
        for c in cands:
            c.close()
    with pytest.raises(CheckpointError, match="no such file"):
        open_candidates([tmp_path / "a.safetensors", tmp_path / "missing.safetensors"])


def test_read_counter_counts_tensor_bytes_per_file(tmp_path):
    from twamerge import average_checkpoints
    from twamerge.io import count_reads, stats

    paths, sds = write_variants(tmp_path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in sds[0].values())
    with count_reads() as reads:
        average_checkpoints(paths, tmp_path / "avg.safetensors")
    assert reads is stats
    shards = json.loads(paths[2].read_text())["weight_map"]
    per_candidate = {
        "ddp.pt": reads.bytes_read[paths[0].resolve()],
        "compiled.safetensors": reads.bytes_read[paths[1].resolve()],
        "hub": sum(reads.bytes_read[(paths[2].parent / s).resolve()] for s in set(shards.values())),
        "lightning.ckpt": reads.bytes_read[paths[3].resolve()],
    }
    # An average reads each candidate's tensor data exactly once.
    assert per_candidate == {name: tensor_bytes for name in per_candidate}
    assert paths[2].resolve() not in reads.bytes_read  # the index holds no tensor data
    with open_checkpoints(paths[1:3]) as cs:
        cs.get_slice(0, "fc.weight", 2, 5)
        assert reads.bytes_read[paths[1].resolve()] == tensor_bytes + 3 * 4
    from twamerge.io import reset_read_stats

    reset_read_stats()
    assert not reads.bytes_read and not reads.hash_bytes_read


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_data_tensor_files_are_read_through_the_io_readers(tmp_path, suffix):
    from twamerge.config import DataConfig
    from twamerge.data import read_table
    from twamerge.io import count_reads

    cols = {"x": torch.randn(12, 3), "label": torch.arange(12) % 3}
    path = tmp_path / f"val{suffix}"
    save_file(cols, str(path)) if suffix == ".safetensors" else torch.save(cols, path)
    with count_reads() as reads:
        data = read_table(DataConfig(str(path)))
    assert set(data.columns) == {"x", "label"} and data.n == 12
    assert torch.equal(data.columns["x"], cols["x"]) and torch.equal(data.columns["label"], cols["label"])
    assert reads.bytes_read[path.resolve()] == 12 * 3 * 4 + 12 * 8


def test_data_tensor_files_keep_the_pickle_safety_and_messages(tmp_path):
    from twamerge.config import DataConfig
    from twamerge.data import read_table as load_data
    from twamerge.errors import DataError

    marker = tmp_path / "pwned"
    torch.save({"x": torch.zeros(8), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="cannot be read as a tensor file .*refusing to unpickle"):
        load_data(DataConfig(str(tmp_path / "evil.pt")))
    assert not marker.exists()
    # A data file is a flat {column: tensor}: containers are not unwrapped as for checkpoints.
    torch.save({"state_dict": {"x": torch.zeros(8)}, "label": torch.zeros(8)}, tmp_path / "nested.pt")
    with pytest.raises(DataError, match="expected a mapping of column name -> tensor"):
        load_data(DataConfig(str(tmp_path / "nested.pt")))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="bad.safetensors: cannot be read as a tensor file"):
        load_data(DataConfig(str(tmp_path / "bad.safetensors")))


def _mixed_files(folder: Path) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """The same tensors as safetensors, a torch zip and a sharded safetensors index: a large tensor (mapped),
    a small one (read into a buffer), a transposed one in the zip (copied out of torch's map), a float16 one."""
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(0)
    sd = {"big": torch.randn(512, 1024, generator=g), "small": torch.randn(7, generator=g),
          "half": torch.randn(300, 1000, generator=g).half()}
    folder.mkdir()
    save_file(sd, str(folder / "a.safetensors"))
    torch.save({"state_dict": {**sd, "wide": sd["big"].t()}, "epoch": 1}, folder / "b.ckpt")
    (folder / "hub").mkdir()
    save_torch_state_dict(sd, folder / "hub", max_shard_size="1MB")
    return [folder / "a.safetensors", folder / "b.ckpt", folder / "hub" / "model.safetensors.index.json"], sd


def test_a_tensor_changed_in_place_changes_neither_the_file_nor_later_reads(tmp_path):
    import hashlib

    paths, sd = _mixed_files(tmp_path / "in")
    files = sorted(p for p in (tmp_path / "in").rglob("*") if p.is_file())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for path in paths:
        with open_checkpoints([path], min_count=1) as cs:
            keys = [k for k in cs.keys if k in sd]
            for key in keys:
                t = cs.get(0, key)
                t.mul_(-2).add_(1)  # the caller's own tensor: the change stays in it
                assert not torch.equal(t, sd[key]), (path.name, key)
                assert torch.equal(cs.get(0, key), sd[key]), (path.name, key)
                piece = cs.get_slice(0, key, 3, 9)
                piece.zero_()
                assert torch.equal(cs.get_slice(0, key, 3, 9), sd[key].reshape(-1)[3:9]), (path.name, key)
            if "wide" in cs.keys:
                wide = cs.get(0, "wide")
                wide.zero_()
                assert torch.equal(cs.get(0, "wide"), sd["big"].t())
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
def test_large_tensors_are_maps_of_the_file_not_copies(tmp_path):
    """What makes the reader as fast as the bytes: a large tensor's memory is the file's pages, mapped for that
    read alone (and unmapped with it); the torch zip's contiguous tensors too, small ones are read."""
    import gc

    paths, sd = _mixed_files(tmp_path / "in")

    def mapped_file(addr: int) -> str | None:
        """The file mapped at ``addr`` in this process, per /proc/self/maps (None: anonymous memory)."""
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[5] if len(fields) > 5 else None
        return None

    for path in paths[:2]:
        with open_checkpoints([path], min_count=1) as cs:
            big = cs.get(0, "big")
            addr = big.data_ptr()
            assert mapped_file(addr) == str(path.resolve()), path.name
            assert mapped_file(cs.get(0, "small").data_ptr()) != str(path.resolve())
            if "wide" in cs.keys:
                assert cs.candidates[0].reads_ranges("big") and not cs.candidates[0].reads_ranges("wide")
            del big
            gc.collect()
            assert mapped_file(addr) != str(path.resolve()), path.name  # unmapped with the tensor


def test_torch_zip_ranges_read_only_the_range(tmp_path):
    from twamerge.io import count_reads

    paths, sd = _mixed_files(tmp_path / "in")
    with count_reads() as reads, open_checkpoints([paths[1]], min_count=1) as cs:
        assert torch.equal(cs.get_slice(0, "big", 1000, 1010), sd["big"].reshape(-1)[1000:1010])
        assert reads.bytes_read[paths[1].resolve()] == 10 * 4
        assert torch.equal(cs.get_slice(0, "wide", 5, 8), sd["big"].t().reshape(-1)[5:8])  # read whole, then cut
        assert reads.bytes_read[paths[1].resolve()] == 10 * 4 + sd["big"].numel() * 4


def test_a_file_cut_short_after_opening_is_an_error_on_read(tmp_path):
    paths, sd = _mixed_files(tmp_path / "in")
    with open_checkpoints([paths[0]], min_count=1) as cs:
        keep = paths[0].stat().st_size - 1000
        os.truncate(paths[0], keep)
        # Whichever tensor is last in the file now ends past its end: mapped or read, it is refused by name.
        last = max(cs.keys, key=lambda k: cs.position(0, k)[1])
        with pytest.raises(CheckpointError, match=f"a.safetensors: tensor '{last}' is truncated"):
            cs.get(0, last)


def test_stack_fills_a_reused_buffer(tmp_path):
    """``stack``/``stack_slice`` with ``out`` fill the caller's buffer (a view of a larger one works) with what
    they would have returned; a buffer of the wrong shape or dtype is refused naming the key."""
    from twamerge.errors import InvalidArgumentError

    paths, sds = write_variants(tmp_path)
    buf = torch.full((4 * 256,), float("nan"))
    with open_checkpoints(paths) as cs:
        for key in cs.float_keys:
            n = cs.numel(key)
            out = buf[: 4 * n].view(4, *cs.shape(key))
            assert cs.stack(key, out=out) is out and torch.equal(out, torch.stack([sd[key] for sd in sds])), key
            part = buf[: 4 * (n - 1)].view(4, n - 1)
            assert cs.stack_slice(key, 1, n, out=part) is part
            assert torch.equal(part, torch.stack([sd[key].reshape(-1)[1:] for sd in sds])), key
            assert torch.equal(cs.stack_slice(key, 0, n), torch.stack([sd[key].reshape(-1) for sd in sds])), key
        with pytest.raises(InvalidArgumentError, match=r"stacking 'fc.weight' needs \[4, 10, 8\]"):
            cs.stack("fc.weight", out=torch.empty(4, 80))
        with pytest.raises(InvalidArgumentError, match="stacking 'fc.bias' needs"):
            cs.stack_slice("fc.bias", 0, 10, out=torch.empty(4, 10, dtype=torch.float64))
