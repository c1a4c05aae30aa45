"""Generate docs/results.md (and its plots) from the example runs: every number on that page comes from a run's
results.json / table.md, never typed in.

    python examples/digits/run.py --out runs/demo
    nice -n 10 python examples/early_training/run.py --out runs/early_training
    python examples/early_training/paper.py --out runs/early_training_paper
    nice -n 10 python examples/finetune_soup/run.py --out runs/finetune_soup
    nice -n 10 python examples/lm_soup/run.py --out runs/lm_soup
    python examples/lora_soup/run.py --out runs/lora_soup
    python examples/make_results.py --runs runs --out docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402

SECTIONS = [
    ("demo", "digits", "Main job: digits (`make demo`)"),
    ("early_training", "early_training", "Early training: TWA over the first epochs vs. the full run"),
    (
        "early_training_paper",
        "early_training_paper",
        "Early training under the paper's protocol: CNN + BatchNorm, step schedule, TWA over the constant-lr half",
    ),
    ("finetune_soup", "finetune_soup", "Fine-tune soup: all-MiniLM-L6-v2 on fortune topics"),
    ("lm_soup", "lm_soup", "Language-model soup: a small Llama on fortunes text"),
    ("lora_soup", "lora_soup", "LoRA soup: PEFT adapters of a small Llama, merged by `twamerge fit`"),
]

# What each section is, for the page (also shown before the section has been run).
INTROS = {
    "lm_soup": (
        "A 2-layer Llama (hidden 128, the all-MiniLM-L6-v2 tokenizer) pre-trained briefly on every Debian "
        "fortunes topic, then fine-tuned five times on the topics computers, linux, science and work (three "
        "specialists, two generalists at a low and a high learning rate). twamerge reads the fine-tunes' Hugging "
        "Face folders and raw text (`{\"text\": ...}` rows of `val.jsonl`); the main command is exactly what a "
        "user types:\n\n"
        "    twamerge fit runs/lm_soup/finetunes/ft* --val runs/lm_soup/data/val.jsonl -o runs/lm_soup/merged "
        "--report runs/lm_soup/report.json\n\n"
        "Loss: mean next-token cross-entropy over the predicted tokens of the test split; lower perplexity is "
        "better.\n"
    ),
    "lora_soup": (
        "A 2-layer Llama (hidden 64, the all-MiniLM-L6-v2 tokenizer) pre-trained briefly on the Debian fortunes "
        "topics other than computers, politics, science and work; then five LoRA adapters trained with peft "
        "(`get_peft_model`, rank 8 on every linear layer of the blocks, `save_pretrained`): one specialist per "
        "topic and one generalist on all four. twamerge reads the adapter folders (their "
        "`base_model_name_or_path` is the base's folder) and raw text; the main command is exactly what a user "
        "types:\n\n"
        "    twamerge fit runs/lora_soup/adapters/lora* --val runs/lora_soup/data/val.jsonl -o "
        "runs/lora_soup/merged --report runs/lora_soup/report.json\n\n"
        "It writes a PEFT adapter (the adapters' factors weighted per block and concatenated); `twamerge apply "
        "... --merge-into-base` writes the same merge as a full model. Every adapter folder is scored twice on "
        "the test quotes: by `twamerge eval` and by the example itself, loaded with "
        "`PeftModel.from_pretrained(base, folder)`. Lower perplexity is better.\n"
    ),
}


def load_run(path: Path) -> dict | None:
    f = path / "results.json"
    if not f.exists():
        return None
    res = json.loads(f.read_text())
    res["_table"] = (path / "table.md").read_text() if (path / "table.md").exists() else ""
    return res


def minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def command_table(res: dict) -> str:
    rows = [[f"`{c['command']}`", f"{c['wall_s']:.1f}"] for c in res.get("commands", [])]
    if len(rows) > 14:  # long runs: the per-kind totals say as much as the full list
        agg: dict[str, list[float]] = {}
        for c in res["commands"]:
            kind = c["command"].split()[1]
            agg.setdefault(kind, []).append(c["wall_s"])
        rows = [
            [f"`twamerge {k}` x {len(v)}", f"{sum(v):.1f} (mean {np.mean(v):.1f})"] for k, v in agg.items()
        ]
    return C.markdown_table(["twamerge command", "wall s"], rows)


def plot_early(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = res["epochs"]
    curves = np.array([s["per_epoch"] for s in res["per_seed"]])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(
        range(1, E + 1), 100 * curves.mean(0), "-", color="0.5", label="checkpoint at epoch (mean over seeds)"
    )
    n = [m["epochs"] for m in res["mean"]["merges"]]
    ax.plot(
        n,
        [100 * m["uniform"] for m in res["mean"]["merges"]],
        "s--",
        color="tab:blue",
        label="uniform average of epochs 1..n (SWA)",
    )
    ax.plot(
        n,
        [100 * m["twa"] for m in res["mean"]["merges"]],
        "o-",
        color="tab:red",
        label="TWA of epochs 1..n (twamerge fit)",
    )
    ax.axhline(100 * res["mean"]["final"], color="k", ls=":", label=f"full run, final epoch ({E})")
    ax.set_xlim(0.5, E + 0.5)
    ax.set_xlabel("epochs of training used (n)")
    ax.set_ylabel("test accuracy (%)")
    lo = min(100 * curves.mean(0)[min(n) - 1], min(100 * m["uniform"] for m in res["mean"]["merges"])) - 0.5
    ax.set_ylim(lo, 100 * max(curves.max(), max(m["twa"] for m in res["mean"]["merges"])) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Fashion-MNIST MLP, seeds {', '.join(str(s['seed']) for s in res['per_seed'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paper(res: dict, path: Path) -> None:
    """The regular run's test accuracy per epoch (mean over seeds) and each merge at its cost in epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E, half = res["epochs"], res["half"]
    curve = 100 * np.array(res["mean"]["per_epoch"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(range(1, E + 1), curve[1:], "-", color="0.5", label="regular run (step schedule), mean over seeds")
    ax.axvline(half + 0.5, color="0.8", lw=0.8)
    ax.axhline(curve[-1], color="k", ls=":", label=f"full run, epoch {E}")
    styles = {"swa": ("v", "tab:gray"), "swa_bn": ("s", "tab:blue"), "twa_t1": ("o", "tab:orange"),
              "twa_t": ("o", "tab:red"), "twa_v": ("D", "tab:green")}
    names = {"swa": "SWA (average)", "swa_bn": "SWA + BN re-estimated", "twa_t1": "TWA-t, 1 epoch",
             "twa_t": f"TWA-t, {res['twa_epochs']} epochs", "twa_v": f"TWA-v, {res['twa_epochs']} epochs"}
    for key, acc in res["mean"]["merges"].items():
        if key == "swa" and 100 * acc < curve[1:].min() - 2:
            continue  # averaged BatchNorm statistics: far below the plot, given in the table
        m, c = styles[key]
        ax.plot([res["cost_epochs"][key]], [100 * acc], m, color=c, ms=8, label=f"{names[key]} of epochs 0..{half}")
    ax.set_xlabel("cost in epochs over the training images (a TWA step = one forward + backward)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(curve[1:].min() - 0.5, max(curve.max(), 100 * max(res["mean"]["merges"].values())) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Fashion-MNIST CNN + BatchNorm, paper protocol, seeds {', '.join(map(str, res['seeds']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alphas(blocks: list[dict], labels: list[str], title: str, path: Path) -> None:
    """Heat map of the learned alphas: one row per block (parameter tensor), one column per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array([b["alphas"] for b in blocks], dtype=float)
    names = [(",".join(b["keys"]) if b.get("keys") else f"block {i}") for i, b in enumerate(blocks)]
    names = [n if len(n) < 48 else n[:22] + "..." + n[-22:] for n in names]
    # A few small tensors (biases) can get alphas far from the rest; clip the colour scale at twice the 75th
    # percentile so the weights stay readable, and say so in the title.
    dev = abs(a - 1 / a.shape[1])
    lim = max(2 * float(np.percentile(dev, 75)), 1e-6)
    if dev.max() > lim:
        title += f"\n(colour clipped at 1/K +- {lim:.2f}; extreme alpha {a.flat[dev.argmax()]:+.2f})"
    h = min(0.16 * len(blocks) + 1.6, 30)
    fig, ax = plt.subplots(figsize=(3 + 0.55 * a.shape[1], h))
    im = ax.imshow(
        a,
        aspect="auto",
        cmap="RdBu_r",
        vmin=1 / a.shape[1] - lim,
        vmax=1 / a.shape[1] + lim,
        interpolation="nearest",
    )
    ax.set_xticks(range(a.shape[1]), labels, rotation=60, ha="right", fontsize=7)
    step = max(1, len(names) // 60)
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=5 if len(names) > 30 else 7)
    fig.colorbar(im, ax=ax, label="alpha (white = uniform 1/K)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lora_soup_notes(res: dict, img: Path, run_dir: Path) -> str:
    """What the lora_soup table means, in words computed from its rows and the fit's report; the alphas of the
    adapted tensors; the time of each part."""
    # twamerge eval's perplexity (the smoke run has only the example's own for the full models).
    ppl = {r["dir"]: r["own_test_ppl"] if r["test_ppl"] is None else r["test_ppl"] for r in res["rows"]}
    rows = {d: {"test_ppl": p} for d, p in ppl.items()}
    names = [s["name"] for s in res["settings"]]
    twa = rows["merged"]["test_ppl"]
    best_test = min(names, key=lambda n: rows[n]["test_ppl"])
    others = {f"the best single adapter by validation perplexity, {res['best_single']}":
              rows[res["best_single"]]["test_ppl"],
              f"the best adapter on the test split (known only in hindsight), {best_test}": rows[best_test]["test_ppl"],
              "the uniform soup": rows["uniform"]["test_ppl"],
              "the greedy soup": next(ppl[r["dir"]] for r in res["rows"] if r["method"].startswith("greedy"))}
    beats = [f"{k} ({v:.2f})" for k, v in others.items() if twa < v]
    loses = [f"{k} ({v:.2f})" for k, v in others.items() if twa >= v]
    text = f"\nTWA's test perplexity is {twa:.2f}"
    text += ("; it is below " + "; ".join(beats)) if beats else ""
    text += ("; it is **not** below " + "; ".join(loses)) if loses else ""
    text += (f". The base without an adapter scores {rows['pretrained']['test_ppl']:.2f}. The merge written into "
             f"the base (`apply --merge-into-base`) scores {rows['merged_full']['test_ppl']:.2f}, the merged adapter's "
             "figure: the two outputs are the same model.\n")
    report = run_dir / "report.json"
    if report.exists():  # what the fit saw on its own held-out rows, where it chose what to write
        fit = json.loads(report.read_text())
        held = {m["name"]: m["heldout"]["metric"] for m in fit["methods"] if m.get("heldout")}
        cands = {n: held[n] for n in names if n in held}
        best = min(cands, key=cands.get)
        text += (f"\nOn the {fit['heldout_rows']} rows of `--val` that the fit held out: TWA {held['twa']:.2f}, "
                 f"the best adapter ({best}) {cands[best]:.2f}, uniform {held['uniform']:.2f}, greedy "
                 f"{held['greedy']:.2f}.")
        text += "".join(f" The fit warned: \"{w}\"." for w in fit.get("warnings") or []) + "\n"
    adapted = [b for b in res.get("alphas") or [] if any(".lora" not in k and "_proj" in k for k in b["keys"])]
    if adapted:
        plot_alphas(adapted, names, "lora_soup: learned alphas per adapted weight", img / "lora_soup_alphas.png")
        text += "\n![alphas](img/lora_soup_alphas.png)\n"
    ws = res["wall_s"]
    pre = res["pretrain"]
    if res.get("load_avg"):
        text += (f"\nLoad average of the {res['machine']['cores_visible']}-core machine (1 minute) at the start, "
                 f"after the training and at the end of the run: "
                 + ", ".join(f"{x:.1f}" for x in res["load_avg"]) + ".\n")
    text += (f"\nPre-training: {minutes(ws['pretrain'])} ({pre['steps']} steps, {pre['epochs']} epochs of "
             f"{pre['tokens']} tokens, loss {pre['loss_first']:.2f} to {pre['loss_last']:.2f}); adapters: "
             f"{minutes(sum(ws['adapters'].values()))} for {len(ws['adapters'])}; the example's own scoring: "
             f"{minutes(ws['own_eval'] + ws.get('own_eval_merged', 0.0))}; twamerge: {minutes(ws['twamerge'])}.\n")
    return text


def never_worse_section(page: Path) -> str:
    """The summary of ``benchmarks/never_worse.py`` (its generated page, ``docs/never_worse.md``), carried here:
    its comparison table of fit options against picking, and a link to the per-pool figures."""
    head = "\n## Does TWA lose to picking? Fit options on pools the tests do not contain\n\n"
    if not page.exists():
        return head + f"_Not run: `{page}` is missing (`python benchmarks/never_worse.py --md {page}` writes it)._\n"
    text = page.read_text()
    start = text.index("Each option against picking")
    end = text.index("\n## Pools")
    return (head + f"From [`{page.name}`]({page.name}), generated by `benchmarks/never_worse.py`, which has the "
            "per-pool figures, the pools and the commands. " + text[start:end].rstrip() + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args(argv)
    img = args.out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)

    parts = [
        "# Results\n\n",
        "Generated by `python examples/make_results.py` from the runs' own output files (`results.json`, "
        "`table.md`); do not edit by hand. Every accuracy is measured by `twamerge eval` on a test split that "
        "no step of the merge has seen (the fit's validation data is separate; `twamerge fit` itself holds "
        "out part of it for the numbers it reports).\n",
    ]
    machine = None
    for run_dir, kind, title in SECTIONS:
        res = load_run(args.runs / run_dir)
        parts.append(f"\n## {title}\n")
        if kind in INTROS:
            parts.append("\n" + INTROS[kind])
        if res is None:
            parts.append(
                f"\n_Not run: `{args.runs / run_dir}/results.json` is missing "
                f"(`python examples/{kind}/run.py --out {args.runs / run_dir}` writes it)._\n"
            )
            continue
        if kind in ("lm_soup", "lora_soup") and res.get("stage") != "merged":
            parts.append(
                f"\n_Not merged yet: `{args.runs / run_dir}/results.json` stops after the training "
                f"(`--no-twamerge`, or a failed twamerge command)._\n"
            )
            continue
        if res.get("smoke"):
            parts.append("_This is a smoke run (tiny subset); rerun without `--smoke` for real numbers._\n")
        machine = machine or res.get("machine")
        parts.append(
            f"\nCommand: `{res['argv']}`"
            + (f" (run at niceness {res['nice']})" if res.get("nice") else "")
            + f". Wall time {minutes(res['wall_s']['total'])} in all, on the machine below.\n\n"
        )
        parts.append(res["_table"].strip() + "\n")
        if kind == "early_training":
            plot_early(res, img / "early_training_accuracy.png")
            parts.append("\n![accuracy vs epochs used](img/early_training_accuracy.png)\n")
            # Alphas of the largest early-training merge of the first seed.
            m = res["per_seed"][0]["merges"][-1]
            if m.get("alphas"):
                plot_alphas(
                    m["alphas"],
                    [f"ep{i + 1}" for i in range(m["epochs"])],
                    f"learned alphas, seed {res['per_seed'][0]['seed']}, epochs 1-{m['epochs']}",
                    img / "early_training_alphas.png",
                )
                parts.append("\n![alphas](img/early_training_alphas.png)\n")
            parts.append(
                f"\nTraining: {minutes(res['wall_s']['train'])} for {len(res['seeds'])} seeds x "
                f"{res['epochs']} epochs.\n"
            )
        elif kind == "early_training_paper":
            plot_paper(res, img / "early_training_paper_accuracy.png")
            parts.append("\n![accuracy vs cost](img/early_training_paper_accuracy.png)\n")
            s0 = res["per_seed"][0]
            if s0.get("alphas"):
                plot_alphas(
                    s0["alphas"],
                    ["init"] + [f"ep{i}" for i in range(1, res["half"] + 1)],
                    f"TWA-t alphas, seed {s0['seed']}, checkpoints 0-{res['half']}",
                    img / "early_training_paper_alphas.png",
                )
                parts.append("\n![alphas](img/early_training_paper_alphas.png)\n")
            w = res["wall_s"]
            fits = ", ".join(
                f"{k.removeprefix('fit_')} {minutes(v)}" for k, v in w.items() if k.startswith("fit_")
            )
            parts.append(
                f"\nTraining: {minutes(w['train'])} for {len(res['seeds'])} seeds x {res['epochs']} epochs; "
                f"`twamerge fit` (all seeds, including start-up, scoring and BatchNorm re-estimation): {fits}.\n"
            )
        elif kind == "digits":
            if res.get("alphas"):
                plot_alphas(
                    res["alphas"],
                    [f"ep{i + 1}" for i in range(res["epochs"])],
                    "digits: learned alphas per parameter tensor",
                    img / "digits_alphas.png",
                )
                parts.append("\n![alphas](img/digits_alphas.png)\n")
        elif kind == "finetune_soup":
            for t in res["twa"]:
                if t["blocks"] == "layer" and t.get("alphas"):
                    labels = [s["name"] for s in res["settings"]]
                    name = f"finetune_soup_alphas_{t['blocks']}_{t['bits']}bit.png"
                    plot_alphas(
                        t["alphas"],
                        labels,
                        f"TWA {t['blocks']} {t['bits']}-bit: alphas per tensor",
                        img / name,
                    )
                    parts.append(f"\n![alphas](img/{name})\n")
                    break
            ft = res["wall_s"]["finetune"]
            parts.append(f"\nFine-tuning: {minutes(sum(ft.values()))} for {len(ft)} runs.\n")
            if res.get("greedy"):
                parts.append(
                    "\nGreedy soup steps (validation accuracy):\n\n"
                    + C.markdown_table(
                        ["soup tried", "val accuracy %", "kept"],
                        [
                            [" + ".join(g["members"]), C.fmt_acc(g["val_acc"]), "yes" if g["kept"] else "no"]
                            for g in res["greedy"]
                        ],
                    )
                )
        elif kind == "lm_soup":
            own = res["own_eval"]
            parts.append(
                "\nThe example's own evaluation with transformers, before any twamerge command (perplexity):\n\n"
                + C.markdown_table(
                    ["model", "val perplexity", "test perplexity"],
                    [[n, f"{r['val_ppl']:.2f}", f"{r['test_ppl']:.2f}"] for n, r in own.items()],
                )
            )
            if res.get("alphas"):
                plot_alphas(
                    res["alphas"],
                    [s["name"] for s in res["settings"]],
                    "lm_soup: learned alphas per parameter tensor",
                    img / "lm_soup_alphas.png",
                )
                parts.append("\n![alphas](img/lm_soup_alphas.png)\n")
            ws, pre = res["wall_s"], res["pretrain"]
            if "from" in pre:  # --pretrained: an earlier run's model
                pre_txt = f"reused from `{pre['from']}`"
            else:
                pre_txt = (f"{minutes(ws['pretrain'])} ({pre['steps']} steps, {pre['epochs']} epochs of "
                           f"{pre['tokens']} tokens, loss {pre['loss_first']:.2f} to {pre['loss_last']:.2f})")
            parts.append(
                f"\nPre-training: {pre_txt}; fine-tuning: {minutes(sum(ws['finetune'].values()))} for "
                f"{len(ws['finetune'])} runs; twamerge: {minutes(ws['twamerge'])}.\n"
            )
        elif kind == "lora_soup":
            parts.append(lora_soup_notes(res, img, args.runs / run_dir))
        parts.append("\n" + command_table(res))
    parts.append(never_worse_section(args.out.parent / "never_worse.md"))
    if machine:
        parts.append(
            "\n## Machine\n\n"
            + C.markdown_table(["machine", "value"], [[k, v] for k, v in machine.items()])
            + "\nThe 2-core CPU was shared with other jobs while these ran (the long runs at low priority), so the wall times are upper bounds.\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
