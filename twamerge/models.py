"""Turn a ``--model`` spec into an ``nn.Module``, call it on a batch, and map checkpoint keys onto it.

The loss and the metric are the task's (``tasks.py``).

Specs:
    ``path/to/file.py:factory``   a factory function in a Python file (run as code: the user's own)
    ``package.module:factory``    a factory in an importable module
    ``timm:NAME``                 ``timm.create_model(NAME, **args)`` (optional ``timm`` extra)
    a directory with config.json  ``transformers`` model class named in the config (optional extra)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import sys
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import ModelError
from .io.discovery import config_folder

if TYPE_CHECKING:
    from .io.candidates import CheckpointSet

log = logging.getLogger(__name__)


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["hidden=64", "act=\\"relu\\"", "name=relu"]`` -> dict; values are JSON literals, else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def load_factory(spec: str, option: str = "--model") -> Callable:
    """The callable ``spec`` names (``file.py:name`` or ``module:name``); errors name ``option``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelError(f"{option} {spec!r}: expected file.py:name or package.module:name"
                         + (", timm:NAME or a directory" if option == "--model" else ""))
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"{option} {spec!r}: no such file {path}")
        name = f"twamerge_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelError(f"{option} {spec!r}: importing {path} failed ({type(exc).__name__}: {exc})") from exc
        finally:
            sys.path.remove(str(path.parent.resolve()))
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelError(f"{option} {spec!r}: cannot import module {target!r} ({type(exc).__name__}: {exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{option} {spec!r}: {target} has no callable {attr!r}")
    return factory


def custom_code_entries(directory: Path, filename: str = "config.json") -> dict[str, str]:
    """The ``auto_map`` of ``directory/filename`` (``config.json``, ``tokenizer_config.json``, ...): Auto class
    -> the folder's Python class transformers would import to load it (``"modeling_x.XForCausalLM"``);
    empty when it names none, or the file is missing or not JSON."""
    try:
        data = json.loads((directory / filename).read_text())
    except (OSError, ValueError):
        return {}
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not isinstance(auto_map, dict):
        return {}
    # A tokenizer's entry is a [slow, fast] pair of class references, either of which may be null.
    return {str(k): v if isinstance(v, str) else ", ".join(str(x) for x in v or [] if x)
            for k, v in auto_map.items()}


def custom_code_refusal(directory: Path, filename: str, entries: dict[str, str], key: str | None = None) -> str:
    """The one-line refusal of a folder that transformers can load only by running its own Python code."""
    key = key if key in entries else next(iter(entries))
    return (f"{directory / filename}: auto_map {key}: {entries[key]} is Python code from that folder, which "
            "twamerge runs only with --trust-remote-code (pass it only for a folder whose code you trust)")


def _build_hf(directory: Path, args: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
    """The transformers model a folder's config.json names, with fresh weights.

    Every transformers call says ``trust_remote_code`` explicitly: left unset, transformers asks on a
    terminal whether to run the folder's code (and runs it on "y"), which a command must never do.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(
            f"--model {directory}: Hugging Face directories need transformers; pip install 'twamerge[transformers]'"
        ) from exc
    if "trust_remote_code" in args:
        raise ModelError("--model-arg trust_remote_code: not a config argument; the flag is --trust-remote-code")
    entries = custom_code_entries(directory)
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                                         trust_remote_code=trust_remote_code, **args)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for bad or unknown configs
        if entries and not trust_remote_code:
            raise ModelError(custom_code_refusal(directory, "config.json", entries, "AutoConfig")) from exc
        raise ModelError(f"--model {directory}: config.json cannot be loaded ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from exc
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        # The folder's own class for this architecture, as its auto_map names it (e.g. modeling_x.XForCausalLM).
        custom = next((k for k, ref in entries.items() if k.startswith("AutoModel")
                       and ref.rsplit(".", 1)[-1] == arch), None)
        if custom is not None and trust_remote_code:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            log.warning("--trust-remote-code: running %s of %s", entries[custom], directory)
            return get_class_from_dynamic_module(entries[custom], str(directory), local_files_only=True)(config)
        cls = getattr(transformers, arch, None)
        if cls is not None:
            if entries:
                log.info("%s: config.json's auto_map is not used (transformers provides %s): none of the folder's "
                         "code runs", directory, arch)
            return cls(config)
        if custom is not None:
            raise ModelError(custom_code_refusal(directory, "config.json", entries, custom))
    raise ModelError(
        f"--model {directory}: config.json names architectures {architectures}, none of which transformers provides"
    )


def build_model(spec: str | None, args: dict[str, Any] | None = None, *, hf_dir: Path | None = None,
                trust_remote_code: bool = False) -> nn.Module:
    """Build the model on CPU; its weights are overwritten from the checkpoints afterwards.

    ``trust_remote_code`` (``--trust-remote-code``) lets a Hugging Face folder's ``auto_map`` run the
    folder's Python files; without it such a folder is refused.

    Raises:
        ModelError: unknown spec, factory that raises or does not return an ``nn.Module``; a folder that
            needs its own code without ``trust_remote_code``.
    """
    args = dict(args or {})
    if spec is None:
        if hf_dir is None:
            raise ModelError("no model to build: put the candidates in a folder with config.json (a Hugging Face "
                             "folder), pass --model SPEC, or set model = \"SPEC\" in [tool.twamerge] of pyproject.toml")
        return _build_hf(hf_dir, args, trust_remote_code)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise ModelError(f"--model {spec}: a directory without config.json")
        return _build_hf(Path(spec), args, trust_remote_code)
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ModelError(f"--model {spec}: needs timm; pip install 'twamerge[timm]'") from exc
        try:
            return timm.create_model(spec[5:], pretrained=False, **args)
        except Exception as exc:
            raise ModelError(f"--model {spec}: timm.create_model failed ({exc})") from exc
    factory = load_factory(spec)
    try:
        model = factory(**args)
    except Exception as exc:
        raise ModelError(f"--model {spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec}: the factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model


# Keys of config.json that differ between saves of one model (who saved it, with which version).
_SAVE_NOTES = ("_name_or_path", "transformers_version")


def model_folder(paths: list[Path]) -> Path | None:
    """The folder whose config.json builds the candidates' model when no ``--model`` is given: the first
    candidate's :func:`config_folder`, once every candidate has one and their configs agree; None when none has.

    Raises:
        ModelError: one line naming the first candidate that differs: it has no config.json while others do, or
            its config.json differs (and the first key that does).
    """
    folders = [config_folder(p) for p in paths]
    first = next((f for f in folders if f is not None), None)
    if first is None:
        return None
    reference = _read_config(first)
    for path, folder in zip(paths, folders):
        if folder is None:
            raise ModelError(f"{path}: no config.json in its folder, while {first} has one; the model is built from "
                             "the candidates' folder only when they all have it: pass --model SPEC")
        if folder == first:
            continue
        other = _read_config(folder)
        differ = [k for k in sorted(set(reference) | set(other)) if reference.get(k) != other.get(k)]
        if differ:
            key = differ[0]
            raise ModelError(f"{path}: {folder / 'config.json'} differs from {first / 'config.json'} ({key}: "
                             f"{json.dumps(other.get(key))} vs {json.dumps(reference.get(key))}); the candidates are "
                             "not one model: pass --model SPEC to build one")
    return first


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / 'config.json'}: cannot be read as JSON ({' '.join(str(exc).split())[:200]})"
                         ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / 'config.json'}: holds {type(config).__name__}, expected a JSON object")
    return {k: v for k, v in config.items() if k not in _SAVE_NOTES}


def call_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Call ``model`` by keyword when its forward names every input column, else positionally.

    A forward that takes ``use_cache`` (transformers' decoders) is told not to build a cache of keys and
    values: scoring and training never reuse it, and it holds two tensors per layer for the whole batch.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if inputs and (all(name in params for name in inputs) or (takes_kwargs and len(inputs) > 1)):
        extra = {"use_cache": False} if "use_cache" in params and "use_cache" not in inputs else {}
        return model(**inputs, **extra)
    return model(*inputs.values())


def output_tensor(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output: a tensor, ``.logits``, ``["logits"]`` or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find the prediction tensor in a model output of type {type(output).__name__}")


class OutputHead:
    """A model as its body (inputs -> final hidden states) and its output head (hidden states -> logits),
    so that a loss can send the hidden states through the head a chunk of tokens at a time instead of
    holding ``[B, T, outputs]`` logits (``tasks.CausalLM``, ``tasks.TokenClassification``).

    The head is either the model's own output layer (``get_output_embeddings()``: a language model's,
    tied to the input embeddings where the model ties them), or the model's other children in the order
    they were registered (``dropout, classifier`` of a token classifier; ``cls`` of BERT's masked-LM
    head), followed by what the model's forward does to its logits as its config says: a scale
    (``logit_scale``, Cohere), a divisor (``logits_scaling``, Granite), a soft cap ``c * tanh(logits / c)``
    (``final_logit_softcapping``, Gemma 2 and 3). :func:`output_head` checks the split against the
    model's own forward before it is used.
    """

    def __init__(self, body: nn.Module, head: nn.Module, config: Any = None):
        self.body, self.head = body, head
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.scale = getattr(text, "logit_scale", None)
        self.divisor = getattr(text, "logits_scaling", None)
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.width: int | None = None  # the logits' width as the check saw it
        # A model sharded with FSDP (--shard-model): body and head run inside one of its forwards (:meth:`within`).
        self.sharded: nn.Module | None = None

    @property
    def n_outputs(self) -> int:
        """The width of the logits (the vocabulary, or the classes)."""
        if self.width is not None:
            return self.width
        weight = getattr(self.head, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else -1

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The final hidden states ``[B, T, H]`` of the body on ``inputs``."""
        out = call_model(self.body, inputs)
        states = getattr(out, "last_hidden_state", None)
        return states if isinstance(states, torch.Tensor) else output_tensor(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``hidden`` ``[..., H]``: the head, then its config's scale and soft cap."""
        logits = self.head(hidden)
        if isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool):
            logits = logits * self.scale
        if isinstance(self.divisor, (int, float)) and not isinstance(self.divisor, bool):
            logits = logits / self.divisor
        if isinstance(self.softcap, (int, float)) and not isinstance(self.softcap, bool) and self.softcap > 0:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def within(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` where the head may be called: for a sharded model, inside a forward of its FSDP root."""
        return fn() if self.sharded is None else getattr(self.sharded, _WITHIN)(fn)


@dataclass
class HiddenStates:
    """A model output that stops before the logits: the final hidden states and the head that makes them
    logits (what ``tasks.CausalLM.forward`` returns when the model splits; its loss applies the head).

    A model sharded with FSDP gathers its root's parameters (embeddings, output layer) only during a
    forward of the root, and frees them after it: its hidden states are not computed ahead (``states``
    is None) but in :meth:`apply`, where body and head run inside one such forward.
    """

    states: torch.Tensor | None  # [B, T, H]; None for a sharded model
    head: OutputHead
    inputs: dict[str, torch.Tensor] | None = None  # a sharded model's inputs
    autocast: tuple[str, torch.dtype] | None = None  # the autocast its body runs under (device type, dtype)

    def apply(self, fn: Callable[[torch.Tensor], Any]) -> Any:
        """``fn(hidden states)``, where ``fn`` may call the head (a sharded model: inside its root's forward)."""
        if self.states is not None:
            return fn(self.states)

        def run() -> Any:
            with torch.autocast(*self.autocast) if self.autocast else contextlib.nullcontext():
                states = self.head.hidden(self.inputs)
            return fn(states)

        return self.head.within(run)


def current_autocast(inputs: dict[str, torch.Tensor]) -> tuple[str, torch.dtype] | None:
    """The autocast the caller runs under for the device of ``inputs`` (device type, dtype), or None."""
    first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    kind = first.device.type if first is not None else "cpu"
    return (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None


# The method of a sharded model that runs a function as a forward of its FSDP root (``register_fsdp_forward_method``:
# the root's parameters gathered before, freed after, and its backward hooks on what the function returns).
_WITHIN = "_twamerge_within"


def _run_as_forward(model: nn.Module, fn: Callable[[], Any]) -> Any:
    return fn()


def _forward_method(model: nn.Module) -> None:
    """Give the FSDP-sharded ``model`` the method :data:`_WITHIN` (once)."""
    if _WITHIN not in model.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        object.__setattr__(model, _WITHIN, types.MethodType(_run_as_forward, model))
        register_fsdp_forward_method(model, _WITHIN)


# How many positions the check of a split compares (one row): enough to catch a head the model's
# forward post-processes, few enough that its full logits cost little at any vocabulary.
_CHECK_POSITIONS = 64


def _head_candidates(model: nn.Module, body: nn.Module) -> list[OutputHead]:
    """The splits :func:`output_head` tries, in order: the output layer (with the config's logit
    post-processing), then the children other than the body in registration order (with it, then without:
    a token classifier of an architecture whose causal LM scales its logits does not scale its own)."""
    config = getattr(model, "config", None)
    found: list[OutputHead] = []
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        found.append(OutputHead(body, head, config))
    # A loss module among the children (DistilBERT's mlm_loss_fct) is not part of the head.
    rest = [m for m in model.children() if m is not body and not isinstance(m, nn.modules.loss._Loss)]
    if rest and not (len(rest) == 1 and rest[0] is head):
        chain = rest[0] if len(rest) == 1 else nn.Sequential(*rest)
        found += [OutputHead(body, chain, config), OutputHead(body, chain, None)]
    return found


@torch.no_grad()
def output_head(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[OutputHead | None, str]:
    """The model split into body and head (:class:`OutputHead`), or None and the reason why not.

    The body is a transformers model's ``base_model``; the head, the first of :func:`_head_candidates`
    whose logits equal those of the model's own forward on the first row of ``inputs`` (at most 64
    positions, in eval mode: dropout off, under the caller's autocast), so a model that does something to
    its logits that the split does not know falls back to its forward instead of being scored wrong.

    A model sharded over the ranks (FSDP, ``--shard-model``) is split too, with body and head called
    inside a forward of its root (:meth:`OutputHead.within`): the check, then every loss. Every rank
    decides on the same row (the probe's, the first forward of a fit) and runs the same collectives: the
    check computes every candidate's logits in one forward, and a head that holds an FSDP unit of its own
    (one all-gather per call, so per chunk: a different number on each rank) is not split.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    sharded = fsdp is not None and isinstance(model, fsdp.FSDPModule)
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return None, "the model has no separate body (base_model)"
    candidates = _head_candidates(model, body)
    if sharded:
        candidates = [c for c in candidates if not any(isinstance(m, fsdp.FSDPModule) for m in c.head.modules())]
        if not candidates:
            return None, "its head is an FSDP unit of its own (--shard-model), gathered at every call"
        _forward_method(model)
        for split in candidates:
            split.sharded = model
    if not candidates:
        return None, "the model has no output layer or head besides its body (base_model)"
    ids = inputs.get("input_ids")
    length = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
    sample = {k: v[:1, :_CHECK_POSITIONS] if length is not None and v.dim() >= 2 and v.shape[1] == length else v[:1]
              for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    try:
        own = output_tensor(call_model(model, sample)).float()  # a model that rejects the inputs: the caller's error
        tries = candidates[0].within(lambda: _try_heads(candidates, sample))  # one forward for all of them
    finally:
        model.train(was_training)
    tolerance = 1e-3 * float(own.abs().max().clamp_min(1.0))
    why = "its head applied to the body's hidden states does not give the logits of its forward"
    for split, mine in zip(candidates, tries):
        if isinstance(mine, str):
            why = mine
        elif own.shape == mine.shape and torch.allclose(mine, own, rtol=1e-3, atol=tolerance):
            split.width = int(own.shape[-1])
            return split, ""
    return None, why


def _try_heads(candidates: list[OutputHead], sample: dict[str, torch.Tensor]) -> list[torch.Tensor | str]:
    """Each candidate's float32 logits on ``sample`` (one body, shared), or why they cannot be computed."""
    try:
        hidden = candidates[0].hidden(sample)
    except Exception as exc:  # a body that takes other inputs than the model, an output without hidden states
        return [f"its body cannot be called on its own ({type(exc).__name__}: {exc})"] * len(candidates)
    found: list[torch.Tensor | str] = []
    for split in candidates:
        try:
            found.append(split.logits(hidden).float())
        except Exception as exc:  # a head that takes more than the hidden states
            found.append(f"its head cannot be called on the hidden states ({type(exc).__name__}: {exc})")
    return found


class ModelKeys:
    """How checkpoint keys map onto a model: merged parameters (with aliases of tied ones) and buffers.

    ``merged`` lists the keys whose parameters are merged by the learned coefficients, in model
    order; ``alias_of`` maps the other names of a tied parameter to its merged key; ``buffers`` are
    the state-dict entries that are not parameters (BatchNorm statistics, counters). Only names and
    shapes are kept: the model's own parameter objects are looked up again when they are bound.
    """

    def __init__(self, model: nn.Module, cs: CheckpointSet, spec: str | None):
        ckpt = set(cs.keys)
        state = model.state_dict(keep_vars=True)
        names_of: dict[int, list[str]] = defaultdict(list)
        for name, p in model.named_parameters(remove_duplicate=False):
            names_of[id(p)].append(name)
        self.merged: list[str] = []  # model order; each is also the parameter's name in the model
        self.alias_of: dict[str, str] = {}
        missing: list[str] = []
        for pid, names in names_of.items():
            present = [n for n in names if n in ckpt]
            if not present:
                missing.append(names[0])
                continue
            self.merged.append(present[0])
            for alias in present[1:]:
                self.alias_of[alias] = present[0]
        param_names = {n for names in names_of.values() for n in names}
        self.buffers = [k for k in state if k not in param_names]
        missing += [k for k in self.buffers if k not in ckpt]
        unexpected = sorted(ckpt - set(state))
        merged = set(self.merged)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}" + (f" ({len(missing)} in all)" if len(missing) > 5 else ""))
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}"
                             + (f" ({len(unexpected)} in all)" if len(unexpected) > 5 else ""))
            raise ModelError(f"the checkpoints do not fit --model {spec or cs.hf_dir}: {'; '.join(parts)}")
        for key in self.model_keys():
            want = tuple(state[key].shape)
            if tuple(cs.shape(key)) != want:
                raise ModelError(f"key {key}: checkpoint shape {tuple(cs.shape(key))} but the model expects {want}")
            if key in merged and not cs.dtype(key).is_floating_point:
                raise ModelError(f"key {key}: parameter stored as {cs.dtype(key)}, expected a floating dtype")

    def model_keys(self) -> list[str]:
        """Every checkpoint key the model reads: merged parameters, their tied aliases, buffers."""
        return [*self.merged, *self.alias_of, *self.buffers]


def enable_gradient_checkpointing(model: nn.Module, spec: str, *, required: bool = True) -> bool:
    """Recompute activations in the backward pass instead of keeping them (``--gradient-checkpointing``).

    Hugging Face models (and any module with the same method) switch it on themselves; the
    non-reentrant form is asked for because the fit's inputs never require gradients. Returns whether
    it is on; a model without the method raises when ``required`` (the flag asked for it), else stays as it is.
    """
    # transformers 5 renamed the method (the old name still works, with a deprecation warning).
    for name, kwargs in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                         ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, name, None)
        if callable(enable):
            break
    else:
        if not required:
            return False
        raise ModelError(f"--gradient-checkpointing: the model of {spec} ({type(model).__name__}) has no "
                         "gradient_checkpointing_enable(); drop the flag or add the method to the model")
    try:
        enable(**{kwargs: {"use_reentrant": False}})
    except TypeError:  # a module whose method takes no such argument
        enable()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # a cache is useless in training and clashes with checkpointing
    return True
