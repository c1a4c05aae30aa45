"""The library entry points behind ``twamerge fit``, ``eval`` and ``apply``.

Each takes plain arguments and config dataclasses, returns a JSON-able report, and raises only
``TwamergeError`` subclasses for bad input. Nothing is written until every figure is computed,
and then atomically.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import __version__, distributed, kernels
from .config import DataConfig, FitConfig, ModelConfig
from .data import load_data, split_holdout
from .distributed import Comm, split_columns
from .errors import BackendUnavailableError, FitError, ModelError, OutputError, TwamergeError
from .fit import FlatBinding, evaluate, has_batchnorm, recalibrate_batchnorm, train_coefficients
from .io import CheckpointSet, check_output, open_checkpoints, write_checkpoint
from .merge import build_metadata, linear_merge, uniform_weights
from .models import Objective, build_model, resolve_objective
from .options import dtype_name, parse_dtype
from .report import REPORT_VERSION, MethodResult, Timer, best_candidate, is_better, peak_memory, read_report
from .subspace import build_subspace, make_layout

log = logging.getLogger(__name__)

Progress = Callable[[Iterable], Iterable]



def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TwamergeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


class ModelKeys:
    """How checkpoint keys map onto a model: merged parameters (with aliases of tied ones) and buffers."""

    def __init__(self, model: nn.Module, cs: CheckpointSet, spec: str | None):
        ckpt = set(cs.keys)
        state = model.state_dict(keep_vars=True)
        names_of: dict[int, list[str]] = defaultdict(list)
        params: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names_of[id(p)].append(name)
            params[id(p)] = p
        self.param_of_key: dict[str, nn.Parameter] = {}
        self.alias_of: dict[str, str] = {}
        missing: list[str] = []
        for pid, names in names_of.items():
            present = [n for n in names if n in ckpt]
            if not present:
                missing.append(names[0])
                continue
            self.param_of_key[present[0]] = params[pid]
            for alias in present[1:]:
                self.alias_of[alias] = present[0]
        param_names = {n for names in names_of.values() for n in names}
        self.buffers = [k for k in state if k not in param_names]
        missing += [k for k in self.buffers if k not in ckpt]
        unexpected = sorted(ckpt - set(state))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}" + (f" ({len(missing)} in all)" if len(missing) > 5 else ""))
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}"
                             + (f" ({len(unexpected)} in all)" if len(unexpected) > 5 else ""))
            raise ModelError(f"the checkpoints do not fit --model {spec or cs.hf_dir}: {'; '.join(parts)}")
        for key in [*self.param_of_key, *self.alias_of, *self.buffers]:
            want = tuple(state[key].shape)
            if tuple(cs.shape(key)) != want:
                raise ModelError(f"key {key}: checkpoint shape {tuple(cs.shape(key))} but the model expects {want}")
            if key in self.param_of_key and not cs.dtype(key).is_floating_point:
                raise ModelError(f"key {key}: parameter stored as {cs.dtype(key)}, expected a floating dtype")
        self.merged = list(self.param_of_key)  # model order

    def model_keys(self) -> list[str]:
        return [*self.param_of_key, *self.alias_of, *self.buffers]


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.load_state_dict(state, strict=False)


def _candidate_state(cs: CheckpointSet, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: cs.get(i, k) for k in keys}


def _check_side_output(path: Path, force: bool, what: str) -> None:
    """The report and the plot are not checkpoints (``check_output``): fail before any work when they cannot go there."""
    if path.exists() and not force:
        raise OutputError(f"{path}: {what} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist")


def _check_backend(backend: str, device: torch.device) -> None:
    """Fail before any work when a forced backend cannot run here (``--backend triton`` on a CPU)."""
    try:
        for op in kernels.OPS:
            kernels.resolve(op, device, backend)
    except kernels.BackendUnavailableError as exc:
        raise BackendUnavailableError(str(exc)) from None


def _phase(comm: Comm | None, name: str):
    """A stretch of work with no collectives inside; under ``comm`` every rank agrees on success at its end."""
    return comm.phase(name) if comm is not None else contextlib.nullcontext()


class _Evaluator:
    """Loads a state into the bound model, recalibrates BatchNorm when asked, and scores both splits.

    Under ``comm`` every rank loads the whole state (the forward needs every weight) and recalibrates
    BatchNorm on the whole fit split, identically; scoring is split across ranks and reduced.
    """

    def __init__(self, model, data, fit_idx, held_idx, objective, batch_size, device, recalibrate: bool,
                 comm: Comm | None = None):
        self.model, self.data, self.objective = model, data, objective
        self.fit_idx, self.held_idx = fit_idx, held_idx
        self.batch_size, self.device, self.recalibrate = batch_size, device, recalibrate
        self.comm = comm

    def load(self, state: dict[str, torch.Tensor], recalibrate: bool) -> None:
        self.load_from(lambda: state, recalibrate)

    def load_from(self, make_state: Callable[[], dict[str, torch.Tensor]], recalibrate: bool) -> None:
        with _phase(self.comm, "load"):
            _load_state(self.model, make_state())
            if recalibrate and self.recalibrate:
                recalibrate_batchnorm(self.model, self.data, self.fit_idx, self.batch_size, self.device)

    def score(self, split: str) -> dict | None:
        idx = self.fit_idx if split == "fit" else self.held_idx
        if idx.numel() == 0:
            return None
        return evaluate(self.model, self.data, idx, self.objective, self.batch_size, self.device, self.comm)


def _merged_weights(alphas: torch.Tensor, key_block: dict[str, int], default: list[float]) -> Callable[[str], list]:
    rows = alphas.tolist()
    return lambda key: rows[key_block[key]] if key in key_block else default


def _encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(st_save({k: v.contiguous() for k, v in tensors.items()})).decode() if tensors else ""


def _decode_tensors(blob: str) -> dict[str, torch.Tensor]:
    return st_load(base64.b64decode(blob)) if blob else {}


def fit(
    checkpoints: Sequence[str | Path],
    *,
    val: DataConfig,
    model: ModelConfig,
    output: str | Path,
    cfg: FitConfig = FitConfig(),
    report_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    ema_key: str | None = None,
    keys: str = "strict",
    allow_nonfinite: bool = False,
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Learn averaging coefficients on validation data (TWA) and write the merged checkpoint.

    Args:
        checkpoints: candidate files or directories (globs expanded by the caller or by ``open_checkpoints``).
        val: the validation data; ``cfg.holdout`` of it is kept aside for the report.
        model: how to build the model and which loss to use.
        output: merged checkpoint path (``.safetensors`` default, ``.pt``, or a directory for HF inputs).
        cfg: fit hyper-parameters.
        report_path: where to write the JSON report (optional).
        plot_path: where to draw the alphas and the fit curve (optional, needs matplotlib).

    Returns:
        The report (a JSON-able dict): metrics of every candidate, the uniform average, the greedy
        soup and TWA on the held-out split, alphas per block, settings, timings and peak memory.

    Example:
        >>> from twamerge import fit, DataConfig, ModelConfig, FitConfig  # doctest: +SKIP
        >>> report = fit(["e1.safetensors", "e2.safetensors", "e3.safetensors"],
        ...              val=DataConfig("val/"), model=ModelConfig("model.py:build"),
        ...              output="merged.safetensors", cfg=FitConfig(blocks="layer", bits=4))
        >>> report["methods"][-1]["heldout"]["metric"]
    """
    output = Path(output)
    device = distributed.rank_device(select_device(cfg.device))
    _check_backend(cfg.backend, device)
    # Under torchrun (or inside an initialised process group of several ranks) the fit is distributed.
    comm = distributed.init(device)
    try:
        with _phase(comm, "check outputs"):
            if comm is None or comm.is_main:
                for side, what in ((report_path, "report"), (plot_path, "plot")):
                    if side is not None:
                        _check_side_output(Path(side), force, what)
                if plot_path is not None:
                    from .plot import plot_format

                    plot_format(Path(plot_path))
        out_dtype = parse_dtype(dtype)
        timer = Timer()
        with _phase(comm, "open"), timer.phase("open"):
            cs = open_checkpoints(checkpoints, ema_key=ema_key, keys=keys, allow_nonfinite=allow_nonfinite)
            if comm is None or comm.is_main:
                # Now that we know whether the inputs are HF folders: the output name's form, before any math.
                check_output(output, force=force, hf_source_dir=cs.hf_dir)
        try:
            return _fit(cs, val, model, output, cfg, report_path, plot_path, out_dtype, force, max_shard_size,
                        device, timer, progress, comm)
        except KeyboardInterrupt:
            # The training loop names its step; anywhere else (baselines, merge) says what is known.
            raise FitError("interrupted before the output was written; nothing was written") from None
        finally:
            cs.close()
    finally:
        if comm is not None:
            comm.close()


def _fit(cs, val, model_cfg, output, cfg, report_path, plot_path, out_dtype, force, max_shard_size, device, timer,
         progress, comm: Comm | None = None) -> dict:
    k = len(cs)
    main = comm is None or comm.is_main
    if not main:
        progress = None
    with _phase(comm, "data"), timer.phase("data"):
        data = load_data(val)
        fit_idx, held_idx = split_holdout(data, cfg.holdout, cfg.seed)
        objective = resolve_objective(model_cfg.loss, data.is_classification)
    with _phase(comm, "model"), timer.phase("model"):
        model = build_model(model_cfg.spec, model_cfg.args, hf_dir=cs.hf_dir).to(device)
        mk = ModelKeys(model, cs, model_cfg.spec)
    with _phase(comm, "subspace"), timer.phase("subspace"):
        layout = make_layout(mk.merged, [tuple(cs.shape(n)) for n in mk.merged], cfg.blocks, cfg.group_size)
        if comm is None:
            chunk, col_range = layout.n_cols, None
            subspace = build_subspace(cs.stack, layout, k, bits=cfg.bits, rank_rtol=cfg.rank_rtol, device=device,
                                      backend=cfg.backend, progress=progress)
        else:
            chunk, ranges = split_columns(layout.n_cols, layout.group_size, comm.world_size)
            col_range = ranges[comm.rank]
            subspace = build_subspace(
                cs.stack, layout, k, bits=cfg.bits, rank_rtol=cfg.rank_rtol, device=device, backend=cfg.backend,
                progress=progress, col_range=col_range, reduce_gram=comm.sum,
                load_slice=lambda name, lo, hi: torch.stack([cs.get_slice(i, name, lo, hi) for i in range(k)]))
    n_ranks = 1 if comm is None else comm.world_size
    with _phase(comm, "bind"):
        binding = FlatBinding(model, layout, mk.param_of_key, device, n_cols=chunk * n_ranks)
    recalibrate = cfg.bn_recalibrate == "on" or (cfg.bn_recalibrate == "auto" and has_batchnorm(model))
    if recalibrate and not has_batchnorm(model) and main:
        log.warning("--bn-recalibrate on: the model has no BatchNorm layer; nothing to recalibrate")

    ev = _Evaluator(model, data, fit_idx, held_idx, objective, cfg.batch_size, device, recalibrate, comm)
    # The baselines come first: the greedy soup and the best candidate can be the fit's start point.
    with timer.phase("evaluate"):
        rows = _baselines(cs, mk, ev, objective, cfg, k)
    theta0 = _start_point(cfg.init, rows, subspace, objective, k, cfg.coordinates)
    with _phase(comm, "fit"), timer.phase("fit"):
        # The fit runs with the candidates' uniform-average buffers, not those of the last baseline scored.
        _load_state(model, {b: _uniform(cs, b) for b in mk.buffers})
        outcome = train_coefficients(binding, subspace, data, fit_idx, objective, cfg, device, progress, comm,
                                     theta0=theta0)
    trained = subspace.combine(outcome.beta, out=torch.empty(subspace.mean.numel(), dtype=torch.float32, device=device))
    alphas = subspace.alphas(outcome.beta)  # [B, K] float64

    # Tensors that are not merged parameters (floating buffers) take the size-weighted mean alphas.
    sizes = torch.tensor([sum(layout.numel(i) for i in range(len(layout.names)) if layout.block_of[i] == b)
                          for b in range(layout.n_blocks)], dtype=torch.float64)
    default_alphas = ((alphas * sizes.unsqueeze(1)).sum(0) / sizes.sum()).tolist()
    key_block = {name: layout.block_of[i] for i, name in enumerate(layout.names)}
    key_block.update({alias: key_block[target] for alias, target in mk.alias_of.items()})

    with _phase(comm, "merge"), timer.phase("merge"):
        merged = linear_merge(cs, _merged_weights(alphas, key_block, default_alphas), out_dtype=out_dtype,
                              progress=progress)
    with timer.phase("evaluate"):
        ev.load(merged, recalibrate=True)
        recalibrated = {}
        if recalibrate:
            state = model.state_dict()
            for key in mk.buffers:
                if merged[key].is_floating_point():
                    merged[key] = state[key].detach().to("cpu", merged[key].dtype).clone()
                    recalibrated[key] = merged[key]
        gap = _quantization_gap(layout, col_range or (0, layout.n_cols), binding.flat, trained, subspace.mean, comm)
        twa_row = MethodResult("twa", "twa", ev.score("fit"), ev.score("heldout"), {"init": cfg.init})
        rows.append(twa_row)
    if comm is not None:
        per_rank = comm.gather_objects({"col_range": list(col_range), "basis_bytes": subspace.basis_bytes(),
                                        **peak_memory()})

    def finish() -> dict:
        """The report, the output and the report file (rank 0 alone in a distributed fit)."""
        split = "heldout" if held_idx.numel() else "fit"
        best = best_candidate(rows, split, objective.classification)
        beats = None if best is None else not is_better(getattr(best, split), getattr(twa_row, split),
                                                        objective.classification)
        metadata = build_metadata("twa", [{"path": s["path"], "sha256": s["sha256"]} for s in cs.sources()],
                                  blocks=cfg.blocks, bits=cfg.bits, alphas=alphas.tolist(), heldout=twa_row.heldout)
        report = {
            "report_version": REPORT_VERSION,
            "tool": "twamerge",
            "version": __version__,
            "settings": asdict(cfg),
            "data": {"path": str(val.path), "rows": data.n, "fit_rows": int(fit_idx.numel()),
                     "heldout_rows": int(held_idx.numel()), "inputs": list(data.inputs), "label": data.label},
            "heldout_rows": int(held_idx.numel()),
            "model": {"spec": model_cfg.spec or str(cs.hf_dir), "args": model_cfg.args, "loss": model_cfg.loss},
            "candidates": cs.sources(),
            "metric_name": objective.metric_name,
            "methods": [r.to_dict() for r in rows],
            "best_candidate": best.name if best else None,
            "twa_at_least_best": beats,
            "blocks": [
                {"index": b, "keys": names, "rank": subspace.ranks[b], "dropped": subspace.dropped[b],
                 "spread": float(subspace.spread[b]), "alphas": alphas[b].tolist()}
                for b, names in enumerate(layout.block_names())
            ],
            "subspace": {"n_params": layout.n_params, "n_cols": layout.n_cols, "rows": subspace.rows,
                         "bits": cfg.bits, "group_size": cfg.group_size, "basis_bytes": subspace.basis_bytes(),
                         "dropped_directions": sum(subspace.dropped), "quantization_gap": gap},
            "fit": {"steps": outcome.steps, "curve": outcome.curve,
                    "final_loss": outcome.curve[-1] if outcome.curve else None},
            "merge": {"key_block": key_block, "block_alphas": alphas.tolist(), "default_alphas": default_alphas,
                      "out_dtype": dtype_name(out_dtype) if out_dtype else None,
                      "recalibrated_buffers": _encode_tensors(recalibrated), "metadata": metadata},
        }
        with timer.phase("write"):
            written = write_checkpoint(merged, output, metadata=metadata, force=force, max_shard_size=max_shard_size,
                                       hf_source_dir=cs.hf_dir)
        report["outputs"] = [str(p) for p in written]
        report["timings"] = timer.seconds
        report["memory"] = {**peak_memory(), "basis_bytes": subspace.basis_bytes(),
                            "flat_buffer_bytes": 3 * binding.flat.numel() * 4}
        if comm is not None:
            report["distributed"] = {"world_size": comm.world_size, "backend": torch.distributed.get_backend(),
                                     "ranks": per_rank}
        if report_path is not None:
            from .report import write_report

            write_report(report, Path(report_path), force)
        if plot_path is not None:
            from .plot import plot_report

            plot_report(report, Path(plot_path), force)
        return report

    if comm is None:
        return finish()
    report = None
    with _phase(comm, "write"):
        if comm.is_main:
            report = finish()
    return comm.broadcast_object(report)


def _quantization_gap(layout, col_range: tuple[int, int], flat: torch.Tensor, trained: torch.Tensor,
                      mean: torch.Tensor, comm: Comm | None) -> float:
    """``|written - trained| / |trained - centre|`` over the merged tensors (padding excluded).

    ``flat`` is the full flat buffer holding what is written; ``trained`` and ``mean`` hold the
    columns ``col_range`` (all of them in one process, a rank's slice in a distributed fit, whose
    squared sums are then added over ranks). Sums run tensor by tensor, without copies.
    """
    c0, c1 = col_range
    sq = torch.zeros(2, dtype=torch.float64)
    error = None
    try:
        for i, o in enumerate(layout.offsets):
            lo, hi = max(o, c0), min(o + layout.numel(i), c1)
            if lo >= hi:
                continue
            real, ref, centre = flat[lo:hi], trained[lo - c0:hi - c0], mean[lo - c0:hi - c0]
            sq += torch.stack([(real - ref).double().square().sum(), (ref - centre).double().square().sum()]).cpu()
    except Exception as exc:
        if comm is None:
            raise
        error = exc
    gap2, moved2 = (sq if comm is None else comm.sum(sq, error)).tolist()
    return math.sqrt(gap2) / math.sqrt(moved2) if moved2 > 0 else 0.0


def _start_point(init: str, rows: list[MethodResult], subspace, objective: Objective, k: int,
                 coordinates: str) -> torch.Tensor | None:
    """Coordinates ``theta`` [B, R] at which the fit starts: None for the uniform average (the paper's start).

    ``best`` starts at the best candidate on the fit split, ``greedy`` at the greedy soup. With
    ``t = a - 1/K`` the offsets of the wanted weights ``a`` from uniform, ``beta_b`` solves
    ``T_b^T beta_b = t`` in the least-squares sense (exact unless the start leaves the subspace, e.g.
    a duplicate candidate whose direction was dropped).
    """
    if init == "uniform":
        return None
    candidates = [r for r in rows if r.kind == "candidate"]
    if init == "best":
        best = max(range(k), key=lambda i: candidates[i].fit["metric"] * (1 if objective.classification else -1))
        weights = [1.0 if i == best else 0.0 for i in range(k)]
    else:
        greedy = next(r for r in rows if r.kind == "greedy")
        names = [c.name for c in candidates]
        chosen = [names.index(n) for n in greedy.detail["ingredients"]]
        weights = [1.0 / len(chosen) if i in chosen else 0.0 for i in range(k)]
    target = torch.tensor(weights, dtype=torch.float64) - 1.0 / k
    beta = torch.stack([torch.linalg.pinv(t.T) @ target for t in subspace.transform])  # [B, R]
    scale = subspace.step_scale(coordinates)
    theta = torch.where(scale > 0, beta / scale.clamp_min(1e-300), torch.zeros_like(beta))
    return theta.float()


def _uniform(cs: CheckpointSet, key: str) -> torch.Tensor:
    x = cs.stack(key)
    return x.double().mean(0).to(x.dtype) if x.is_floating_point() else x[0]


def _baselines(cs, mk: ModelKeys, ev: _Evaluator, objective: Objective, cfg: FitConfig, k: int) -> list[MethodResult]:
    """Every candidate, the uniform average and the greedy soup (ingredients chosen on the fit split)."""
    keys = mk.model_keys()
    rows: list[MethodResult] = []
    if cfg.eval_candidates or cfg.greedy:
        for i in range(k):
            ev.load_from(lambda: _candidate_state(cs, i, keys), recalibrate=False)
            rows.append(MethodResult(Path(cs.paths[i]).name, "candidate", ev.score("fit"), ev.score("heldout"),
                                     {"path": str(cs.paths[i])}))
    ev.load_from(lambda: linear_merge(cs, uniform_weights(k)), recalibrate=True)
    rows.append(MethodResult("uniform", "uniform", ev.score("fit"), ev.score("heldout")))
    if cfg.greedy and rows:
        rows.append(_greedy_soup(cs, ev, objective, rows[:k]))
    if not cfg.eval_candidates:
        rows = [r for r in rows if r.kind != "candidate"]
    return rows


def _greedy_soup(cs, ev: _Evaluator, objective: Objective, candidates: list[MethodResult]) -> MethodResult:
    """Sort by fit-split metric, add each candidate to the running uniform soup if the fit metric strictly improves."""
    k = len(candidates)
    sign = 1 if objective.classification else -1
    order = sorted(range(k), key=lambda i: -sign * candidates[i].fit["metric"])
    soup, best = [order[0]], candidates[order[0]].fit
    for i in order[1:]:
        trial = soup + [i]
        weights = [1.0 / len(trial) if j in trial else 0.0 for j in range(k)]
        ev.load_from(lambda: linear_merge(cs, weights), recalibrate=True)
        score = ev.score("fit")
        if is_better(score, best, objective.classification):
            soup, best = trial, score
    weights = [1.0 / len(soup) if j in soup else 0.0 for j in range(k)]
    ev.load_from(lambda: linear_merge(cs, weights), recalibrate=True)
    return MethodResult("greedy", "greedy", ev.score("fit"), ev.score("heldout"),
                        {"ingredients": [candidates[j].name for j in sorted(soup)]})


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    *,
    val: DataConfig,
    model: ModelConfig,
    batch_size: int = 64,
    device: str = "auto",
    ema_key: str | None = None,
    bn_recalibrate: bool = False,
) -> dict:
    """Loss and metric of each checkpoint on all rows of ``val``.

    Returns:
        ``{"metric_name", "rows", "checkpoints": [{"path", "loss", "metric", "n"}]}``.
    """
    dev = select_device(device)
    data = load_data(val)
    objective = resolve_objective(model.loss, data.is_classification)
    cs = open_checkpoints(checkpoints, ema_key=ema_key, min_count=1)
    try:
        net = build_model(model.spec, model.args, hf_dir=cs.hf_dir).to(dev)
        mk = ModelKeys(net, cs, model.spec)
        everything = torch.arange(data.n)
        results = []
        for i in range(len(cs)):
            _load_state(net, _candidate_state(cs, i, mk.model_keys()))
            if bn_recalibrate:
                recalibrate_batchnorm(net, data, everything, batch_size, dev)
            score = evaluate(net, data, everything, objective, batch_size, dev)
            results.append({"path": str(cs.paths[i]), **score})
    finally:
        cs.close()
    return {"metric_name": objective.metric_name, "rows": data.n, "checkpoints": results}


def apply_report(report_path: str | Path, checkpoints: Sequence[str | Path], output: str | Path, *,
                 force: bool = False, max_shard_size: int | None = None) -> dict:
    """Re-emit a fit's merge from its saved coefficients: no data and no model needed.

    The candidates must be the fit's (checked by SHA-256, in order); the output is bit-for-bit the
    fit's output (the same tensors, the same metadata).
    """
    report = read_report(Path(report_path))
    output = Path(output)
    merge = report["merge"]
    cs = open_checkpoints(checkpoints, allow_nonfinite=True)
    try:
        check_output(output, force=force, hf_source_dir=cs.hf_dir)
        expected = [c["sha256"] for c in report["candidates"]]
        got = [s["sha256"] for s in cs.sources()]
        if len(expected) != len(got):
            raise TwamergeError(f"{report_path}: the fit used {len(expected)} candidates; {len(got)} were given")
        for i, (e, g) in enumerate(zip(expected, got)):
            if e != g:
                raise TwamergeError(f"{cs.paths[i]}: SHA-256 {g[:12]}... differs from the fit's candidate {i + 1} "
                                    f"({report['candidates'][i]['path']}, {e[:12]}...); pass the same files in the same order")
        alphas = torch.tensor(merge["block_alphas"], dtype=torch.float64)
        out_dtype = parse_dtype(merge.get("out_dtype"))
        merged = linear_merge(cs, _merged_weights(alphas, merge["key_block"], merge["default_alphas"]),
                              out_dtype=out_dtype)
        merged.update(_decode_tensors(merge.get("recalibrated_buffers", "")))
        written = write_checkpoint(merged, output, metadata=merge["metadata"], force=force,
                                   max_shard_size=max_shard_size,
                                   hf_source_dir=cs.hf_dir)
    finally:
        cs.close()
    return {"outputs": [str(p) for p in written], "report": str(report_path), "candidates": len(expected)}

