"""Time and peak memory of ``twamerge average`` against the plain load-and-sum loop (and mergekit, if installed).

The loop is what timm's ``avg_checkpoints.py`` and most scripts do: load each whole checkpoint
(``safetensors.torch.load_file`` / ``torch.load``), add it into a float64 accumulator, cast, save.
Every contender runs in a fresh subprocess on the same files, in interleaved rounds (each contender
once per round, so a busy moment of a shared machine hits all alike); each one's fastest round is
reported, so the ratios are meaningful on any machine. The subprocesses are pinned to one core (and
twamerge also to two, to show what hashing costs when it has a core of its own), with one torch
thread. Peak memory is each subprocess's own ``ru_maxrss`` (from ``wait4``).

Contenders:

- ``load-and-sum loop``;
- ``twamerge average``: with the inputs' SHA-256 (the default: hashed on a worker thread beside the
  merge, waited for before the output's metadata is written);
- ``twamerge average --no-hash``: ``hash_inputs=False``, no input hashes in the summary or metadata;
- ``mergekit-yaml`` and ``mergekit-pytorch`` (``merge_method: linear``, float32, ``--no-copy-tokenizer
  --no-write-model-card``), each only when its command is on PATH. mergekit needs its own environment
  (it pins other versions of transformers' helpers), e.g.::

      python -m venv /tmp/mkenv && /tmp/mkenv/bin/pip install torch==2.13.0 mergekit
      PATH=/tmp/mkenv/bin:$PATH OMP_NUM_THREADS=1 python benchmarks/average.py

  mergekit-yaml reads Hugging Face folders of an architecture it knows, so the candidates are written
  as Llama folders (``config.json`` + ``model.safetensors``, sized by ``--mb``); every other contender
  reads the same ``model.safetensors`` files. mergekit-yaml is given ``-j 1`` (one thread).

"seconds" is the merge as timed inside the process (the loop and twamerge; imports excluded), "wall"
the whole subprocess (Python and torch imports included, the only time mergekit can be given).

    OMP_NUM_THREADS=1 python benchmarks/average.py [--k 8] [--mb 64] [--format safetensors|pt] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# Pins the subprocess to the cores in BENCH_CPUS (before torch starts its threads), one torch thread.
_PIN = textwrap.dedent(
    """
    import os
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in os.environ["BENCH_CPUS"].split(",")})
    import torch
    torch.set_num_threads(1)
    """
)

_TWAMERGE = _PIN + textwrap.dedent(
    """
    import json, sys, time
    from twamerge import OutputConfig, average_checkpoints
    t = time.perf_counter()
    average_checkpoints(sys.argv[3:], OutputConfig(sys.argv[2], force=True), hash_inputs=sys.argv[1] == "hash")
    print(json.dumps({"s": time.perf_counter() - t}))
    """
)

_LOOP = _PIN + textwrap.dedent(
    """
    import json, sys, time
    from safetensors.torch import load_file, save_file
    t = time.perf_counter()
    paths = sys.argv[3:]
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
    save_file({k: (v / len(paths)).to(dtypes[k]) for k, v in acc.items()}, sys.argv[2])
    print(json.dumps({"s": time.perf_counter() - t}))
    """
)


def _run(cmd: list[str], cpus: str, tmp: Path) -> dict[str, float]:
    """Run ``cmd`` pinned to ``cpus``; its in-process seconds (if it prints them), wall seconds, peak RSS (MB)."""
    env = {**os.environ, "BENCH_CPUS": cpus, "OMP_NUM_THREADS": "1"}
    with open(tmp / "stdout", "w+") as out, open(tmp / "stderr", "w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err.read()[-2000:]}")
        out.seek(0)
        lines = out.read().strip().splitlines()
    inner = json.loads(lines[-1])["s"] if lines and lines[-1].startswith("{") else float("nan")
    return {"s": inner, "wall": wall, "rss_mb": usage.ru_maxrss / 1024}


def _mergekit_cmd(tool: str, models: list[Path], tmp: Path) -> list[str] | None:
    """``mergekit-yaml`` (Hugging Face folders) or ``mergekit-pytorch`` (checkpoint files), uniform linear merge."""
    exe = shutil.which(tool)
    if exe is None:
        return None
    # YAML is a superset of JSON.
    config = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": True},
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in models]}
    (tmp / f"{tool}.yml").write_text(json.dumps(config))
    cmd = [exe, str(tmp / f"{tool}.yml"), str(tmp / f"{tool}-out"), "--quiet", "--no-copy-tokenizer",
           "--no-write-model-card"]
    return cmd + ["-j", "1"] if tool == "mergekit-yaml" else cmd


def _llama_config(mb: int) -> dict:
    """A Llama config of about ``mb`` MB in float32: vocabulary 8192, hidden 512, as many layers as fit."""
    hidden, inter, vocab = 512, 1408, 8192
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, (mb * 1024 * 1024 // 4 - 2 * vocab * hidden) // per_layer)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": int(layers), "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}


def _llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of LlamaForCausalLM's state dict (written out: no transformers import)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
                                          "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        shapes.update({pre + "self_attn.q_proj.weight": (h, h), pre + "self_attn.k_proj.weight": (h, h),
                       pre + "self_attn.v_proj.weight": (h, h), pre + "self_attn.o_proj.weight": (h, h),
                       pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
                       pre + "mlp.down_proj.weight": (h, i), pre + "input_layernorm.weight": (h,),
                       pre + "post_attention_layernorm.weight": (h,)})
    return shapes


def _best_interleaved(contenders: dict[str, tuple[list[str], str]], repeat: int, tmp: Path) -> dict[str, dict]:
    """Every contender once per round, ``repeat`` rounds: the fastest times and the largest peak RSS of each."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, (cmd, cpus) in contenders.items():
            runs[name].append(_run(cmd, cpus, tmp))
    return {name: {"s": min(r["s"] for r in rs), "wall": min(r["wall"] for r in rs),
                   "rss_mb": max(r["rss_mb"] for r in rs)} for name, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8, help="checkpoints to average")
    ap.add_argument("--mb", type=int, default=64, help="size of one checkpoint in MB (float32)")
    ap.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; each contender's fastest is reported")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    one, two = str(cores[0]), ",".join(map(str, cores[:2]))
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        g = torch.Generator().manual_seed(0)
        config = _llama_config(args.mb)
        shapes = _llama_shapes(config)
        folders, paths = [], []
        for i in range(args.k):
            sd = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
            folder = tmp_path / f"c{i}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            p = folder / f"model.{args.format}"
            save_file(sd, str(p)) if args.format == "safetensors" else torch.save(sd, p)
            folders.append(folder)
            paths.append(p)
        files = list(map(str, paths))
        n_params = sum(math.prod(shape) for shape in shapes.values())

        def ours(hashing: str, out: str) -> list[str]:
            return [py, "-c", _TWAMERGE, hashing, str(tmp_path / out), *files]

        contenders = {
            "load-and-sum loop": ([py, "-c", _LOOP, "-", str(tmp_path / "loop.safetensors"), *files], one),
            "twamerge average": (ours("hash", "ours.safetensors"), one),
            "twamerge --no-hash": (ours("no-hash", "fast.safetensors"), one),
        }
        if len(cores) > 1:
            contenders["twamerge, 2 cores"] = (ours("hash", "ours2.safetensors"), two)
            contenders["twamerge --no-hash, 2 cores"] = (ours("no-hash", "fast2.safetensors"), two)
        mergekit = {"mergekit-pytorch": _mergekit_cmd("mergekit-pytorch", paths, tmp_path)}
        if args.format == "safetensors":  # mergekit-yaml's folders hold model.safetensors
            mergekit["mergekit-yaml"] = _mergekit_cmd("mergekit-yaml", folders, tmp_path)
        contenders.update({name: (cmd, one) for name, cmd in mergekit.items() if cmd is not None})
        best = _best_interleaved(contenders, args.repeat, tmp_path)
        two_files = _best_interleaved({"2": ([py, "-c", _TWAMERGE, "hash", str(tmp_path / "two.safetensors"),
                                             *files[:2]], one)}, 1, tmp_path)["2"]

    base = best["load-and-sum loop"]
    print(f"{args.k} checkpoints x {n_params * 4 / 2**20:.0f} MB ({args.format}, Llama layout, {n_params / 1e6:.1f}M "
          f"parameters), best of {args.repeat} interleaved rounds, one torch thread per process")
    print(f"{'contender':<30}{'seconds':>9}{'x loop':>8}{'wall s':>9}{'x loop':>8}{'peak RSS MB':>13}")
    for name, r in best.items():
        print(f"{name:<30}{r['s']:>9.2f}{base['s'] / r['s']:>8.2f}{r['wall']:>9.2f}{base['wall'] / r['wall']:>8.2f}"
              f"{r['rss_mb']:>13.0f}")
    for name, cmd in mergekit.items():
        if cmd is None:
            print(f"({name} is not on PATH: no {name} row)")
    ours_r, fast = best["twamerge average"], best["twamerge --no-hash"]
    print(f"hashing the inputs costs twamerge {ours_r['s'] - fast['s']:+.2f} s on one core", end="")
    if "twamerge, 2 cores" in best:
        print(f", {best['twamerge, 2 cores']['s'] - best['twamerge --no-hash, 2 cores']['s']:+.2f} s on two", end="")
    print()
    print(f"twamerge peak RSS, {args.k} vs 2 checkpoints: {ours_r['rss_mb']:.0f} MB vs {two_files['rss_mb']:.0f} MB "
          f"(+{ours_r['rss_mb'] - two_files['rss_mb']:.0f} MB for {args.k - 2} more checkpoints of {args.mb} MB)")


if __name__ == "__main__":
    main()
