"""The task decides the loss the fit minimises, the metric every figure is measured in, and the labels.

It owns everything about labels: their form (:meth:`Task.shape_labels`, called by ``prepare.py``
on the label column as read), the classes the held-out split keeps in proportion
(:meth:`Task.strata`), the loss and the metric. Adding a task is one :class:`Task` subclass and
one entry in :data:`TASKS` (``--task NAME``; ``--task module:fn`` returning an instance needs no
entry), plus one in ``HEAD_MAPPINGS`` if ``auto`` should pick it for a kind of transformers head.

A :class:`Task` turns a model output and a :class:`~twamerge.data.Batch` into sums, never means:
``loss`` returns the sum of per-item losses and the number of items (tokens for a language model,
labelled rows for a classifier), so averages are exact across batches of any size and across ranks
(the fit divides by the global batch's item count; evaluation adds the sums over ranks and divides
once). The metric carries its own direction (``higher_is_better``), which decides the best candidate,
the greedy soup, ``--init best`` and ``--fail-if-worse``.

    task                  items                    loss                         metric
    classification        labelled rows            cross-entropy                accuracy (higher)
    token-classification  labelled tokens (!=-100) cross-entropy                accuracy (higher)
    causal-lm             predicted tokens         shifted next-token CE        perplexity (lower)
    masked-lm             masked tokens (!=-100)   cross-entropy                perplexity (lower)
    regression            rows                     mean squared error per row   loss (lower)
    entropy (--loss)      rows or tokens           prediction entropy           entropy (lower)

The token-level tasks never hold ``[batch, tokens, outputs]`` logits when the model splits into body and
head (``models.output_head``, checked once per model against its forward): ``forward`` returns the
body's hidden states and the loss sends the scored positions through the head a chunk at a time
(:func:`chunked_sum`), for causal-lm, token-classification, masked-lm and entropy over them. A
``--loss module:fn`` receives the model's own output, full logits included.
"""

from __future__ import annotations

import logging
import math
import sys
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX  # the one definition; ``tasks.IGNORE_INDEX`` is the same constant
from .errors import DataError, ModelError
from .models import HiddenStates, OutputHead, call_model, current_autocast, load_factory, output_head, output_tensor

if TYPE_CHECKING:
    from torch import nn

    from .data import Batch

log = logging.getLogger(__name__)


# Which task a transformers head is comes from transformers' own registry, not from its class name
# (GPT2LMHeadModel is a causal LM, BartForConditionalGeneration a seq2seq model): each auto mapping
# (model type -> head class) names the heads of one kind. Consulted in this order: a class in two
# mappings takes the first (XLMWithLMHeadModel: causal LM; BART: seq2seq before masked LM).
# ``None``: a kind of head twamerge has no task for (``--task auto`` refuses it, naming --task).
HEAD_MAPPINGS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-lm"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", None),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked-lm"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "classification"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "classification"),
    ("MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES", "classification"),
)
# A custom-code head (``--trust-remote-code``) is in no mapping: its config's ``auto_map`` says which
# Auto class loads it, e.g. ``{"AutoModelForCausalLM": "modeling_x.XForCausalLM"}``.
AUTO_CLASS_TASKS = {"AutoModelForCausalLM": "causal-lm", "AutoModelForSeq2SeqLM": None,
                    "AutoModelForSequenceClassification": "classification",
                    "AutoModelForTokenClassification": "token-classification", "AutoModelForMaskedLM": "masked-lm",
                    "AutoModelForImageClassification": "classification",
                    "AutoModelForAudioClassification": "classification"}
# For help texts and errors: the kinds of head ``--task auto`` recognises.
HEAD_KINDS = "causal LM, sequence/token/image/audio/video classification, masked LM; seq2seq is refused"


@dataclass
class LabelColumn:
    """The label column as read, and what the model says about its classes: what a task shapes labels from.

    Attributes:
        name: the column's name in ``--val``.
        values: as read: a tensor ``[N, ...]``, a list of 1-D tensors (ragged), a list of ``str``, ...
        kind: ``numeric``, ``ragged``, ``text``, ``image`` or ``other`` (``data.RawTable.kind``).
        class_names: the names of a datasets ``ClassLabel`` column (ids index them), else None.
        label2id: the model config's ``label2id`` (class name -> output index), else None.
        model_name: the model's class name, for error messages.
    """

    name: str
    values: Any
    kind: str
    class_names: list[str] | None = None
    label2id: Mapping[str, int] | None = None
    model_name: str = "the model"

    def ids_of(self) -> dict[str, int] | None:
        """``label2id`` with string keys and int values, or None when the model has none."""
        return {str(k): int(v) for k, v in self.label2id.items()} if self.label2id else None


def _ids_of_strings(column: LabelColumn) -> torch.Tensor:
    """String labels through the config's ``label2id``; an unknown label is an error naming it."""
    mapping, values = column.ids_of(), column.values
    if mapping is None:
        raise DataError(f"label column {column.name} holds strings (e.g. {values[0]!r}) and {column.model_name} has "
                        "no config.label2id to map them; give integer labels")
    unknown = sorted({v for v in values if v not in mapping})
    if unknown:
        raise DataError(f"label {unknown[0]!r} of column {column.name} is not in the model's label2id "
                        f"({', '.join(list(mapping)[:10])})" + (f"; {len(unknown)} unknown labels" if
                                                               len(unknown) > 1 else ""))
    return torch.tensor([mapping[v] for v in values], dtype=torch.long)


def _renumber_class_label(column: LabelColumn) -> torch.Tensor:
    """A ClassLabel's ids, renumbered through ``label2id`` when the model names the same classes."""
    mapping, values, names = column.ids_of(), column.values, column.class_names
    if mapping is None or not set(names) <= set(mapping) or list(mapping) == names:
        return values
    table = torch.tensor([mapping[n] for n in names], dtype=torch.long)
    return torch.where(values >= 0, table[values.clamp_min(0)], values)


class _Splits:
    """The split of each model a task calls (``models.output_head``), decided once per model: its body's hidden
    states (:class:`~twamerge.models.HiddenStates`) when it splits, else its forward's output, with a log line."""

    def __init__(self) -> None:
        self._heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def of(task: Task) -> _Splits:
        """The task's own record, made at its first forward (a subclass's ``__init__`` need not call ours)."""
        return task.__dict__.setdefault("_splits", _Splits())

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], what: str) -> Any:
        if model not in self._heads:
            head, why = output_head(model, inputs)
            if head is None:
                log.info("%s: the loss takes the logits of the model's forward ([batch, tokens, %s] at once): %s",
                         type(model).__name__, what, why)
            self._heads[model] = head
        head = self._heads[model]
        if head is None:
            return call_model(model, inputs)
        if head.sharded is not None:  # computed where the loss is, inside a forward of the FSDP root
            return HiddenStates(None, head, inputs, current_autocast(inputs))
        return HiddenStates(head.hidden(inputs), head)


class Task:
    """Labels, loss and metric of one kind of model output. Subclasses override ``count`` and ``loss``.

    Attributes:
        name: the task's name as ``--task`` spells it.
        metric_name: the name of the reported metric.
        higher_is_better: the metric's direction.
        needs_labels: whether the data must carry a label column.
        token_level: whether items are token positions (labels are sequences padded with -100).
        labels_from_inputs: whether the labels are the input ids themselves (a language model):
            without a label column the task builds them from the batch, and ``prompt`` +
            ``completion`` rows become one sequence whose prompt positions are ignored.
        label_dtype: the dtype rectangular labels are cast to (None: kept as read).
    """

    name = "task"
    metric_name = "loss"
    higher_is_better = False
    needs_labels = True
    token_level = False
    labels_from_inputs = False
    label_dtype: torch.dtype | None = None

    def shape_labels(self, column: LabelColumn | None) -> torch.Tensor | list[torch.Tensor] | None:
        """The label column in the form :meth:`loss` reads, or None: the task builds its labels from the inputs.

        Strings become the model's class ids (``label2id``), a ClassLabel's ids are renumbered to
        the model's order, bools become integers, rectangular labels are cast to ``label_dtype``.
        ``column`` is None only for a task with ``labels_from_inputs`` and no label column.

        Raises:
            DataError: strings without a ``label2id`` or not in it; a column of images or other objects.
        """
        if column is None:
            return None
        values, kind = column.values, column.kind
        if kind == "text":
            values = _ids_of_strings(column)
        elif column.class_names is not None:
            values = _renumber_class_label(column)
        elif kind not in ("numeric", "ragged"):
            raise DataError(f"label column {column.name}: a {kind} column; expected numbers or strings")
        if isinstance(values, torch.Tensor) and values.dtype == torch.bool:
            values = values.long()
        if self.label_dtype is not None and isinstance(values, torch.Tensor):
            values = values.to(self.label_dtype)
        return values

    def strata(self, labels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | None:
        """The class of each row ``[N]`` the held-out split keeps in proportion, or None for a plain shuffle.

        ``labels`` is the label column as :meth:`shape_labels` returned it.
        """
        return None

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's output on ``inputs`` as :meth:`loss` and :meth:`sums` read it (by default, its forward)."""
        return call_model(model, inputs)

    def count(self, batch: Batch) -> int:
        """The number of items of ``batch`` (known before the forward pass: the fit divides by it)."""
        return batch.rows

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """``(sum of per-item losses, a float32 scalar with grad; number of items)``."""
        raise NotImplementedError

    def sums(self, output: Any, batch: Batch) -> tuple[float, float, int]:
        """``(loss sum, metric numerator, items)`` of one batch; added over batches and ranks, then ``finish``."""
        total, n = self.loss(output, batch)
        value = float(total)
        return value, value, n

    def finish(self, loss_sum: float, numerator: float, n: int) -> dict:
        """``{"loss", "metric", "n"}`` from sums over a whole split."""
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "metric": numerator / max(n, 1), "n": n}

    def check_labels(self, labels: torch.Tensor, n_outputs: int) -> None:
        """Refuse labels the model's ``n_outputs`` cannot predict (``labels``: every label of the data, flat)."""


def _labels_in_range(labels: torch.Tensor, n_outputs: int, what: str) -> None:
    """Every label is -100 (ignored) or a valid index into ``n_outputs`` classes."""
    used = labels[labels != IGNORE_INDEX]
    if used.numel() and (int(used.max()) >= n_outputs or int(used.min()) < 0):
        bad = int(used.max()) if int(used.max()) >= n_outputs else int(used.min())
        raise DataError(f"label {bad} is out of range for a model with {n_outputs} {what} "
                        f"(labels must be 0..{n_outputs - 1}, or {IGNORE_INDEX} for an ignored position)")


class Classification(Task):
    """Cross-entropy on logits ``[B, C]`` (or ``[B, T, C]`` with labels ``[B, T]``); accuracy over labelled items."""

    name = "classification"
    metric_name = "accuracy"
    higher_is_better = True

    def count(self, batch: Batch) -> int:
        return int((batch.target != IGNORE_INDEX).sum())

    def _flat(self, output: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pred = output_tensor(output)
        label = batch.target.to(pred.device).long()
        n_classes = pred.shape[-1]
        if pred.numel() // n_classes != label.numel():
            raise ModelError(f"the model predicts {tuple(pred.shape)} but the labels are {tuple(label.shape)}; "
                             f"expected {label.numel()} predictions of {n_classes} classes")
        _labels_in_range(label, n_classes, "outputs")
        return pred.reshape(-1, n_classes).float(), label.reshape(-1)

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        logits, label = self._flat(output, batch)
        return F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="sum"), self.count(batch)

    def sums(self, output: Any, batch: Batch) -> tuple[float, float, int]:
        logits, label = self._flat(output, batch)
        total = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="sum")
        keep = label != IGNORE_INDEX
        correct = int((logits.argmax(-1)[keep] == label[keep]).sum())
        return float(total), float(correct), int(keep.sum())

    def finish(self, loss_sum: float, numerator: float, n: int) -> dict:
        # The numerator counts correct items out of the same n items: an accuracy is at most 1.
        return {"loss": loss_sum / max(n, 1), "metric": round(numerator) / max(n, 1), "n": n}

    def check_labels(self, labels: torch.Tensor, n_outputs: int) -> None:
        _labels_in_range(labels, n_outputs, "outputs")

    def strata(self, labels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | None:
        # Integer class ids, one per row: each class keeps its share of the held-out rows. Not token
        # labels (a sequence per row), nor float labels (not class ids).
        if (isinstance(labels, torch.Tensor) and not torch.is_floating_point(labels) and labels.dim()
                and labels.numel() == labels.shape[0]):
            return labels.reshape(-1)
        return None


class TokenClassification(Classification):
    """Per-token classification (NER-style): labels ``[B, T]`` padded with -100, accuracy over labelled tokens.

    As for a causal LM, a model that splits into body and head (``models.output_head``: a token
    classifier's ``dropout, classifier``, a masked LM's prediction head) is scored from its body's hidden
    states: only the labelled positions go through the head, a chunk of them at a time.
    """

    name = "token-classification"
    token_level = True

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """The body's hidden states when the model splits into body and head (checked once per model against
        its forward), else its own output."""
        return _Splits.of(self).forward(model, inputs, "outputs")

    def _chunked(self, output: HiddenStates, batch: Batch, fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, int]:
        """``chunked_sum`` of ``fn`` over the labelled positions, and their number."""
        label = batch.target.long()
        _labels_in_range(label, output.head.n_outputs, "outputs")
        keep = label != IGNORE_INDEX

        def on(states: torch.Tensor) -> torch.Tensor:
            if tuple(states.shape[:-1]) != tuple(label.shape):
                raise ModelError(f"the model's hidden states are {tuple(states.shape)} but the labels are "
                                 f"{tuple(label.shape)}; expected one label per position")
            here = keep.to(states.device)
            return chunked_sum(states[here], output.head, fn, label.to(states.device)[here])

        return output.apply(on), int(keep.sum())

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        if not isinstance(output, HiddenStates):
            return super().loss(output, batch)
        return self._chunked(output, batch, _cross_entropy)

    def sums(self, output: Any, batch: Batch) -> tuple[float, float, int]:
        if not isinstance(output, HiddenStates):
            return super().sums(output, batch)
        (total, correct), n = self._chunked(output, batch, _nll_and_correct)
        return float(total), float(correct), n


class CausalLM(Task):
    """Next-token prediction: position ``t`` predicts label ``t + 1``; -100 (padding, prompts) is ignored.

    Without a label column the labels are the input ids with -100 where ``attention_mask`` is 0
    (the padding), as transformers' ``DataCollatorForLanguageModeling(mlm=False)`` builds them.
    """

    name = "causal-lm"
    metric_name = "perplexity"
    higher_is_better = False
    token_level = True
    labels_from_inputs = True

    def shape_labels(self, column: LabelColumn | None) -> torch.Tensor | list[torch.Tensor] | None:
        """A label column of token ids as given (IGNORE_INDEX where a position is not scored); None without
        one (or with a column that is not ids): :meth:`labels` takes the input ids then."""
        if column is not None and column.kind in ("numeric", "ragged"):
            return column.values
        return None

    @staticmethod
    def labels(batch: Batch) -> torch.Tensor:
        """The unshifted labels ``[B, T]``: the label column as given, else the ids with padding ignored."""
        if batch.target is not None:
            return batch.target
        ids = batch.inputs["input_ids"]
        mask = batch.inputs.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)

    def count(self, batch: Batch) -> int:
        return int((self.labels(batch)[:, 1:] != IGNORE_INDEX).sum())

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """The final hidden states (:class:`~twamerge.models.HiddenStates`) when the model splits into body and
        head (``models.output_head``, checked once per model against its forward), else its own output."""
        return _Splits.of(self).forward(model, inputs, "vocabulary")

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        if isinstance(output, HiddenStates):
            labels = self.labels(batch)[:, 1:]

            def on(states: torch.Tensor) -> torch.Tensor:
                # Only the scored positions reach the head: padding and prompts cost no logits.
                shifted = labels.to(states.device)
                keep = shifted != IGNORE_INDEX
                return chunked_cross_entropy(states[:, :-1][keep], shifted[keep], output.head)

            return output.apply(on), int((labels != IGNORE_INDEX).sum())
        logits = output_tensor(output)  # [B, T, V]
        labels = self.labels(batch).to(logits.device)
        shifted = labels[:, 1:].reshape(-1)
        total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted,
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total, int((shifted != IGNORE_INDEX).sum())

    def finish(self, loss_sum: float, numerator: float, n: int) -> dict:
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "metric": math.exp(loss) if loss < 700 else math.inf, "n": n}

    def check_labels(self, labels: torch.Tensor, n_outputs: int) -> None:
        _labels_in_range(labels, n_outputs, "vocabulary entries")


# Logits per chunk of :func:`chunked_cross_entropy`: 128 MiB of float32 (about 1,100 positions of a 30k
# vocabulary, 260 of a 128k one), so the loss holds a few such chunks whatever the batch and the vocabulary.
CHUNK_LOGIT_BYTES = 128 << 20


def chunk_positions(n_outputs: int) -> int:
    """Positions per chunk of :func:`chunked_cross_entropy` for a head of ``n_outputs`` logits."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * max(n_outputs, 1)))


def chunked_sum(hidden: torch.Tensor, head: OutputHead, fn: Callable[..., torch.Tensor], *per_position: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
    """The sum over chunks of positions of ``fn(head.logits(h).float(), *rows)``: the logits of one chunk of
    ``hidden`` ``[N, H]`` exist at once, never ``[N, outputs]``; ``per_position`` are ``[N, ...]`` tensors
    cut into the same chunks (the labels).

    With gradients, each chunk is recomputed in the backward pass (``torch.utils.checkpoint``, which
    replays a dropout in the head with the same random draw), so the forward keeps no logits either;
    the head's weights (tied to the embeddings or not) receive their gradient through the head as usual.
    The logits are taken in float32, as transformers' own loss does.
    """
    chunk = chunk or chunk_positions(head.n_outputs)

    def part(h: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        return fn(head.logits(h).float(), *rows)

    total = hidden.float().sum() * 0  # 0, joined to the graph even when no position is scored
    for start in range(0, hidden.shape[0], chunk):
        pieces = [t[start:start + chunk] for t in (hidden, *per_position)]
        if torch.is_grad_enabled():
            total = total + checkpoint(part, *pieces, use_reentrant=False)
        else:
            total = total + part(*pieces)
    return total


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


def _nll_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[cross-entropy sum, correct predictions]`` of a chunk (scoring: no gradient)."""
    correct = (logits.argmax(-1) == labels).sum().to(logits.dtype)
    return torch.stack([F.cross_entropy(logits, labels, reduction="sum"), correct])


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum()


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: OutputHead,
                          chunk: int | None = None) -> torch.Tensor:
    """Sum of the cross-entropy of ``head.logits(hidden)`` ``[N, V]`` against ``labels`` ``[N]``, a chunk of
    positions at a time (:func:`chunked_sum`)."""
    return chunked_sum(hidden, head, _cross_entropy, labels, chunk=chunk)


class MaskedLM(TokenClassification):
    """Masked-token prediction (BERT's pre-training head): cross-entropy on the masked positions only.

    The data carries the masking, as transformers' ``DataCollatorForLanguageModeling`` made it for an
    evaluation: ``input_ids`` with the mask tokens in, and a ``labels`` column holding the original id
    at each masked position and -100 elsewhere (no random masking here: the figures must not depend on
    a draw). The metric is the perplexity over those positions, ``exp`` of the mean cross-entropy, as
    transformers' ``run_mlm.py`` reports it.
    """

    name = "masked-lm"
    metric_name = "perplexity"
    higher_is_better = False

    def sums(self, output: Any, batch: Batch) -> tuple[float, float, int]:
        total, n = self.loss(output, batch)
        return float(total), float(total), n

    def finish(self, loss_sum: float, numerator: float, n: int) -> dict:
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "metric": math.exp(loss) if loss < 700 else math.inf, "n": n}

    def check_labels(self, labels: torch.Tensor, n_outputs: int) -> None:
        _labels_in_range(labels, n_outputs, "vocabulary entries")


class Regression(Task):
    """Mean squared error per row (over the row's target elements); the metric is the loss."""

    name = "regression"
    label_dtype = torch.float32  # targets are compared with float predictions

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        pred = output_tensor(output).float()
        target = batch.target.to(pred.device).float()
        rows = target.shape[0]
        if pred.numel() != target.numel():
            raise ModelError(f"the model predicts {tuple(pred.shape)} but the targets are {tuple(target.shape)}")
        per_row = (pred.reshape(rows, -1) - target.reshape(rows, -1)).square().mean(1)
        return per_row.sum(), rows


class Entropy(Task):
    """AdaMerging's unsupervised objective: the mean entropy of the predictions; no labels needed.

    Items are rows, or for a token-level ``base`` task the positions where ``attention_mask`` is 1 (taken a
    chunk of positions at a time through the head where ``base.forward`` returns hidden states).
    """

    name = "entropy"
    metric_name = "entropy"
    higher_is_better = False
    needs_labels = False

    def __init__(self, base: Task):
        self.base = base
        self.token_level = base.token_level

    def _mask(self, batch: Batch) -> torch.Tensor | None:
        """``[B, T]`` ones at the scored positions of a token-level task; None for one prediction per row."""
        if not self.token_level:
            return None
        mask = batch.inputs.get("attention_mask")
        if mask is None:
            first = batch.inputs.get("input_ids", next(iter(batch.inputs.values())))
            mask = torch.ones(first.shape[:2], dtype=torch.long)
        return mask

    def count(self, batch: Batch) -> int:
        mask = self._mask(batch)
        return batch.rows if mask is None else int(mask.sum())

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """The ``base`` task's output: a language model's or token classifier's hidden states where it splits."""
        return self.base.forward(model, inputs)

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        mask = self._mask(batch)
        if isinstance(output, HiddenStates) and mask is not None:
            # The entropy of every attended position, a chunk of positions through the head at a time.
            total = output.apply(lambda states: chunked_sum(states[mask.to(states.device) != 0], output.head, _entropy))
            return total, int(mask.sum())
        logits = output_tensor(output).float()
        logp = logits.log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)  # [B] or [B, T]
        mask = self._mask(batch)
        if mask is not None:
            mask = mask.to(ent.device, ent.dtype)
            return (ent * mask).sum(), int(mask.sum())
        return ent.sum(), ent.numel()


class CustomLoss(Task):
    """``--loss module:fn``: ``fn(output, label)`` returns a scalar mean over the rows of the batch.

    The metric stays the ``base`` task's accuracy for one label per row (the sums are exact), else the loss.
    ``fn`` receives the model's own output: for a language model, its full ``[batch, tokens, vocabulary]``
    logits (said once in a log line; the token budgets bound them).
    """

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        if self.base.token_level and model not in self._told:
            self._told.add(model)
            log.info("%s: --loss %s receives the model's output, with its full [batch, tokens, outputs] logits "
                     "(the built-in losses take them a chunk of tokens at a time)", type(model).__name__,
                     getattr(self.fn, "__name__", "module:fn"))
        return call_model(model, inputs)

    def __init__(self, fn: Callable[[Any, torch.Tensor], torch.Tensor], base: Task):
        self.fn, self.base = fn, base
        self._told = weakref.WeakSet()  # the models the log line was written for
        self.name = base.name
        self.label_dtype = base.label_dtype  # regression targets stay floats for fn
        self.accuracy = isinstance(base, Classification) and not base.token_level
        self.metric_name = "accuracy" if self.accuracy else "loss"
        self.higher_is_better = self.accuracy

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        label = batch.target.to(output_tensor(output).device)
        return self.fn(output, label) * batch.rows, batch.rows

    def sums(self, output: Any, batch: Batch) -> tuple[float, float, int]:
        total, n = self.loss(output, batch)
        if not self.accuracy:
            return float(total), float(total), n
        pred = output_tensor(output)
        correct = int((pred.argmax(-1).reshape(-1) == batch.target.to(pred.device).reshape(-1)).sum())
        return float(total), float(correct), n

    def finish(self, loss_sum: float, numerator: float, n: int) -> dict:
        metric = round(numerator) / max(n, 1) if self.accuracy else loss_sum / max(n, 1)
        return {"loss": loss_sum / max(n, 1), "metric": metric, "n": n}

    def strata(self, labels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | None:
        return self.base.strata(labels)


# The tasks ``--task NAME`` names (``auto`` picks one of them from the model or the label column).
TASKS: dict[str, Callable[[], Task]] = {"classification": Classification, "causal-lm": CausalLM,
                                        "token-classification": TokenClassification, "regression": Regression,
                                        "masked-lm": MaskedLM}
TASK_NAMES = tuple(TASKS)


@lru_cache(maxsize=1)
def _head_registry() -> dict[str, tuple[str | None, str]]:
    """Head class name -> (task or None, the mapping naming it), from transformers' auto mappings;
    empty without transformers (a plain module's task then comes from its labels)."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return {}
    registry: dict[str, tuple[str | None, str]] = {}
    for mapping, task in HEAD_MAPPINGS:
        for classes in getattr(modeling_auto, mapping, {}).values():
            # A model type maps to one class name, or to a tuple of them.
            for cls in (classes,) if isinstance(classes, str) else classes:
                registry.setdefault(cls, (task, mapping))
    return registry


def _auto_map_task(arch: str, auto_map: Mapping[str, Any] | None) -> tuple[str | None, str] | None:
    """(task or None, the auto_map entry) of a custom-code head whose config's ``auto_map`` names ``arch``."""
    for auto_class, ref in (auto_map or {}).items():
        refs = [ref] if isinstance(ref, str) else [r for r in ref or [] if isinstance(r, str)]
        if auto_class in AUTO_CLASS_TASKS and any(r.rsplit(".", 1)[-1] == arch for r in refs):
            return AUTO_CLASS_TASKS[auto_class], f"auto_map {auto_class}: {ref}"
    return None


def task_of_architecture(architectures: list[str] | None,
                         auto_map: Mapping[str, Any] | None = None) -> tuple[str | None, str] | None:
    """The head kind of the first architecture transformers' registry (or the config's ``auto_map``) knows:
    ``(task name, or None for a kind twamerge has no task for; where it was found)``; None when none is known.

    ``["GPT2LMHeadModel"]`` -> ``("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")``.
    """
    registry = _head_registry()
    for arch in architectures or []:
        if arch in registry:
            return registry[arch]
        found = _auto_map_task(arch, auto_map)
        if found is not None:
            return found
    return None


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here just to answer no
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _task_of_head(model: nn.Module, label: torch.Tensor | list | None, loss: str) -> Task:
    """``--task auto``: the head's kind from transformers' registry; a plain module's from its label column.

    Raises:
        ModelError: a transformers head of a kind twamerge has no task for, or in none of the mappings.
    """
    archs = model_architectures(model)
    found = task_of_architecture(archs, getattr(getattr(model, "config", None), "auto_map", None)) if archs else None
    if found is None:
        if not _is_transformers_model(model):
            return _by_label(label, loss)
        raise ModelError(f"{archs[0]} is in none of transformers' task mappings ({HEAD_KINDS}), so --task auto "
                         f"cannot tell what it predicts; pass --task {'|'.join(TASK_NAMES)} or --task module:fn")
    name, where = found
    if name is None:
        raise ModelError(f"{archs[0]} is a sequence-to-sequence head ({where}), and twamerge has no task for "
                         "it; pass --task module:fn returning a twamerge.tasks.Task (with --preprocess for its "
                         "decoder inputs)")
    return TASKS[name]()


def model_architectures(model: nn.Module) -> list[str]:
    """``config.architectures`` of a transformers model, else the class name of a transformers model, else []."""
    config = getattr(model, "config", None)
    archs = list(getattr(config, "architectures", None) or [])
    return archs or ([type(model).__name__] if config is not None else [])


def resolve_task(task: str, loss: str, model: nn.Module, label: torch.Tensor | list | None) -> Task:
    """The task of ``--task`` and ``--loss``.

    Args:
        task: ``auto``, a name of :data:`TASK_NAMES`, or ``module:fn`` returning a :class:`Task`.
        loss: ``auto``, ``ce``, ``mse``, ``entropy`` or ``module:fn`` (``fn(output, label)`` -> scalar mean).
        model: the model; ``auto`` looks its ``config.architectures`` up in transformers' auto mappings
            (:data:`HEAD_MAPPINGS`; a custom-code head through its config's ``auto_map``).
        label: the label column as read (its dtype decides ``auto`` for a plain module), or None.

    Raises:
        ModelError: an unknown task, a factory that does not return a Task; ``auto`` for a transformers
            model whose architecture is in none of the mappings, or a seq2seq head.
    """
    if ":" in task:
        made = load_factory(task, "--task")()
        if not isinstance(made, Task):
            raise ModelError(f"--task {task!r}: the factory returned {type(made).__name__}, expected a "
                             "twamerge.tasks.Task")
        base = made
    elif task != "auto":
        if task not in TASKS:
            raise ModelError(f"--task {task!r}: expected auto, {', '.join(TASK_NAMES)} or module:fn")
        base = TASKS[task]()
    elif loss == "ce":
        base = Classification()
    elif loss == "mse":
        base = Regression()
    else:
        base = _task_of_head(model, label, loss)
    if loss == "entropy":
        return Entropy(base)
    if loss in ("auto", "ce", "mse"):
        return base
    return CustomLoss(load_factory(loss, "--loss"), base)


def _by_label(label: torch.Tensor | list | None, loss: str) -> Task:
    """A plain module's task from its label column: integers classify, floats regress."""
    if label is None:
        # Entropy needs no label (one prediction per row); otherwise the data preparation reports
        # the missing label column, naming the columns it found.
        return Classification()
    first = label if isinstance(label, torch.Tensor) else (label[0] if label else None)
    if isinstance(first, torch.Tensor) and torch.is_floating_point(first):
        return Regression()
    return Classification()
