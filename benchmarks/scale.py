"""How a fit scales with the parameter count D, each figure against its target (issues 12 and 20), in one run.

The model is an MLP of ``--depth`` (12) equal hidden layers on 256 features (``_scale_model.py``); K = 8
float32 safetensors candidates (a base plus noise), an 8-bit basis, one thread, the files in the page
cache. For each size (default 12M and 47M parameters: widths about 1030 and 2050), ``--rounds``
interleaved rounds (every measurement once per round, so a busy moment of a shared machine hits all
alike; the fastest round of each is reported) of:

- the raw read: ``open(...).readinto`` of every byte of every candidate into one reused buffer;
- twamerge's read of the candidates as the subspace build reads them (``cs.stack_slice`` of every
  tensor into a reused buffer), the divisor this benchmark used before issue 20;
- the fit: ``twamerge fit --no-greedy --no-candidates --holdout 0 --epochs 1 --min-steps 0
  --batch-size 32`` through the CLI in a fresh process: its report's ``timings.subspace`` (the build)
  and ``fit.seconds_per_step`` (the steps' wall time over their number), and the process's peak RSS
  (the kernel's high-water mark of its memory, ``VmHWM``: anonymous memory and mapped file pages alike;
  not ``ru_maxrss``, which Linux carries over ``exec`` from the parent, so a child of this benchmark,
  which holds the candidates and a model, would report at least the parent's peak);
- a plain forward + backward of the same model on a batch of the same size.

Printed per size: build / raw read (target 2.5), in wall time and in CPU time (the building thread's,
the hashing threads beside it left out, against the reading thread's: what a shared machine distorts
least), and build / twamerge's read; the fit step / forward +
backward (target 1.5 at 100M and batch 128, issue 12); peak RSS growth over an idle process (one that
imported twamerge) per parameter. Then the growth between the two sizes over their difference in
parameters, where fixed costs cancel, against the method's floor (flat weights and gradients 8 B, the
float32 mean 4 B, the basis (K-1) * bits/8 B and its scales and offsets 8 (K-1) / group_size B:
19.4 B at K = 8, 8 bits; target 1.1x).

Then the greedy soup at ``--trial-size`` (100M) parameters, the same model: ``twamerge fit --epochs 0``
with the candidates scored and the greedy soup on, timing (inside the process) each trial, the
``combine`` and the scoring pass of the fit rows inside it, the exact merge of the soup chosen
from its ingredients' files, and, for comparison, a trial as the soup made it before issue 20 (its
ingredients merged from their files, two and all K of them, then the same scoring pass). The trials must read no
candidate byte; the read counter is printed.

    OMP_NUM_THREADS=1 python benchmarks/scale.py                    # about 6 minutes on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/scale.py --trial-size 0     # the sizes only
    OMP_NUM_THREADS=1 python benchmarks/scale.py --sizes 10e6,100e6 --depth 4 --batch 128 --trial-size 0
                                                                    # issue 12's fit-step settings
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _raw_read import raw_read

HERE = Path(__file__).resolve().parent
MODEL = HERE / "_scale_model.py"
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# The peak RSS of this process's own memory (see the module docstring), printed at exit.
_PEAK = textwrap.dedent(
    """
    import atexit, sys
    def _peak():
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("RSS", int(hwm.split()[1]) * 1024, file=sys.stderr)
    atexit.register(_peak)
    """
)

# Runs in a fresh process: one `twamerge fit` through the CLI entry point, then its peak RSS, and the CPU time
# of the thread that built the subspace (the hashing threads' excluded: they run beside it).
_FIT = _PEAK + textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from twamerge import pipeline
    from twamerge.cli import app
    real_stage = pipeline.subspace_stage
    def subspace_stage(run):
        start = time.thread_time()
        try:
            return real_stage(run)
        finally:
            print("BUILD_CPU", time.thread_time() - start, file=sys.stderr)
    pipeline.subspace_stage = subspace_stage
    app(sys.argv[1:], standalone_mode=False)
    """
)

# The same process start-up without the fit: the RSS baseline.
_IDLE = _PEAK + textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    import twamerge, twamerge.cli, twamerge.pipeline
    """
)

# A fit with the greedy soup, its trials timed from inside (see the module docstring); prints JSON.
_TRIALS = textwrap.dedent(
    """
    import dataclasses, json, sys, time, torch
    torch.set_num_threads(1)
    from twamerge import methods, pipeline
    from twamerge.cli import app
    from twamerge.evaluation import Scorer
    from twamerge.io import stats
    from twamerge.subspace import Subspace

    t = {"trial": [], "combine": [], "score_fit": [], "exact_soup": [], "old_trial": [], "old_trial_all": [],
         "trial_bytes": 0}
    inside = []

    def timed(name, fn, when=lambda *a, **k: True):
        def wrapper(*args, **kwargs):
            if not when(*args, **kwargs):
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t[name].append(time.perf_counter() - start)
        return wrapper

    real_point = pipeline.FitScoring.point
    def point(self, weights, heldout=True, fit=True):
        if not fit:  # the soup chosen, loaded again for its held-out score: not a trial
            return real_point(self, weights, heldout, fit)
        before = sum(stats.bytes_read.values())
        inside.append(1)
        start = time.perf_counter()
        try:
            return real_point(self, weights, heldout, fit)
        finally:
            t["trial"].append(time.perf_counter() - start)
            inside.pop()
            t["trial_bytes"] += sum(stats.bytes_read.values()) - before
    pipeline.FitScoring.point = point
    Subspace.combine = timed("combine", Subspace.combine, lambda *a, **k: bool(inside))
    Scorer.score = timed("score_fit", Scorer.score, lambda self, split: bool(inside) and split == "fit")
    pipeline.FitScoring.merge = timed("exact_soup", pipeline.FitScoring.merge)

    greedy = methods.METHODS["greedy"]
    def score(s):
        rows = greedy.score(s)
        # Trials as the greedy soup made them before: the soup so far and the candidate tried merged from their
        # files, then scored; the first trial merges two candidates, the last up to all of them.
        for name, chosen in (("old_trial", [0, 1]), ("old_trial_all", list(range(s.k)))):
            start = time.perf_counter()
            s.merge(methods.one_hot(s.k, chosen), heldout=False)
            t[name].append(time.perf_counter() - start)
        return rows
    methods.METHODS["greedy"] = dataclasses.replace(greedy, score=score)
    app(sys.argv[1:], standalone_mode=False)
    t["exact_soup"] = t["exact_soup"][:1]  # the later ones are the old-style trials above
    print(json.dumps(t))
    """
)


def _printed(stderr: str, name: str) -> float:
    return float(next(line.split()[1] for line in stderr.splitlines() if line.startswith(name + " ")))


def _rss(stderr: str) -> int:
    return int(_printed(stderr, "RSS"))


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_ENV)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)[:200]}\n{r.stderr[-3000:]}")
    return r


def _model():
    spec = importlib.util.spec_from_file_location("scale_model", MODEL)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _width_for(d: float, depth: int) -> int:
    m = _model()
    lo, hi = 16, 1 << 16
    while lo < hi:  # the smallest width with at least d parameters
        mid = (lo + hi) // 2
        if m.n_params(mid, depth) >= d:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _write_candidates(root: Path, width: int, depth: int, k: int) -> tuple[list[str], str, int]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    m = _model()
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


def _build_read(paths: list[str]) -> None:
    """Every tensor of every candidate, stacked as the subspace build reads it (into one reused buffer)."""
    import torch

    from twamerge import open_checkpoints

    with open_checkpoints(paths) as cs:
        biggest = max(len(cs) * cs.numel(k) * cs.dtype(k).itemsize for k in cs.keys)
        room = torch.empty(biggest, dtype=torch.uint8)
        for key in cs.keys_in_file_order():
            n = cs.numel(key)
            out = room[: len(cs) * n * cs.dtype(key).itemsize].view(cs.dtype(key)).view(len(cs), n)
            cs.stack_slice(key, 0, n, out=out)


def _fwd_bwd(width: int, depth: int, batch: int):
    import torch

    m = _model()
    model = m.build(width=width, depth=depth)
    x, y = torch.randn(batch, m.IN_FEATURES), torch.randint(0, 10, (batch,))

    def step() -> None:
        model.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    step()  # allocates the gradients
    return step


def _timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def measure(d: float, args: argparse.Namespace, tmp: Path) -> dict:
    width = _width_for(d, args.depth)
    root = Path(tempfile.mkdtemp(dir=tmp, prefix=f"scale{int(d)}-"))
    try:
        paths, val, n_params = _write_candidates(root, width, args.depth, args.k)
        fit_args = ["fit", *paths, "--val", val, "--model", f"{MODEL}:build", "--model-arg", f"width={width}",
                    "--model-arg", f"depth={args.depth}", "--bits", str(args.bits), "--batch-size", str(args.batch),
                    "--device", "cpu", "--force", "-q", "-o", str(root / "m.safetensors"), "--report",
                    str(root / "fit.json"), "--no-greedy", "--no-candidates", "--holdout", "0", "--epochs", "1",
                    "--min-steps", "0"]
        step = _fwd_bwd(width, args.depth, args.batch)
        raw_read(paths)  # into the page cache
        rounds: dict[str, list[float]] = {name: [] for name in (
            "raw_s", "raw_cpu", "build_read_s", "build_s", "build_cpu", "step_s", "fwd_bwd_s", "rss")}
        for _ in range(args.rounds):
            rounds["raw_s"].append(_timed(lambda: raw_read(paths)))
            rounds["raw_cpu"].append(_timed(lambda: raw_read(paths), time.thread_time))
            rounds["build_read_s"].append(_timed(lambda: _build_read(paths)))
            r = _run(_FIT, *fit_args)
            rep = json.loads((root / "fit.json").read_text())
            rounds["build_s"].append(rep["timings"]["subspace"])
            rounds["build_cpu"].append(_printed(r.stderr, "BUILD_CPU"))
            rounds["step_s"].append(rep["fit"]["seconds_per_step"])
            rounds["rss"].append(_rss(r.stderr))
            rounds["fwd_bwd_s"].append(min(_timed(step) for _ in range(3)))
        idle = _rss(_run(_IDLE).stderr)
        best = {name: min(v) for name, v in rounds.items()}
        return {"D": n_params, "width": width, "rounds": rounds, **best, "rss_growth": best["rss"] - idle,
                "build_over_raw": best["build_s"] / best["raw_s"], "build_over_raw_cpu": best["build_cpu"] / best["raw_cpu"],
                "build_over_build_read": best["build_s"] / best["build_read_s"],
                "step_over_fwd_bwd": best["step_s"] / best["fwd_bwd_s"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def greedy_trials(d: float, args: argparse.Namespace, tmp: Path) -> dict:
    width = _width_for(d, args.depth)
    root = Path(tempfile.mkdtemp(dir=tmp, prefix=f"trials{int(d)}-"))
    try:
        paths, val, n_params = _write_candidates(root, width, args.depth, args.k)
        raw_read(paths)
        r = _run(_TRIALS, "fit", *paths, "--val", val, "--model", f"{MODEL}:build", "--model-arg", f"width={width}",
                 "--model-arg", f"depth={args.depth}", "--bits", str(args.bits), "--batch-size", str(args.batch),
                 "--device", "cpu", "--force", "-q", "-o", str(root / "m.safetensors"), "--epochs", "0")
        return {"D": n_params, "width": width, **json.loads(r.stdout.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="12e6,47e6", help="comma-separated parameter counts")
    ap.add_argument("--depth", type=int, default=12, help="hidden layers of the MLP")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trial-size", type=float, default=100e6, help="parameters of the greedy-trial run (0: none)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    sizes = [float(s) for s in args.sizes.split(",")]
    floor = 8 + 4 + (args.k - 1) * args.bits / 8 + 8 * (args.k - 1) / 128
    print(f"MLP of {args.depth} hidden layers, K = {args.k} float32 candidates, {args.bits}-bit basis, batch "
          f"{args.batch}, one thread; fastest of {args.rounds} interleaved rounds")
    print("| D | width | raw read s | build s | build / raw read (target 2.5) | the same in CPU time | "
          "build / twamerge's read | fit step / fwd+bwd | peak RSS growth / param |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for d in sizes:
        r = measure(d, args, Path(args.tmp))
        results.append(r)
        print(f"| {r['D'] / 1e6:.1f}M | {r['width']} | {r['raw_s']:.3f} | {r['build_s']:.3f} | {r['build_over_raw']:.2f} "
              f"| {r['build_over_raw_cpu']:.2f} | {r['build_over_build_read']:.2f} | {r['step_over_fwd_bwd']:.2f} | "
              f"{r['rss_growth'] / r['D']:.1f} B |", flush=True)
        print(json.dumps(r), file=sys.stderr, flush=True)
    for a, b in zip(results, results[1:]):
        slope = (b["rss_growth"] - a["rss_growth"]) / (b["D"] - a["D"])
        print(f"peak RSS growth from {a['D'] / 1e6:.1f}M to {b['D'] / 1e6:.1f}M: {slope:.1f} B per parameter, "
              f"{slope / floor:.2f}x the floor of {floor:.1f} B (target 1.1x)")
    if args.trial_size > 0:
        t = greedy_trials(args.trial_size, args, Path(args.tmp))
        print(json.dumps(t), file=sys.stderr, flush=True)
        print(f"greedy soup at {t['D'] / 1e6:.0f}M parameters (width {t['width']}, K = {args.k}, 256 fit rows): "
              f"{len(t['trial'])} trials (the start included), median {_median(t['trial']):.2f} s each = combine "
              f"{_median(t['combine']):.2f} s + scoring the fit rows {_median(t['score_fit']):.2f} s (+ loading); "
              f"candidate bytes read during the trials: {t['trial_bytes']}; the exact soup merged from its files and "
              f"scored: {t['exact_soup'][0]:.2f} s; a trial as made before (its ingredients merged from their files, "
              f"then scored): {t['old_trial'][0]:.2f} s with 2, {t['old_trial_all'][0]:.2f} s with {args.k}")


if __name__ == "__main__":
    main()
