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
the greedy soup chosen (one read of its ingredients: its trials are points of the subspace and read
nothing), and the written merge. The uniform average is the subspace's mean and reads nothing. The
inputs' SHA-256 are computed on worker threads from the moment the candidates are opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import __version__, distributed, sharding
from .config import EVAL_BATCH_TOKENS, DataConfig, FitConfig, ModelConfig, OutputConfig, ReadConfig
from .data import iter_batches, split_holdout
from .distributed import Comm, SingleProcess, split_columns
from .errors import BackendUnavailableError, FitError, OutputError, TwamergeError, one_line
from .evaluation import Scorer, Splits, evaluate, has_batchnorm, load_state, probe, recalibrate_batchnorm
from .fit import FitOutcome, FlatBinding, train_coefficients
from .io import AtomicWrite, CheckpointSet
from .io.adapters import AdapterSet, check_merge_output, open_inputs, source_dirs, tokenizer_dir, write_output
from .io.model_card import apply_command, fit_card
from .io.writer import check_side_outputs
from .kernels import dispatch
from .merge import build_metadata, linear_merge
from .methods import METHODS, MethodResult, best_candidate, by_init, fit_baselines
from .models import ModelKeys, build_model, enable_gradient_checkpointing, model_folder
from .options import dtype_name, parse_dtype
from .precision import resolve_precision
from .prepare import ModelContext, load_inputs
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
from .shard_write import check_sharded_output, send_rows, write_sharded
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
    sources: Mapping[str, str] | None = None,
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
        sources: where each setting came from (the CLI's: command line, a settings file, default), kept in
            the report as ``setting_sources``.

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
    run.sources = None if sources is None else dict(sources)
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
        if not run.sharded:
            with run.stage("probe"):
                probe_stage(run)
        with run.stage("bind", timed=False):
            run.flat = bind_stage(run)
        with run.stage("subspace"):
            run.subspace = subspace_stage(run)
        if run.sharded:
            # A sharded model has weights only once the subspace's mean is in its shards: it is probed then.
            with run.stage("probe"):
                load_point(run.flat, run.subspace, torch.zeros(run.flat.layout.n_blocks, run.subspace.rows), run.comm)
                probe_stage(run)
        run.scorer = make_scorer(run)
        # The baselines come first: the greedy soup and the best candidate can be the fit's start point.
        with run.stage("evaluate", agree=False):
            results.baselines = baselines_stage(run)
        with run.stage("fit"):
            results.trained = train_stage(run, results.baselines)
        with run.stage("merge"):
            results.merged = merge_stage(run, results.trained)
        with run.stage("evaluate", agree=False):
            results.twa = results.written = evaluate_stage(run, results.merged, heldout=not cfg.fit_floor)
        if cfg.fit_floor:
            floor_stage(run, results)
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
    sources: dict[str, str] | None = None  # where each setting came from, for the report (fit's ``sources``)
    sharded: bool = False  # the model sharded over the ranks (--shard-model, twamerge.sharding)

    @classmethod
    def start(cls, cfg: FitConfig, *, val: DataConfig, model: ModelConfig, out: OutputConfig, read: ReadConfig,
              progress: Progress | None) -> FitRun:
        """Pick the device, fail early on a backend that cannot run there, and join the ranks."""
        device = distributed.rank_device(select_device(cfg.device))
        check_backend(cfg.backend, device, cfg.bits)
        # Under torchrun (or inside an initialised process group of several ranks) the fit is distributed.
        comm = distributed.init(device)
        run = cls(cfg, val, model, out, read, device, comm, progress if comm.is_main else None)
        run.sharded = sharding.enabled(cfg.shard_model, comm.world_size)
        return run

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
            if self.flat is not None:
                self.flat.binding.close()
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
    floor: dict | None = None  # what floor_stage found and did (--fit-floor)
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
        for op in dispatch.OPS:
            dispatch.resolve(op, device, backend, bits=bits)
    except dispatch.BackendUnavailableError as exc:
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
    # LoRA adapter folders open as the adapted models (io.adapters), on their base (--model, or their config's).
    cs = open_inputs(checkpoints, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite,
                     model=run.model_cfg.spec)
    try:
        parse_dtype(out.dtype)
        if run.comm.is_main:
            check_merge_output(cs, out.path, merge_into_base=out.merge_into_base, force=out.force,
                               max_shard_size=out.max_shard_size)
            if run.sharded:
                check_sharded_output(cs, out.path)
            # The inputs' SHA-256 (the report's and the metadata's) on worker threads from now on, beside the
            # fit's work; the write waits for what is left of it. Only the rank that writes needs them.
            cs.start_hashing()
    except BaseException:
        cs.close()
        raise
    return cs


def model_stage(run: FitRun) -> Network:
    cfg, cs = run.cfg, run.cs
    # Without --model, the candidates' own Hugging Face folder (their config.json agreeing) builds the model.
    folder = _model_folder(cs) if run.model_cfg.spec is None else None
    spec = run.model_cfg.spec or str(folder)
    # A model to shard is built without its weights (on the meta device); each rank allocates its rows of them.
    with sharding.parameters_on_meta() if run.sharded else contextlib.nullcontext():
        model = build_model(run.model_cfg.spec, run.model_cfg.args, hf_dir=folder,
                            trust_remote_code=run.model_cfg.trust_remote_code)
    model = model if run.sharded else model.to(run.device)
    keys = ModelKeys(model, cs, spec)
    bn = has_batchnorm(model)
    recalibrate = cfg.bn_recalibrate == "on" or (cfg.bn_recalibrate == "auto" and bn)
    if cfg.bn_recalibrate == "on" and not bn:
        log.warning("--bn-recalibrate on: the model has no BatchNorm layer; nothing to recalibrate")
    amp = resolve_precision(cfg.precision, run.device, cs.dtype(keys.merged[0]) if keys.merged else None)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, spec)
    return Network(model, keys, spec, recalibrate, amp)


def _config_source(cs: CheckpointSet, spec: str | None) -> Path | None:
    """Where a folder output's config and processor files come from: the candidates' Hugging Face folder (the
    adapters' base), else --model's when it is one (checkpoint files of a Trainer folder given with --model)."""
    if cs.hf_dir is not None:
        return cs.hf_dir
    return Path(spec) if spec is not None and (Path(spec) / "config.json").is_file() else None


def _model_folder(cs: CheckpointSet) -> Path | None:
    """The folder that builds the model without --model: the candidates' own, or the adapters' base."""
    return cs.base_dir if isinstance(cs, AdapterSet) else model_folder(cs.paths)


def data_stage(run: FitRun) -> Splits:
    """The validation data as the model takes it (text tokenized with the candidates' tokenizer), the
    task (its loss and metric), and the seeded split."""
    data, task = load_inputs(run.val, run.model_cfg,
                             ModelContext(run.net.model, source_dirs(run.cs, run.model_cfg.spec)))
    log.info("task %s: loss %s, metric %s (%s is better)", task.name, type(task).__name__, task.metric_name,
             "higher" if task.higher_is_better else "lower")
    fit_idx, held_idx = split_holdout(data, run.cfg.holdout, run.cfg.seed)
    # Gradient checkpointing by default for a language model: it lowers the fit's peak memory there
    # (docs/performance.md, "Language models"); elsewhere only when asked (model_stage).
    if run.cfg.gradient_checkpointing is None and task.labels_from_inputs:
        if enable_gradient_checkpointing(run.net.model, run.net.spec, required=False):
            log.info("gradient checkpointing on (a language model; --no-gradient-checkpointing turns it off)")
    return Splits(data, fit_idx, held_idx, task)


def probe_stage(run: FitRun) -> None:
    """One batch through the model before anything expensive (``evaluation.probe``)."""
    splits = run.splits
    probe(run.net.model, splits.data, splits.fit, splits.task, run.cfg.batch_size, run.device, run.net.amp,
          run.cfg.batch_tokens)


def bind_stage(run: FitRun) -> FlatSpace:
    names, cs, comm = run.net.keys.merged, run.cs, run.comm
    layout = make_layout(names, [tuple(cs.shape(n)) for n in names], run.cfg.blocks, run.cfg.group_size,
                         pad_tensors=run.sharded)
    if run.sharded:
        splits = run.splits
        batch = next(iter_batches(splits.data, splits.fit[:run.cfg.batch_size], run.cfg.batch_size))
        binding = sharding.ShardedBinding(run.net.model, layout, run.device, comm,
                                          dtype=flat_dtype(cs, names, run.net.amp), amp=run.net.amp,
                                          aliases=run.net.keys.alias_of, inputs=batch.inputs)
        return FlatSpace(layout, binding.columns.n_local, None, binding)
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
    value makes it non-finite), unless ``--allow-nonfinite`` asked not to. The C loops on CPU read each
    tensor's K copies where the reader mapped them; other backends stack them in the gradient buffer, idle
    until training (which clears it every step): no K copies of the largest tensor above the fit's own memory.
    """
    cfg, cs = run.cfg, run.cs
    return build_subspace(cs, run.flat.layout, bits=cfg.bits, comm=run.comm, rank_rtol=cfg.rank_rtol,
                          device=run.device, backend=cfg.backend, progress=run.progress,
                          check_finite=not cs.allow_nonfinite,
                          columns=run.flat.binding.columns if run.sharded else None,
                          scratch=None if run.sharded else run.flat.binding.grad)


def make_scorer(run: FitRun) -> Scorer:
    """Loads states into the bound model and scores both splits (BatchNorm re-estimated when the fit does)."""
    cfg, net = run.cfg, run.net
    return Scorer(net.model, run.splits, cfg.batch_size, run.device, net.recalibrate, run.comm, net.amp,
                  cfg.eval_batch_size, cfg.batch_tokens, cfg.eval_batch_tokens)


def uniform_buffers(cs: CheckpointSet, keys: ModelKeys) -> dict[str, torch.Tensor]:
    """The candidates' uniform average of every buffer (integer ones: the first candidate's)."""
    out = {}
    for key in keys.buffers:
        x = cs.stack(key)
        out[key] = x.double().mean(0).to(x.dtype) if x.is_floating_point() else x[0]
    return out


def load_point(flat: FlatSpace, subspace: Subspace, beta: torch.Tensor, comm: Comm) -> None:
    """Make the model's merged parameters the subspace point ``mean + P~^T beta`` (every rank gets all of it, or
    of a sharded model its rows)."""
    flat.binding.load_point(subspace, beta, comm)


class FitScoring:
    """The fit's side of :class:`methods.Scoring`: what a baseline's ``score`` loads and scores.

    Scoring a candidate reads that candidate alone (its row is made once, however many baselines
    ask); the uniform average is the subspace's mean (``beta = 0``) with the candidates' mean
    buffers and reads no weights; a merge reads the candidates it weighs; a point of the subspace
    (a greedy-soup trial) is one combine of the basis and reads nothing.
    """

    def __init__(self, run: FitRun):
        self.run = run
        self.k = len(run.cs)
        self.higher_is_better = run.splits.task.higher_is_better
        self._keys = run.net.keys.model_keys()
        self._candidates: dict[int, MethodResult] = {}
        self._buffer_stacks: dict[str, torch.Tensor] | None = None

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
        scorer.load(lambda: binding.merge(cs, weights), recalibrate=True)
        scores = {"fit": scorer.score("fit")}
        if heldout:
            scores["heldout"] = scorer.score("heldout")
        return scores

    def point(self, weights: list[float], heldout: bool = True, fit: bool = True) -> dict:
        run = self.run
        with run.stage("subspace point", timed=False):
            load_point(run.flat, run.subspace, run.subspace.beta_of(weights).float(), run.comm)
        run.scorer.load(self._buffers(weights), recalibrate=True)
        return {split: run.scorer.score(split) for split, wanted in (("fit", fit), ("heldout", heldout)) if wanted}

    def _buffers(self, weights: list[float]) -> dict[str, torch.Tensor]:
        """The model's buffers for a merge of ``weights`` (integer ones: the first candidate's, as ``linear_merge``
        keeps them), from the candidates' buffers read once (small: BatchNorm statistics, counters)."""
        if self._buffer_stacks is None:
            self._buffer_stacks = {key: self.run.cs.stack(key) for key in self.run.net.keys.buffers}
        w = torch.tensor(weights, dtype=torch.float64)
        return {key: torch.tensordot(w, x.double(), dims=1).to(x.dtype) if x.is_floating_point() else x[0]
                for key, x in self._buffer_stacks.items()}

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
    return theta_of_row(run, method.contenders(baselines, run.splits.task.higher_is_better)[0])


def theta_of_row(run: FitRun, row: MethodResult) -> torch.Tensor:
    """The coordinates [B, R] of a fit baseline's merge (its weights in every block) in the subspace."""
    weights = METHODS[row.kind].row_weights(row, len(run.cs))
    return run.subspace.theta_of(weights, run.cfg.coordinates)


def train_stage(run: FitRun, baselines: list[MethodResult], start: MethodResult | None = None) -> FitOutcome:
    """Learn the coefficients on the fit rows, from the start point ``cfg.init`` names (or from the baseline
    row ``start``: :func:`floor_stage`'s continuation).

    With ``cfg.restarts`` > 1 the fit runs that many times with the seeds ``seed, seed + 1, ...``
    (data order and dropout) and the coefficients are averaged: the merge is linear in them, so
    this is the average of the fitted points, which smooths the noise of one data order.
    """
    cfg = run.cfg
    theta0 = start_point(run, baselines) if start is None else theta_of_row(run, start)
    buffers = uniform_buffers(run.cs, run.net.keys)
    outcomes = []
    for restart in range(cfg.restarts):
        # Every fit runs with the candidates' uniform-average buffers, not those of the last model scored.
        load_state(run.net.model, buffers)
        outcomes.append(train_coefficients(run.flat.binding, run.subspace, run.splits,
                                           replace(cfg, seed=cfg.seed + restart), run.comm,
                                           progress=run.progress, theta0=theta0, amp=run.net.amp))
    for outcome in outcomes:
        outcome.runs[-1]["start"] = cfg.init if start is None else start.name
    if len(outcomes) == 1:
        return outcomes[0]
    # An early stop can end the restarts at different steps: each step's loss is the mean over those that reached it.
    curve = []
    for i in range(max(len(o.curve) for o in outcomes)):
        reached = [o.curve[i] for o in outcomes if len(o.curve) > i]
        curve.append(sum(reached) / len(reached))
    seconds = [o.seconds_per_step for o in outcomes if o.seconds_per_step is not None]
    return FitOutcome(beta=torch.stack([o.beta for o in outcomes]).mean(0), curve=curve,
                      seconds_per_step=sum(seconds) / len(seconds) if seconds else None,
                      runs=[r for o in outcomes for r in o.runs])


def merge_stage(run: FitRun, trained: FitOutcome) -> Merged:
    subspace = run.subspace
    # The gradient buffer is free once training is over: it holds the trained point, not a new D floats.
    point = run.flat.binding.trained_point(subspace, trained.beta)
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
    tensors = run.flat.binding.merge(run.cs, _weights_of(alphas, key_block, default_alphas), out_dtype=out_dtype,
                                     progress=run.progress)
    return Merged(tensors, alphas, key_block, default_alphas, out_dtype, trained)


def _weights_of(alphas: torch.Tensor, key_block: dict[str, int], default: list[float]) -> Callable[[str], list]:
    rows = alphas.tolist()
    return lambda key: rows[key_block[key]] if key in key_block else default


def evaluate_stage(run: FitRun, merged: Merged, heldout: bool = True) -> Evaluated:
    """Score exactly what is written (BatchNorm re-estimated for it, and written so): the fit rows, and the
    held-out rows unless ``heldout`` is False (:func:`floor_stage` scores them once it has decided which merge
    TWA's is, so that no held-out score is made for a merge that is not reported)."""
    run.scorer.load(merged.tensors, recalibrate=True)
    recalibrated = _keep_recalibrated(merged, run.net)
    gap = run.flat.binding.quantization_gap(run.subspace, merged.trained, run.comm)
    scores = run.scorer.score_both() if heldout else {"fit": run.scorer.score("fit"), "heldout": None}
    row = MethodResult("twa", "twa", **scores, detail={"init": run.cfg.init})
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


def floor_stage(run: FitRun, results: FitResults) -> None:
    """Never below the baselines on the fit rows (``--fit-floor``, docs/defaults.md, "The fit floor").

    Every scored baseline (each candidate, the uniform average, the greedy soup; the start point is one of
    them) lies in TWA's search space, so a fit that ends with a higher fit-split loss than the best of them
    has stopped short. It then continues once from that baseline (a second fit of the same budget); if it
    still ends above it, TWA's merge is that baseline. Only fit-split losses decide; the held-out rows of
    the merge kept are scored here, after the decision. Sets ``results.floor``: the losses compared and
    ``action`` (``kept``: the fit was at or below every baseline; ``continued``: the continuation was;
    ``returned``: the baseline is written as TWA), and updates ``results`` when the merge changes. A fit of
    0 steps (``--epochs 0``) writes its start point as asked and is left alone.
    """
    rows = [r for r in results.baselines if r.fit is not None]
    twa = results.twa
    if rows and results.trained.curve:
        best = min(rows, key=lambda r: r.fit["loss"])
        results.floor = {"best_baseline": best.name, "best_fit_loss": best.fit["loss"],
                         "twa_fit_loss": twa.row.fit["loss"], "action": "kept"}
        if twa.row.fit["loss"] > best.fit["loss"]:
            twa = _continue_from(run, results, best)
    if twa.row.heldout is None and (results.floor or {}).get("action") != "returned":
        # The model holds TWA's merge as it was scored on the fit rows (nothing was loaded since).
        with run.stage("evaluate", agree=False):
            twa.row.heldout = run.scorer.score("heldout")
    results.twa = results.written = twa


def _continue_from(run: FitRun, results: FitResults, best: MethodResult) -> Evaluated:
    """:func:`floor_stage`'s second fit, from the baseline ``best``; returns TWA as it ends (``best`` itself
    when the second fit still ends above it). Updates ``results.trained``, ``results.merged``, ``results.floor``."""
    floor = results.floor
    log.info("the fit ends at a fit-split loss of %.6g, above %s's %.6g: it continues from %s",
             floor["twa_fit_loss"], best.name, best.fit["loss"], best.name)
    with run.stage("fit"):
        more = train_stage(run, results.baselines, start=best)
    results.trained = _joined(results.trained, more)
    with run.stage("merge"):
        merged = merge_stage(run, more)
    with run.stage("evaluate", agree=False):
        twa = evaluate_stage(run, merged, heldout=False)
    floor["continued_fit_loss"] = twa.row.fit["loss"]
    if twa.row.fit["loss"] <= best.fit["loss"]:
        floor["action"] = "continued"
        results.merged = merged
        return twa
    floor["action"] = "returned"
    log.info("the continued fit ends at %.6g, still above: TWA's merge is %s", twa.row.fit["loss"], best.name)
    with run.stage("merge"):
        results.merged, recalibrated = merge_row(run, best, merged.trained)
    row = MethodResult("twa", "twa", fit=best.fit, heldout=best.heldout, detail=twa.row.detail)
    return Evaluated(row, recalibrated, twa.quantization_gap)


def _joined(first: FitOutcome, then: FitOutcome) -> FitOutcome:
    """The coefficients of ``then``, with the curve and runs of both fits in order."""
    steps = [(o.seconds_per_step, len(o.curve)) for o in (first, then) if o.seconds_per_step is not None]
    seconds = sum(s * n for s, n in steps) / sum(n for _, n in steps) if steps else None
    return FitOutcome(beta=then.beta, curve=first.curve + then.curve, seconds_per_step=seconds,
                      runs=first.runs + then.runs)


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
    written, recalibrated = merge_row(run, chosen, results.merged.trained)
    log.info("--select best: writing %s, the best on the held-out rows", chosen.name)
    return written, Evaluated(chosen, recalibrated, twa.quantization_gap)


def merge_row(run: FitRun, row: MethodResult, trained: torch.Tensor) -> tuple[Merged, dict[str, torch.Tensor]]:
    """A fit baseline's merge (its weights, the same in every block) from the original files, loaded as it was
    scored: BatchNorm re-estimated on the fit rows for a merge of several candidates, a candidate as it is.
    Returns it and the BatchNorm statistics re-estimated for it."""
    method = METHODS[row.kind]
    weights = method.row_weights(row, len(run.cs))
    alphas = torch.tensor(weights, dtype=torch.float64).expand(run.flat.layout.n_blocks, len(weights)).clone()
    merged = merge_alphas(run, alphas, trained)
    run.scorer.load(merged.tensors, recalibrate=not method.one_candidate)
    return merged, ({} if method.one_candidate else _keep_recalibrated(merged, run.net))


def describe_ranks(run: FitRun) -> list[dict] | None:
    """Each rank's columns, basis bytes and peak memory (a distributed fit's report); None in one process."""
    if run.comm.world_size == 1:
        return None
    share = run.flat.binding.describe() if run.sharded else {"col_range": list(run.flat.col_range)}
    return run.comm.gather_objects({**share, "basis_bytes": run.subspace.basis_bytes(), **peak_memory()})


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
        if not run.comm.is_main and run.sharded:
            # Rank 0 writes the checkpoint tensor by tensor, gathering each sharded one from every rank.
            send_rows(run.flat.binding, results.merged.tensors, run.out.max_shard_size)
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
    # Adapters: the base's SHA-256 (hashed beside the fit since open_stage) goes to the report, and to the
    # output's metadata when the output is the base with the merge added.
    base = cs.base_source() if isinstance(cs, AdapterSet) else None
    metadata = build_metadata(written.row.kind, [{"path": s["path"], "sha256": s["sha256"]} for s in sources],
                              blocks=cfg.blocks, bits=cfg.bits, alphas=merged.alphas.tolist(),
                              heldout=written.row.heldout, metric_name=splits.task.metric_name,
                              higher_is_better=splits.task.higher_is_better,
                              **({"base": base} if base is not None and out.merge_into_base else {}))
    tokenizer = tokenizer_dir(cs, run.model_cfg.spec, run.val.tokenizer)
    facts = {"version": __version__, "settings": {"blocks": cfg.blocks, "bits": cfg.bits}, "candidates": sources,
             "methods": [r.to_dict() for r in [*results.baselines, twa.row]], "metric_name": splits.task.metric_name,
             "higher_is_better": splits.task.higher_is_better, "heldout_rows": int(splits.heldout.numel()),
             "written": {"name": written.row.name}, "merge": {"block_alphas": merged.alphas.tolist(),
                                                              "key_block": merged.key_block}}
    card = model_card(cs, facts, out, None if out.report is None else str(out.report))
    # timings["write"] is the checkpoint's write alone.
    with run.stage("write", agree=False):
        if run.sharded:
            files = write_sharded(run.flat.binding, merged.tensors, out.path, metadata=metadata, force=out.force,
                                  max_shard_size=out.max_shard_size, source_dir=_config_source(cs, run.model_cfg.spec),
                                  tokenizer=tokenizer, model_card=card, transaction=aw)
        else:
            files = write_output(cs, out.path, tensors=merged.tensors,
                                 weights_of=_weights_of(merged.alphas, merged.key_block, merged.default_alphas),
                                 metadata=metadata, out_dtype=merged.out_dtype, merge_into_base=out.merge_into_base,
                                 force=out.force, max_shard_size=out.max_shard_size, tokenizer=tokenizer,
                                 model_card=card, source_dir=_config_source(cs, run.model_cfg.spec), transaction=aw)
    layout, data, flat = run.flat.layout, splits.data, run.flat
    report = build_report(
        settings=cfg,
        data=DataSummary(str(run.val.path), data.n, int(splits.fit.numel()), int(splits.heldout.numel()),
                         list(data.inputs), data.label),
        model={"spec": run.net.spec, "args": run.model_cfg.args, "loss": run.model_cfg.loss,
               "task": splits.task.name, "tokenizer": None if tokenizer is None else str(tokenizer)},
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
                "flat_buffer_bytes": flat.binding.buffer_bytes()},
        distributed=None if per_rank is None else {"world_size": len(per_rank),
                                                   "backend": torch.distributed.get_backend(), "ranks": per_rank},
        written=written.row,
    )
    report["fit"].update(runs=trained.runs, floor=results.floor)
    if isinstance(cs, AdapterSet):
        report["adapters"] = {**cs.describe(), "base_sha256": base["sha256"]}
    report["warnings"] = loss_warnings(report)
    if run.sources is not None:
        report["setting_sources"] = run.sources
    for line in report["warnings"]:
        log.warning("%s", line)
    if out.report is not None:
        from .report import write_report

        write_report(report, out.report, out.force, transaction=aw)
    if out.plot is not None:
        from .plot import plot_report

        plot_report(report, out.plot, out.force, transaction=aw)
    return report


def model_card(cs: CheckpointSet, facts: dict, out: OutputConfig, report_path: str | None) -> str:
    """The README.md of a fit's folder output (``io.model_card``), from the report (``apply``) or the part of it
    known before the write (``fit``): both write the same card for the same report path and output."""
    adapters = cs.describe() if isinstance(cs, AdapterSet) else None
    blocks = None
    if adapters is not None and out.merge_into_base:
        adapters["base_sha256"] = cs.base_source()["sha256"]  # the card names the base the folder is made of
    if adapters is not None:
        key_block = facts["merge"]["key_block"]
        blocks = sorted({key_block[k] for k in [*cs.adapted, *cs.whole] if k in key_block})
    as_adapter = adapters is not None and not out.merge_into_base
    reproduce = None if report_path is None else apply_command(
        report_path, [c["path"] for c in facts["candidates"]], str(out.path), merge_into_base=out.merge_into_base)
    return fit_card(facts, library_name="peft" if as_adapter else "transformers" if cs.hf_dir is not None else None,
                    base_model=cs.base_name if adapters is not None else None, adapter=adapters,
                    merge_into_base=out.merge_into_base, alpha_blocks=blocks, reproduce=reproduce)


def loss_warnings(report: dict) -> list[str]:
    """The report's warnings: one line when the written merge is worse than the best candidate on the held-out
    rows (on the fit rows under ``--holdout 0``), naming both figures and the two guards against it."""
    written = report["written"]
    if written["at_least_best"] is not False:
        return []
    split = "heldout" if report["heldout_rows"] else "fit"
    rows = [MethodResult(r["name"], r["kind"], r.get("fit"), r.get("heldout")) for r in report["methods"]]
    best = best_candidate(rows, split, report["higher_is_better"])
    mine = next(r for r in rows if (r.name, r.kind) == (written["name"], written["kind"]))
    where = f"the {report['heldout_rows']} held-out rows" if split == "heldout" else "the fit rows (--holdout 0)"
    return [f"the written merge ({mine.name}) scores {report['metric_name']} {getattr(mine, split)['metric']:.4f} on "
            f"{where}, worse than the best candidate {best.name} ({getattr(best, split)['metric']:.4f}); --select best "
            "writes the best of TWA and the baselines on the held-out rows, --fail-if-worse makes this an error"]


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
    batch_tokens: int = EVAL_BATCH_TOKENS,
) -> dict:
    """Loss and metric of each checkpoint on all rows of ``val``, in batches of at most ``batch_size`` rows and
    (token ids) ``batch_tokens`` tokens.

    Returns:
        ``{"metric_name", "higher_is_better", "task", "rows", "checkpoints": [{"path", "loss", "metric", "n"}]}``
        (``n``: the task's items, e.g. tokens for a language model).
    """
    dev = select_device(device)
    # Each adapter is scored on its own: merged adapters (rank K r) beside their candidates are fine.
    cs = open_inputs(checkpoints, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite,
                     min_count=1, model=model.spec, same_rank=False)
    try:
        folder = _model_folder(cs) if model.spec is None else None
        net = build_model(model.spec, model.args, hf_dir=folder, trust_remote_code=model.trust_remote_code).to(dev)
        keys = ModelKeys(net, cs, model.spec or str(folder)).model_keys()
        data, task = load_inputs(val, model, ModelContext(net, source_dirs(cs, model.spec)))
        everything = torch.arange(data.n)
        probe(net, data, everything, task, batch_size, dev, tokens=batch_tokens)
        results = []
        for i in range(len(cs)):
            load_state(net, ((k, cs.get(i, k)) for k in keys))
            if bn_recalibrate:
                recalibrate_batchnorm(net, data, everything, batch_size, dev, tokens=batch_tokens)
            score = evaluate(net, data, everything, task, batch_size, dev, SingleProcess(dev), tokens=batch_tokens)
            results.append({"path": str(cs.paths[i]), **score})
    finally:
        cs.close()
    return {"metric_name": task.metric_name, "higher_is_better": task.higher_is_better, "task": task.name,
            "rows": data.n, "checkpoints": results}


def apply_report(report_path: str | Path, checkpoints: Sequence[str | Path],
                 output: OutputConfig | str | Path, *, model: str | None = None) -> dict:
    """Re-emit a fit's merge from its saved coefficients: no data and no model needed.

    The candidates must be the fit's (checked by SHA-256, in order); the output is bit-for-bit the
    fit's output (the same tensors, the same metadata, the same model card for the same report path
    and output). LoRA adapters merged into their base (``output.merge_into_base``) need the base:
    ``model``, else the fit's ``--model`` folder, else the adapters' base_model_name_or_path.
    """
    out = OutputConfig.of(output)
    report = read_report(Path(report_path))
    merge = report["merge"]
    fit_model = (report.get("model") or {}).get("spec")
    if model is None and isinstance(fit_model, str) and Path(fit_model).is_dir():
        model = fit_model
    cs = open_inputs(checkpoints, allow_nonfinite=True, model=model, need_base=out.merge_into_base)
    try:
        check_merge_output(cs, out.path, merge_into_base=out.merge_into_base, force=out.force,
                           max_shard_size=out.max_shard_size)
        expected = [c["sha256"] for c in report["candidates"]]
        if len(expected) != len(cs):
            raise TwamergeError(f"{report_path}: the fit used {len(expected)} candidates; {len(cs)} were given")
        cs.start_hashing()  # on worker threads, beside the merge; the check below waits for the digests
        alphas = torch.tensor(merge["block_alphas"], dtype=torch.float64)
        weights_of = _weights_of(alphas, merge["key_block"], merge["default_alphas"])
        out_dtype = parse_dtype(merge.get("out_dtype"))
        # The check comes after the merge, which runs while the files are hashed. Merged adapters are
        # written as factors: the dense merge is needed only for a merge into the base.
        as_adapter = isinstance(cs, AdapterSet) and not out.merge_into_base
        merged = None if as_adapter else linear_merge(cs, weights_of, out_dtype=out_dtype)
        got = [s["sha256"] for s in cs.sources()]
        for i, (e, g) in enumerate(zip(expected, got)):
            if e != g:
                raise TwamergeError(f"{cs.paths[i]}: SHA-256 {g[:12]}... differs from the fit's candidate {i + 1} "
                                    f"({report['candidates'][i]['path']}, {e[:12]}...); pass the same files in the "
                                    "same order")
        metadata = merge["metadata"]
        base = cs.base_source() if isinstance(cs, AdapterSet) and out.merge_into_base else None
        if base is not None:
            metadata = _check_base(report, report_path, base, metadata)
        if merged is not None:
            merged.update(recalibrated_buffers(report_path, merge.get("recalibrated_buffers", ""), merged))
        tokenizer = (report.get("model") or {}).get("tokenizer")
        tokenizer = Path(tokenizer) if isinstance(tokenizer, str) and Path(tokenizer).is_dir() else None
        written = write_output(cs, out.path, tensors=merged, weights_of=weights_of, metadata=metadata,
                               out_dtype=out_dtype, merge_into_base=out.merge_into_base, force=out.force,
                               max_shard_size=out.max_shard_size, tokenizer=tokenizer,
                               model_card=model_card(cs, report, out, str(report_path)),
                               source_dir=_config_source(cs, model))
    finally:
        cs.close()
    return {"outputs": [str(p) for p in written], "report": str(report_path), "candidates": len(expected),
            **({"base": base} if base is not None else {})}


def _check_base(report: dict, report_path: str | Path, base: dict[str, str], metadata: dict[str, str]
                ) -> dict[str, str]:
    """The metadata of a merge into the base that ``apply`` writes: the fit's, with the base's path and SHA-256
    (``twamerge.base``) unless the fit's output already records them. The base must be the one the fit used
    (its SHA-256 in the report) when the report has it: another base gives other weights."""
    adapters = report.get("adapters")
    recorded = adapters.get("base_sha256") if isinstance(adapters, dict) else None
    if "twamerge.base" in metadata:
        try:
            recorded = json.loads(metadata["twamerge.base"])["sha256"]
        except (TypeError, ValueError, KeyError):
            raise TwamergeError(f"{report_path}: merge.metadata's twamerge.base is not the JSON of the base's path "
                                "and sha256") from None
    if recorded is not None and not (isinstance(recorded, str) and len(recorded) == 64
                                     and set(recorded) <= set("0123456789abcdef")):
        raise TwamergeError(f"{report_path}: the base's SHA-256 in the report is not 64 hex digits: {recorded!r:.80}")
    if recorded is not None and recorded != base["sha256"]:
        raise TwamergeError(f"{base['path']}: the base model's SHA-256 {base['sha256'][:12]}... differs from the "
                            f"fit's base ({recorded[:12]}..., {report_path}); pass the base the fit used (--model)")
    if "twamerge.base" in metadata:
        return metadata  # the fit's own bytes: the same output, byte for byte
    return {**metadata, "twamerge.base": json.dumps(base)}
