"""Text to token ids with the candidates' own tokenizer, as a training script would have done it.

The tokenizer is the first Hugging Face candidate folder's (``--tokenizer DIR`` overrides it); the
candidates must share it, since one tokenization feeds every candidate. Everything is local:
``local_files_only`` always, and ``trust_remote_code`` said explicitly (False unless
``--trust-remote-code``). Sequences are truncated to ``--max-length`` and padded per batch later
(``data.iter_batches``), so no row carries the padding of the longest row of the data set.

Chat rows (lists of ``{"role", "content"}`` messages) are rendered with the tokenizer's own chat
template and scored on the assistant turns only (:func:`tokenize_chat`).
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
from .models import custom_code_entries, custom_code_refusal

log = logging.getLogger(__name__)

# The files a tokenizer is saved as (save_pretrained); any one differing changes the token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# Where a tokenizer's chat template may live besides tokenizer_config.json (transformers 4.43+ saves it apart).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The text column by name (first found), and the second text of a pair task for the first ones.
TEXT_COLUMNS = ("text", "sentence", "content", "document", "sentence1", "premise", "question", "review", "input")
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "question": "context"}
# A chat column by name (lists of {"role", "content"} messages, TRL's conversational format).
CHAT_COLUMNS = ("messages", "conversation", "conversations")
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
    for name in TOKENIZER_FILES + CHAT_TEMPLATE_FILES:  # another chat template renders other ids
        ref = digest(first / name)
        for other in dirs[1:]:
            if digest(other / name) != ref:
                differ.setdefault(name, []).append(other.name)
    if differ:
        parts = "; ".join(f"{name} differs between {first.name} and {', '.join(others)}"
                          for name, others in differ.items())
        raise DataError(f"the candidates' tokenizers differ ({parts}); one tokenization cannot serve them all: "
                        "pass --tokenizer DIR to choose one")


def load_tokenizer(directory: Path, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer`` of a local folder, with a pad token (eos when it has none, said once).

    ``trust_remote_code`` is passed explicitly (transformers would otherwise ask on a terminal, and run
    the folder's ``tokenization_*.py`` on "y").

    Raises:
        DataError: no tokenizer files, transformers cannot load them, or they need the folder's own
            code (an ``auto_map``) without ``trust_remote_code``.
    """
    if not directory.is_dir() or not has_tokenizer(directory):
        raise DataError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                         trust_remote_code=trust_remote_code)
    except Exception as exc:
        if not trust_remote_code:
            for name in ("tokenizer_config.json", "config.json"):  # the tokenizer's auto_map, else the model's
                entries = custom_code_entries(directory, name)
                if entries:
                    raise DataError(custom_code_refusal(directory, name, entries, "AutoTokenizer")) from exc
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
    """Token columns, one 1-D int64 tensor per row (``input_ids``, ``attention_mask``, ...).

    Attributes:
        at_limit: rows whose length reached max_length (truncated, or exactly that long).
        kept: the rows of the data these columns hold, when some were dropped (chat rows with nothing
            to score); None: every row, in order.
        note: what the log says about the rows (their scored tokens, the truncated and dropped ones).
    """

    columns: dict[str, list[torch.Tensor]]
    at_limit: int
    kept: list[int] | None = None
    note: str | None = None


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


# -- chat ------------------------------------------------------------------------------------------

def check_chat_template(tok: Any, directory: Path) -> None:
    """Refuse a tokenizer without a chat template: chat rows are rendered with the tokenizer's own, never a guess."""
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{directory}: the tokenizer has no chat template (no chat_template in tokenizer_config.json, "
                        "no chat_template.jinja), and chat rows are rendered with the tokenizer's own template; add "
                        "the one the models were trained with, or pass --tokenizer DIR with one")
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{directory}: the assistant tokens of chat rows are located through the character offsets "
                        "of a fast tokenizer (tokenizer.json), and this tokenizer is a slow one")


def _render(tok: Any, messages: list[dict], row: int, generation_prompt: bool = False) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 errors, and raise_exception() calls of the template itself
        raise DataError(f"chat row {row}: the tokenizer's chat template fails on its messages "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc


def assistant_spans(tok: Any, messages: list[dict], first_scored: int, row: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant message from ``first_scored`` on.

    The span of message ``i`` is what rendering ``messages[:i + 1]`` adds to rendering ``messages[:i]``
    with the generation prompt: the assistant's text as the template renders it, its end-of-turn
    marker included (the model learned to stop there), the template's own assistant header not.
    This needs the template to render each prefix of the conversation as a prefix of the whole.

    Raises:
        DataError: a template that renders a later message by rewriting an earlier part.
    """
    text = _render(tok, messages, row)
    spans = []
    for i in range(first_scored, len(messages)):
        if messages[i].get("role") != "assistant":
            continue
        before = _render(tok, messages[:i], row, generation_prompt=True)
        upto = _render(tok, messages[:i + 1], row)
        if not upto.startswith(before) or not text.startswith(upto):
            raise DataError(f"chat row {row}: the chat template renders message {i} ({messages[i].get('role')}) "
                            "by changing the text of the messages before it, so its tokens cannot be told apart; "
                            "render the rows yourself and give prompt/completion text")
        spans.append((len(before), len(upto)))
    return text, spans


def _label_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` at the tokens that overlap an assistant span (as transformers' assistant-token mask counts a
    token holding any of a span's characters), IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, end) in enumerate(offsets):
        if any(start < b and end > a for a, b in spans):
            labels[j] = ids[j]
    return labels


def tokenize_chat(tok: Any, conversations: list[list[dict]], first_scored: list[int], max_length: int) -> Tokenized:
    """Chat rows rendered with the tokenizer's chat template; ``labels`` are the ids of the assistant tokens.

    Args:
        conversations: one list of messages per row.
        first_scored: per row, the first message whose assistant turns are scored (0 for ``messages``
            rows: every assistant turn; the number of prompt messages for TRL's conversational
            prompt/completion rows: the completion's).
        max_length: longer rows are cut there.

    The rendered text is tokenized as transformers' ``apply_chat_template(tokenize=True)`` does (no
    special tokens added: the template writes its own). Rows left without a scored assistant token (none
    in the data, or all beyond ``max_length``) are dropped, and :attr:`Tokenized.kept` and
    :attr:`Tokenized.note` say which and why.
    """
    texts, spans = [], []
    for row, (messages, first) in enumerate(zip(conversations, first_scored)):
        text, row_spans = assistant_spans(tok, messages, first, row)
        texts.append(text)
        spans.append(row_spans)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, masks, kept = [], [], [], []
    no_turn, cut_off, truncated, scored = [], [], 0, 0
    for row, (row_ids, offsets, row_spans) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], spans)):
        if not row_spans:
            no_turn.append(row)
            continue
        lab = _label_spans(list(row_ids), list(offsets), row_spans)
        cut = len(row_ids) > max_length
        row_ids, lab = row_ids[:max_length], lab[:max_length]
        # Position 0 predicts nothing (a causal LM's label t is predicted at t - 1): it never counts.
        n = sum(1 for v in lab[1:] if v != IGNORE_INDEX)
        if n == 0:  # every assistant token cut off, or the assistant turns render to nothing
            (cut_off if cut else no_turn).append(row)
            continue
        truncated += cut
        scored += n
        kept.append(row)
        ids.append(torch.tensor(row_ids, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        masks.append(torch.ones(len(row_ids), dtype=torch.long))
    parts = [f"loss on {scored} assistant tokens of {sum(len(i) for i in ids)}"]
    if truncated:
        parts.append(f"{truncated} rows cut at {max_length} tokens (--max-length; their assistant tokens beyond it "
                     "are not scored)")
    if no_turn:
        parts.append(f"{len(no_turn)} rows dropped without an assistant token to score (no assistant message, "
                     f"or an empty one; rows {_rows(no_turn)})")
    if cut_off:
        parts.append(f"{len(cut_off)} rows dropped whose assistant tokens all lie beyond --max-length {max_length} "
                     f"(rows {_rows(cut_off)})")
    if not kept:
        raise DataError(f"no chat row has an assistant token to score within --max-length {max_length}: "
                        + "; ".join(parts[1:]))
    return Tokenized({"input_ids": ids, "attention_mask": masks, "labels": labels}, truncated,
                     kept if len(kept) < len(conversations) else None, "; ".join(parts))


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
