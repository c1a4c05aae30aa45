"""Peak memory per rank and step time of a distributed fit at N = 1, 2, 4 ranks, against the target of issue 21.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py                      # 12M and 47M parameters, N = 1, 2, 4
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --sizes 6e6,24e6 --ranks 1,2
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --ranks 4 --replicated  # and with every rank's model whole
    python benchmarks/distributed.py --check --device cuda --ranks 2         # GPUs (benchmarks/gpu_check.sh)

``--check``: one size (the first of ``--sizes``), the one-process fit and the sharded fit on ``--ranks``
ranks (a world of one for 1) on ``--device``, printing their largest alpha difference and each rank's
peak memory; exit 1 when the alphas differ by more than 1e-3.

The model is benchmarks/scale.py's: an MLP of ``--depth`` (12) equal hidden layers on 256 features, K = 8
float32 safetensors candidates (a base plus noise), an 8-bit basis, 320 random rows. Each rank is a
fresh process started as torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR... set; gloo on the CPU)
running ``twamerge fit --no-greedy --no-candidates --holdout 0 --epochs 1 --min-steps 0`` (10 steps of
32 rows), with ``MALLOC_MMAP_THRESHOLD_=65536`` (without it glibc keeps freed blocks and the peak
climbs step by step) and one thread; each prints its peak RSS when it ends (``VmHWM``: ``ru_maxrss`` would
count the RSS of this process, which starts it, since it survives exec). The model
is sharded (``--shard-model auto``: on for N > 1); N = 1 runs the one-process fit, and ``1 (FSDP)``
the same fit sharded over a world of one.

Printed per size: every rank's peak RSS; then, per N, the growth of the largest rank's peak between
the two sizes over their difference in parameters (fixed costs cancel), against the target
``floor / N + 2 B``, with floor = flat weights and gradients 8 B + the float32 mean 4 B + the basis
(K - 1) bits / 8 B + its scales and offsets 8 (K - 1) / group_size B (19.4 B at K = 8, 8 bits: the
README's formula); and the seconds per step against N = 1 (on a 2-core machine the ranks share the
cores: the step shows the overhead of sharding, not a speed-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "_scale_model.py"

# One rank: the CLI as `python -m twamerge` runs it under torchrun, then its peak RSS (its stdout is the report).
_RANK = textwrap.dedent(
    """
    import os, resource, sys, torch
    torch.set_num_threads(1)
    from twamerge.cli import app
    code = 0
    try:
        app(sys.argv[1:], standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a rank would report at least the RSS of the process that
    # started it (this one, which wrote the candidates); VmHWM belongs to the address space exec made.
    try:
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RSS", peak * 1024, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)  # as cli.main ends a torchrun rank
    """
)


def _scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", HERE / "scale.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(n: int, args: list[str], shard: str) -> list[int]:
    """``twamerge ARGS`` on ``n`` ranks (one plain process for n = 1); returns each rank's peak RSS in bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    port = _free_port()
    procs = []
    for rank in range(n):
        ranks = {} if n == 1 else {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
                                   "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, *args, "--shard-model", shard],
                                      env={**env, **ranks}, text=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    rss = []
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"a rank failed ({proc.returncode}):\n{err[-3000:]}")
        rss.append(int(next(line.split()[1] for line in err.splitlines() if line.startswith("RSS "))))
    return rss


def measure(d: float, worlds: list[tuple[str, int, str]], args: argparse.Namespace, keep: bool = False) -> dict:
    scale = _scale()
    width = scale._width_for(d, args.depth)
    root = Path(tempfile.mkdtemp(dir=args.tmp, prefix=f"dist{int(d)}-"))
    try:
        paths, val, n_params = scale._write_candidates(root, width, args.depth, args.k)
        scale.raw_read(paths)  # into the page cache
        out = {"D": n_params, "width": width}
        for name, n, shard in worlds:
            report = root / "fit.json"
            fit_args = ["fit", *paths, "--val", val, "--model", f"{MODEL}:build", "--model-arg", f"width={width}",
                        "--model-arg", f"depth={args.depth}", "--bits", str(args.bits), "--batch-size",
                        str(args.batch), "--device", args.device, "--force", "-q", "-o", str(root / "m.safetensors"),
                        "--report", str(report), "--no-greedy", "--no-candidates", "--holdout", "0", "--epochs", "1",
                        "--min-steps", "0", "--no-fit-floor"]
            rss = run_ranks(n, fit_args, shard)
            rep = json.loads(report.read_text())
            out[name] = {"rss": rss, "step_s": rep["fit"]["seconds_per_step"], "alphas": rep["merge"]["block_alphas"],
                         "cuda_peak": [r.get("cuda_peak_allocated_bytes") for r in
                                       (rep.get("distributed") or {}).get("ranks", [rep["memory"]])],
                         "basis_bytes": [r["basis_bytes"] for r in (rep.get("distributed") or {}).get("ranks", [])]
                         or [rep["memory"]["basis_bytes"]]}
            print(f"  {n_params / 1e6:.1f}M, {name:>9}: peak RSS per rank {', '.join(f'{b / 2**20:.0f}' for b in rss)} "
                  f"MiB, {out[name]['step_s']:.3f} s/step", flush=True)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="12e6,47e6", help="two comma-separated parameter counts")
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes")
    ap.add_argument("--depth", type=int, default=12, help="hidden layers of the MLP")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU per rank)")
    ap.add_argument("--check", action="store_true", help="one size: the sharded fit against one process (see above)")
    ap.add_argument("--replicated", action="store_true", help="also run N > 1 with --shard-model off (every rank "
                    "holds the whole model)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    if args.check:
        n = int(args.ranks.split(",")[-1])
        got = measure(sizes[0], [("1", 1, "off"), ("sharded", n, "on")], args)
        drift = max(abs(a - b) for ra, rb in zip(got["1"]["alphas"], got["sharded"]["alphas"]) for a, b in zip(ra, rb))
        print(f"{got['D'] / 1e6:.1f}M parameters on {args.device}: max |alpha(sharded over {n}) - alpha(one process)| "
              f"= {drift:.2e}; peak CUDA memory per rank {got['sharded']['cuda_peak']} vs {got['1']['cuda_peak']}")
        sys.exit(0 if drift <= 1e-3 else 1)
    if len(sizes) != 2:
        raise SystemExit("--sizes: give two parameter counts (the growth between them is the figure)")
    worlds = []
    for n in (int(s) for s in args.ranks.split(",")):
        worlds += [("1", 1, "off"), ("1 (FSDP)", 1, "on")] if n == 1 else [(str(n), n, "auto")]
        if n > 1 and args.replicated:
            worlds.append((f"{n} (off)", n, "off"))
    floor = 8 + 4 + (args.k - 1) * args.bits / 8 + 8 * (args.k - 1) / 128
    print(f"MLP of {args.depth} hidden layers, K = {args.k} float32 candidates, {args.bits}-bit basis, batch "
          f"{args.batch}, gloo ranks on {os.cpu_count()} CPU cores, MALLOC_MMAP_THRESHOLD_=65536", flush=True)
    small, big = (measure(d, worlds, args) for d in sizes)
    dd = big["D"] - small["D"]
    one = big["1"]["step_s"] if "1" in big else None
    print(f"\n| ranks | peak RSS growth per parameter per rank, {small['D'] / 1e6:.1f}M -> {big['D'] / 1e6:.1f}M | "
          "target floor / N + 2 B | met | basis bytes per rank / one process | s/step (vs 1 rank) |")
    print("|---|---:|---:|---|---:|---:|")
    for name, n, _ in worlds:
        growth = max((b - a) / dd for a, b in zip(small[name]["rss"], big[name]["rss"]))
        target = floor / n + 2
        basis = max(big[name]["basis_bytes"]) / big["1"]["basis_bytes"][0] if "1" in big else float("nan")
        vs = f" ({big[name]['step_s'] / one:.2f}x)" if one else ""
        print(f"| {name} | {growth:.1f} B | {target:.1f} B | {'yes' if growth <= target else 'NO'} | {basis:.2f} | "
              f"{big[name]['step_s']:.3f}{vs} |")
    print(json.dumps({"small": small, "big": big, "floor": floor}), file=sys.stderr)


if __name__ == "__main__":
    main()
