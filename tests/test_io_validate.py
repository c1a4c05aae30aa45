"""io.validate: key/shape/dtype agreement across candidates and the NaN/Inf policy."""

from __future__ import annotations

import pytest
import torch
from ckpt_fixtures import small_state_dict, touch_all
from safetensors.torch import save_file

from twamerge.errors import CheckpointError, CheckpointMismatchError, NonFiniteError
from twamerge.io import open_checkpoints


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
    paths = touch_all(tmp_path, ["a.safetensors"])[:n]
    with pytest.raises(CheckpointError, match=f"need at least 2 checkpoints, got {n}"):
        open_checkpoints(paths)
