"""A real training run shared by the fit tests: an MLP on scikit-learn's digits, one checkpoint per epoch.

Validation and test splits are written with ``datasets.save_to_disk``; the checkpoints with
safetensors, as a user's training script would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ASSETS = Path(__file__).parent / "assets"
MODEL_SPEC = str(ASSETS / "mlp.py") + ":build"


@dataclass
class DigitsRun:
    checkpoints: list[Path]
    val: Path
    test: Path
    root: Path


def make_digits_run(root: Path, *, epochs: int = 6, batchnorm: bool = False, seed: int = 0,
                    scale: float = 1.0, lr: float = 0.1, val_rows: int = 450) -> DigitsRun:
    """``epochs`` checkpoints of SGD (momentum 0.9, learning rate ``lr``) on 900 images; ``val_rows`` (at most 450)
    validation and 447 test images. A low ``lr`` gives a run that is still improving at its last checkpoint."""
    import sys

    import datasets
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(ASSETS))
    from mlp import build

    sys.path.pop(0)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    train, val, test = perm[:900], perm[900:900 + min(val_rows, 450)], perm[1350:]
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("val", val), ("test", test)):
        datasets.Dataset.from_dict({"x": x[rows].tolist(), "label": y[rows].tolist()}).save_to_disk(str(root / name))
    torch.manual_seed(seed)
    model = build(batchnorm=batchnorm)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train]).long()
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), 32):
            rows = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(xt[rows]), yt[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().clone() * (1 / scale if v.is_floating_point() and "running" not in k else 1)
                 for k, v in model.state_dict().items()}
        path = root / f"epoch{epoch + 1}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return DigitsRun(paths, root / "val", root / "test", root)


# Few epochs and large batches: the tests check behaviour, not the quality of the fit (so no --min-steps floor either).
FAST = dict(epochs=3, batch_size=64, min_steps=0)


def fit_digits(run: DigitsRun, out: Path, model_args: dict | None = None, checkpoints: list | None = None, **cfg):
    """``twamerge.fit`` on ``run`` with the FAST settings, the report beside ``out`` (``.json``)."""
    from twamerge.config import DataConfig, FitConfig, ModelConfig, OutputConfig
    from twamerge.pipeline import fit

    return fit(checkpoints or run.checkpoints, val=DataConfig(str(run.val)),
               model=ModelConfig(MODEL_SPEC, model_args or {}), output=OutputConfig(out, report=out.with_suffix(".json")),
               cfg=FitConfig(**{**FAST, **cfg}))
