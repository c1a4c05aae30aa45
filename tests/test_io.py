"""Checkpoint reading, validation and writing on files written by torch, safetensors and huggingface_hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckpt_fixtures import small_state_dict, write_variants
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twamerge.io import (
    expand_paths,
    open_checkpoints,
    unwrap_state_dict,
    write_checkpoint,
)
from twamerge.options import parse_size
from twamerge.errors import (
    CheckpointError,
    CheckpointMismatchError,
    NonFiniteError,
    OutputError,
)


def _touch_all(folder: Path, names: list[str]) -> list[Path]:
    out = []
    for n in names:
        p = folder / n
        save_file({"w": torch.zeros(2)}, str(p))
        out.append(p)
    return out


def test_expand_paths_natural_order_globs_and_dirs(tmp_path):
    _touch_all(tmp_path, ["epoch10.safetensors", "epoch9.safetensors", "epoch1.safetensors", "epoch2.safetensors"])
    want = ["epoch1", "epoch2", "epoch9", "epoch10"]
    assert [p.stem for p in expand_paths([str(tmp_path / "epoch*.safetensors")])] == want
    assert [p.stem for p in expand_paths([tmp_path])] == want
    # Explicit arguments keep their order.
    assert [p.stem for p in expand_paths([tmp_path / "epoch9.safetensors", tmp_path / "epoch1.safetensors"])] == [
        "epoch9", "epoch1"]


def test_expand_paths_model_dir_and_index_shards(tmp_path):
    from huggingface_hub import save_torch_state_dict

    hf = tmp_path / "hf"
    hf.mkdir()
    save_torch_state_dict(small_state_dict(0), hf, max_shard_size=600)
    (hf / "config.json").write_text("{}")
    assert expand_paths([hf]) == [hf]
    # A glob over the shard folder yields the index, not the shards it covers.
    assert [p.name for p in expand_paths([str(hf / "*")])] == ["model.safetensors.index.json"]


@pytest.mark.parametrize("case", ["duplicate", "missing", "empty-glob", "empty-dir"])
def test_expand_paths_errors(tmp_path, case):
    (p,) = _touch_all(tmp_path, ["a.safetensors"])
    (tmp_path / "empty").mkdir()
    args = {
        "duplicate": [p, tmp_path / "." / "a.safetensors"],
        "missing": [tmp_path / "nope.pt"],
        "empty-glob": [str(tmp_path / "*.pt")],
        "empty-dir": [tmp_path / "empty"],
    }[case]
    with pytest.raises(CheckpointError) as e:
        expand_paths(args)
    assert "\n" not in str(e.value)
    if case == "duplicate":
        assert "more than once" in str(e.value)


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


def test_mismatched_shapes_name_key_and_files(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    b["fc.weight"] = torch.zeros(10, 9)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        open_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    msg = str(e.value)
    assert "'fc.weight'" in msg and "[10, 8]" in msg and "[10, 9]" in msg and "b.safetensors" in msg


def test_missing_keys_and_intersection(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    del b["fc.bias"]
    b["extra"] = torch.zeros(3)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(CheckpointMismatchError) as e:
        open_checkpoints(paths)
    assert "fc.bias" in str(e.value) and "extra" in str(e.value) and "--keys intersection" in str(e.value)
    with open_checkpoints(paths, keys="intersection") as cs:
        assert "fc.bias" not in cs.keys and "extra" not in cs.keys and "fc.weight" in cs.keys
        assert cs.dropped_keys == ["extra", "fc.bias"]


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


def test_nonfinite_weights(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    b["fc.weight"][0, 0] = float("nan")
    b["fc.weight"][1, 1] = float("inf")
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with open_checkpoints(paths) as cs, pytest.raises(NonFiniteError) as e:
        cs.get(1, "fc.weight")
    assert "b.safetensors" in str(e.value) and "'fc.weight'" in str(e.value) and "1 NaN and 1 Inf" in str(e.value)
    with open_checkpoints(paths, allow_nonfinite=True) as cs:
        assert cs.get(1, "fc.weight").isnan().sum() == 1


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_candidates(tmp_path, n):
    paths = _touch_all(tmp_path, ["a.safetensors"])[:n]
    with pytest.raises(CheckpointError, match=f"need at least 2 checkpoints, got {n}"):
        open_checkpoints(paths)


def test_write_safetensors_roundtrip_with_metadata_and_tied(tmp_path):
    sd = small_state_dict(0)
    sd["head.weight"] = sd["fc.weight"]  # tied: same storage
    out = tmp_path / "m.safetensors"
    written = write_checkpoint(sd, out, metadata={"twamerge.method": "test"})
    assert written == [out]
    back = load_file(str(out))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["twamerge.method"] == "test" and meta["format"] == "pt"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporaries left
    with pytest.raises(OutputError, match="already exists; pass --force"):
        write_checkpoint(sd, out, metadata={})
    write_checkpoint({"x": torch.ones(1)}, out, metadata={}, force=True)
    assert list(load_file(str(out))) == ["x"]


def test_write_torch_and_sharded(tmp_path):
    sd = small_state_dict(0)
    pt = write_checkpoint(sd, tmp_path / "m.pt", metadata={"k": "v"})
    assert [p.name for p in pt] == ["m.pt", "m.pt.metadata.json"]
    back = torch.load(pt[0], weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert json.loads(pt[1].read_text())["k"] == "v"

    shards = write_checkpoint(sd, tmp_path / "s.safetensors", metadata={"k": "v"}, max_shard_size=parse_size("600B"))
    assert len(shards) > 2 and shards[-1].name == "s.safetensors.index.json"
    assert shards[0].name == f"s-00001-of-{len(shards) - 1:05d}.safetensors"
    index = json.loads(shards[-1].read_text())
    assert index["metadata"]["k"] == "v" and set(index["weight_map"]) == set(sd)
    save_file(sd, str(tmp_path / "ref.safetensors"))
    with open_checkpoints([shards[-1], tmp_path / "ref.safetensors"]) as cs:
        assert all(torch.equal(cs.get(0, k), sd[k]) for k in cs.keys)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import twamerge.io.writer as ck

    calls = []
    real = ck._save

    def failing(tensors, path, fmt, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, fmt, metadata)

    monkeypatch.setattr(ck, "_save", failing)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(small_state_dict(0), tmp_path / "s.safetensors", metadata={}, max_shard_size=600)
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        write_checkpoint(small_state_dict(0), tmp_path / "d", metadata={}, max_shard_size=600)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="is not a directory"):
        write_checkpoint(small_state_dict(0), tmp_path / "file" / "sub" / "m.safetensors", metadata={})
    with pytest.raises(OutputError, match="suffix '.txt'"):
        write_checkpoint(small_state_dict(0), tmp_path / "m.txt", metadata={})
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(OutputError, match="not writable"):
            write_checkpoint(small_state_dict(0), ro / "m.safetensors", metadata={})


def test_directory_output_copies_hf_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "tokenizer.json").write_text("{}")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(src / "model.safetensors"))
    out = tmp_path / "merged"
    written = write_checkpoint({"w": torch.ones(3)}, out, metadata={}, hf_source_dir=src)
    assert written == [out / "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["1_Pooling", "config.json", "model.safetensors", "tokenizer.json"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "src"]
    write_checkpoint({"w": torch.zeros(3)}, out, metadata={}, hf_source_dir=src, force=True)
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "src"]


def test_force_overwrite_removes_what_the_previous_output_had(tmp_path):
    sd = small_state_dict(0)
    out = tmp_path / "s.safetensors"
    (tmp_path / "notes.txt").write_text("the user's file beside the output")
    many = write_checkpoint(sd, out, metadata={}, max_shard_size=300)
    fewer = write_checkpoint(sd, out, metadata={}, max_shard_size=600, force=True)
    assert len(many) > len(fewer) > 2
    # Sharded -> fewer shards: the old shards named in the old index go.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", *(p.name for p in fewer)])
    one = write_checkpoint(sd, out, metadata={}, max_shard_size=parse_size("1MB"), force=True)
    assert [p.name for p in one] == ["s.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "s.safetensors"]
    # Single -> sharded: the single file would shadow the index for a loader given the output name.
    again = write_checkpoint(sd, out, metadata={}, max_shard_size=600, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", *(p.name for p in again)])
    assert not out.exists()
    save_file(sd, str(tmp_path / "ref.safetensors"))
    with open_checkpoints([again[-1], tmp_path / "ref.safetensors"]) as cs:
        assert all(torch.equal(cs.get(0, k), sd[k]) for k in cs.keys)


def test_directory_output_config_names_the_written_dtype(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert", "torch_dtype": "float32"}')
    save_file({"w": torch.zeros(2)}, str(src / "model.safetensors"))
    out = write_checkpoint({"w": torch.ones(2, dtype=torch.bfloat16), "ids": torch.arange(3)}, tmp_path / "m",
                           metadata={}, hf_source_dir=src)
    config = json.loads((out[0].parent / "config.json").read_text())
    assert config == {"model_type": "bert", "torch_dtype": "bfloat16"}
    assert json.loads((src / "config.json").read_text())["torch_dtype"] == "float32"  # the source is untouched
