"""Text for the language-model soup, built offline from Debian's `fortunes` collections.

Every quote of every topic file under /usr/share/games/fortunes (quotes separated by lines holding only `%`,
attribution lines removed: the reader of examples/finetune_soup/data.py) is one text. A quote that occurs in
several files is kept once, under the first topic in sorted order. The ASCII-art files are left out (pictures,
not text).

The fine-tune target is a few topics (`TARGET`): their quotes are split into a fine-tuning pool, a validation
split (`val.jsonl`, what `twamerge` sees) and a test split (`test.jsonl`, what it never sees), the two of them
with the same number of quotes per topic. Pre-training reads every other quote of every topic, the fine-tuning
pool of the target topics included, and never a validation or test quote.

    apt-get install -y fortunes fortunes-min
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_soup.data import DEFAULT_DIR, read_category  # noqa: E402

TARGET = ("computers", "linux", "science", "work")
_OVERSTRIKE = re.compile(r"[^\x08]\x08")  # `_\bx`: a terminal's underlined or bold x
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(quote: str) -> str:
    """Plain text of a quote: overstrike sequences resolved to the character printed last, control characters
    dropped."""
    while "\x08" in quote:
        new = _OVERSTRIKE.sub("", quote, count=0)
        if new == quote:
            break
        quote = new
    return " ".join(_CONTROL.sub("", quote).split())
EXCLUDE = ("art", "ascii-art")  # drawings made of characters


def topic_files(root: Path = DEFAULT_DIR) -> list[str]:
    """The topic files of a fortunes folder: every plain file that has a `.dat` index next to it."""
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and "." not in p.name and (root / f"{p.name}.dat").exists() and p.name not in EXCLUDE
    )


def read_topics(root: Path = DEFAULT_DIR, min_words: int = 3, max_words: int = 80) -> dict[str, list[str]]:
    """{topic: quotes}, each quote once over all topics, `min_words`..`max_words` words long, in file order."""
    if not root.exists():
        raise FileNotFoundError(
            f"no fortunes under {root}: apt-get install -y fortunes fortunes-min (or set FORTUNES_DIR)"
        )
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for topic in topic_files(root):
        quotes = []
        for q in map(clean, read_category(root / topic)):
            if q not in seen and min_words <= len(q.split()) <= max_words:
                seen.add(q)
                quotes.append(q)
        out[topic] = quotes
    return out


@dataclass
class Corpus:
    pretrain: list[str]  # every topic, without a validation or test quote
    pool: dict[str, list[str]]  # fine-tuning quotes of each target topic
    val: list[dict] = field(default_factory=list)  # {"text", "topic"} rows
    test: list[dict] = field(default_factory=list)


def build(
    target: tuple[str, ...] = TARGET,
    per_topic: int = 60,
    max_eval_words: int = 50,
    seed: int = 0,
    root: Path = DEFAULT_DIR,
) -> Corpus:
    """Split the quotes: `per_topic` validation and `per_topic` test quotes of each target topic (at most
    `max_eval_words` words, so that no evaluated text is truncated), the rest of the target topics as the
    fine-tuning pools, and everything but the evaluation quotes for pre-training."""
    topics = read_topics(root)
    missing = [t for t in target if t not in topics]
    if missing:
        raise FileNotFoundError(f"fortune topics {missing} not found under {root}")
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    corpus = Corpus(pretrain=[], pool={})
    for t in target:
        quotes = topics[t]
        short = [i for i, q in enumerate(quotes) if len(q.split()) <= max_eval_words]
        if len(short) < 2 * per_topic + 10:
            raise ValueError(f"topic {t!r}: {len(short)} short quotes, too few for 2 x {per_topic} + 10")
        pick = rng.permutation(short)[: 2 * per_topic]
        corpus.val += [{"text": quotes[i], "topic": t} for i in pick[:per_topic]]
        corpus.test += [{"text": quotes[i], "topic": t} for i in pick[per_topic:]]
        held.update(quotes[i] for i in pick)
        corpus.pool[t] = [q for q in quotes if q not in held]
    for quotes in topics.values():
        corpus.pretrain += [q for q in quotes if q not in held]
    # Rows of the evaluation splits interleaved by topic order, shuffled once.
    corpus.val = [corpus.val[i] for i in rng.permutation(len(corpus.val))]
    corpus.test = [corpus.test[i] for i in rng.permutation(len(corpus.test))]
    return corpus
