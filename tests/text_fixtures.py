"""Tiny real transformers models saved as fine-tunes would be, with the real MiniLM tokenizer, and text data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from ckpt_fixtures import minilm_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VOCAB = 30522  # the MiniLM (BERT uncased) vocabulary
LABELS = ["negative", "neutral", "positive"]

WORDS = ("the cat sat on a warm mat while rain fell over quiet hills and dogs ran past old red barns near "
         "small rivers where children played with bright kites every sunny morning").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 3 to 14 words (different lengths: padding matters)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 15, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def tiny_config(kind: str):
    import transformers

    if kind == "causal-lm":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        tie_word_embeddings=True)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "classification":
        return transformers.BertConfig(**common, num_labels=3, id2label=dict(enumerate(LABELS)),
                                       label2id={n: i for i, n in enumerate(LABELS)})
    return transformers.BertConfig(**common, num_labels=4)


def save_finetunes(root: Path, kind: str, n: int = 3, *, eos_as_pad: bool = False) -> list[Path]:
    """``n`` folders of one tiny model (``kind``) with perturbed weights, tokenizer files copied in."""
    import transformers

    torch.manual_seed(0)
    cls = {"causal-lm": transformers.LlamaForCausalLM, "classification": transformers.BertForSequenceClassification,
           "token-classification": transformers.BertForTokenClassification}[kind]
    base = cls(tiny_config(kind))
    dirs = []
    for i in range(n):
        model = cls(tiny_config(kind))
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = root / f"ft{i + 1}"
        model.save_pretrained(d)
        for name in TOKENIZER_FILES:
            shutil.copy2(minilm_dir() / name, d / name)
        if eos_as_pad:  # a tokenizer with an eos and no pad token, as Llama's
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                cfg = json.loads((d / name).read_text())
                cfg["pad_token"] = None
                cfg["eos_token"] = "[SEP]"
                (d / name).write_text(json.dumps(cfg))
        dirs.append(d)
    return dirs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_model(folder: Path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(str(folder), local_files_only=True)
    return model.eval()


def tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
