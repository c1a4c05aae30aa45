"""A topic-classification task built offline from Debian's `fortunes` collections.

Each file under /usr/share/games/fortunes/<category> holds quotes separated by lines containing only `%`. A quote's
category is its label. Attribution lines (starting with `--`) are removed so the task is about the text itself,
quotes that occur in more than one category are dropped, and every class gets the same number of short quotes.

    apt-get install -y fortunes fortunes-min
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path(os.environ.get("FORTUNES_DIR", "/usr/share/games/fortunes"))
DEFAULT_CATEGORIES = ("computers", "politics", "science", "startrek", "work")
_ATTRIBUTION = re.compile(r"^\s*(--|\u2014)")


def read_category(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    quotes = []
    for block in re.split(r"^%\s*$", text, flags=re.M):
        lines = [ln for ln in block.splitlines() if ln.strip() and not _ATTRIBUTION.match(ln)]
        quote = " ".join(" ".join(lines).split())
        if quote:
            quotes.append(quote)
    return quotes


def load(
    categories: tuple[str, ...] = DEFAULT_CATEGORIES,
    per_class: int = 220,
    max_words: int = 45,
    seed: int = 0,
    root: Path = DEFAULT_DIR,
) -> tuple[list[str], np.ndarray, list[str]]:
    """-> (texts, labels int64 [N], category names); `per_class` quotes of at most `max_words` words each."""
    missing = [c for c in categories if not (root / c).exists()]
    if missing:
        raise FileNotFoundError(
            f"fortune files {missing} not found under {root}: "
            f"apt-get install -y fortunes fortunes-min (or set FORTUNES_DIR)"
        )
    per_cat = {c: read_category(root / c) for c in categories}
    seen: dict[str, int] = {}
    for quotes in per_cat.values():
        for q in set(quotes):
            seen[q] = seen.get(q, 0) + 1
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, c in enumerate(categories):
        pool = sorted({q for q in per_cat[c] if seen[q] == 1 and 3 <= len(q.split()) <= max_words})
        if len(pool) < per_class:
            raise ValueError(
                f"category {c!r} has {len(pool)} usable quotes, fewer than per_class={per_class}"
            )
        for i in rng.permutation(len(pool))[:per_class]:
            texts.append(pool[i])
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64), list(categories)
