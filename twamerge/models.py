"""Turn a ``--model`` spec into an ``nn.Module``, call it on a batch, and map checkpoint keys onto it.

The loss and the metric are the task's (``tasks.py``).

Specs:
    ``path/to/file.py:factory``   a factory function in a Python file (run as code: the user's own)
    ``package.module:factory``    a factory in an importable module
    ``timm:NAME``                 ``timm.create_model(NAME, **args)`` (optional ``timm`` extra)
    a directory with config.json  ``transformers`` model class named in the config (optional extra)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import ModelError

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


def _build_hf(directory: Path, args: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(
            f"--model {directory}: Hugging Face directories need transformers; pip install 'twamerge[transformers]'"
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True, **args)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for bad or unknown configs
        raise ModelError(f"--model {directory}: config.json cannot be loaded ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from exc
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls(config)
    raise ModelError(
        f"--model {directory}: config.json names architectures {architectures}, none of which transformers provides"
    )


def build_model(spec: str | None, args: dict[str, Any] | None = None, *, hf_dir: Path | None = None) -> nn.Module:
    """Build the model on CPU; its weights are overwritten from the checkpoints afterwards.

    Raises:
        ModelError: unknown spec, factory that raises or does not return an ``nn.Module``.
    """
    args = dict(args or {})
    if spec is None:
        if hf_dir is None:
            raise ModelError("--model is required unless the checkpoints are Hugging Face directories with config.json")
        return _build_hf(hf_dir, args)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise ModelError(f"--model {spec}: a directory without config.json")
        return _build_hf(Path(spec), args)
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


def call_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Call ``model`` by keyword when its forward names every input column, else positionally."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if inputs and (all(name in params for name in inputs) or (takes_kwargs and len(inputs) > 1)):
        return model(**inputs)
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


def enable_gradient_checkpointing(model: nn.Module, spec: str) -> None:
    """Recompute activations in the backward pass instead of keeping them (``--gradient-checkpointing``).

    Hugging Face models (and any module with the same method) switch it on themselves; the
    non-reentrant form is asked for because the fit's inputs never require gradients.
    """
    # transformers 5 renamed the method (the old name still works, with a deprecation warning).
    for name, kwargs in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                         ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, name, None)
        if callable(enable):
            break
    else:
        raise ModelError(f"--gradient-checkpointing: the model of {spec} ({type(model).__name__}) has no "
                         "gradient_checkpointing_enable(); drop the flag or add the method to the model")
    try:
        enable(**{kwargs: {"use_reentrant": False}})
    except TypeError:  # a module whose method takes no such argument
        enable()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # a cache is useless in training and clashes with checkpointing
