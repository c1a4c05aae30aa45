"""From the columns of ``--val`` to the model's inputs and the task's labels.

The rules, in order (each column not used is named in the log with the reason):

1. ``--preprocess fn``: ``fn(columns)`` (a dict of lists) returns the model's inputs; nothing else is guessed.
2. Token ids already present (``input_ids``, of any length per row) are used as they are.
3. Else, for a causal LM, chat rows (a ``messages`` column of ``{"role", "content"}`` lists, or
   TRL's conversational ``prompt`` + ``completion`` lists; ``--text COL`` names another) are
   rendered with the tokenizer's chat template and scored on the assistant turns only
   (``text.tokenize_chat``).
4. Else a text column (``--text``, or by name: ``text``, ``sentence``, ...; ``--text-pair``) is
   tokenized with the candidates' tokenizer; ``prompt`` + ``completion`` rows for a causal LM
   train and score on the completion only.
5. A datasets ``Image`` column becomes float32 ``[N, C, H, W]`` in [0, 1], or goes through the
   candidate folder's image processor (``preprocessor_config.json``).
6. The other numeric columns are inputs (``--inputs`` names them); when the model's ``forward``
   names its parameters, columns it does not take are dropped.

The label column is found here (``--label``, else by name) and handed to the task, which gives it
its form (``Task.shape_labels``: strings through the config's ``label2id``, floats for regression,
none for a causal LM without one, whose labels are the ids) and says which classes the held-out
split keeps in proportion (``Task.strata``). Label padding is ``data.IGNORE_INDEX``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import text as textmod
from .config import DataConfig, ModelConfig
from .data import IGNORE_INDEX, RawTable, TensorData, ragged, read_table
from .errors import DataError
from .models import config_folder, custom_code_entries, custom_code_refusal, load_factory
from .tasks import LabelColumn, Task, resolve_task

log = logging.getLogger(__name__)

LABEL_CANDIDATES = ("label", "labels", "target", "y")  # the label column by name, without --label


@dataclass
class ModelContext:
    """What the data preparation needs to know about the model and where its files are.

    Attributes:
        model: the built model (its ``config`` and ``forward`` signature are read).
        hf_dirs: the candidates' Hugging Face folders (tokenizer and image processor files), in order
            (:func:`hf_dirs`: candidate folders, or the folders of candidate files, with a config.json).
    """

    model: nn.Module
    hf_dirs: list[Path]

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def forward_names(self) -> set[str] | None:
        """The parameters ``forward`` names (not ``*args``/``**kwargs``); None when unknown."""
        try:
            params = inspect.signature(self.model.forward).parameters.values()
        except (TypeError, ValueError):
            return None
        names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        return names or None


def load_inputs(val: DataConfig, model_cfg: ModelConfig, ctx: ModelContext) -> tuple[TensorData, Task]:
    """Read ``--val``, decide the task, and build the model-ready columns.

    Raises:
        DataError: no usable inputs, no label column, an unknown string label, no tokenizer for text,
            tokenizers that differ between candidates, ragged labels that do not match the ids.
        ModelError: a bad ``--task``, ``--loss`` or ``--preprocess`` spec.
    """
    table = read_table(val)
    for name, reason in table.dropped.items():
        log.info("column %s of %s dropped: %s", name, table.source, reason)
    preprocessed: set[str] = set()
    if val.preprocess:
        preprocessed = _preprocess(table, val.preprocess)
    label = _find_label(table, val)
    task = resolve_task(model_cfg.task, model_cfg.loss, ctx.model, table.columns.get(label) if label else None)
    return _Builder(table, val, task, ctx, label, preprocessed, model_cfg.trust_remote_code).build(), task


def _find_label(table: RawTable, val: DataConfig) -> str | None:
    if val.label is not None:
        if val.label not in table.columns:
            raise DataError(f"--label {val.label}: not a column of {table.source}; columns: {', '.join(table.columns)}")
        return val.label
    return next((c for c in LABEL_CANDIDATES if c in table.columns), None)


def _preprocess(table: RawTable, spec: str) -> set[str]:
    """Replace the table's columns by what ``fn(columns)`` returns (labels kept); returns the new input names."""
    fn = load_factory(spec, "--preprocess")
    raw = {k: (v if isinstance(v, torch.Tensor) else list(v)) for k, v in table.columns.items()}
    try:
        out = fn(raw)
    except Exception as exc:
        raise DataError(f"--preprocess {spec}: raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                        ) from exc
    if not isinstance(out, dict) or not out:
        raise DataError(f"--preprocess {spec}: returned {type(out).__name__}, expected a dict of columns")
    kept = {k: v for k, v in table.columns.items() if k in LABEL_CANDIDATES and k not in out}
    for name in table.columns:
        if name not in out and name not in kept:
            log.info("column %s of %s dropped: replaced by --preprocess %s", name, table.source, spec)
    table.columns = dict(kept)
    table.images = set()
    for name, value in out.items():
        table.columns[name] = _as_column(value, name, spec)
    lengths = {k: len(v) for k, v in table.columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"--preprocess {spec}: columns have different lengths {lengths}")
    return set(out) - set(LABEL_CANDIDATES)


def _as_column(value: Any, name: str, spec: str) -> Any:
    """A tensor for rectangular numbers, ragged 1-D tensors, or the list of strings as given."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value))
    values = list(value)
    if values and isinstance(values[0], str):
        return values
    if values and isinstance(values[0], torch.Tensor):
        try:
            return torch.stack(values)
        except RuntimeError:
            return values
    try:
        array = np.asarray(values)
        if array.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(array))
    except ValueError:
        pass
    rows = ragged(values)
    if rows is None:
        raise DataError(f"--preprocess {spec}: column {name} is neither numbers, lists of numbers nor text")
    return rows


class _Builder:
    """One preparation: the columns chosen so far, their pad values, and what was left out and why."""

    def __init__(self, table: RawTable, val: DataConfig, task: Task, ctx: ModelContext, label: str | None,
                 preprocessed: set[str], trust_remote_code: bool = False):
        self.table, self.val, self.task, self.ctx, self.label = table, val, task, ctx, label
        self.preprocessed = preprocessed
        self.columns: dict[str, Any] = {}
        self.pad: dict[str, float] = {}
        self.inputs: list[str] = []
        self.used: set[str] = set()
        self.tok: Any = None
        self.tok_dir: Path | None = None
        self.max_length: int | None = val.max_length
        self.trust_remote_code = trust_remote_code  # --trust-remote-code: the folders' tokenizer/processor code

    def build(self) -> TensorData:
        table, val = self.table, self.val
        if self.preprocessed:
            for name in sorted(self.preprocessed, key=list(table.columns).index):
                self._add_input(name, table.columns[name])
        elif val.inputs:
            missing = [c for c in val.inputs if c not in table.columns]
            if missing:
                raise DataError(f"--inputs {','.join(missing)}: not columns of {table.source}; "
                                f"columns: {', '.join(table.columns)}")
            for name in val.inputs:
                self._take(name)
        else:
            self._choose_inputs()
        if not self.inputs:
            kinds = ", ".join(f"{c} ({table.kind(c)})" for c in table.columns)
            raise DataError(f"--val {table.source}: no input columns for the model (columns: {kinds}); text is "
                            f"found by name ({', '.join(textmod.TEXT_COLUMNS[:4])}, ...) or --text COL, numeric "
                            "inputs by --inputs, anything else through --preprocess")
        label_name = self._labels()
        self._truncate()
        for name in table.columns:
            if name not in self.used and name != label_name:
                log.info("column %s of %s dropped: %s", name, table.source, self._why_unused(name))
        used = {name: self.columns[name] for name in (*self.inputs, *([label_name] if label_name else []))}
        check_finite_columns(used, table.source, allow=self.val.allow_nonfinite_data)
        strata = self.task.strata(self.columns[label_name]) if label_name else None
        return TensorData(self.columns, tuple(self.inputs), label_name, table.source, self.pad, strata)

    # -- inputs ------------------------------------------------------------------------------------

    def _choose_inputs(self) -> None:
        table = self.table
        kinds = {c: table.kind(c) for c in table.columns}
        skip = {self.label} if self.label else set()
        if "input_ids" in table.columns and kinds["input_ids"] in ("numeric", "ragged"):
            self._load_tokenizer(optional=True)
            for name in ("input_ids", "attention_mask", "token_type_ids"):
                if name in table.columns and name not in skip:
                    self._take(name)
        else:
            texts = [c for c, k in kinds.items() if k == "text" and c not in skip]
            chat = self._chat_columns([c for c, k in kinds.items() if k == "chat" and c not in skip])
            if chat is not None:
                self._tokenize_chat(*chat)
            else:
                text, pair = textmod.find_text_columns(texts, self.val.text, self.val.text_pair)
                if text is not None:
                    self._tokenize(text, pair)
                elif self.task.labels_from_inputs and {"prompt", "completion"} <= set(texts):
                    self._tokenize_sft()
        for name, kind in kinds.items():
            if name in self.used or name in skip:
                continue
            if kind == "image":
                self._take(name)
            elif kind in ("numeric", "ragged") and not (self.task.token_level and name == "labels"):
                self._take(name)
        self._drop_unnamed_by_forward()

    def _take(self, name: str) -> None:
        """Use the column ``name`` of the table as an input (images converted, text refused)."""
        kind = self.table.kind(name)
        value = self.table.columns[name]
        if kind == "image":
            value, name_out = self._images(name, value)
            self.used.add(name)
            self._add_input(name_out, value)
            return
        if kind not in ("numeric", "ragged"):
            raise DataError(f"--inputs {name}: a {kind} column cannot go to the model as it is; "
                            "text is tokenized from --text, other data needs --preprocess")
        self.used.add(name)
        self._add_input(name, value)

    def _add_input(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            value = value.float()
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor) and value[0].dtype == torch.float64:
            value = [v.float() for v in value]
        self.columns[name] = value
        self.used.add(name)
        if name not in self.inputs:
            self.inputs.append(name)
        if name == "input_ids" and self.tok is not None:
            self.pad[name] = textmod.pad_id(self.tok)
        if name == "input_ids" and isinstance(value, list) and "attention_mask" not in self.table.columns \
                and "attention_mask" not in self.columns and self._accepts("attention_mask"):
            # Ragged ids get the mask a collator would build: 1 on tokens, 0 on the padding.
            self.columns["attention_mask"] = [torch.ones_like(v) for v in value]
            self.inputs.append("attention_mask")

    def _accepts(self, name: str) -> bool:
        names = self.ctx.forward_names()
        return names is None or name in names

    def _drop_unnamed_by_forward(self) -> None:
        """When ``forward`` names some of the inputs, drop those it does not name (they would fail the call)."""
        names = self.ctx.forward_names()
        if names is None or not any(c in names for c in self.inputs):
            return
        for c in [c for c in self.inputs if c not in names]:
            self.inputs.remove(c)
            self.columns.pop(c)
            log.info("column %s of %s dropped: %s.forward takes no argument %s", c, self.table.source,
                     self.ctx.name, c)

    # -- text --------------------------------------------------------------------------------------

    def _load_tokenizer(self, optional: bool = False) -> Any:
        if self.tok is not None:
            return self.tok
        if self.val.tokenizer is not None:
            directory = Path(self.val.tokenizer)
        else:
            dirs = [d for d in self.ctx.hf_dirs if textmod.has_tokenizer(d)]
            if not dirs:
                if optional:
                    return None
                raise DataError(f"--val {self.table.source}: text needs a tokenizer, and the candidates are not "
                                "Hugging Face folders with tokenizer files; pass --tokenizer DIR")
            textmod.check_same_tokenizer(self.ctx.hf_dirs)
            directory = dirs[0]
        self.tok = textmod.load_tokenizer(directory, self.trust_remote_code)
        self.tok_dir = directory
        if self.max_length is None:
            self.max_length = textmod.default_max_length(self.ctx.config, self.tok)
        return self.tok

    def _tokenize(self, text: str, pair: str | None) -> None:
        tok = self._load_tokenizer()
        texts = self.table.columns[text]
        pairs = self.table.columns[pair] if pair else None
        out = textmod.tokenize(tok, texts, pairs, self.max_length)
        self._tokens(out, f"{text}" + (f" + {pair}" if pair else ""))
        self.used.update({text} | ({pair} if pair else set()))

    def _tokenize_sft(self) -> None:
        tok = self._load_tokenizer()
        out = textmod.tokenize_prompt_completion(tok, self.table.columns["prompt"], self.table.columns["completion"],
                                                 self.max_length)
        self.columns["labels"] = out.columns.pop("labels")
        self.pad["labels"] = IGNORE_INDEX
        self._tokens(out, "prompt + completion (loss on the completion tokens only)")
        self.used.update({"prompt", "completion"})

    def _chat_columns(self, chats: list[str]) -> tuple[str, str | None] | None:
        """The chat column to render and, for TRL's conversational prompt/completion, the completion's; None
        when the data is not chat (or the model is not a language model and ``--text`` does not ask for it).

        ``--text COL`` names a chat column; else ``messages`` (or another of ``text.CHAT_COLUMNS``), else
        ``prompt`` + ``completion`` columns of messages.
        """
        val = self.val
        if val.text is not None:
            choice = (val.text, None) if val.text in chats else None
        elif any(c in chats for c in textmod.CHAT_COLUMNS):
            choice = (next(c for c in textmod.CHAT_COLUMNS if c in chats), None)
        elif {"prompt", "completion"} <= set(chats):
            choice = ("prompt", "completion")
        else:
            choice = None
        if choice is not None and not self.task.labels_from_inputs:
            if val.text is None:
                return None  # a classifier's data may carry chat beside its text column: not for it
            raise DataError(f"--text {val.text}: chat messages are scored as a language model's next tokens, and "
                            f"{self.ctx.name} is a {self.task.name} model; give a text column")
        return choice

    def _tokenize_chat(self, column: str, completion: str | None) -> None:
        """Chat rows through the tokenizer's chat template, the loss on the assistant tokens only; rows left
        with nothing to score are dropped from every column (and the log says which)."""
        tok = self._load_tokenizer()
        textmod.check_chat_template(tok, self.tok_dir)
        columns = self.table.columns
        if completion is None:
            rows, first = columns[column], [0] * len(columns[column])
            what = f"{column} (chat, the tokenizer's chat template)"
        else:  # the completion's assistant turns are scored, as TRL's SFT trainer does
            rows = [list(p) + list(c) for p, c in zip(columns[column], columns[completion])]
            first = [len(p) for p in columns[column]]
            what = f"{column} + {completion} (chat, the tokenizer's chat template; the completion scored)"
        out = textmod.tokenize_chat(tok, rows, first, self.max_length)
        if out.kept is not None:
            self._keep_rows(out.kept)
        self.columns["labels"] = out.columns.pop("labels")
        self.pad["labels"] = IGNORE_INDEX
        self._tokens(out, what)
        self.used.update({column} | ({completion} if completion else set()))

    def _keep_rows(self, kept: list[int]) -> None:
        """Keep the rows ``kept`` of every column of the table (the others have nothing to score)."""
        index = torch.tensor(kept, dtype=torch.long)
        self.table.columns = {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in kept]
                              for k, v in self.table.columns.items()}

    def _tokens(self, out: textmod.Tokenized, what: str) -> None:
        names = [c for c in out.columns if c == "input_ids" or self._accepts(c)]
        for c in out.columns:
            if c not in names:
                log.info("tokenizer output %s dropped: %s.forward takes no argument %s", c, self.ctx.name, c)
        for c in names:
            self._add_input(c, out.columns[c])
        n = len(out.columns["input_ids"])
        if out.note is not None:
            # Rows dropped change what is measured: a warning, not a detail.
            log.log(logging.WARNING if out.kept is not None else logging.INFO, "tokenized %s: %d rows, max length "
                    "%d; %s", what, n, self.max_length, out.note)
            return
        log.info("tokenized %s: %d rows, max length %d%s", what, n, self.max_length,
                 f"; {out.at_limit} rows reach it and may be truncated" if out.at_limit else "")

    # -- images ------------------------------------------------------------------------------------

    def _images(self, name: str, images: list) -> tuple[torch.Tensor, str]:
        """Images as float32 ``[N, C, H, W]``: through the candidates' image processor, or scaled to [0, 1]."""
        target = "pixel_values" if self._accepts("pixel_values") and self.ctx.forward_names() else name
        proc_dir = next((d for d in self.ctx.hf_dirs if (d / "preprocessor_config.json").is_file()), None)
        if proc_dir is not None:
            try:
                import transformers

                proc = transformers.AutoImageProcessor.from_pretrained(
                    str(proc_dir), local_files_only=True, trust_remote_code=self.trust_remote_code)
                pixels = proc(images=images, return_tensors="pt")["pixel_values"]
            except Exception as exc:
                entries = custom_code_entries(proc_dir, "preprocessor_config.json")
                if entries and not self.trust_remote_code:
                    raise DataError(custom_code_refusal(proc_dir, "preprocessor_config.json", entries,
                                                        "AutoImageProcessor")) from exc
                raise DataError(f"column {name}: the image processor of {proc_dir} failed ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]})") from exc
            log.info("column %s: %d images through the image processor of %s -> %s %s", name, len(images),
                     proc_dir, target, list(pixels.shape))
            return pixels.float(), target
        arrays = [np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img) for img in images]
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise DataError(f"column {name}: images of different sizes {shapes[:4]}; resize them with --preprocess, "
                            "or put the model's preprocessor_config.json in the candidate folder")
        x = torch.from_numpy(np.stack(arrays)).float() / 255.0  # [N, H, W] or [N, H, W, C]
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        log.info("column %s: %d images as float32 %s in [0, 1]", name, len(images), list(x.shape))
        return x.contiguous(), target

    # -- labels ------------------------------------------------------------------------------------

    def _labels(self) -> str | None:
        """Put the label column, in the task's form, into ``columns``; its name, or None without labels."""
        task, table = self.task, self.table
        if not task.needs_labels:
            return None
        if task.labels_from_inputs and "labels" in self.columns:  # prompt + completion rows (_tokenize_sft)
            return "labels"
        if self.label is None and not task.labels_from_inputs:
            raise DataError(f"--val {table.source}: no label column; expected one of {', '.join(LABEL_CANDIDATES)} "
                            f"(columns: {', '.join(table.columns)}); name it with --label, or fit without labels "
                            "with --loss entropy")
        column = None if self.label is None else LabelColumn(
            self.label, table.columns[self.label], table.kind(self.label), table.class_names.get(self.label),
            getattr(self.ctx.config, "label2id", None), self.ctx.name)
        values = task.shape_labels(column)
        if values is None:  # the task builds its labels from the input ids (tasks.CausalLM.labels)
            if "input_ids" not in self.columns:
                raise DataError(f"--val {table.source}: a {task.name} model needs text or input_ids; columns: "
                                f"{', '.join(table.columns)}")
            return None
        self.columns[self.label] = values
        self.pad[self.label] = IGNORE_INDEX
        return self.label

    # -- lengths -----------------------------------------------------------------------------------

    def _truncate(self) -> None:
        """Cut ragged columns (already tokenized ids, their labels) to ``--max-length`` (and the model's limit)."""
        if self.max_length is None and self.ctx.config is not None and any(
                isinstance(v, list) for v in self.columns.values()):
            self.max_length = textmod.default_max_length(self.ctx.config, self.tok)
        limit = self.max_length
        ragged = {k: v for k, v in self.columns.items() if isinstance(v, list)}
        if "input_ids" in ragged and self.label in ragged and self.task.token_level:
            bad = [i for i, (a, b) in enumerate(zip(ragged["input_ids"], ragged[self.label])) if len(a) != len(b)]
            if bad:
                i = bad[0]
                raise DataError(f"row {i}: {len(ragged['input_ids'][i])} input_ids but {len(ragged[self.label][i])} "
                                f"{self.label}; token labels need one label per token (-100 to ignore one)")
        if limit is None:
            return
        cut = 0
        for name, rows in ragged.items():
            long = sum(1 for r in rows if r.numel() > limit)
            if long:
                self.columns[name] = [r[:limit] for r in rows]
                cut = max(cut, long)
        if cut:
            log.info("%d rows longer than %d tokens truncated (--max-length)", cut, limit)

    def _why_unused(self, name: str) -> str:
        kind = self.table.kind(name)
        if name in self.columns or name in self.used:
            return "not an input of the model"
        if kind == "text":
            return "a text column other than the one tokenized (choose it with --text)"
        if kind == "chat":
            return ("chat messages, scored by a causal language model only" if not self.task.labels_from_inputs
                    else "a chat column other than the one rendered (choose it with --text)")
        if kind == "image":
            return "an image column not used"
        return "not named by --inputs" if self.val.inputs else f"{self.task.name} does not use it"


def check_finite_columns(columns: dict[str, Any], source: str, *, allow: bool = False) -> None:
    """Refuse complex columns, and NaN/Inf anywhere (unless ``allow``), naming the column and first row.

    ``columns`` are the model's inputs and the label, as tensors ``[N, ...]`` or lists of per-row
    tensors (ragged sequences).
    """
    def rows_of(col: Any) -> list[torch.Tensor] | torch.Tensor:
        return col if isinstance(col, torch.Tensor) else [t for t in col if isinstance(t, torch.Tensor)]

    for name, col in columns.items():
        parts = rows_of(col)
        if any(t.is_complex() for t in ([parts] if isinstance(parts, torch.Tensor) else parts)):
            raise DataError(f"--val {source}: column {name!r} is complex; inputs and labels must be real")
    if allow:
        return
    for name, col in columns.items():
        parts = rows_of(col)
        if isinstance(parts, torch.Tensor):
            if not parts.is_floating_point():
                continue
            bad = ~torch.isfinite(parts.float() if parts.dtype.itemsize == 1 else parts)
            rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten() if bad.numel() else bad.new_zeros(0)
        else:
            rows = torch.tensor([i for i, t in enumerate(parts) if t.is_floating_point()
                                 and not bool(torch.isfinite(t.float()).all())], dtype=torch.long)
        if rows.numel():
            raise DataError(f"--val {source}: column {name!r} holds NaN or Inf in {rows.numel()} rows, first row "
                            f"{int(rows[0])}; clean the data or pass --allow-nonfinite-data")


def hf_dirs(paths: list[Path]) -> list[Path]:
    """The candidates' Hugging Face folders (with a config.json), in order, each once: a candidate folder, or the
    folder of a candidate file (``checkpoint-500/model.safetensors``, ``ckpts/*.safetensors`` beside config.json)."""
    folders = [f for f in map(config_folder, paths) if f is not None]
    return list(dict.fromkeys(folders))

