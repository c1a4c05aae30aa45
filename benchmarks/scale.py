"""How a fit scales with the parameter count D, against the issue's targets, measured in one run.

For each D (10M and 100M; --big adds 300M) it writes K float32 safetensors candidates of an MLP,
then runs `twamerge fit` in a fresh process (one thread) and prints, each against its target:

- peak RSS growth per parameter (peak RSS of the fit minus that of a process that imported
  twamerge and read nothing), against the method's floor: flat weights and gradients (8 B), the
  float32 mean (4 B) and the basis at its bit width ((K-1) * bits/8 + 8 (K-1) / group_size B);
- subspace build / reading the candidates once (the same reader, every tensor of every candidate);
- fit step / a plain forward + backward of the same model on the same batch;
- baselines (scoring every candidate, the uniform average and the greedy soup) / the fit phase.

    python benchmarks/scale.py                 # 10M and 100M, about 10 minutes on 2 CPU cores
    python benchmarks/scale.py --sizes 10e6    # one size
    python benchmarks/scale.py --big           # adds 300M (needs ~10 GB of disk under --tmp and RAM)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "_scale_model.py"

# Runs in a fresh process: one `twamerge fit` through the CLI entry point, then its peak RSS.
_FIT = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from twamerge.cli import app
    try:
        app(sys.argv[1:], standalone_mode=False)
    finally:
        print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
    """
)

# The same process start-up (torch, twamerge, the model file) without the fit: the RSS baseline.
_IDLE = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    import twamerge, twamerge.cli, twamerge.pipeline
    print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
    """
)

# Reading the candidates once, tensor by tensor, with the reader the fit uses; then forward + backward.
_READ_AND_STEP = textwrap.dedent(
    """
    import json, sys, time, importlib.util, torch
    torch.set_num_threads(1)
    from twamerge import open_checkpoints
    paths, width, depth, batch = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    best_read = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        with open_checkpoints(paths) as cs:
            for key in cs.keys:
                for i in range(len(cs)):
                    cs.get(i, key, check=False)
        best_read = min(best_read, time.perf_counter() - t)
    spec = importlib.util.spec_from_file_location("m", sys.argv[5])
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    model = m.build(width=width, depth=depth)
    x, y = torch.randn(batch, m.IN_FEATURES), torch.randint(0, 10, (batch,))
    best_step = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        model.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        best_step = min(best_step, time.perf_counter() - t)
    print(json.dumps({"read_s": best_read, "step_s": best_step}))
    """
)


def _rss(stderr: str) -> int:
    return int(next(line.split()[1] for line in stderr.splitlines() if line.startswith("RSS ")))


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)[:200]}\n{r.stderr[-3000:]}")
    return r


def _width_for(d: float, depth: int) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("m", MODEL)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    lo, hi = 16, 1 << 16
    while lo < hi:  # the smallest width with at least d parameters
        mid = (lo + hi) // 2
        if m.n_params(mid, depth) >= d:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _write_candidates(root: Path, width: int, depth: int, k: int) -> tuple[list[str], str, int]:
    import importlib.util

    import numpy as np
    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("m", MODEL)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    torch.manual_seed(0)
    base = m.build(width=width, depth=depth)
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(i + 1)
        state = {n: (p.detach() + 0.01 * torch.randn(p.shape, generator=g)).contiguous()
                 for n, p in base.state_dict().items()}
        path = root / f"c{i}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
        del state
    rng = np.random.default_rng(0)
    val = root / "val.npz"
    np.savez(val, x=rng.standard_normal((320, m.IN_FEATURES), dtype=np.float32),
             label=rng.integers(0, 10, 320).astype(np.int64))
    return paths, str(val), sum(p.numel() for p in base.parameters())


def measure(d: float, args: argparse.Namespace, tmp: Path) -> dict:
    width = _width_for(d, args.depth)
    root = Path(tempfile.mkdtemp(dir=tmp, prefix=f"scale{int(d)}-"))
    try:
        paths, val, n_params = _write_candidates(root, width, args.depth, args.k)
        common = [*paths, "--val", val, "--model", f"{MODEL}:build", "--model-arg", f"width={width}",
                  "--model-arg", f"depth={args.depth}", "--bits", str(args.bits), "--batch-size", str(args.batch),
                  "--device", "cpu", "--force", "-q"]
        # 2 fit steps (256 fit rows of 320, batch 128), no baselines: the fit's own memory and time.
        report = root / "fit.json"
        r = _run(_FIT, "fit", *common, "-o", str(root / "m.safetensors"), "--report", str(report), "--epochs", "1",
                 "--no-greedy", "--no-candidates")
        fit_rss = _rss(r.stderr)
        rep = json.loads(report.read_text())
        idle_rss = _rss(_run(_IDLE).stderr)
        rs = json.loads(_run(_READ_AND_STEP, ",".join(paths), str(width), str(args.depth), str(args.batch),
                             str(MODEL)).stdout)
        out = {"D": n_params, "width": width, "rss_growth": fit_rss - idle_rss,
               "rss_per_param": (fit_rss - idle_rss) / n_params,
               "floor_per_param": 8 + 4 + (args.k - 1) * args.bits / 8 + 8 * (args.k - 1) / 128,
               "build_over_read": rep["timings"]["subspace"] / rs["read_s"],
               "step_over_fwd_bwd": rep["timings"]["fit"] / max(rep["fit"]["steps"], 1) / rs["step_s"],
               "timings": rep["timings"], "read_s": rs["read_s"], "fwd_bwd_s": rs["step_s"]}
        if not args.skip_baselines:
            # The defaults' baselines (every candidate, uniform, greedy soup) against the fit phase.
            report2 = root / "fit2.json"
            _run(_FIT, "fit", *common, "-o", str(root / "m2.safetensors"), "--report", str(report2),
                 "--epochs", "1")
            t = json.loads(report2.read_text())["timings"]
            out["baselines_over_fit"] = t["evaluate"] / t["fit"]
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10e6,100e6", help="comma-separated parameter counts")
    ap.add_argument("--big", action="store_true", help="add 300M parameters")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")] + ([300e6] if args.big else [])
    print(f"K = {args.k} float32 candidates, {args.bits}-bit basis, one thread; targets from issue 12")
    print("RSS per parameter: the peak's growth over an idle process divided by D, and (from the second size on)")
    print("the growth between two sizes divided by their difference, which excludes fixed costs (the staging window).")
    print("| D | RSS / param | RSS growth / param from the previous size (floor) | build / read once (target 2.5) "
          "| fit step / fwd+bwd (target 1.5) | baselines / fit phase (target 1) |")
    print("|---|---:|---:|---:|---:|---:|")
    previous = None
    for d in sizes:
        r = measure(d, args, Path(args.tmp))
        base = f"{r['baselines_over_fit']:.2f}" if "baselines_over_fit" in r else "-"
        slope = "-" if previous is None else \
            f"{(r['rss_growth'] - previous['rss_growth']) / (r['D'] - previous['D']):.1f} B"
        print(f"| {r['D'] / 1e6:.0f}M | {r['rss_per_param']:.1f} B | {slope} ({r['floor_per_param']:.1f} B) | "
              f"{r['build_over_read']:.2f} | {r['step_over_fwd_bwd']:.2f} | {base} |", flush=True)
        print(json.dumps(r), file=sys.stderr, flush=True)
        previous = r


if __name__ == "__main__":
    main()
