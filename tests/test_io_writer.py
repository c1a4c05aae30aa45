"""io.writer and io.atomic: atomic, reproducible outputs (safetensors, torch, shards, HF folders)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckpt_fixtures import small_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twamerge.errors import OutputError
from twamerge.io import open_checkpoints, write_checkpoint
from twamerge.options import parse_size


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

    def failing(tensors, path, fmt, metadata, pieces):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, fmt, metadata, pieces)

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
    (src / "modules.json").write_text('[{"idx": 0, "path": "", "type": "Transformer"}, '
                                      '{"idx": 1, "path": "1_Pooling", "type": "Pooling"}]')
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    # Code, a training run's state and the source's own card are never copied (only data-only side files are).
    for name in ("modeling_x.py", "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "README.md"):
        (src / name).write_text("x")
    save_file({"w": torch.zeros(1)}, str(src / "model.safetensors"))
    out = tmp_path / "merged"
    written = write_checkpoint({"w": torch.ones(3)}, out, metadata={}, hf_source_dir=src)
    assert written == [out / "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["1_Pooling", "config.json", "model.safetensors", "modules.json",
                                                     "tokenizer.json"]
    assert [p.name for p in (out / "1_Pooling").iterdir()] == ["config.json"]
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


def test_refuse_existing_and_atomic_file(tmp_path):
    from twamerge.io import atomic_file, refuse_existing
    from twamerge.report import atomic_output

    p = tmp_path / "r.json"
    refuse_existing(p)  # absent: fine
    p.write_text("old")
    with pytest.raises(OutputError, match=r"r.json already exists; pass --force to overwrite it or choose another"):
        refuse_existing(p)
    with pytest.raises(OutputError, match=r"r.json: report exists; pass --force to overwrite it$"):
        refuse_existing(p, "report")
    refuse_existing(p, "report", force=True)
    with pytest.raises(RuntimeError), atomic_file(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]
    with atomic_file(p) as tmp:
        tmp.write_text("new")
    assert p.read_text() == "new" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(OutputError, match="plot exists"), atomic_output(p, False, "plot"):
        pass
    with atomic_output(p, True, "plot") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"
        tmp.write_text("plot")
    assert p.read_text() == "plot" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_the_output_hash_comes_from_the_bytes_written(tmp_path, monkeypatch):
    """The writer hashes what it writes: the recorded hash is the file's real SHA-256 and survives the rename,
    and asking for it reads nothing back."""
    import builtins
    import hashlib

    from twamerge.io import sha256_file, write_checkpoint

    tensors = {"w": torch.randn(300, 7), "flag": torch.tensor([True, False]), "h": torch.randn(5).half()}
    real_open, read_back = builtins.open, []

    def spy(file, mode="r", *args, **kwargs):
        if "r" in mode and isinstance(file, (str, os.PathLike)) and Path(file).parent == tmp_path:
            read_back.append(Path(file).name)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    [out] = write_checkpoint(tensors, tmp_path / "o.safetensors", metadata={"a": "b"})  # logs its sha256
    digest = sha256_file(out)
    monkeypatch.undo()
    assert read_back == []  # neither the temporary file nor the output was read to hash it
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
