"""A fit end to end on the GPU, checked against the same fit on the CPU (part of ``benchmarks/gpu_check.sh``).

Trains a small MLP on scikit-learn's digits (no download, no ``datasets``: the device image lacks it),
saves 8 epoch checkpoints with safetensors in float32 and in bfloat16, writes ``--val`` as ``.npz``,
then runs ``twamerge.fit``:

1. float32 candidates on the CPU (torch references) - the oracle;
2. the same on CUDA with the Triton kernels (``backend="triton"``): alphas must match the CPU's;
3. bfloat16 candidates on CUDA with ``precision="bf16"``: bf16 flat buffers, the held-out accuracy
   must stay within 2 points of the float32 fit.

Prints one JSON object per fit (alphas' max difference, held-out accuracy, seconds per step, peak
memory) and exits 1 when a check fails. On a machine without CUDA it runs the CPU fit only and says so.

    python benchmarks/gpu_fit_check.py --out /tmp/gpu_fit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from twamerge import DataConfig, FitConfig, ModelConfig, OutputConfig, fit

SPEC = f"{Path(__file__).resolve()}:build"


def build() -> nn.Module:
    """The fitted model (``--model benchmarks/gpu_fit_check.py:build``): an MLP on the 8x8 digits."""
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_run(root: Path, epochs: int = 8) -> tuple[list[Path], list[Path], Path, str]:
    """Epoch checkpoints (float32 and bf16 copies), the --val file and the model spec."""
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(y))
    train, val = perm[:1200], perm[1200:]
    np.savez(root / "val.npz", x=x[val], label=y[val].astype(np.int64))
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train]).long()
    f32, bf16 = [], []
    for epoch in range(1, epochs + 1):
        for i in range(0, len(train), 32):
            loss = nn.functional.cross_entropy(model(xt[i:i + 32]), yt[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {f"{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        f32.append(root / f"epoch_{epoch:02d}.safetensors")
        save_file(state, str(f32[-1]))
        bf16.append(root / "bf16" / f"epoch_{epoch:02d}.safetensors")
        bf16[-1].parent.mkdir(exist_ok=True)
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(bf16[-1]))
    return f32, bf16, root / "val.npz", SPEC


def run_fit(name: str, ckpts: list[Path], val: Path, spec: str, out: Path, **cfg) -> dict:
    report = fit(ckpts, val=DataConfig(str(val)), model=ModelConfig(spec), output=OutputConfig(out / f"{name}.safetensors", force=True),
                 cfg=FitConfig(epochs=5, greedy=False, eval_candidates=False, **cfg))
    twa = next(m for m in report["methods"] if m["kind"] == "twa")
    return {"fit": name, "heldout_accuracy": twa["heldout"]["metric"], "alphas": report["merge"]["block_alphas"],
            "seconds_per_step": report["fit"]["seconds_per_step"], "memory": report["memory"],
            "n_cols": report["subspace"]["n_cols"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_fit_check"))
    args = ap.parse_args(argv)
    f32, bf16, val, spec = make_run(args.out / "run")
    results = [run_fit("cpu_torch", f32, val, spec, args.out, device="cpu", backend="torch")]
    failures = []
    if torch.cuda.is_available():
        results.append(run_fit("cuda_triton", f32, val, spec, args.out, device="cuda", backend="triton"))
        results.append(run_fit("cuda_bf16", bf16, val, spec, args.out, device="cuda", precision="bf16"))
        ref = torch.tensor(results[0]["alphas"])
        diff = (torch.tensor(results[1]["alphas"]) - ref).abs().max().item()
        results[1]["max_alpha_diff_vs_cpu"] = diff
        if diff > 1e-3:
            failures.append(f"cuda_triton alphas differ from the CPU's by {diff:.2e} (> 1e-3)")
        bf16_fit = results[2]
        if bf16_fit["memory"]["flat_buffer_bytes"] != 2 * 2 * bf16_fit["n_cols"]:
            failures.append(f"bf16 fit: flat buffers of {bf16_fit['memory']['flat_buffer_bytes']} bytes, not bf16 "
                            f"weights + gradients ({4 * bf16_fit['n_cols']})")
        drop = results[0]["heldout_accuracy"] - results[2]["heldout_accuracy"]
        if drop > 0.02:
            failures.append(f"bf16 held-out accuracy is {drop:.3f} below float32 (> 0.02)")
    else:
        print("no CUDA device: only the CPU fit ran", file=sys.stderr)
    for r in results:
        r["alphas"] = f"[{len(r['alphas'])} blocks]"
        print(json.dumps(r))
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
