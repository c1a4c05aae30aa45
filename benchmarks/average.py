"""Throughput and peak memory of ``twamerge average`` against the plain load-everything loop.

The baseline is what timm's ``avg_checkpoints.py`` and most scripts do: load each whole checkpoint
(``torch.load`` / ``safetensors.torch.load_file``), add it into a float64 accumulator, cast, save.
Both run in fresh subprocesses on the same files in the same run, so the ratio is meaningful on any
machine; peak memory is each subprocess's ``ru_maxrss``.

    python benchmarks/average.py [--k 8] [--mb 64] [--format safetensors|pt] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_TWAMERGE = textwrap.dedent(
    """
    import json, resource, sys, time
    from twamerge import OutputConfig, average_checkpoints
    t = time.perf_counter()
    average_checkpoints(sys.argv[2:], OutputConfig(sys.argv[1], force=True))
    print(json.dumps({"s": time.perf_counter() - t,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)

_BASELINE = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from safetensors.torch import load_file, save_file
    t = time.perf_counter()
    paths = sys.argv[2:]
    acc, dtypes = {}, {}
    for p in paths:
        sd = load_file(p) if p.endswith(".safetensors") else torch.load(p, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            dtypes[k] = v.dtype
            if k in acc:
                acc[k] += v.double()
            else:
                acc[k] = v.double().clone()
        del sd
    save_file({k: (v / len(paths)).to(dtypes[k]) for k, v in acc.items()}, sys.argv[1])
    print(json.dumps({"s": time.perf_counter() - t,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def _run(script: str, out: Path, paths: list[Path]) -> dict[str, float]:
    res = subprocess.run([sys.executable, "-c", script, str(out), *map(str, paths)], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _best_interleaved(scripts: dict[str, tuple[str, Path]], paths: list[Path], repeat: int) -> dict[str, dict]:
    """Run every script once per round, ``repeat`` rounds, so a busy moment of a shared machine hits
    both methods alike; the fastest time and the largest peak RSS of each."""
    runs: dict[str, list[dict]] = {name: [] for name in scripts}
    for _ in range(repeat):
        for name, (script, out) in scripts.items():
            runs[name].append(_run(script, out, paths))
    return {name: {"s": min(r["s"] for r in rs), "rss_mb": max(r["rss_mb"] for r in rs)} for name, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8, help="checkpoints to average")
    ap.add_argument("--mb", type=int, default=64, help="size of one checkpoint in MB (float32)")
    ap.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each runs both methods); the fastest is reported")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        g = torch.Generator().manual_seed(0)
        n_tensors = 16
        per = args.mb * 1024 * 1024 // 4 // n_tensors
        paths = []
        for i in range(args.k):
            sd = {f"layer{j}.weight": torch.randn(per, generator=g) for j in range(n_tensors)}
            p = tmp_path / f"c{i}.{args.format}"
            save_file(sd, str(p)) if args.format == "safetensors" else torch.save(sd, p)
            paths.append(p)
        total_mb = args.k * args.mb
        best = _best_interleaved({"base": (_BASELINE, tmp_path / "base.safetensors"),
                                  "ours": (_TWAMERGE, tmp_path / "ours.safetensors")}, paths, args.repeat)
        base, ours = best["base"], best["ours"]
        two = _best_interleaved({"two": (_TWAMERGE, tmp_path / "two.safetensors")}, paths[:2], 1)["two"]

    print(f"{args.k} checkpoints x {args.mb} MB ({args.format}), best of {args.repeat} interleaved rounds")
    print(f"{'method':<28}{'seconds':>9}{'MB/s':>9}{'peak RSS MB':>13}")
    for name, r in (("torch.load + sum loop", base), ("twamerge average", ours)):
        print(f"{name:<28}{r['s']:>9.2f}{total_mb / r['s']:>9.0f}{r['rss_mb']:>13.0f}")
    print(f"throughput ratio twamerge/baseline: {base['s'] / ours['s']:.2f}x")
    print(f"peak RSS ratio twamerge/baseline: {ours['rss_mb'] / base['rss_mb']:.2f}")
    print(f"twamerge peak RSS, {args.k} vs 2 checkpoints: {ours['rss_mb']:.0f} MB vs {two['rss_mb']:.0f} MB "
          f"(+{ours['rss_mb'] - two['rss_mb']:.0f} MB for {args.k - 2} more checkpoints of {args.mb} MB)")


if __name__ == "__main__":
    main()
