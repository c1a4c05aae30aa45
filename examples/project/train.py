"""Make a copy of this project with what a training run leaves: checkpoints and validation data.

    python examples/project/train.py --out runs/project
    cd runs/project && twamerge fit ckpts/*.safetensors --val data/

DIR gets this folder's pyproject.toml and model.py, ``ckpts/epoch_NN.safetensors`` (one per epoch of SGD on
scikit-learn's 8x8 digits, at a constant learning rate so that the checkpoints scatter around a good
region) and ``data/`` (the validation rows, ``datasets.save_to_disk``: a column ``x`` of 64 pixels and a
``label``). The model and the fit's settings are in pyproject.toml, so the twamerge line names only the
checkpoints and the data.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/project"), help="the project copy to create (new)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder (the twamerge line refuses to overwrite its output)")
    out.mkdir(parents=True)
    for name in ("pyproject.toml", "model.py"):
        shutil.copy2(HERE / name, out / name)

    import datasets
    from sklearn.datasets import load_digits

    spec = importlib.util.spec_from_file_location("project_model", out / "model.py")
    project_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(project_model)

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(len(y))
    train, val = order[: len(y) // 2], order[len(y) // 2 :]
    datasets.Dataset.from_dict({"x": x[val].tolist(), "label": y[val].tolist()}).save_to_disk(str(out / "data"))

    torch.manual_seed(args.seed)
    model = project_model.build(hidden=64)  # as model-args in pyproject.toml
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    gen = torch.Generator().manual_seed(args.seed)
    (out / "ckpts").mkdir()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 32):
            rows = perm[i : i + 32]
            loss = F.cross_entropy(model(xt[rows]), yt[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                  str(out / "ckpts" / f"epoch_{epoch:02d}.safetensors"))
    print(f"{out}: {args.epochs} checkpoints in ckpts/, {len(val)} validation rows in data/; now, in {out}:\n"
          "    twamerge fit ckpts/*.safetensors --val data/")
    return out


if __name__ == "__main__":
    main()
