"""The report of a fit: metrics of every method on the held-out split, alphas, settings, timings, memory.

The report is plain data (JSON-able dicts). The CLI renders it as a table; ``apply`` reads it back
to re-emit the same merge without data or model.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import OutputError, TwamergeError
from .io.atomic import AtomicWrite, refuse_existing

REPORT_VERSION = 1


@dataclass
class MethodResult:
    """One row of the comparison table."""

    name: str
    kind: str  # candidate | uniform | greedy | twa
    fit: dict | None = None  # {"loss", "metric", "n"} on the fit split
    heldout: dict | None = None  # the same on the held-out split
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "fit": self.fit, "heldout": self.heldout, **self.detail}


class Timer:
    """Named wall-clock phases."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory() -> dict:
    """Peak resident memory of this process (and of the CUDA allocator when used), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def best_candidate(rows: list[MethodResult], split: str, higher_is_better: bool) -> MethodResult | None:
    """The candidate row with the best metric on ``split`` (the first of equals); None without candidates."""
    cands = [r for r in rows if r.kind == "candidate" and getattr(r, split) is not None]
    if not cands:
        return None
    sign = 1 if higher_is_better else -1
    return max(cands, key=lambda r: sign * getattr(r, split)["metric"])


def is_better(a: dict, b: dict, higher_is_better: bool) -> bool:
    """Whether metrics ``a`` are strictly better than ``b``."""
    return a["metric"] > b["metric"] if higher_is_better else a["metric"] < b["metric"]


@dataclass
class DataSummary:
    """The validation data of a fit and its split."""

    path: str
    rows: int
    fit_rows: int
    heldout_rows: int
    inputs: list[str]
    label: str | None


@dataclass
class BasisSummary:
    """The subspace a fit trained in: per block its keys, rank, dropped directions and spread."""

    block_keys: list[list[str]]
    ranks: list[int]
    dropped: list[int]
    spread: list[float]
    n_params: int
    n_cols: int
    rows: int
    bits: int
    group_size: int
    basis_bytes: int
    quantization_gap: float


@dataclass
class MergeRecord:
    """What ``apply`` needs to write the fit's merge again: per-key blocks, alphas, dtype, buffers, metadata."""

    key_block: dict[str, int]
    block_alphas: list[list[float]]  # [B][K]
    default_alphas: list[float]  # [K], for floating tensors outside every block (buffers)
    out_dtype: str | None
    recalibrated_buffers: str  # base64 safetensors of the re-estimated BatchNorm statistics, or ""
    metadata: dict[str, str]


def build_report(*, settings: Any, data: DataSummary, model: dict, candidates: list[dict], metric_name: str,
                 higher_is_better: bool, methods: list[MethodResult], basis: BasisSummary, curve: list[float],
                 merge: MergeRecord, outputs: list[str], timings: dict[str, float], memory: dict,
                 distributed: dict | None = None) -> dict:
    """The JSON-able report of a fit, from its stages' results (no I/O, no torch).

    The comparison that CI gates on, ``twa_at_least_best``, is made on the held-out split when
    there is one, else on the fit split (and the report then says ``heldout_rows: 0``).
    """
    split = "heldout" if data.heldout_rows else "fit"
    best = best_candidate(methods, split, higher_is_better)
    twa = next(r for r in methods if r.kind == "twa")
    beats = None if best is None else not is_better(getattr(best, split), getattr(twa, split), higher_is_better)
    report = {
        "report_version": REPORT_VERSION,
        "tool": "twamerge",
        "version": _version(),
        "settings": asdict(settings),
        "data": asdict(data),
        "heldout_rows": data.heldout_rows,
        "model": model,
        "candidates": candidates,
        "metric_name": metric_name,
        "higher_is_better": higher_is_better,
        "methods": [r.to_dict() for r in methods],
        "best_candidate": best.name if best else None,
        "twa_at_least_best": beats,
        "blocks": [
            {"index": b, "keys": keys, "rank": basis.ranks[b], "dropped": basis.dropped[b],
             "spread": float(basis.spread[b]), "alphas": merge.block_alphas[b]}
            for b, keys in enumerate(basis.block_keys)
        ],
        "subspace": {"n_params": basis.n_params, "n_cols": basis.n_cols, "rows": basis.rows, "bits": basis.bits,
                     "group_size": basis.group_size, "basis_bytes": basis.basis_bytes,
                     "dropped_directions": sum(basis.dropped), "quantization_gap": basis.quantization_gap},
        "fit": {"steps": len(curve), "curve": curve, "final_loss": curve[-1] if curve else None},
        "merge": asdict(merge),
        "outputs": outputs,
        "timings": timings,
        "memory": memory,
    }
    if distributed is not None:
        report["distributed"] = distributed
    return report


def _version() -> str:
    from . import __version__

    return __version__


@contextmanager
def atomic_output(path: Path, force: bool, what: str) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Refuses to overwrite ``path`` without ``force``.
    """
    path = Path(path)
    refuse_existing(path, what, force=force)
    with AtomicWrite() as aw:
        try:
            tmp = aw.file(path, suffix=path.suffix or ".tmp")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the {what} ({exc.strerror})") from exc
        yield tmp
        aw.commit()


def write_report(report: dict, path: Path, force: bool) -> None:
    """Write ``report`` as JSON atomically; refuse to overwrite without ``force``."""
    with atomic_output(path, force, "report") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def read_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TwamergeError(f"{path}: no such report file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TwamergeError(f"{path}: not a readable JSON report ({exc})") from exc
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION or "merge" not in report:
        raise TwamergeError(f"{path}: not a twamerge fit report (report_version {REPORT_VERSION} with a 'merge' section)")
    missing = [k for k in ("candidates",) if not isinstance(report.get(k), list)] + [
        f"merge.{k}" for k in ("block_alphas", "key_block", "default_alphas", "metadata")
        if not isinstance(report["merge"], dict) or k not in report["merge"]]
    if missing:
        raise TwamergeError(f"{path}: the report lacks {', '.join(missing)}; was it edited or cut short?")
    return report
