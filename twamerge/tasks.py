"""The task decides the loss the fit minimises, the metric every figure is measured in, and the labels.

It owns everything about labels: their form (:meth:`Task.shape_labels`, called by ``prepare.py``
on the label column as read), the classes the held-out split keeps in proportion
(:meth:`Task.strata`), the loss and the metric. Adding a task is one :class:`Task` subclass and
one entry in :data:`TASKS` (``--task NAME``; ``--task module:fn`` returning an instance needs no
entry), plus one in ``ARCHITECTURE_SUFFIXES`` if ``auto`` should pick it for a transformers head.

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
    regression            rows                     mean squared error per row   loss (lower)
    entropy (--loss)      rows or tokens           prediction entropy           entropy (lower)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX  # the one definition; ``tasks.IGNORE_INDEX`` is the same constant
from .errors import DataError, ModelError
from .models import load_factory, output_tensor

if TYPE_CHECKING:
    from torch import nn

    from .data import Batch


# config.architectures suffix -> task (transformers' naming convention for heads).
ARCHITECTURE_SUFFIXES = (("ForCausalLM", "causal-lm"), ("ForSequenceClassification", "classification"),
                         ("ForTokenClassification", "token-classification"),
                         ("ForImageClassification", "classification"))


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
    """Per-token classification (NER-style): labels ``[B, T]`` padded with -100, accuracy over labelled tokens."""

    name = "token-classification"
    token_level = True


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

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
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

    Items are rows, or for a token-level ``base`` task the positions where ``attention_mask`` is 1.
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

    def loss(self, output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
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
    """

    def __init__(self, fn: Callable[[Any, torch.Tensor], torch.Tensor], base: Task):
        self.fn, self.base = fn, base
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
                                        "token-classification": TokenClassification, "regression": Regression}
TASK_NAMES = tuple(TASKS)


def task_of_architecture(architectures: list[str] | None) -> str | None:
    """The task a transformers head class implies (``LlamaForCausalLM`` -> ``causal-lm``), or None."""
    for arch in architectures or []:
        for suffix, name in ARCHITECTURE_SUFFIXES:
            if arch.endswith(suffix):
                return name
    return None


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
        model: the model; ``auto`` reads its ``config.architectures`` (transformers heads).
        label: the label column as read (its dtype decides ``auto`` for a plain module), or None.

    Raises:
        ModelError: an unknown task, a factory that does not return a Task.
        DataError: ``auto`` cannot decide (no architecture, no label).
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
        name = task_of_architecture(model_architectures(model))
        if name is None:
            base = _by_label(label, loss)
        else:
            base = TASKS[name]()
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
