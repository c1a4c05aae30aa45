"""Text to token ids with the candidates' own tokenizer, as a training script would have done it.

The tokenizer is the first Hugging Face candidate folder's (``--tokenizer DIR`` overrides it); the
candidates must share it, since one tokenization feeds every candidate. Everything is local:
``local_files_only`` always. Sequences are truncated to ``--max-length`` and padded per batch
later (``data.iter_batches``), so no row carries the padding of the longest row of the data set.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import IGNORE_INDEX
from .errors import DataError

log = logging.getLogger(__name__)

# The files a tokenizer is saved as (save_pretrained); any one differing changes the token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# The text column by name (first found), and the second text of a pair task for the first ones.
TEXT_COLUMNS = ("text", "sentence", "content", "document", "sentence1", "premise", "question", "review", "input")
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "question": "context"}
DEFAULT_MAX_LENGTH = 512  # a cap on the model's own limit: validation rows rarely need more, memory grows with it


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def check_same_tokenizer(dirs: list[Path]) -> None:
    """Refuse candidates whose tokenizer files differ (one tokenization cannot serve them all).

    Raises:
        DataError: naming the differing files and the folders they differ between.
    """
    if len(dirs) < 2:
        return

    def digest(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    first = dirs[0]
    differ: dict[str, list[str]] = {}
    for name in TOKENIZER_FILES:
        ref = digest(first / name)
        for other in dirs[1:]:
            if digest(other / name) != ref:
                differ.setdefault(name, []).append(other.name)
    if differ:
        parts = "; ".join(f"{name} differs between {first.name} and {', '.join(others)}"
                          for name, others in differ.items())
        raise DataError(f"the candidates' tokenizers differ ({parts}); one tokenization cannot serve them all: "
                        "pass --tokenizer DIR to choose one")


def load_tokenizer(directory: Path) -> Any:
    """``AutoTokenizer`` of a local folder, with a pad token (eos when it has none, said once).

    Raises:
        DataError: no tokenizer files, or transformers cannot load them.
    """
    if not directory.is_dir() or not has_tokenizer(directory):
        raise DataError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise DataError(f"{directory}: the tokenizer cannot be loaded ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]})") from exc
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            log.info("the tokenizer of %s has neither a pad nor an eos token; padding with id 0 "
                     "(the attention mask hides it)", directory)
        else:
            tok.pad_token = tok.eos_token
            log.info("the tokenizer of %s has no pad token; padding with eos %r (id %d), as transformers "
                     "users do (the attention mask hides it, and padding is never a label)",
                     directory, tok.eos_token, tok.eos_token_id)
    return tok


def pad_id(tok: Any) -> int:
    return int(tok.pad_token_id) if tok.pad_token_id is not None else 0


def default_max_length(config: Any, tok: Any | None) -> int:
    """The model's ``max_position_embeddings`` (and the tokenizer's limit), capped at :data:`DEFAULT_MAX_LENGTH`."""
    limits = [DEFAULT_MAX_LENGTH]
    for value in (getattr(config, "max_position_embeddings", None), getattr(tok, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 10**6:
            limits.append(value)
    return min(limits)


def find_text_columns(text_columns: list[str], text: str | None, pair: str | None) -> tuple[str | None, str | None]:
    """The text column (``--text`` or the first of :data:`TEXT_COLUMNS`) and its pair column, if any."""
    for name, option in ((text, "--text"), (pair, "--text-pair")):
        if name is not None and name not in text_columns:
            raise DataError(f"{option} {name}: not a text column; text columns: {', '.join(text_columns) or 'none'}")
    if text is None:
        text = next((c for c in TEXT_COLUMNS if c in text_columns), None)
    if pair is None and text in PAIR_COLUMNS and PAIR_COLUMNS[text] in text_columns:
        pair = PAIR_COLUMNS[text]
    return text, pair


@dataclass
class Tokenized:
    """Token columns, one 1-D int64 tensor per row (``input_ids``, ``attention_mask``, ...)."""

    columns: dict[str, list[torch.Tensor]]
    at_limit: int  # rows whose length reached max_length (truncated, or exactly that long)


def tokenize(tok: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Tokenized:
    """Tokenize with truncation and no padding (padding happens per batch)."""
    enc = tok(texts, pairs, truncation=True, max_length=max_length)
    columns = {k: [torch.tensor(v, dtype=torch.long) for v in values] for k, values in enc.items()}
    at_limit = sum(1 for ids in columns["input_ids"] if ids.numel() >= max_length)
    return Tokenized(columns, at_limit)


def tokenize_prompt_completion(tok: Any, prompts: list[str], completions: list[str], max_length: int) -> Tokenized:
    """SFT rows: ids = prompt + completion (+ eos); ``labels`` = IGNORE_INDEX on the prompt: only the completion counts.

    The prompt is tokenized with the tokenizer's special tokens (a BOS) and the completion without,
    followed by eos when the tokenizer has one, as TRL's SFT trainer does.
    """
    p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    c_ids = tok(completions, add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids, labels, masks, at_limit = [], [], [], 0
    for p, c in zip(p_ids, c_ids):
        row, lab = list(p) + list(c) + eos, [IGNORE_INDEX] * len(p) + list(c) + eos
        if len(row) >= max_length:
            at_limit += 1
        row, lab = row[:max_length], lab[:max_length]
        ids.append(torch.tensor(row, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        masks.append(torch.ones(len(row), dtype=torch.long))
    return Tokenized({"input_ids": ids, "attention_mask": masks, "labels": labels}, at_limit)
