"""Data-free averaging checked against numpy, on real formats and on the real MiniLM weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_fixtures import minilm_dir, perturbed_minilm_dirs, small_state_dict, write_variants
from helpers import assert_close
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twamerge import average_checkpoints, linear_merge, open_checkpoints
from twamerge.errors import InvalidArgumentError


def _np_average(sds: list[dict[str, torch.Tensor]], w: list[float], key: str) -> np.ndarray:
    return sum(wi * sd[key].double().numpy() for wi, sd in zip(w, sds))


def test_uniform_weighted_ema_match_numpy_on_mixed_formats(tmp_path):
    paths, sds = write_variants(tmp_path / "in")
    k = len(paths)
    cases = {
        "uniform": ({}, [1 / k] * k),
        "weighted": ({"weights": [1.0, 2.0, 3.0, 4.0]}, [0.1, 0.2, 0.3, 0.4]),
        "ema": ({"ema": 0.5}, [0.125, 0.125, 0.25, 0.5]),
    }
    for name, (kwargs, w) in cases.items():
        out = tmp_path / f"{name}.safetensors"
        summary = average_checkpoints(paths, out, **kwargs)
        assert summary["method"] == name and summary["count"] == k
        np.testing.assert_allclose(summary["weights"], w, rtol=1e-12)
        merged = load_file(str(out))
        assert set(merged) == set(sds[0])
        for key, t in merged.items():
            assert t.dtype == sds[0][key].dtype
            if key == "bn.num_batches_tracked":
                assert int(t) == 100
                continue
            ref = _np_average(sds, w, key).astype(np.float32)
            assert_close(f"{name}:{key}", torch.from_numpy(ref), t)
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert meta["twamerge.method"] == name
        assert json.loads(meta["twamerge.weights"]) == pytest.approx(w)
        assert [s["sha256"] for s in json.loads(meta["twamerge.sources"])] == [s["sha256"] for s in summary["inputs"]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float64_and_casts_once(tmp_path, dtype):
    sds = [small_state_dict(s, dtype=dtype) for s in range(3)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(sd, str(paths[-1]))
    with open_checkpoints(paths) as cs:
        merged = linear_merge(cs, [0.2, 0.3, 0.5])
        wide = linear_merge(cs, [0.2, 0.3, 0.5], out_dtype=torch.float32)
    for key in ("conv.weight", "fc.weight"):
        exact = torch.from_numpy(_np_average(sds, [0.2, 0.3, 0.5], key))
        assert merged[key].dtype == dtype and wide[key].dtype == torch.float32
        # One rounding at the end: equal to rounding the float64 result.
        assert torch.equal(merged[key], exact.to(dtype))
        assert_close(key, exact.float(), wide[key])


def test_per_key_weights_and_integer_mismatch_warning(tmp_path, caplog):
    a, b = small_state_dict(0), small_state_dict(1)
    b["bn.num_batches_tracked"] = torch.tensor(7)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    with open_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) as cs:
        with caplog.at_level(logging.WARNING, logger="twamerge"):
            merged = linear_merge(cs, lambda key: [1.0, 0.0] if key.startswith("fc") else [0.0, 1.0])
            linear_merge(cs, [0.5, 0.5])  # a fit merges many times (greedy trials): one warning per key
        with pytest.raises(InvalidArgumentError, match="got 3 weights"):
            linear_merge(cs, [0.3, 0.3, 0.4])
    assert torch.equal(merged["fc.weight"], a["fc.weight"]) and torch.equal(merged["conv.weight"], b["conv.weight"])
    assert int(merged["bn.num_batches_tracked"]) == 100
    assert sum("bn.num_batches_tracked" in r.getMessage() for r in caplog.records) == 1


def test_minilm_hf_dirs_to_directory_output(tmp_path):
    dirs, sds = perturbed_minilm_dirs(tmp_path / "in", 3)
    out = tmp_path / "merged"
    summary = average_checkpoints(dirs, out, weights=[0.5, 0.25, 0.25])
    assert summary["inputs"][0]["format"] == "hf-dir:safetensors"
    assert (out / "config.json").read_text() == (minilm_dir() / "config.json").read_text()
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(sds[0])
    for key in merged:
        if not merged[key].is_floating_point():
            assert torch.equal(merged[key], sds[0][key])
            continue
        ref = _np_average(sds, [0.5, 0.25, 0.25], key).astype(np.float32)
        assert_close(key, torch.from_numpy(ref), merged[key])
    # The output loads in the library people use for such directories.
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(out))
    assert_close("embeddings", merged["embeddings.word_embeddings.weight"],
                 model.embeddings.word_embeddings.weight.detach())


_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    from twamerge import average_checkpoints
    paths = sys.argv[2:]
    average_checkpoints(paths, sys.argv[1])
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def peak_rss_kb(paths: list[Path], out: Path) -> int:
    """Peak RSS of averaging ``paths`` in a fresh interpreter (KiB)."""
    # glibc's dynamic mmap threshold makes peak RSS depend on allocation history (+-30 MB here); a fixed
    # threshold returns freed tensors to the OS at once, so what remains is what the merge really holds.
    # Holding every file's pages (no page release after reading a pickle) still shows as +190 MB.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", _PEAK, str(out), *map(str, paths)], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kb"]


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_peak_memory_independent_of_candidate_count(tmp_path, fmt):
    # 8 tensors of 1M floats: 32 MB per checkpoint, so holding all 8 files would add ~190 MB.
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(8):
        sd = {f"layer{j}.weight": torch.randn(1024, 1024, generator=g) for j in range(8)}
        p = tmp_path / f"c{i}.{fmt}"
        save_file(sd, str(p)) if fmt == "safetensors" else torch.save(sd, p)
        paths.append(p)
    ckpt_kb = 32 * 1024
    two = peak_rss_kb(paths[:2], tmp_path / "two.safetensors")
    eight = peak_rss_kb(paths, tmp_path / "eight.safetensors")
    assert eight - two < ckpt_kb // 2, f"8 checkpoints: {eight} KiB, 2 checkpoints: {two} KiB"


def test_float8_and_unsigned_tensors_merge_and_round_trip(tmp_path):
    """Every dtype the reader accepts is written back; float8 is averaged (torch has no float8 promotion)."""
    a = {"w8": torch.tensor([0.5, 1.0, -2.0]).to(torch.float8_e4m3fn), "u16": torch.tensor([1, 60000], dtype=torch.uint16)}
    b = {"w8": torch.tensor([1.5, 1.0, -1.0]).to(torch.float8_e4m3fn), "u16": torch.tensor([1, 60000], dtype=torch.uint16)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    average_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors")
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert merged["w8"].dtype == torch.float8_e4m3fn and merged["w8"].float().tolist() == [1.0, 1.0, -1.5]
    assert torch.equal(merged["u16"], a["u16"])


def test_batchnorm_statistics_are_flagged(tmp_path, caplog):
    """Averaged BatchNorm statistics do not fit the averaged weights: the summary counts them and a warning says
    how to re-estimate them."""
    import logging

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(small_state_dict(i), str(paths[-1]))
    with caplog.at_level(logging.WARNING, logger="twamerge"):
        summary = average_checkpoints(paths, tmp_path / "m.safetensors")
    assert summary["batchnorm_statistics_averaged"] == 2
    assert any("re-estimate" in r.getMessage() and "--epochs 0" in r.getMessage() for r in caplog.records)


def test_blocks_and_windows_give_the_whole_tensor_accumulators_bits(tmp_path, monkeypatch):
    """The merge sums a key block by block over windows of the candidates (ranged reads; whole tensors for a
    transposed torch tensor): the same float64 numbers as one accumulator over the whole tensor, cast once."""
    import twamerge.merge as merge

    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(37, 29, generator=g), "h": torch.randn(1001, generator=g).half(),
            "t": torch.randn(13, 17, generator=g)} for _ in range(3)]
    paths = [tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.safetensors"]
    save_file(sds[0], str(paths[0]))
    torch.save({**sds[1], "t": sds[1]["t"].t().contiguous().t()}, paths[1])  # stored transposed: no ranges
    save_file(sds[2], str(paths[2]))
    monkeypatch.setattr(merge, "BLOCK", 64)
    monkeypatch.setattr(merge, "WINDOW_BYTES", 3 * 2 * 200)  # a window of 200 float16s per candidate
    w = [0.2, 0.3, 0.5]
    with open_checkpoints(paths) as cs:
        assert cs.reads_ranges("w") and not cs.reads_ranges("t")
        merged = linear_merge(cs, w)
        wide = linear_merge(cs, w, out_dtype=torch.float64)
    for key in sds[0]:
        acc = torch.zeros(sds[0][key].shape, dtype=torch.float64)
        for wi, sd in zip(w, sds):
            acc.add_(sd[key], alpha=wi)
        assert torch.equal(merged[key], acc.to(sds[0][key].dtype)), key
        assert torch.equal(wide[key], acc), key


def test_no_hash_writes_no_input_hashes_and_hashes_nothing(tmp_path):
    from twamerge.io import count_reads

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(small_state_dict(i), str(paths[-1]))
    with count_reads() as reads:
        summary = average_checkpoints(paths, tmp_path / "fast.safetensors", hash_inputs=False)
    assert not reads.hash_bytes_read
    with safe_open(str(tmp_path / "fast.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["twamerge.sources"]) == [{"path": str(p), "format": "safetensors"} for p in paths]
    assert "sha256" not in meta["twamerge.sources"]
    assert all("sha256" not in s for s in summary["inputs"])
    assert len(summary["outputs"][0]["sha256"]) == 64  # the output's hash stays (computed as it is written)
    hashed = average_checkpoints(paths, tmp_path / "hashed.safetensors")
    fast, slow = load_file(str(tmp_path / "fast.safetensors")), load_file(str(tmp_path / "hashed.safetensors"))
    assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast)  # the same merge
    assert [s["sha256"] for s in hashed["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
