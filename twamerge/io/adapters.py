"""LoRA adapters (PEFT folders) as merge candidates: read, check that they agree, view them as models, write.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``) with two factors per adapted module, ``lora_A`` [r, in] and ``lora_B`` [out, r]. Its
module's weight is ``W + s B A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``),
transposed for embeddings and ``fan_in_fan_out`` layers (GPT-2's Conv1D).

How a merge of adapters is computed. Adapter k as a model is ``c_k = W + dW_k`` on its modules
and ``W`` elsewhere; a merge with weights summing to 1 is ``sum_k alpha_k c_k = W + sum_k alpha_k
dW_k``: exactly the base plus the weighted updates. So :class:`AdapterSet` is a
:class:`~twamerge.io.CheckpointSet` whose candidate ``k`` reads as that model (the base's tensor
plus ``s_k B_k A_k``, formed densely when read), and everything that works on checkpoints (the
subspace, the fit, the baselines, ``linear_merge``, ``eval``) works on adapters unchanged.

Why dense updates and not the low-rank factors: the basis is built from the centred candidates
``c_k - mean``, which on an adapted module are combinations of dense updates whichever way they are
computed, and the fit trains the model's dense weights. Building the basis from the factors would
save the dense product per read (``out x r x in`` flops, small next to a forward pass) but needs a
subspace and a flat binding that know about factors; the dense view needs neither and is exact.
What it costs: the fit's basis spans the whole base model, like a fit of full checkpoints (the
tensors no adapter changes are the base in every candidate: their blocks have no directions).

What is written: by default a PEFT adapter whose effect is the merge exactly, the concatenation of
the weighted factors (rank ``sum_k r_k``), as PEFT's ``add_weighted_adapter(combination_type="cat")``
builds it: ``A = [w_1 s_1 A_1; ...; w_K s_K A_K]``, ``B = [B_1 ... B_K]``, scaling 1, so that
``B A = sum_k w_k s_k B_k A_k``; per-block weights are folded into each module's factors.
``--merge-into-base`` writes the merged full model instead.

Tensors an adapter saves whole (``modules_to_save``, a saved embedding layer) are candidates like
checkpoint tensors: merged as ``sum_k w_k T_k`` and written whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointMismatchError, InvalidArgumentError, OutputError, one_line
from .atomic import AtomicWrite
from .candidates import Candidate, CheckpointSet, open_checkpoints
from .discovery import config_folder, expand_paths, hf_weight_file, is_adapter_dir
from .formats import Entry
from .jsonschema import load_json
from .writer import TOKENIZER_FILES, check_output, copy_side_files, save_safetensors, write_checkpoint

log = logging.getLogger(__name__)

__all__ = ["ADAPTER_CONFIG", "Adapter", "AdapterSet", "check_merge_output", "is_adapter_dir", "open_inputs",
           "source_dirs", "tokenizer_dir", "write_output"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Every key of a PEFT model's saved adapter starts with this: the PeftModel's ``base_model.model``.
PEFT_PREFIX = "base_model.model."
FORMAT = "peft-lora"

# Settings under which a module's weight is not ``W + s B A`` (or the file holds more than the factors and
# whole tensors): refused with the setting named, rather than merged wrongly. A value counts as unset when it
# is one of these.
_UNSET: tuple[Any, ...] = (None, False, {}, [], "none", "")
_UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude per output)",
    "lora_bias": "trained biases on lora_B",
    "bias": "trained biases",
    "rank_pattern": "ranks per module (rank_pattern)",
    "alpha_pattern": "alphas per module (alpha_pattern)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "replicated layers",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "alora_invocation_tokens": "activated LoRA (applied after invocation tokens)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ewhich>lora_embedding_A"
                     r"|lora_embedding_B)$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of one adapter: where its factors are, and the weight they update."""

    module: str  # the module's name in the base model, e.g. model.layers.0.self_attn.q_proj
    a_raw: str  # the factors' keys in the adapter file
    b_raw: str
    rank: int
    shape: tuple[int, ...]  # the shape of the module's weight: (out, in), (in, out) when transposed, (num, dim)
    transpose: bool  # the update is (B A)^T: embeddings and fan_in_fan_out layers
    embedding: bool

    @property
    def key(self) -> str:
        """The module's weight in the base model's state dict."""
        return f"{self.module}.weight"


class Adapter:
    """One PEFT LoRA adapter folder: its config, its factors and whole tensors, and its scaling.

    Raises:
        CheckpointError: no or a broken ``adapter_config.json``, no weights file, not a LoRA adapter, a
            setting under which the update is not ``s B A`` (named), factors that do not pair up.
    """

    def __init__(self, path: Path):
        self.path = path = Path(path)
        config = load_json(path / ADAPTER_CONFIG, "adapter config", CheckpointError)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: expected a JSON object, got {type(config).__name__}")
        self.config: dict[str, Any] = config
        kind = config.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(f"{path}: peft_type {kind!r}; twamerge merges LoRA adapters (peft_type 'LORA')")
        for name, what in _UNSUPPORTED.items():
            value = config.get(name)
            if not any(value is u or (type(value) is type(u) and value == u) for u in _UNSET):
                raise CheckpointError(f"{path}: {ADAPTER_CONFIG} sets {name}={json.dumps(value)[:80]} ({what}), "
                                      "which twamerge cannot merge; it merges plain LoRA (A, B and a scaling)")
        self.r = _positive_int(config.get("r"), path, "r")
        alpha = config.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise CheckpointError(f"{path}: {ADAPTER_CONFIG} has lora_alpha={alpha!r}; expected a number")
        self.rslora = bool(config.get("use_rslora", False))
        # PEFT's LoraLayer.update_layer: alpha / sqrt(r) with rsLoRA, else alpha / r.
        self.scaling = float(alpha) / (math.sqrt(self.r) if self.rslora else self.r)
        base = config.get("base_model_name_or_path")
        self.base_name: str | None = base if isinstance(base, str) and base else None
        weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: an adapter folder without {' or '.join(ADAPTER_WEIGHTS)}")
        self.file = Candidate(weights, None)
        try:
            self.modules, self.whole = self._classify(bool(config.get("fan_in_fan_out", False)))
        except BaseException:
            self.file.close()
            raise

    def _classify(self, fan_in_fan_out: bool) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """Pair the factors per module and map the whole tensors to base-model keys."""
        entries = self.file.entries
        factors: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        whole: dict[str, str] = {}
        for raw in entries:
            if not raw.startswith(PEFT_PREFIX):
                raise CheckpointError(f"{self.file.path}: key {raw!r} does not start with {PEFT_PREFIX!r}; not a "
                                      "LoRA adapter saved by PEFT")
            name = raw[len(PEFT_PREFIX):]
            m = _FACTOR.match(name)
            if m is None:
                # A whole tensor: modules_to_save, or a saved embedding (under its LoRA wrapper's base_layer).
                key = re.sub(r"\.base_layer(?=\.)", "", name)
                if key in whole:
                    raise CheckpointError(f"{self.file.path}: {raw!r} and {whole[key]!r} are both the tensor {key}")
                whole[key] = raw
                continue
            module = m.group("module") or m.group("emodule")
            which = (m.group("which") or m.group("ewhich"))[-1]  # "A" or "B"
            if m.group("emodule"):
                embedding.add(module)
            factors.setdefault(module, {})[which] = raw
        modules: dict[str, LoraModule] = {}
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise CheckpointError(f"{self.file.path}: module {module} has no {missing}")
            (a_shape, _), (b_shape, _) = entries[pair["A"]], entries[pair["B"]]
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise CheckpointError(f"{self.file.path}: module {module} has factors of shapes {list(a_shape)} and "
                                      f"{list(b_shape)}; twamerge merges LoRA on linear and embedding layers (2-D "
                                      "factors), not on convolutions")
            rank = a_shape[0]
            if b_shape[1] != rank:
                raise CheckpointError(f"{self.file.path}: module {module}: lora_A has rank {rank}, lora_B "
                                      f"{b_shape[1]}")
            if rank != self.r:
                raise CheckpointError(f"{self.file.path}: module {module} has rank {rank}, {ADAPTER_CONFIG} says "
                                      f"r={self.r}")
            is_emb = module in embedding
            transpose = is_emb or fan_in_fan_out
            out, inp = b_shape[0], a_shape[1]
            shape = (inp, out) if transpose else (out, inp)
            lora = LoraModule(module, pair["A"], pair["B"], rank, shape, transpose, is_emb)
            modules[lora.key] = lora
        if not modules:
            raise CheckpointError(f"{self.file.path}: no LoRA factors (lora_A/lora_B) in the adapter")
        overlap = sorted(set(modules) & set(whole))
        if overlap and any(not whole[k].endswith(".base_layer.weight") for k in overlap):
            raise CheckpointError(f"{self.file.path}: {overlap[0]} is saved whole and has LoRA factors")
        return modules, whole

    def delta(self, key: str) -> torch.Tensor:
        """``s B A`` of the module whose weight is ``key`` (transposed where the layer needs it): float64."""
        m = self.modules[key]
        a = self.file.read(m.a_raw).to(torch.float64)
        b = self.file.read(m.b_raw).to(torch.float64)
        d = (b @ a).mul_(self.scaling)
        return d.T.contiguous() if m.transpose else d

    def factor_dtype(self) -> torch.dtype:
        return self.file.entries[next(iter(self.modules.values())).a_raw][1]

    def close(self) -> None:
        self.file.close()


def _positive_int(value: Any, path: Path, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {ADAPTER_CONFIG} has {name}={value!r}; expected a positive integer")
    return value


# -- the adapters as candidates ---------------------------------------------------------------------


class AdapterView:
    """Adapter ``k`` seen as a candidate model (the ``Candidate`` interface that ``CheckpointSet`` reads).

    With a base: every base key; an adapted module's weight is ``W + s B A`` (float32 at least: a
    16-bit weight would round most of a small update away), a whole tensor is the adapter's own,
    the rest is the base's. Without a base: the adapted modules' updates ``s B A`` and the whole
    tensors only (what data-free outputs and similarities need).
    """

    format = FORMAT
    rename_note = None

    def __init__(self, adapter: Adapter, base: Candidate | None, base_dir: Path | None,
                 entries: dict[str, Entry]):
        self.adapter = adapter
        self.path = adapter.path
        self.base = base
        self.hf_dir = base_dir  # what a model is built from, and an output's config comes from
        self.entries = entries

    def read(self, key: str) -> torch.Tensor:
        a = self.adapter
        if key in a.modules:
            start = a.file.read(a.whole[key]) if key in a.whole else (
                self.base.read(key) if self.base is not None else None)
            total = a.delta(key)
            if start is not None:
                total += start.to(torch.float64)
            return total.to(self.entries[key][1])
        if key in a.whole:
            return a.file.read(a.whole[key])
        return self.base.read(key)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.read(key).reshape(-1)[start:stop].clone()

    def reads_ranges(self, key: str) -> bool:
        return False  # an adapted weight is formed whole

    def position(self, key: str) -> tuple[int, int] | None:
        if self.base is not None and key in self.base.entries:
            return self.base.position(key)  # a pass in this order reads the base front to back
        a = self.adapter
        raw = a.modules[key].a_raw if key in a.modules else a.whole.get(key)
        return a.file.position(raw) if raw is not None else None

    def start_hashing(self) -> Any:
        return self.adapter.file.start_hashing()

    def sha256(self) -> str:
        """SHA-256 of the adapter's weights file (the base is the same for every candidate)."""
        return self.adapter.file.sha256()

    def size_bytes(self) -> int:
        return self.adapter.file.size_bytes()

    def close(self) -> None:
        self.adapter.close()


class AdapterSet(CheckpointSet):
    """K LoRA adapters of one base, validated to agree, read as the K adapted models (see the module doc).

    Attributes:
        adapters: the adapters, in order.
        base_dir: the base model's folder, or None (then only the adapted tensors are keys).
        base_name: the adapters' ``base_model_name_or_path`` (what a model card names as the base).
        adapted: the base keys of the adapted modules' weights, in the first adapter's order.
        whole: the keys of the tensors the adapters save whole.
    """

    def __init__(self, adapters: list[Adapter], base_dir: Path | None, allow_nonfinite: bool):
        self.adapters = adapters
        self.base_dir = base_dir
        first = adapters[0]
        self.base_name = first.base_name
        self.adapted = list(first.modules)
        self.whole = list(first.whole)
        self._base = Candidate(base_dir, None) if base_dir is not None else None
        try:
            entries = self._entries()
        except BaseException:
            if self._base is not None:
                self._base.close()
            raise
        views = [AdapterView(a, self._base, base_dir, entries) for a in adapters]
        super().__init__(views, list(entries), [], allow_nonfinite)

    def _entries(self) -> dict[str, Entry]:
        first = self.adapters[0]
        factor_dtype = torch.promote_types(first.factor_dtype(), torch.float32)
        if self._base is None:
            out: dict[str, Entry] = {k: (m.shape, factor_dtype) for k, m in first.modules.items()}
            out.update({k: first.file.entries[raw] for k, raw in first.whole.items()})
            return out
        base = self._base.entries
        for key, raw in [*((k, m.a_raw) for k, m in first.modules.items()), *first.whole.items()]:
            if key not in base:
                raise CheckpointMismatchError(f"{first.path}: {raw} changes {key}, which the base model "
                                              f"{self.base_dir} does not have; is this adapter of that base?")
        for key, m in first.modules.items():
            if tuple(base[key][0]) != tuple(m.shape):
                raise CheckpointMismatchError(f"{first.path}: the update of {m.module} has shape {list(m.shape)}, its "
                                              f"weight {key} in the base {self.base_dir} {list(base[key][0])}")
        for key, raw in first.whole.items():
            if tuple(base[key][0]) != tuple(first.file.entries[raw][0]):
                raise CheckpointMismatchError(f"{first.path}: {raw} has shape {list(first.file.entries[raw][0])}, "
                                              f"{key} in the base {self.base_dir} {list(base[key][0])}")
        out = dict(base)
        for key in first.modules:
            # Updates are small next to the weight: a 16-bit sum would round most of them away.
            out[key] = (base[key][0], torch.promote_types(base[key][1], torch.float32))
        for key, raw in first.whole.items():
            if key not in first.modules:
                out[key] = first.file.entries[raw]
        return out

    def start_hashing(self) -> None:
        """The candidates' SHA-256 and, when the base is open, the base's, on the hashing threads."""
        super().start_hashing()
        if self._base is not None:
            self._base.start_hashing()

    def base_source(self) -> dict[str, str] | None:
        """``{"path", "sha256"}`` of the base model's weights (for a sharded base, the hash of its shards'
        ``name:sha`` lines, as for a candidate), or None when the base is not open. A merge into the base
        records it: the written weights are the base's as much as the adapters'."""
        if self._base is None:
            return None
        self._base.start_hashing()  # a no-op when start_hashing() started it beside the reads
        return {"path": str(self.base_dir), "sha256": self._base.sha256()}

    def base_dtype(self, key: str) -> torch.dtype:
        """The dtype the base stores ``key`` in (what a merged full model is written in)."""
        return self._base.entries[key][1] if self._base is not None else self.dtype(key)

    def rank(self) -> int:
        return self.adapters[0].r

    def adapter_tensors(self, weights_of: Callable[[str], Sequence[float]],
                        dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The merged adapter's tensors (file keys -> tensors) and the adapters it concatenates.

        Module by module, ``A = [w_k s_k A_k]_k`` stacked along the rank and ``B = [B_k]_k`` side by side
        (``w``: ``weights_of(module's weight key)``), so that ``B A = sum_k w_k s_k B_k A_k`` with a
        scaling of 1; an adapter whose weight is 0 in every module is left out. Whole tensors are
        ``sum_k w_k T_k``. Factors are computed in float64 and stored in ``dtype`` (default: the first
        adapter's); whole tensors in theirs.
        """
        first = self.adapters[0]
        keys = [*self.adapted, *self.whole]
        weights = {key: [float(w) for w in weights_of(key)] for key in keys}
        used = [i for i in range(len(self)) if any(weights[key][i] != 0.0 for key in keys)]
        out_dtype = dtype or first.factor_dtype()
        out: dict[str, torch.Tensor] = {}
        for key, m in first.modules.items():
            w = weights[key]
            a_parts, b_parts = [], []
            for i in used:
                ad = self.adapters[i]
                mod = ad.modules[key]
                a_parts.append(ad.file.read(mod.a_raw).to(torch.float64) * (w[i] * ad.scaling))
                b_parts.append(ad.file.read(mod.b_raw).to(torch.float64))
            out[m.a_raw] = torch.cat(a_parts, dim=0).to(out_dtype)
            out[m.b_raw] = torch.cat(b_parts, dim=1).to(out_dtype)
        for key, raw in first.whole.items():
            w = weights[key]
            acc = torch.zeros(first.file.entries[raw][0], dtype=torch.float64)
            for i in used:
                acc.add_(self.adapters[i].file.read(self.adapters[i].whole[key]).to(torch.float64), alpha=w[i])
            out[raw] = acc.to(dtype or first.file.entries[raw][1])
        return out, used

    def adapter_config(self, used: int) -> dict[str, Any]:
        """The merged adapter's config: the first adapter's, with rank ``used * r`` and a scaling of 1."""
        config = dict(self.adapters[0].config)
        rank = used * self.rank()
        # lora_alpha = r without rsLoRA: scaling 1, the weights and scalings are in the A factors.
        config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                      inference_mode=True)
        return config

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` and the reports say about the adapters."""
        first = self.adapters[0]
        kinds = sorted({m.module.rsplit(".", 1)[-1] for m in first.modules.values()})
        return {"base_model": self.base_name, "base_dir": str(self.base_dir) if self.base_dir else None,
                "rank": first.r, "target_modules": kinds, "modules": len(first.modules),
                "whole_tensors": list(first.whole),
                "update_params": sum(math.prod(m.shape) for m in first.modules.values())}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._base is not None:
                self._base.close()


# -- opening ---------------------------------------------------------------------------------------


def check_agree(adapters: list[Adapter], *, same_rank: bool = True) -> None:
    """Adapters merge only when they adapt the same modules of the same base at the same rank.

    ``same_rank=False`` (``eval``, which scores each adapter on its own and writes nothing) lets the
    ranks differ: the candidates and their merges (rank ``K r``) are then scored in one command.

    Raises:
        CheckpointMismatchError: one line naming the two adapters and what differs.
    """
    first = adapters[0]
    for other in adapters[1:]:
        pair = f"{first.path} and {other.path}"
        if _base_id(first.base_name) != _base_id(other.base_name):
            raise CheckpointMismatchError(f"{pair} are adapters of different bases (base_model_name_or_path "
                                          f"{first.base_name!r} and {other.base_name!r}); only adapters of one base "
                                          "can be merged")
        only_first = [k for k in first.modules if k not in other.modules]
        only_other = [k for k in other.modules if k not in first.modules]
        if only_first or only_other:
            name, owner = (only_first[0], first) if only_first else (only_other[0], other)
            raise CheckpointMismatchError(
                f"{pair} adapt different modules: only {owner.path} adapts {owner.modules[name].module} (target "
                f"modules {_targets(first)} and {_targets(other)}); adapters must target the same modules")
        if same_rank and first.r != other.r:
            raise CheckpointMismatchError(f"{pair} have different ranks (r={first.r} and r={other.r}); adapters must "
                                          "have the same rank")
        for key, m in first.modules.items():
            o = other.modules[key]
            if (m.shape, m.transpose) != (o.shape, o.transpose):
                raise CheckpointMismatchError(f"{pair}: module {m.module} updates a weight of shape {list(m.shape)} in "
                                              f"one and {list(o.shape)} in the other; not adapters of one base")
        if set(first.whole) != set(other.whole):
            extra = sorted(set(first.whole) ^ set(other.whole))[0]
            raise CheckpointMismatchError(f"{pair} save different whole tensors: {extra} is in one only "
                                          "(modules_to_save differ)")
        for key, raw in first.whole.items():
            a, b = first.file.entries[raw], other.file.entries[other.whole[key]]
            if a[0] != b[0]:
                raise CheckpointMismatchError(f"{pair}: {key} has shape {list(a[0])} in one and {list(b[0])} in the "
                                              "other")


def _base_id(name: str | None) -> str | None:
    """A base's identity: a local folder by where it resolves to, anything else as written."""
    if name is not None and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def _targets(adapter: Adapter) -> list[str]:
    return sorted({m.module.rsplit(".", 1)[-1] for m in adapter.modules.values()})


def find_base(adapters: list[Adapter], model: str | None) -> Path:
    """The base model's folder: ``--model`` when given, else the adapters' ``base_model_name_or_path``
    when it is a local model folder.

    Raises:
        CheckpointError: ``--model`` is no model folder, or the base is not local and no ``--model`` says where.
    """
    if model is not None:
        base = Path(model).expanduser()
        if not base.is_dir() or hf_weight_file(base) is None:
            raise CheckpointError(f"--model {model}: LoRA adapters need their base model's folder (config.json and "
                                  "the weights, e.g. model.safetensors)")
        return base
    name = adapters[0].base_name
    if name is None:
        raise CheckpointError(f"{adapters[0].path}: {ADAPTER_CONFIG} names no base_model_name_or_path; pass --model "
                              "BASE_DIR, the base model's folder")
    base = Path(name).expanduser()
    if not base.is_dir():
        raise CheckpointError(f"{adapters[0].path}: the base model {name!r} (base_model_name_or_path) is not a local "
                              "folder; pass --model BASE_DIR, a folder with its config.json and weights")
    if hf_weight_file(base) is None:
        raise CheckpointError(f"{adapters[0].path}: the base model folder {name} holds no weights "
                              "(model.safetensors, pytorch_model.bin); pass --model BASE_DIR")
    return base


def open_adapters(paths: Sequence[Path], *, model: str | None = None, need_base: bool,
                  allow_nonfinite: bool = False, same_rank: bool = True) -> AdapterSet:
    """Open LoRA adapter folders, check they agree, and (when ``need_base``) find their base."""
    adapters: list[Adapter] = []
    try:
        for p in paths:
            adapters.append(Adapter(p))
        check_agree(adapters, same_rank=same_rank)
        # Without need of it, the base is not opened: the adapters' own tensors are the whole merge.
        base = find_base(adapters, model) if need_base else None
        aset = AdapterSet(adapters, base, allow_nonfinite)
    except BaseException:
        for a in adapters:
            a.close()
        raise
    log.info("%d LoRA adapters (rank %d, %d modules) of the base %s", len(adapters), adapters[0].r,
             len(adapters[0].modules), base if base is not None else adapters[0].base_name)
    if base is not None:
        changed = len(aset.adapted) + len([k for k in aset.whole if k not in aset.adapted])
        log.info("the adapters change %d of the base's %d tensors; the others are the base's in every candidate "
                 "(a fit finds no directions there)", changed, len(aset.keys))
    return aset


def adapter_paths(paths: Sequence[str | Path]) -> list[Path] | None:
    """The expanded ``paths`` when they are adapter folders, None when none is.

    Raises:
        CheckpointError: adapters mixed with checkpoints (naming one of each).
    """
    expanded = expand_paths(paths)
    adapters = [p for p in expanded if is_adapter_dir(p)]
    if not adapters:
        return None
    others = [p for p in expanded if not is_adapter_dir(p)]
    if others:
        raise CheckpointError(f"{adapters[0]} is a LoRA adapter and {others[0]} is not; merge adapters with adapters "
                              "(or merge each adapter into its base first)")
    return expanded


def open_inputs(paths: Sequence[str | Path], *, ema_key: str | None = None, keys: str = "strict",
                allow_nonfinite: bool = False, min_count: int = 2, model: str | None = None,
                need_base: bool = True, same_rank: bool = True) -> CheckpointSet:
    """``open_checkpoints``, or an :class:`AdapterSet` when the paths are LoRA adapter folders.

    Args:
        model: ``--model``: for adapters, the base model's folder (default: their base_model_name_or_path).
        need_base: whether adapters need their base (a fit, a merge into the base) or may go without.
        same_rank: whether adapters must have one rank (a merge); False for ``eval``.
        The others as for :func:`~twamerge.io.open_checkpoints`.

    Raises:
        CheckpointError, CheckpointMismatchError: as ``open_checkpoints``; for adapters also a setting that
            cannot be merged, adapters that differ (the difference named), a base that cannot be found.
    """
    found = adapter_paths(paths)
    if found is None:
        return open_checkpoints(paths, ema_key=ema_key, keys=keys, allow_nonfinite=allow_nonfinite,
                                min_count=min_count)
    if len(found) < min_count:
        raise CheckpointError(f"need at least {min_count} adapters, got {len(found)} "
                              f"({', '.join(str(p) for p in found)})")
    if ema_key is not None:
        raise InvalidArgumentError(f"--key {ema_key}: LoRA adapters have no entries to choose from")
    if keys != "strict":
        raise InvalidArgumentError(f"--keys {keys}: LoRA adapters merge only when they adapt the same modules")
    return open_adapters(found, model=model, need_base=need_base, allow_nonfinite=allow_nonfinite,
                         same_rank=same_rank)


# -- what an output is made of ----------------------------------------------------------------------


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def source_dirs(cs: CheckpointSet, model: str | None) -> list[Path]:
    """The folders a command looks in for the tokenizer (and processor files), in order.

    The candidates' own: Hugging Face model folders, or adapter folders that hold tokenizer files;
    when none holds tokenizer files, ``--model``'s folder (or the adapters' base) when it does.
    """
    paths = [Path(p) for p in cs.paths]
    if isinstance(cs, AdapterSet):
        dirs = [p for p in paths if has_tokenizer_files(p)]
    else:
        # Candidate folders with config.json, or the folders of candidate files that hold one, each once.
        dirs = list(dict.fromkeys(f for f in map(config_folder, paths) if f is not None))
    if any(has_tokenizer_files(d) for d in dirs):
        return dirs
    fallback = Path(model) if model is not None and Path(model).is_dir() else getattr(cs, "base_dir", None)
    if fallback is not None and has_tokenizer_files(fallback):
        return [*dirs, fallback] if dirs else [fallback]
    return dirs


def tokenizer_dir(cs: CheckpointSet, model: str | None, tokenizer: str | Path | None) -> Path | None:
    """The tokenizer an output gets: ``--tokenizer``, else the first of :func:`source_dirs` that has one."""
    if tokenizer is not None:
        return Path(tokenizer)
    return next((d for d in source_dirs(cs, model) if has_tokenizer_files(d)), None)


def check_merge_output(cs: CheckpointSet, out: Path, *, merge_into_base: bool = False, force: bool = False,
                       max_shard_size: int | None = None) -> None:
    """Fail before any work when the output cannot be written, or cannot be what the candidates make
    (``check_output`` for a merge of ``cs``).

    Raises:
        InvalidArgumentError: ``--merge-into-base`` for candidates that are not adapters.
        CheckpointError: ``--merge-into-base`` without the adapters' base.
        OutputError: an adapter output named like a file; as ``check_output``.
    """
    if not isinstance(cs, AdapterSet) or merge_into_base:
        if merge_into_base and not isinstance(cs, AdapterSet):
            raise InvalidArgumentError("--merge-into-base: the candidates are not LoRA adapters (it merges adapters "
                                       "into their base model)")
        if merge_into_base and cs.base_dir is None:
            raise CheckpointError("--merge-into-base needs the adapters' base model: pass --model BASE_DIR")
        check_output(out, force=force, hf_source_dir=cs.hf_dir, max_shard_size=max_shard_size)
        return
    if Path(out).suffix.lower() in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise OutputError(f"output {out}: merged LoRA adapters are written as an adapter folder (adapter_config.json "
                          "and adapter_model.safetensors); give -o a folder name, or pass --merge-into-base for a "
                          "full model")
    check_output(out, force=force, hf_source_dir=cs.adapters[0].path)


def write_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any], out: Path, *,
                  metadata: dict[str, str], force: bool = False, tokenizer: Path | None = None,
                  model_card: str | None = None, transaction: AtomicWrite | None = None) -> list[Path]:
    """Write a PEFT adapter folder atomically: ``adapter_model.safetensors`` (with ``metadata``),
    ``adapter_config.json``, the tokenizer's files when given, and ``README.md`` when ``model_card``.

    Returns the paths written. Raises ``OutputError`` as ``write_checkpoint`` does.
    """
    out = Path(out)
    check_output(out, force=force, hf_source_dir=out)
    metadata = {"format": "pt", **metadata}
    written: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            aw = transaction if transaction is not None else stack.enter_context(AtomicWrite())
            tmp = aw.directory(out)
            save_safetensors(tensors, tmp / ADAPTER_WEIGHTS[0], metadata)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            written += [out / ADAPTER_WEIGHTS[0], out / ADAPTER_CONFIG]
            if tokenizer is not None:
                copied = copy_side_files(None, tmp, tokenizer=tokenizer)
                log.info("copied %s from %s", ", ".join(copied) or "nothing", tokenizer)
            if model_card is not None:
                (tmp / "README.md").write_text(model_card)
                written.append(out / "README.md")
            if transaction is None:
                aw.commit()
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {out}: {one_line(e)[:300]}") from None
    return written


def write_output(cs: CheckpointSet, out: Path, *, tensors: dict[str, torch.Tensor] | None,
                 weights_of: Callable[[str], Sequence[float]], metadata: dict[str, str],
                 out_dtype: torch.dtype | None = None, merge_into_base: bool = False, force: bool = False,
                 max_shard_size: int | None = None, tokenizer: Path | None = None, model_card: str | None = None,
                 source_dir: Path | None = None, transaction: AtomicWrite | None = None) -> list[Path]:
    """Write a merge: an adapter folder for adapters (``weights_of`` gives each key's candidate weights),
    else ``tensors`` (the merged full model; for adapters with ``merge_into_base``, adapted weights
    are cast back to the base's dtype unless ``out_dtype``) through ``write_checkpoint``, with the
    side files of ``source_dir`` (default: the candidates' Hugging Face folder, or the adapters' base)."""
    if isinstance(cs, AdapterSet) and not merge_into_base:
        factors, used = cs.adapter_tensors(weights_of, out_dtype)
        log.info("the merged adapter concatenates %d of %d adapters: rank %d", len(used), len(cs),
                 len(used) * cs.rank())
        return write_adapter(factors, cs.adapter_config(len(used)), out, metadata=metadata, force=force,
                             tokenizer=tokenizer, model_card=model_card, transaction=transaction)
    assert tensors is not None
    if isinstance(cs, AdapterSet) and out_dtype is None:
        tensors = {k: t.to(cs.base_dtype(k)) if t.is_floating_point() else t for k, t in tensors.items()}
    return write_checkpoint(tensors, out, metadata=metadata, force=force, max_shard_size=max_shard_size,
                            hf_source_dir=source_dir or cs.hf_dir, tokenizer_dir=tokenizer, model_card=model_card,
                            transaction=transaction)
