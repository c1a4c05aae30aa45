"""inspect: per-file facts, mergeability, centred similarity against numpy, basis memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ckpt_fixtures import small_state_dict, write_variants
from safetensors.torch import save_file

from twamerge import inspect_checkpoints
from twamerge.inspect_ckpt import basis_memory_bytes


def test_inspect_mixed_formats_matches_numpy(tmp_path):
    paths, sds = write_variants(tmp_path)
    r = inspect_checkpoints(paths)
    json.dumps(r, allow_nan=False)
    assert r["count"] == 4 and r["mergeable"] and r["reason"] is None
    assert [f["format"] for f in r["files"]] == ["torch", "safetensors", "safetensors-sharded", "torch"]
    f0 = r["files"][0]
    assert f0["tensors"] == 9 and f0["dtypes"] == {"float32": 8, "int64": 1}
    assert f0["params"] == sum(t.numel() for t in sds[0].values())
    assert f0["float_params"] == f0["params"] - 1 and f0["bytes"] == paths[0].stat().st_size
    assert r["files"][3]["renamed"]["container"] == "state_dict"

    x = np.stack([np.concatenate([sd[k].double().numpy().ravel() for k in sorted(sd) if sd[k].is_floating_point()])
                  for sd in sds])
    xc = x - x.mean(0)
    norms = np.linalg.norm(xc, axis=1)
    cos = (xc @ xc.T) / np.outer(norms, norms)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    sim = r["similarity"]
    np.testing.assert_allclose(sim["cosine"], cos, atol=1e-6)
    np.testing.assert_allclose(sim["distance"], dist, rtol=1e-6)
    np.testing.assert_allclose(sim["norms"], norms, rtol=1e-6)
    assert sim["rank"] == 3  # centred rows sum to zero: rank K-1

    d = f0["float_params"]
    assert r["float_params"] == d
    assert r["basis_memory"]["bytes"] == {str(b): basis_memory_bytes(4, d, b) for b in (1, 2, 4, 8)}


def test_basis_memory_formula():
    # 3 rows; D=1000 pads to 1024 = 8 groups of 128: codes 1024*bits/8 bytes + 8 groups * 8 bytes per row.
    assert basis_memory_bytes(4, 1000, 1) == 3 * (128 + 64)
    assert basis_memory_bytes(4, 1000, 4) == 3 * (512 + 64)
    assert basis_memory_bytes(4, 1000, 8) == 3 * (1024 + 64)
    assert basis_memory_bytes(4, 1000, 32) == 3 * 4000
    assert basis_memory_bytes(1, 1000, 4) == 0


def test_duplicates_lower_the_rank(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    for name, sd in {"a": a, "b": b, "c": a}.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    r = inspect_checkpoints([tmp_path / f"{n}.safetensors" for n in "abc"])
    assert r["similarity"]["rank"] == 1
    assert r["similarity"]["distance"][0][2] == 0.0


def test_not_mergeable_reports_reason(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    b["fc.weight"] = torch.zeros(3, 3)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    r = inspect_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert not r["mergeable"] and "'fc.weight'" in r["reason"] and r["similarity"] is None
    one = inspect_checkpoints([tmp_path / "a.safetensors"])
    assert not one["mergeable"] and "at least 2" in one["reason"]
    assert one["basis_memory"]["bytes"]["4"] == 0


def test_nonfinite_is_reported_not_raised(tmp_path):
    a, b = small_state_dict(0), small_state_dict(1)
    b["conv.bias"][0] = float("nan")
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    r = inspect_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert not r["mergeable"] and "NaN" in r["reason"]


@pytest.mark.parametrize("similarity", [False])
def test_inspect_without_similarity(tmp_path, similarity):
    paths, _ = write_variants(tmp_path)
    r = inspect_checkpoints(paths, similarity=similarity)
    assert r["mergeable"] and r["similarity"] is None
