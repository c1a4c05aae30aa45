"""The library entry points behind ``twamerge fit``, ``eval`` and ``apply``.

``fit`` is a recipe: it reads top to bottom as named stages, each a function below with typed
inputs and outputs (small dataclasses). The same code runs in one process and on every rank of a
distributed fit: one process is a :class:`~twamerge.distributed.SingleProcess` world of one. Each
stage ends at a point where every rank agrees on success (``comm.phase``), so a failure anywhere
stops every rank with the error. Nothing is written until every figure is computed.

Reads of the candidate files (README, "How it works"): the subspace build (one read per block when
its K copies fit in memory), one read of each candidate to score it, the greedy soup's trials (each
reads only its ingredients), and the written merge, which also hashes every input. The uniform
average is the subspace's mean and reads nothing.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import distributed, kernels
from .config import DataConfig, FitConfig, ModelConfig, OutputConfig, ReadConfig
from .data import split_holdout
from .distributed import Comm, SingleProcess, split_columns
from .errors import BackendUnavailableError, FitError, ModelError, OutputError, TwamergeError, one_line
from .evaluation import Scorer, Splits, evaluate, has_batchnorm, load_state, probe, recalibrate_batchnorm
from .fit import FitOutcome, FlatBinding, train_coefficients
from .io import AtomicWrite, CheckpointSet, check_output, open_checkpoints, refuse_existing, write_checkpoint
from .io.atomic import check_name_length
from .io.formats.checks import check_tensor
from .merge import build_metadata, linear_merge
from .methods import METHODS, greedy_soup, one_hot, uniform_weights
from .models import ModelKeys, build_model
from .options import dtype_name, parse_dtype
from .precision import resolve_precision
from .prepare import ModelContext, hf_dirs, load_inputs
from .report import (
    BasisSummary,
    DataSummary,
    MergeRecord,
    MethodResult,
    Timer,
    best_candidate,
    best_on_heldout,
    build_report,
    is_better,
    peak_memory,
    read_report,
)
from .subspace import FlatLayout, Subspace, build_subspace, make_layout

log = logging.getLogger(__name__)

Progress = Callable[[Iterable], Iterable]


def fit(
    checkpoints: Sequence[str | Path],
    *,
    val: DataConfig,
    model: ModelConfig,
    output: OutputConfig | str | Path,
    cfg: FitConfig = FitConfig(),
    read: ReadConfig = ReadConfig(),
    progress: Progress | None = None,
) -> dict:
    """Learn averaging coefficients on validation data (TWA) and write the merged checkpoint.

    Args:
        checkpoints: candidate files, globs or directories.
        val: the validation data; ``cfg.holdout`` of it is kept aside for the report.
        model: how to build the model and which loss to use.
        output: where the merged checkpoint (``.safetensors`` default, ``.pt``, or a directory for
            HF inputs), the JSON report and the plot go; a bare path is the checkpoint alone.
        cfg: fit hyper-parameters.
        read: how the candidates are read (``--key``, ``--keys``, ``--allow-nonfinite``).
        progress: optional wrapper around long loops (a progress bar).

    Returns:
        The report (a JSON-able dict): metrics of every candidate, the uniform average, the greedy
        soup and TWA on the held-out split, alphas per block, settings, timings and peak memory.

    Example:
        >>> from twamerge import fit, DataConfig, ModelConfig, FitConfig, OutputConfig  # doctest: +SKIP
        >>> report = fit(["e1.safetensors", "e2.safetensors", "e3.safetensors"],
        ...              val=DataConfig("val/"), model=ModelConfig("model.py:build"),
        ...              output=OutputConfig("merged.safetensors", report="report.json"),
        ...              cfg=FitConfig(blocks="layer", bits=4))
        >>> report["methods"][-1]["heldout"]["metric"]
    """
    out = OutputConfig.of(output)
    device = distributed.rank_device(select_device(cfg.device))
    check_backend(cfg.backend, device, cfg.bits)
    # Under torchrun (or inside an initialised process group of several ranks) the fit is distributed.
    comm = distributed.init(device)
    progress = progress if comm.is_main else None
    timer = Timer()
    try:
        with comm.phase("check outputs"):
            if comm.is_main:
                check_side_outputs(out)
        with _stage(comm, timer, "open"):
            cs = open_stage(checkpoints, read, out, comm)
        try:
            with _stage(comm, timer, "model"):
                net = model_stage(model, cs, cfg, device)
            with _stage(comm, timer, "data"):
                splits = data_stage(val, model, cfg, cs, net)
            with _stage(comm, timer, "probe"):
                probe(net.model, splits.data, splits.fit, splits.task, cfg.batch_size, device, net.amp)
            with comm.phase("bind"):
                flat = bind_stage(net, cs, cfg, device, comm)
            with _stage(comm, timer, "subspace"):
                subspace = subspace_stage(cs, flat, cfg, device, comm, progress)
            scorer = Scorer(net.model, splits, cfg.batch_size, device, net.recalibrate, comm, net.amp,
                            cfg.eval_batch_size)
            # The baselines come first: the greedy soup and the best candidate can be the fit's start point.
            with timer.phase("evaluate"):
                baselines = baselines_stage(cs, net, flat, subspace, scorer, cfg, comm)
            with _stage(comm, timer, "fit"):
                trained = train_stage(cs, net, flat, subspace, splits, baselines, cfg, device, comm, progress)
            with _stage(comm, timer, "merge"):
                merged = merge_stage(cs, net, flat, subspace, trained, out, progress)
            with timer.phase("evaluate"):
                twa = evaluate_stage(merged, net, flat, subspace, scorer, cfg, comm)
            written = twa
            if cfg.select == "best":
                with timer.phase("select"):
                    merged, written = select_stage(cs, net, flat, scorer, baselines, twa, merged, out, progress)
            per_rank = describe_ranks(flat, subspace, comm)
            report = None
            with comm.phase("write"):
                if comm.is_main:
                    report = write_stage(cs, val, model, cfg, out, splits, flat, subspace, baselines, trained,
                                         merged, twa, written, timer, per_rank)
            return comm.broadcast_object(report)
        except KeyboardInterrupt:
            # The training loop names its step; anywhere else (baselines, merge) says what is known.
            raise FitError("interrupted before the output was written; nothing was written") from None
        finally:
            cs.close()
    finally:
        comm.close()


# -- the stages, in the order fit runs them ---------------------------------------------------------


@contextlib.contextmanager
def _stage(comm: Comm, timer: Timer, name: str) -> Iterator[None]:
    """A timed stretch of work with no collectives inside, ending where every rank agrees on success."""
    with comm.phase(name), timer.phase(name):
        yield


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TwamergeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def check_backend(backend: str | None, device: torch.device, bits: int | None = None) -> None:
    """Fail before any work when a forced backend cannot run here (``--backend triton`` on a CPU,
    ``--backend native`` for a float basis)."""
    try:
        for op in kernels.OPS:
            kernels.resolve(op, device, backend, bits=bits)
    except kernels.BackendUnavailableError as exc:
        raise BackendUnavailableError(str(exc)) from None


def check_side_outputs(out: OutputConfig) -> None:
    """The report and the plot are not checkpoints (``check_output``): fail before any work when they cannot go
    there (exists without --force, a folder, a name too long, an unwritable folder, or the same file as another
    output)."""
    destinations = {os.path.realpath(out.path): "-o"}
    for p in (out.path.with_name(out.path.name + ".index.json"), out.path.with_name(out.path.name + ".metadata.json")):
        destinations.setdefault(os.path.realpath(p), "-o")
    for path, what, flag in ((out.report, "report", "--report"), (out.plot, "plot", "--plot")):
        if path is None:
            continue
        path = Path(path)
        check_name_length(path, what)
        real = os.path.realpath(path)
        if real in destinations:
            raise OutputError(f"{flag} {path} is the same file as {destinations[real]} writes; give it its own name")
        if Path(real).is_relative_to(os.path.realpath(out.path)):
            raise OutputError(f"{flag} {path} is inside the output {out.path}; put it beside the output")
        destinations[real] = flag
        refuse_existing(path, what, force=out.force)
        if os.path.isdir(path):
            raise OutputError(f"{path}: the {what} would replace a folder; give it a file name")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"{path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: the folder {parent} is not writable")
    if out.plot is not None:
        from .plot import plot_format

        plot_format(out.plot)


def open_stage(checkpoints: Sequence[str | Path], read: ReadConfig, out: OutputConfig, comm: Comm) -> CheckpointSet:
    """Open and validate the candidates; then, knowing whether they are HF folders, check the output's form."""
    cs = open_checkpoints(checkpoints, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite)
    try:
        parse_dtype(out.dtype)
        if comm.is_main:
            check_output(out.path, force=out.force, hf_source_dir=cs.hf_dir, max_shard_size=out.max_shard_size)
    except BaseException:
        cs.close()
        raise
    return cs


@dataclass
class Network:
    """The model the fit trains through, how the checkpoint keys map onto it, and its BatchNorm policy."""

    model: nn.Module
    keys: ModelKeys
    spec: str
    recalibrate: bool
    amp: torch.dtype | None = None  # the autocast dtype of forward and backward (--precision); None: float32


def model_stage(model_cfg: ModelConfig, cs: CheckpointSet, cfg: FitConfig, device: torch.device) -> Network:
    model = build_model(model_cfg.spec, model_cfg.args, hf_dir=cs.hf_dir).to(device)
    keys = ModelKeys(model, cs, model_cfg.spec)
    bn = has_batchnorm(model)
    recalibrate = cfg.bn_recalibrate == "on" or (cfg.bn_recalibrate == "auto" and bn)
    if cfg.bn_recalibrate == "on" and not bn:
        log.warning("--bn-recalibrate on: the model has no BatchNorm layer; nothing to recalibrate")
    amp = resolve_precision(cfg.precision, device, cs.dtype(keys.merged[0]) if keys.merged else None)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, model_cfg.spec or str(cs.hf_dir))
    return Network(model, keys, model_cfg.spec or str(cs.hf_dir), recalibrate, amp)


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


def data_stage(val: DataConfig, model: ModelConfig, cfg: FitConfig, cs: CheckpointSet, net: Network) -> Splits:
    """The validation data as the model takes it (text tokenized with the candidates' tokenizer), the
    task (its loss and metric), and the seeded split."""
    data, task = load_inputs(val, model, ModelContext(net.model, hf_dirs(cs.paths)))
    log.info("task %s: loss %s, metric %s (%s is better)", task.name, type(task).__name__, task.metric_name,
             "higher" if task.higher_is_better else "lower")
    fit_idx, held_idx = split_holdout(data, cfg.holdout, cfg.seed)
    return Splits(data, fit_idx, held_idx, task)


@dataclass
class FlatSpace:
    """Where the merged parameters live: the flat layout, this rank's columns, and the model bound to it.

    The model's merged parameters are views of ``binding.flat`` (and their gradients of
    ``binding.grad``). Binding comes before the subspace build, so the model's own parameters are
    gone before the basis is allocated: the peak holds one copy of the weights, not two.
    """

    layout: FlatLayout
    chunk: int  # padded columns per rank
    col_range: tuple[int, int]  # this rank's columns
    binding: FlatBinding


def bind_stage(net: Network, cs: CheckpointSet, cfg: FitConfig, device: torch.device, comm: Comm) -> FlatSpace:
    names = net.keys.merged
    layout = make_layout(names, [tuple(cs.shape(n)) for n in names], cfg.blocks, cfg.group_size)
    chunk, ranges = split_columns(layout.n_cols, layout.group_size, comm.world_size)
    binding = FlatBinding(net.model, layout, device, n_cols=chunk * comm.world_size, world_size=comm.world_size,
                          dtype=flat_dtype(cs, names, net.amp))
    return FlatSpace(layout, chunk, ranges[comm.rank], binding)


def flat_dtype(cs: CheckpointSet, names: list[str], amp: torch.dtype | None) -> torch.dtype:
    """bfloat16 when every merged tensor is stored in bfloat16 and the model computes in it (autocast),
    else float32: bf16 weights and gradients halve the flat buffers without changing what the model computes."""
    if amp == torch.bfloat16 and names and all(cs.dtype(n) == torch.bfloat16 for n in names):
        return torch.bfloat16
    return torch.float32


def subspace_stage(cs: CheckpointSet, flat: FlatSpace, cfg: FitConfig, device: torch.device, comm: Comm,
                   progress: Progress | None) -> Subspace:
    """Mean and Gram, then the quantized orthonormal basis (this rank's columns), streaming over the candidates.

    The build checks the candidates for NaN/Inf itself, from each tensor's Gram matrix (a non-finite
    value makes it non-finite), unless ``--allow-nonfinite`` asked not to.
    """
    return build_subspace(cs, flat.layout, bits=cfg.bits, comm=comm, rank_rtol=cfg.rank_rtol, device=device,
                          backend=cfg.backend, progress=progress, check_finite=not cs.allow_nonfinite)


def uniform_buffers(cs: CheckpointSet, keys: ModelKeys) -> dict[str, torch.Tensor]:
    """The candidates' uniform average of every buffer (integer ones: the first candidate's)."""
    out = {}
    for key in keys.buffers:
        x = cs.stack(key)
        out[key] = x.double().mean(0).to(x.dtype) if x.is_floating_point() else x[0]
    return out


def load_point(flat: FlatSpace, subspace: Subspace, beta: torch.Tensor, comm: Comm) -> None:
    """Make the model's merged parameters the subspace point ``mean + P~^T beta`` (every rank gets all of it)."""
    local_w = flat.binding.local_w
    subspace.combine(beta.to(local_w.device), out=local_w[:subspace.mean.numel()])
    comm.all_gather(flat.binding.flat, local_w)


def baselines_stage(cs: CheckpointSet, net: Network, flat: FlatSpace, subspace: Subspace, scorer: Scorer,
                    cfg: FitConfig, comm: Comm) -> list[MethodResult]:
    """Every candidate, the uniform average and the greedy soup (ingredients chosen on the fit split).

    Scoring a candidate reads that candidate alone; the uniform average is the subspace's mean
    (``beta = 0``) with the candidates' mean buffers and reads no weights; a greedy trial reads its
    ingredients.
    """
    keys = net.keys.model_keys()
    higher = scorer.splits.task.higher_is_better
    candidates: list[MethodResult] = []
    if METHODS["candidate"].enabled(cfg) or METHODS["greedy"].enabled(cfg):
        for i in range(len(cs)):
            scorer.load(lambda: ((key, cs.get(i, key)) for key in keys), recalibrate=False)
            # Rows name a candidate by its file name, which need not be unique (a/model.safetensors,
            # b/model.safetensors): the index is what picks its weights.
            candidates.append(MethodResult(Path(cs.paths[i]).name, "candidate", **scorer.score_both(),
                                           detail={"path": str(cs.paths[i]), "index": i}))
    rows = list(candidates) if METHODS["candidate"].enabled(cfg) else []
    with comm.phase("uniform"):
        load_point(flat, subspace, torch.zeros(flat.layout.n_blocks, subspace.rows), comm)
    scorer.load(uniform_buffers(cs, net.keys), recalibrate=True)
    rows.append(MethodResult("uniform", "uniform", **scorer.score_both()))
    if METHODS["greedy"].enabled(cfg):
        rows.append(_greedy_row(cs, flat, scorer, candidates, higher))
    return rows


def _greedy_row(cs: CheckpointSet, flat: FlatSpace, scorer: Scorer, candidates: list[MethodResult],
                higher: bool) -> MethodResult:
    """Sort by fit-split metric, add each candidate to the running uniform soup if the fit metric strictly improves.

    Each trial is scored on the fit split, which alone decides; a kept trial is scored on the held-out
    split too while it is loaded, so the soup's row needs no merge of its own unless no candidate
    was ever added to the first.
    """
    k = len(candidates)
    sign = 1 if higher else -1
    order = sorted(range(k), key=lambda i: -sign * candidates[i].fit["metric"])

    def try_soup(weights: list[float]) -> dict:
        scorer.load(lambda: linear_merge(cs, weights, into=flat.binding.param_view), recalibrate=True)
        return {"fit": scorer.score("fit")}

    def with_heldout(result: dict) -> dict:
        return {**result, "heldout": scorer.score("heldout")}

    soup, accepted = greedy_soup(order, candidates[order[0]].fit, k, try_soup,
                                 lambda a, b: is_better(a, b, higher), on_accept=with_heldout)
    if accepted is None:
        accepted = with_heldout(try_soup(one_hot(k, soup)))
    return MethodResult("greedy", "greedy", **accepted,
                        detail={"ingredients": [candidates[j].name for j in sorted(soup)], "indices": sorted(soup)})


def _baseline_weights(row: MethodResult, k: int) -> list[float]:
    """The weights of the ``k`` candidates in a baseline row: the uniform average, one candidate, or the greedy
    soup's ingredients."""
    if row.kind == "uniform":
        return uniform_weights(k)
    return one_hot(k, row.detail["indices"] if row.kind == "greedy" else [row.detail["index"]])


def _start_point(init: str, baselines: list[MethodResult], subspace: Subspace, k: int, higher: bool,
                 coordinates: str) -> torch.Tensor | None:
    """Coordinates ``theta`` [B, R] at which the fit starts: None for the uniform average (the paper's start).

    ``best`` starts at the best candidate on the fit split, ``greedy`` at the greedy soup. With
    ``t = a - 1/K`` the offsets of the wanted weights ``a`` from uniform, ``beta_b`` solves
    ``T_b^T beta_b = t`` in the least-squares sense (exact unless the start leaves the subspace, e.g.
    a duplicate candidate whose direction was dropped).
    """
    if init == "uniform":
        return None
    row = (best_candidate(baselines, "fit", higher) if init == "best"
           else next(r for r in baselines if r.kind == "greedy"))
    weights = _baseline_weights(row, k)
    target = torch.tensor(weights, dtype=torch.float64) - 1.0 / k
    beta = torch.stack([torch.linalg.pinv(t.T) @ target for t in subspace.transform])  # [B, R]
    scale = subspace.step_scale(coordinates)
    theta = torch.where(scale > 0, beta / scale.clamp_min(1e-300), torch.zeros_like(beta))
    return theta.float()


def train_stage(cs: CheckpointSet, net: Network, flat: FlatSpace, subspace: Subspace, splits: Splits,
                baselines: list[MethodResult], cfg: FitConfig, device: torch.device, comm: Comm,
                progress: Progress | None) -> FitOutcome:
    """Learn the coefficients on the fit rows, from the start point ``cfg.init`` names.

    With ``cfg.restarts`` > 1 the fit runs that many times with the seeds ``seed, seed + 1, ...``
    (data order and dropout) and the coefficients are averaged: the merge is linear in them, so
    this is the average of the fitted points, which smooths the noise of one data order.
    """
    theta0 = _start_point(cfg.init, baselines, subspace, len(cs), splits.task.higher_is_better,
                          cfg.coordinates)
    buffers = uniform_buffers(cs, net.keys)
    outcomes = []
    for restart in range(cfg.restarts):
        # Every fit runs with the candidates' uniform-average buffers, not those of the last model scored.
        load_state(net.model, buffers)
        outcomes.append(train_coefficients(flat.binding, subspace, splits.data, splits.fit, splits.task,
                                           replace(cfg, seed=cfg.seed + restart), device, comm, progress,
                                           theta0=theta0, amp=net.amp))
    if len(outcomes) == 1:
        return outcomes[0]
    curves = torch.tensor([o.curve for o in outcomes], dtype=torch.float64)
    seconds = [o.seconds_per_step for o in outcomes if o.seconds_per_step is not None]
    return FitOutcome(beta=torch.stack([o.beta for o in outcomes]).mean(0), curve=curves.mean(0).tolist(),
                      seconds_per_step=sum(seconds) / len(seconds) if seconds else None)


@dataclass
class Merged:
    """The learned merge as written: ``sum_k alpha_k c_k`` per block, from the original files."""

    tensors: dict[str, torch.Tensor]
    alphas: torch.Tensor  # [B, K] float64
    key_block: dict[str, int]  # merged keys and their tied aliases -> block
    default_alphas: list[float]  # [K] for floating tensors outside every block (buffers)
    out_dtype: torch.dtype | None
    trained: torch.Tensor  # [own columns] float32, the quantized-subspace point that was trained


def merge_stage(cs: CheckpointSet, net: Network, flat: FlatSpace, subspace: Subspace, trained: FitOutcome,
                out: OutputConfig, progress: Progress | None) -> Merged:
    # The gradient buffer is free once training is over: it holds the trained point, not a new D floats.
    point = subspace.combine(trained.beta, out=flat.binding.local_g[:subspace.mean.numel()])
    return merge_alphas(cs, net, flat, subspace.alphas(trained.beta), out, progress, point)


def merge_alphas(cs: CheckpointSet, net: Network, flat: FlatSpace, alphas: torch.Tensor, out: OutputConfig,
                 progress: Progress | None, trained: torch.Tensor) -> Merged:
    """``sum_k alphas[b, k] c_k`` for every tensor of block ``b``, from the original files."""
    layout = flat.layout
    # Tensors that are not merged parameters (floating buffers) take the size-weighted mean alphas.
    sizes = torch.zeros(layout.n_blocks, dtype=torch.float64)
    for i, b in enumerate(layout.block_of):
        sizes[b] += layout.numel(i)
    default_alphas = ((alphas * sizes.unsqueeze(1)).sum(0) / sizes.sum()).tolist()
    key_block = {name: layout.block_of[i] for i, name in enumerate(layout.names)}
    key_block.update({alias: key_block[target] for alias, target in net.keys.alias_of.items()})
    out_dtype = parse_dtype(out.dtype)
    # Float32 results go straight into the flat buffer the model's parameters view: the merge is
    # then loaded (and written from there) without a second D floats.
    tensors = linear_merge(cs, _weights_of(alphas, key_block, default_alphas), out_dtype=out_dtype,
                           progress=progress, into=flat.binding.param_view)
    return Merged(tensors, alphas, key_block, default_alphas, out_dtype, trained)


def _weights_of(alphas: torch.Tensor, key_block: dict[str, int], default: list[float]) -> Callable[[str], list]:
    rows = alphas.tolist()
    return lambda key: rows[key_block[key]] if key in key_block else default


@dataclass
class Evaluated:
    """The written merge's scores, the BatchNorm statistics re-estimated for it, and the quantization gap."""

    row: MethodResult
    recalibrated: dict[str, torch.Tensor]
    quantization_gap: float


def evaluate_stage(merged: Merged, net: Network, flat: FlatSpace, subspace: Subspace, scorer: Scorer,
                   cfg: FitConfig, comm: Comm) -> Evaluated:
    """Score exactly what is written (BatchNorm re-estimated for it, and written so)."""
    scorer.load(merged.tensors, recalibrate=True)
    recalibrated = _keep_recalibrated(merged, net)
    gap = _quantization_gap(flat, subspace, merged.trained, comm)
    row = MethodResult("twa", "twa", **scorer.score_both(), detail={"init": cfg.init})
    return Evaluated(row, recalibrated, gap)


def _keep_recalibrated(merged: Merged, net: Network) -> dict[str, torch.Tensor]:
    """Put the model's re-estimated BatchNorm statistics into the merge to write; returns them."""
    recalibrated = {}
    if net.recalibrate:
        state = net.model.state_dict()
        for key in net.keys.buffers:
            if merged.tensors[key].is_floating_point():
                merged.tensors[key] = state[key].detach().to("cpu", merged.tensors[key].dtype).clone()
                recalibrated[key] = merged.tensors[key]
    return recalibrated


def select_stage(cs: CheckpointSet, net: Network, flat: FlatSpace, scorer: Scorer, baselines: list[MethodResult],
                 twa: Evaluated, merged: Merged, out: OutputConfig, progress: Progress | None
                 ) -> tuple[Merged, Evaluated]:
    """``--select best``: the merge to write is the best on the held-out rows (``report.best_on_heldout``).

    When that is not TWA, its weights (the same in every block) are merged from the original files and
    loaded as they were scored: BatchNorm re-estimated on the fit rows for the soups, a candidate as
    it is. Returns what to write and its evaluation (its row as reported; TWA's quantization gap).
    """
    chosen = best_on_heldout([*baselines, twa.row], scorer.splits.task.higher_is_better)
    if chosen is twa.row:
        return merged, twa
    weights = _baseline_weights(chosen, len(cs))
    alphas = torch.tensor(weights, dtype=torch.float64).expand(flat.layout.n_blocks, len(weights)).clone()
    written = merge_alphas(cs, net, flat, alphas, out, progress, merged.trained)
    soup = chosen.kind != "candidate"
    scorer.load(written.tensors, recalibrate=soup)
    recalibrated = _keep_recalibrated(written, net) if soup else {}
    log.info("--select best: writing %s, the best on the held-out rows", chosen.name)
    return written, Evaluated(chosen, recalibrated, twa.quantization_gap)


def _quantization_gap(flat: FlatSpace, subspace: Subspace, trained: torch.Tensor, comm: Comm) -> float:
    """``|written - trained| / |trained - centre|`` over the merged tensors (padding excluded).

    ``flat.binding.flat`` holds what is written (all columns); ``trained`` and the subspace mean hold
    this rank's columns, whose squared sums are added over ranks. Sums run tensor by tensor, without copies.
    """
    layout, mean, written = flat.layout, subspace.mean, flat.binding.flat
    c0, c1 = flat.col_range
    sq = torch.zeros(2, dtype=torch.float64)
    error = None
    try:
        for i, o in enumerate(layout.offsets):
            lo, hi = max(o, c0), min(o + layout.numel(i), c1)
            if lo >= hi:
                continue
            real, ref, centre = written[lo:hi], trained[lo - c0:hi - c0], mean[lo - c0:hi - c0]
            sq += torch.stack([(real - ref).double().square().sum(), (ref - centre).double().square().sum()]).cpu()
    except Exception as exc:
        error = exc
    gap2, moved2 = comm.sum(sq, error).tolist()
    return math.sqrt(gap2) / math.sqrt(moved2) if moved2 > 0 else 0.0


def describe_ranks(flat: FlatSpace, subspace: Subspace, comm: Comm) -> list[dict] | None:
    """Each rank's columns, basis bytes and peak memory (a distributed fit's report); None in one process."""
    if comm.world_size == 1:
        return None
    return comm.gather_objects({"col_range": list(flat.col_range), "basis_bytes": subspace.basis_bytes(),
                                **peak_memory()})


def write_stage(cs: CheckpointSet, val: DataConfig, model_cfg: ModelConfig, cfg: FitConfig, out: OutputConfig,
                splits: Splits, flat: FlatSpace, subspace: Subspace, baselines: list[MethodResult],
                trained: FitOutcome, merged: Merged, twa: Evaluated, written: Evaluated, timer: Timer,
                per_rank: list[dict] | None) -> dict:
    """Write the merged checkpoint, the report and the plot as one transaction (rank 0 alone).

    Every file is written under a temporary name and all are renamed into place together at the end:
    a failure anywhere (a report that cannot be written, a full disk, an interrupt) leaves every
    destination as it was.
    """
    with AtomicWrite() as aw:
        report = _stage_outputs(aw, cs, val, model_cfg, cfg, out, splits, flat, subspace, baselines, trained,
                                merged, twa, written, timer, per_rank)
        try:
            aw.commit()
        except OSError as exc:
            raise OutputError(f"cannot write the outputs of the fit ({one_line(exc)}); nothing was changed") from None
    return report


def _stage_outputs(aw: AtomicWrite, cs: CheckpointSet, val: DataConfig, model_cfg: ModelConfig, cfg: FitConfig,
                   out: OutputConfig, splits: Splits, flat: FlatSpace, subspace: Subspace,
                   baselines: list[MethodResult], trained: FitOutcome, merged: Merged, twa: Evaluated,
                   written: Evaluated, timer: Timer, per_rank: list[dict] | None) -> dict:
    sources = cs.sources()
    metadata = build_metadata(written.row.kind, [{"path": s["path"], "sha256": s["sha256"]} for s in sources],
                              blocks=cfg.blocks, bits=cfg.bits, alphas=merged.alphas.tolist(),
                              heldout=written.row.heldout, metric_name=splits.task.metric_name,
                              higher_is_better=splits.task.higher_is_better)
    with timer.phase("write"):
        files = write_checkpoint(merged.tensors, out.path, metadata=metadata, force=out.force,
                                 max_shard_size=out.max_shard_size, hf_source_dir=cs.hf_dir, transaction=aw)
    layout = flat.layout
    data = splits.data
    report = build_report(
        settings=cfg,
        data=DataSummary(str(val.path), data.n, int(splits.fit.numel()), int(splits.heldout.numel()),
                         list(data.inputs), data.label),
        model={"spec": model_cfg.spec or str(cs.hf_dir), "args": model_cfg.args, "loss": model_cfg.loss,
               "task": splits.task.name},
        candidates=sources,
        metric_name=splits.task.metric_name,
        higher_is_better=splits.task.higher_is_better,
        methods=[*baselines, twa.row],
        basis=BasisSummary(layout.block_names(), subspace.ranks, subspace.dropped, subspace.spread.tolist(),
                           layout.n_params, layout.n_cols, subspace.rows, cfg.bits, cfg.group_size,
                           subspace.basis_bytes(), twa.quantization_gap),
        curve=trained.curve,
        seconds_per_step=trained.seconds_per_step,
        merge=MergeRecord(merged.key_block, merged.alphas.tolist(), merged.default_alphas,
                          dtype_name(merged.out_dtype) if merged.out_dtype else None,
                          _encode_tensors(written.recalibrated), metadata),
        outputs=[str(p) for p in files],
        timings=timer.seconds,
        memory={**peak_memory(), "basis_bytes": subspace.basis_bytes(),
                "flat_buffer_bytes": 2 * flat.binding.flat.numel() * flat.binding.flat.element_size()},
        distributed=None if per_rank is None else {"world_size": len(per_rank),
                                                   "backend": torch.distributed.get_backend(), "ranks": per_rank},
        written=written.row,
    )
    if out.report is not None:
        from .report import write_report

        write_report(report, out.report, out.force, transaction=aw)
    if out.plot is not None:
        from .plot import plot_report

        plot_report(report, out.plot, out.force, transaction=aw)
    return report


def _encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(st_save({k: v.contiguous() for k, v in tensors.items()})).decode() if tensors else ""


def _decode_tensors(blob: str, source: str | Path = "report") -> dict[str, torch.Tensor]:
    if not blob:
        return {}
    try:
        return st_load(base64.b64decode(blob, validate=True))
    except Exception as exc:  # noqa: BLE001 - binascii, safetensors and torch errors alike
        raise TwamergeError(f"{source}: merge.recalibrated_buffers: not base64 of a safetensors blob "
                            f"({one_line(exc)[:200]})") from None


def _recalibrated(report_path: str | Path, blob: str, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The report's recalibrated buffers, each checked against the merged tensor it replaces."""
    buffers = _decode_tensors(blob, report_path)
    for key, t in buffers.items():
        field = f"{report_path}: merge.recalibrated_buffers[{key!r}]"
        check_tensor(t, report_path, f"merge.recalibrated_buffers[{key!r}]")
        if key not in merged:
            raise TwamergeError(f"{field}: not a tensor of the merge")
        ref = merged[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise TwamergeError(f"{field}: {list(t.shape)} {dtype_name(t.dtype)} does not match the merged "
                                f"{list(ref.shape)} {dtype_name(ref.dtype)}")
    return buffers


# -- eval and apply ---------------------------------------------------------------------------------


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    *,
    val: DataConfig,
    model: ModelConfig,
    batch_size: int = 64,
    device: str = "auto",
    read: ReadConfig = ReadConfig(),
    bn_recalibrate: bool = False,
) -> dict:
    """Loss and metric of each checkpoint on all rows of ``val``.

    Returns:
        ``{"metric_name", "higher_is_better", "task", "rows", "checkpoints": [{"path", "loss", "metric", "n"}]}``
        (``n``: the task's items, e.g. tokens for a language model).
    """
    dev = select_device(device)
    cs = open_checkpoints(checkpoints, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite,
                          min_count=1)
    try:
        net = build_model(model.spec, model.args, hf_dir=cs.hf_dir).to(dev)
        keys = ModelKeys(net, cs, model.spec).model_keys()
        data, task = load_inputs(val, model, ModelContext(net, hf_dirs(cs.paths)))
        everything = torch.arange(data.n)
        probe(net, data, everything, task, batch_size, dev)
        results = []
        for i in range(len(cs)):
            load_state(net, ((k, cs.get(i, k)) for k in keys))
            if bn_recalibrate:
                recalibrate_batchnorm(net, data, everything, batch_size, dev)
            score = evaluate(net, data, everything, task, batch_size, dev, SingleProcess(dev))
            results.append({"path": str(cs.paths[i]), **score})
    finally:
        cs.close()
    return {"metric_name": task.metric_name, "higher_is_better": task.higher_is_better, "task": task.name,
            "rows": data.n, "checkpoints": results}


def apply_report(report_path: str | Path, checkpoints: Sequence[str | Path],
                 output: OutputConfig | str | Path) -> dict:
    """Re-emit a fit's merge from its saved coefficients: no data and no model needed.

    The candidates must be the fit's (checked by SHA-256, in order); the output is bit-for-bit the
    fit's output (the same tensors, the same metadata).
    """
    out = OutputConfig.of(output)
    report = read_report(Path(report_path))
    merge = report["merge"]
    cs = open_checkpoints(checkpoints, allow_nonfinite=True)
    try:
        check_output(out.path, force=out.force, hf_source_dir=cs.hf_dir, max_shard_size=out.max_shard_size)
        expected = [c["sha256"] for c in report["candidates"]]
        if len(expected) != len(cs):
            raise TwamergeError(f"{report_path}: the fit used {len(expected)} candidates; {len(cs)} were given")
        alphas = torch.tensor(merge["block_alphas"], dtype=torch.float64)
        # The merge reads every candidate once and hashes it on that read; the check comes after it.
        merged = linear_merge(cs, _weights_of(alphas, merge["key_block"], merge["default_alphas"]),
                              out_dtype=parse_dtype(merge.get("out_dtype")))
        got = [s["sha256"] for s in cs.sources()]
        for i, (e, g) in enumerate(zip(expected, got)):
            if e != g:
                raise TwamergeError(f"{cs.paths[i]}: SHA-256 {g[:12]}... differs from the fit's candidate {i + 1} "
                                    f"({report['candidates'][i]['path']}, {e[:12]}...); pass the same files in the "
                                    "same order")
        merged.update(_recalibrated(report_path, merge.get("recalibrated_buffers", ""), merged))
        written = write_checkpoint(merged, out.path, metadata=merge["metadata"], force=out.force,
                                   max_shard_size=out.max_shard_size, hf_source_dir=cs.hf_dir)
    finally:
        cs.close()
    return {"outputs": [str(p) for p in written], "report": str(report_path), "candidates": len(expected)}
