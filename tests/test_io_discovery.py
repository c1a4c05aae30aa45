"""io.discovery: paths, globs and directories -> ordered candidates (files written by safetensors and huggingface_hub)."""

from __future__ import annotations

import pytest
from ckpt_fixtures import small_state_dict, touch_all

from twamerge.errors import CheckpointError
from twamerge.io import expand_paths


def test_expand_paths_natural_order_globs_and_dirs(tmp_path):
    touch_all(tmp_path, ["epoch10.safetensors", "epoch9.safetensors", "epoch1.safetensors", "epoch2.safetensors"])
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
    (p,) = touch_all(tmp_path, ["a.safetensors"])
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
