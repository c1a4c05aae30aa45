"""The library entry points behind ``twamerge fit``, ``eval`` and ``apply``.

``fit`` is a recipe: it reads top to bottom as named stages, each a function below that takes the
fit's shared state (:class:`FitRun`: settings, candidates, model, data, flat space, subspace, scorer,
ranks) and returns what it made, kept on the run or in the :class:`FitResults` that the last stage
writes. The same code runs in one process and on every rank of a distributed fit: one process is a
:class:`~twamerge.distributed.SingleProcess` world of one. Each stage runs inside
``run.stage(name)``, which times it and ends at a point where every rank agrees on success, so a
failure anywhere stops every rank with the error. Nothing is written until every figure is computed.

Reads of the candidate files (docs/how-it-works.md, "Reads of the candidate files"): the subspace
build (one read per block when its K copies fit in memory), one read of each candidate to score it,
the greedy soup's trials (each reads only its ingredients), and the written merge, which also hashes
every input. The uniform average is the subspace's mean and reads nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import distributed, kernels
from .config import DataConfig, FitConfig, ModelConfig, OutputConfig, ReadConfig
from .data import split_holdout
from .distributed import Comm, SingleProcess, split_columns
from .errors import BackendUnavailableError, FitError, OutputError, TwamergeError, one_line
from .evaluation import Scorer, Splits, evaluate, has_batchnorm, load_state, probe, recalibrate_batchnorm
from .fit import FitOutcome, FlatBinding, train_coefficients
from .io import AtomicWrite, CheckpointSet, check_output, open_checkpoints, write_checkpoint
from .io.writer import check_side_outputs
from .merge import build_metadata, linear_merge
from .methods import METHODS, MethodResult, by_init, fit_baselines
from .models import ModelKeys, build_model, enable_gradient_checkpointing
from .options import dtype_name, parse_dtype
from .precision import resolve_precision
from .prepare import ModelContext, hf_dirs, load_inputs
from .report import (
    BasisSummary,
    DataSummary,
    MergeRecord,
    Timer,
    best_on_heldout,
    build_report,
    encode_tensors,
    peak_memory,
    read_report,
    recalibrated_buffers,
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
    run = FitRun.start(cfg, val=val, model=model, out=OutputConfig.of(output), read=read, progress=progress)
    results = FitResults()
    try:
        with run.stage("check outputs", timed=False):
            check_outputs_stage(run)
        with run.stage("open"):
            run.cs = open_stage(run, checkpoints)
        with run.stage("model"):
            run.net = model_stage(run)
        with run.stage("data"):
            run.splits = data_stage(run)
        with run.stage("probe"):
            probe_stage(run)
        with run.stage("bind", timed=False):
            run.flat = bind_stage(run)
        with run.stage("subspace"):
            run.subspace = subspace_stage(run)
        run.scorer = make_scorer(run)
        # The baselines come first: the greedy soup and the best candidate can be the fit's start point.
        with run.stage("evaluate", agree=False):
            results.baselines = baselines_stage(run)
        with run.stage("fit"):
            results.trained = train_stage(run, results.baselines)
        with run.stage("merge"):
            results.merged = merge_stage(run, results.trained)
        with run.stage("evaluate", agree=False):
            results.twa = results.written = evaluate_stage(run, results.merged)
        if cfg.select == "best":
            with run.stage("select", agree=False):
                results.merged, results.written = select_stage(run, results)
        return write_stage(run, results)
    except KeyboardInterrupt:
        if run.cs is None:
            raise
        # The training loop names its step; anywhere else (baselines, merge) says what is known.
        raise FitError("interrupted before the output was written; nothing was written") from None
    finally:
        run.close()


# -- the fit's state --------------------------------------------------------------------------------


@dataclass
class Network:
    """The model the fit trains through, how the checkpoint keys map onto it, and its BatchNorm policy."""

    model: nn.Module
    keys: ModelKeys
    spec: str
    recalibrate: bool
    amp: torch.dtype | None = None  # the autocast dtype of forward and backward (--precision); None: float32


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


@dataclass
class FitRun:
    """What every stage of a fit reads: the settings, where it runs, and what the early stages set up.

    The settings and the ranks are given at the start; ``cs`` (the candidates), ``net`` (the model),
    ``splits`` (the validation rows and the task), ``flat`` (the flat parameter space the model is
    bound to), ``subspace`` and ``scorer`` are set by the stages of those names, in that order (None
    before).
    """

    cfg: FitConfig
    val: DataConfig
    model_cfg: ModelConfig
    out: OutputConfig
    read: ReadConfig
    device: torch.device
    comm: Comm
    progress: Progress | None = None
    timer: Timer = field(default_factory=Timer)
    cs: CheckpointSet | None = None
    net: Network | None = None
    splits: Splits | None = None
    flat: FlatSpace | None = None
    subspace: Subspace | None = None
    scorer: Scorer | None = None

    @classmethod
    def start(cls, cfg: FitConfig, *, val: DataConfig, model: ModelConfig, out: OutputConfig, read: ReadConfig,
              progress: Progress | None) -> FitRun:
        """Pick the device, fail early on a backend that cannot run there, and join the ranks."""
        device = distributed.rank_device(select_device(cfg.device))
        check_backend(cfg.backend, device, cfg.bits)
        # Under torchrun (or inside an initialised process group of several ranks) the fit is distributed.
        comm = distributed.init(device)
        return cls(cfg, val, model, out, read, device, comm, progress if comm.is_main else None)

    @contextlib.contextmanager
    def stage(self, name: str, *, agree: bool = True, timed: bool = True) -> Iterator[None]:
        """A named stretch of the fit: timed under ``timings[name]`` in the report, and ending where every
        rank agrees on success (``Comm.phase``: a failure on any rank raises on all).

        ``agree=False`` for a stretch that agrees by itself, because every collective inside it carries
        the error flag (scoring, ``--select best``), or that runs on rank 0 alone (the checkpoint write):
        an agreement there would be a collective that not every rank reaches in step. ``timed=False``
        for the steps the report does not time (the output checks, binding, the write as a whole).
        """
        with contextlib.ExitStack() as stack:
            if agree:
                stack.enter_context(self.comm.phase(name))
            if timed:
                stack.enter_context(self.timer.phase(name))
            yield

    def close(self) -> None:
        """Close the candidates (once opened) and leave the process group (when this fit made it)."""
        try:
            if self.cs is not None:
                self.cs.close()
        finally:
            self.comm.close()


@dataclass
class Merged:
    """The learned merge as written: ``sum_k alpha_k c_k`` per block, from the original files."""

    tensors: dict[str, torch.Tensor]
    alphas: torch.Tensor  # [B, K] float64
    key_block: dict[str, int]  # merged keys and their tied aliases -> block
    default_alphas: list[float]  # [K] for floating tensors outside every block (buffers)
    out_dtype: torch.dtype | None
    trained: torch.Tensor  # [own columns] float32, the quantized-subspace point that was trained


@dataclass
class Evaluated:
    """A merge's scores, the BatchNorm statistics re-estimated for it, and TWA's quantization gap."""

    row: MethodResult
    recalibrated: dict[str, torch.Tensor]
    quantization_gap: float


@dataclass
class FitResults:
    """What the stages after the subspace make, in order, for :func:`write_stage`."""

    baselines: list[MethodResult] = field(default_factory=list)  # the rows of the fit baselines
    trained: FitOutcome | None = None  # the learned coefficients and the training curve
    merged: Merged | None = None  # what is written: TWA's merge, or under --select best the chosen one
    twa: Evaluated | None = None  # TWA's merge as scored (its row and quantization gap are always reported)
    written: Evaluated | None = None  # the written merge as scored (TWA's unless --select best chose another)


# -- the stages, in the order fit runs them ---------------------------------------------------------


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


def check_outputs_stage(run: FitRun) -> None:
    """Rank 0 fails before any work when the report or the plot cannot be written where asked."""
    out = run.out
    if run.comm.is_main:
        check_side_outputs(out.path, {"--report": out.report, "--plot": out.plot}, force=out.force)
        if out.plot is not None:
            from .plot import plot_format

            plot_format(out.plot)


def open_stage(run: FitRun, checkpoints: Sequence[str | Path]) -> CheckpointSet:
    """Open and validate the candidates; then, knowing whether they are HF folders, check the output's form."""
    read, out = run.read, run.out
    cs = open_checkpoints(checkpoints, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite)
    try:
        parse_dtype(out.dtype)
        if run.comm.is_main:
            check_output(out.path, force=out.force, hf_source_dir=cs.hf_dir, max_shard_size=out.max_shard_size)
    except BaseException:
        cs.close()
        raise
    return cs


def model_stage(run: FitRun) -> Network:
    cfg, cs, spec = run.cfg, run.cs, run.model_cfg.spec or str(run.cs.hf_dir)
    model = build_model(run.model_cfg.spec, run.model_cfg.args, hf_dir=cs.hf_dir).to(run.device)
    keys = ModelKeys(model, cs, run.model_cfg.spec)
    bn = has_batchnorm(model)
    recalibrate = cfg.bn_recalibrate == "on" or (cfg.bn_recalibrate == "auto" and bn)
    if cfg.bn_recalibrate == "on" and not bn:
        log.warning("--bn-recalibrate on: the model has no BatchNorm layer; nothing to recalibrate")
    amp = resolve_precision(cfg.precision, run.device, cs.dtype(keys.merged[0]) if keys.merged else None)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, spec)
    return Network(model, keys, spec, recalibrate, amp)


def data_stage(run: FitRun) -> Splits:
    """The validation data as the model takes it (text tokenized with the candidates' tokenizer), the
    task (its loss and metric), and the seeded split."""
    data, task = load_inputs(run.val, run.model_cfg, ModelContext(run.net.model, hf_dirs(run.cs.paths)))
    log.info("task %s: loss %s, metric %s (%s is better)", task.name, type(task).__name__, task.metric_name,
             "higher" if task.higher_is_better else "lower")
    fit_idx, held_idx = split_holdout(data, run.cfg.holdout, run.cfg.seed)
    return Splits(data, fit_idx, held_idx, task)


def probe_stage(run: FitRun) -> None:
    """One batch through the model before anything expensive (``evaluation.probe``)."""
    splits = run.splits
    probe(run.net.model, splits.data, splits.fit, splits.task, run.cfg.batch_size, run.device, run.net.amp)


def bind_stage(run: FitRun) -> FlatSpace:
    names, cs, comm = run.net.keys.merged, run.cs, run.comm
    layout = make_layout(names, [tuple(cs.shape(n)) for n in names], run.cfg.blocks, run.cfg.group_size)
    chunk, ranges = split_columns(layout.n_cols, layout.group_size, comm.world_size)
    binding = FlatBinding(run.net.model, layout, run.device, n_cols=chunk * comm.world_size,
                          world_size=comm.world_size, dtype=flat_dtype(cs, names, run.net.amp))
    return FlatSpace(layout, chunk, ranges[comm.rank], binding)


def flat_dtype(cs: CheckpointSet, names: list[str], amp: torch.dtype | None) -> torch.dtype:
    """bfloat16 when every merged tensor is stored in bfloat16 and the model computes in it (autocast),
    else float32: bf16 weights and gradients halve the flat buffers without changing what the model computes."""
    if amp == torch.bfloat16 and names and all(cs.dtype(n) == torch.bfloat16 for n in names):
        return torch.bfloat16
    return torch.float32


def subspace_stage(run: FitRun) -> Subspace:
    """Mean and Gram, then the quantized orthonormal basis (this rank's columns), streaming over the candidates.

    The build checks the candidates for NaN/Inf itself, from each tensor's Gram matrix (a non-finite
    value makes it non-finite), unless ``--allow-nonfinite`` asked not to.
    """
    cfg, cs = run.cfg, run.cs
    return build_subspace(cs, run.flat.layout, bits=cfg.bits, comm=run.comm, rank_rtol=cfg.rank_rtol,
                          device=run.device, backend=cfg.backend, progress=run.progress,
                          check_finite=not cs.allow_nonfinite)


def make_scorer(run: FitRun) -> Scorer:
    """Loads states into the bound model and scores both splits (BatchNorm re-estimated when the fit does)."""
    cfg, net = run.cfg, run.net
    return Scorer(net.model, run.splits, cfg.batch_size, run.device, net.recalibrate, run.comm, net.amp,
                  cfg.eval_batch_size)


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


class FitScoring:
    """The fit's side of :class:`methods.Scoring`: what a baseline's ``score`` loads and scores.

    Scoring a candidate reads that candidate alone (its row is made once, however many baselines
    ask); the uniform average is the subspace's mean (``beta = 0``) with the candidates' mean
    buffers and reads no weights; a merge reads the candidates it weighs.
    """

    def __init__(self, run: FitRun):
        self.run = run
        self.k = len(run.cs)
        self.higher_is_better = run.splits.task.higher_is_better
        self._keys = run.net.keys.model_keys()
        self._candidates: dict[int, MethodResult] = {}

    def candidate(self, i: int) -> MethodResult:
        if i not in self._candidates:
            cs, scorer = self.run.cs, self.run.scorer
            scorer.load(lambda: ((key, cs.get(i, key)) for key in self._keys), recalibrate=False)
            # Rows name a candidate by its file name, which need not be unique (a/model.safetensors,
            # b/model.safetensors): the index is what picks its weights.
            self._candidates[i] = MethodResult(Path(cs.paths[i]).name, "candidate", **scorer.score_both(),
                                               detail={"path": str(cs.paths[i]), "index": i})
        return self._candidates[i]

    def centre(self) -> dict:
        run = self.run
        with run.stage("uniform", timed=False):
            load_point(run.flat, run.subspace, torch.zeros(run.flat.layout.n_blocks, run.subspace.rows), run.comm)
        run.scorer.load(uniform_buffers(run.cs, run.net.keys), recalibrate=True)
        return run.scorer.score_both()

    def merge(self, weights: list[float], heldout: bool = True) -> dict:
        cs, binding, scorer = self.run.cs, self.run.flat.binding, self.run.scorer
        scorer.load(lambda: linear_merge(cs, weights, into=binding.param_view), recalibrate=True)
        scores = {"fit": scorer.score("fit")}
        if heldout:
            scores["heldout"] = scorer.score("heldout")
        return scores

    def heldout(self) -> dict | None:
        return self.run.scorer.score("heldout")


def baselines_stage(run: FitRun) -> list[MethodResult]:
    """The rows of every fit baseline the settings keep (``methods.fit_baselines``: the candidates, the
    uniform average, the greedy soup), each scored by its method, in registry order."""
    scoring = FitScoring(run)
    return [row for method in fit_baselines(run.cfg) for row in method.score(scoring)]


def start_point(run: FitRun, baselines: list[MethodResult]) -> torch.Tensor:
    """Coordinates ``theta`` [B, R] at which the fit starts (``--init``): the merge that the method named by
    ``--init`` puts forward (the uniform average, the paper's start; the greedy soup; the best candidate
    on the fit split), located in the subspace (``Subspace.theta_of``)."""
    method = by_init(run.cfg.init)
    row = method.contenders(baselines, run.splits.task.higher_is_better)[0]
    weights = method.row_weights(row, len(run.cs))
    return run.subspace.theta_of(weights, run.cfg.coordinates)


def train_stage(run: FitRun, baselines: list[MethodResult]) -> FitOutcome:
    """Learn the coefficients on the fit rows, from the start point ``cfg.init`` names.

    With ``cfg.restarts`` > 1 the fit runs that many times with the seeds ``seed, seed + 1, ...``
    (data order and dropout) and the coefficients are averaged: the merge is linear in them, so
    this is the average of the fitted points, which smooths the noise of one data order.
    """
    cfg = run.cfg
    theta0 = start_point(run, baselines)
    buffers = uniform_buffers(run.cs, run.net.keys)
    outcomes = []
    for restart in range(cfg.restarts):
        # Every fit runs with the candidates' uniform-average buffers, not those of the last model scored.
        load_state(run.net.model, buffers)
        outcomes.append(train_coefficients(run.flat.binding, run.subspace, run.splits,
                                           replace(cfg, seed=cfg.seed + restart), run.comm,
                                           progress=run.progress, theta0=theta0, amp=run.net.amp))
    if len(outcomes) == 1:
        return outcomes[0]
    curves = torch.tensor([o.curve for o in outcomes], dtype=torch.float64)
    seconds = [o.seconds_per_step for o in outcomes if o.seconds_per_step is not None]
    return FitOutcome(beta=torch.stack([o.beta for o in outcomes]).mean(0), curve=curves.mean(0).tolist(),
                      seconds_per_step=sum(seconds) / len(seconds) if seconds else None)


def merge_stage(run: FitRun, trained: FitOutcome) -> Merged:
    subspace = run.subspace
    # The gradient buffer is free once training is over: it holds the trained point, not a new D floats.
    point = subspace.combine(trained.beta, out=run.flat.binding.local_g[:subspace.mean.numel()])
    return merge_alphas(run, subspace.alphas(trained.beta), point)


def merge_alphas(run: FitRun, alphas: torch.Tensor, trained: torch.Tensor) -> Merged:
    """``sum_k alphas[b, k] c_k`` for every tensor of block ``b``, from the original files."""
    layout = run.flat.layout
    # Tensors that are not merged parameters (floating buffers) take the size-weighted mean alphas.
    sizes = torch.zeros(layout.n_blocks, dtype=torch.float64)
    for i, b in enumerate(layout.block_of):
        sizes[b] += layout.numel(i)
    default_alphas = ((alphas * sizes.unsqueeze(1)).sum(0) / sizes.sum()).tolist()
    key_block = {name: layout.block_of[i] for i, name in enumerate(layout.names)}
    key_block.update({alias: key_block[target] for alias, target in run.net.keys.alias_of.items()})
    out_dtype = parse_dtype(run.out.dtype)
    # Float32 results go straight into the flat buffer the model's parameters view: the merge is
    # then loaded (and written from there) without a second D floats.
    tensors = linear_merge(run.cs, _weights_of(alphas, key_block, default_alphas), out_dtype=out_dtype,
                           progress=run.progress, into=run.flat.binding.param_view)
    return Merged(tensors, alphas, key_block, default_alphas, out_dtype, trained)


def _weights_of(alphas: torch.Tensor, key_block: dict[str, int], default: list[float]) -> Callable[[str], list]:
    rows = alphas.tolist()
    return lambda key: rows[key_block[key]] if key in key_block else default


def evaluate_stage(run: FitRun, merged: Merged) -> Evaluated:
    """Score exactly what is written (BatchNorm re-estimated for it, and written so)."""
    run.scorer.load(merged.tensors, recalibrate=True)
    recalibrated = _keep_recalibrated(merged, run.net)
    gap = run.subspace.quantization_gap(run.flat.binding.flat, merged.trained, run.comm)
    row = MethodResult("twa", "twa", **run.scorer.score_both(), detail={"init": run.cfg.init})
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


def select_stage(run: FitRun, results: FitResults) -> tuple[Merged, Evaluated]:
    """``--select best``: the merge to write is the best on the held-out rows (``report.best_on_heldout``).

    When that is not TWA, its weights (the same in every block) are merged from the original files and
    loaded as they were scored: BatchNorm re-estimated on the fit rows for a merge of several
    candidates, a candidate as it is. Returns what to write and its evaluation (its row as reported;
    TWA's quantization gap).
    """
    twa = results.twa
    chosen = best_on_heldout([*results.baselines, twa.row], run.splits.task.higher_is_better)
    if chosen is twa.row:
        return results.merged, twa
    method = METHODS[chosen.kind]
    weights = method.row_weights(chosen, len(run.cs))
    alphas = torch.tensor(weights, dtype=torch.float64).expand(run.flat.layout.n_blocks, len(weights)).clone()
    written = merge_alphas(run, alphas, results.merged.trained)
    run.scorer.load(written.tensors, recalibrate=not method.one_candidate)
    recalibrated = {} if method.one_candidate else _keep_recalibrated(written, run.net)
    log.info("--select best: writing %s, the best on the held-out rows", chosen.name)
    return written, Evaluated(chosen, recalibrated, twa.quantization_gap)


def describe_ranks(run: FitRun) -> list[dict] | None:
    """Each rank's columns, basis bytes and peak memory (a distributed fit's report); None in one process."""
    if run.comm.world_size == 1:
        return None
    return run.comm.gather_objects({"col_range": list(run.flat.col_range), "basis_bytes": run.subspace.basis_bytes(),
                                    **peak_memory()})


def write_stage(run: FitRun, results: FitResults) -> dict:
    """Write the merged checkpoint, the report and the plot as one transaction (rank 0 alone); every rank
    returns the report.

    Every file is written under a temporary name and all are renamed into place together at the end:
    a failure anywhere (a report that cannot be written, a full disk, an interrupt) leaves every
    destination as it was.
    """
    per_rank = describe_ranks(run)
    report = None
    with run.stage("write", timed=False):
        if run.comm.is_main:
            with AtomicWrite() as aw:
                report = _stage_outputs(run, results, aw, per_rank)
                try:
                    aw.commit()
                except OSError as exc:
                    raise OutputError(f"cannot write the outputs of the fit ({one_line(exc)}); "
                                      "nothing was changed") from None
    return run.comm.broadcast_object(report)


def _stage_outputs(run: FitRun, results: FitResults, aw: AtomicWrite, per_rank: list[dict] | None) -> dict:
    """Stage the checkpoint, the report and the plot in ``aw``; returns the report."""
    cfg, cs, out, splits, subspace = run.cfg, run.cs, run.out, run.splits, run.subspace
    merged, twa, written, trained = results.merged, results.twa, results.written, results.trained
    sources = cs.sources()
    metadata = build_metadata(written.row.kind, [{"path": s["path"], "sha256": s["sha256"]} for s in sources],
                              blocks=cfg.blocks, bits=cfg.bits, alphas=merged.alphas.tolist(),
                              heldout=written.row.heldout, metric_name=splits.task.metric_name,
                              higher_is_better=splits.task.higher_is_better)
    # timings["write"] is the checkpoint's write alone.
    with run.stage("write", agree=False):
        files = write_checkpoint(merged.tensors, out.path, metadata=metadata, force=out.force,
                                 max_shard_size=out.max_shard_size, hf_source_dir=cs.hf_dir, transaction=aw)
    layout, data, flat = run.flat.layout, splits.data, run.flat
    report = build_report(
        settings=cfg,
        data=DataSummary(str(run.val.path), data.n, int(splits.fit.numel()), int(splits.heldout.numel()),
                         list(data.inputs), data.label),
        model={"spec": run.net.spec, "args": run.model_cfg.args, "loss": run.model_cfg.loss,
               "task": splits.task.name},
        candidates=sources,
        metric_name=splits.task.metric_name,
        higher_is_better=splits.task.higher_is_better,
        methods=[*results.baselines, twa.row],
        basis=BasisSummary(layout.block_names(), subspace.ranks, subspace.dropped, subspace.spread.tolist(),
                           layout.n_params, layout.n_cols, subspace.rows, cfg.bits, cfg.group_size,
                           subspace.basis_bytes(), twa.quantization_gap),
        curve=trained.curve,
        seconds_per_step=trained.seconds_per_step,
        merge=MergeRecord(merged.key_block, merged.alphas.tolist(), merged.default_alphas,
                          dtype_name(merged.out_dtype) if merged.out_dtype else None,
                          encode_tensors(written.recalibrated), metadata),
        outputs=[str(p) for p in files],
        timings=run.timer.seconds,
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
        merged.update(recalibrated_buffers(report_path, merge.get("recalibrated_buffers", ""), merged))
        written = write_checkpoint(merged, out.path, metadata=merge["metadata"], force=out.force,
                                   max_shard_size=out.max_shard_size, hf_source_dir=cs.hf_dir)
    finally:
        cs.close()
    return {"outputs": [str(p) for p in written], "report": str(report_path), "candidates": len(expected)}
