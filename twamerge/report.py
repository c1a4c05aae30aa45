"""The report of a fit: metrics of every method on the held-out split, alphas, settings, timings, memory.

The report is plain data (JSON-able dicts). The CLI renders it as a table; ``apply`` reads it back
to re-emit the same merge without data or model.
"""

from __future__ import annotations

import base64
import contextlib
import json
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import OutputError, TwamergeError, one_line
from .io.atomic import AtomicWrite, refuse_existing
from .io.formats.checks import check_tensor
from .io.jsonschema import Fields, load_json
from .methods import MethodResult, best_candidate, contenders, is_better
from .options import dtype_name, parse_dtype

__all__ = ["BasisSummary", "DataSummary", "MergeRecord", "MethodResult", "Timer", "best_candidate", "best_on_heldout",
           "build_report", "decode_tensors", "encode_tensors", "is_better", "peak_memory", "read_report",
           "recalibrated_buffers", "validate_report", "write_report"]

REPORT_VERSION = 1


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


def _vm_hwm_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory() -> dict:
    """Peak resident memory of this process (and of the CUDA allocator when used), in bytes.

    On Linux the kernel's high-water mark of this address space (``VmHWM``): ``ru_maxrss`` survives
    exec, so a rank started by torchrun (or any Python launcher) would report at least its launcher's
    peak. Elsewhere ``ru_maxrss``.
    """
    out = {"cpu_peak_rss_bytes": _vm_hwm_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def best_on_heldout(rows: list[MethodResult], higher_is_better: bool) -> MethodResult:
    """What ``--select best`` writes: of TWA and what each fit baseline puts forward (``methods.contenders``:
    the uniform average, the greedy soup, the best candidate on the fit split), the row with the best
    held-out metric; ties go to the lower held-out loss, then to the first of that order (TWA first).
    Each contender was made on the fit rows, so the held-out rows compare them fairly; the winner's
    held-out figure is then optimistic (it was chosen by it). TWA when there are no held-out rows."""
    twa = next(r for r in rows if r.kind == "twa")
    if twa.heldout is None:
        return twa
    pool = [twa, *(row for method in contenders() for row in method.contenders(rows, higher_is_better))]
    sign = 1 if higher_is_better else -1
    return max(pool, key=lambda r: (sign * r.heldout["metric"], -r.heldout["loss"]))


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
                 seconds_per_step: float | None = None,
                 merge: MergeRecord, outputs: list[str], timings: dict[str, float], memory: dict,
                 distributed: dict | None = None, written: MethodResult | None = None) -> dict:
    """The JSON-able report of a fit, from its stages' results (no I/O, no torch).

    The comparisons with the best candidate (``twa_at_least_best``, and ``written.at_least_best``,
    which ``--fail-if-worse`` gates on) are made on the held-out split when there is one, else on the
    fit split (and the report then says ``heldout_rows: 0``). ``written``: the row whose merge was
    written (``--select best``); TWA's when None.
    """
    split = "heldout" if data.heldout_rows else "fit"
    best = best_candidate(methods, split, higher_is_better)
    twa = next(r for r in methods if r.kind == "twa")
    written = written or twa

    def at_least_best(row: MethodResult) -> bool | None:
        return None if best is None else not is_better(getattr(best, split), getattr(row, split), higher_is_better)

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
        "twa_at_least_best": at_least_best(twa),
        # What -o holds. Under --select best its held-out figure chose it among four, so it is optimistic.
        # --fail-if-worse gates on what was written.
        "written": {"name": written.name, "kind": written.kind,
                    "chosen_on_heldout": getattr(settings, "select", "twa") == "best" and data.heldout_rows > 0,
                    "at_least_best": at_least_best(written)},
        "blocks": [
            {"index": b, "keys": keys, "rank": basis.ranks[b], "dropped": basis.dropped[b],
             "spread": float(basis.spread[b]), "alphas": merge.block_alphas[b]}
            for b, keys in enumerate(basis.block_keys)
        ],
        "subspace": {"n_params": basis.n_params, "n_cols": basis.n_cols, "rows": basis.rows, "bits": basis.bits,
                     "group_size": basis.group_size, "basis_bytes": basis.basis_bytes,
                     "dropped_directions": sum(basis.dropped), "quantization_gap": basis.quantization_gap},
        "fit": {"steps": len(curve), "curve": curve, "final_loss": curve[-1] if curve else None,
                "seconds_per_step": seconds_per_step},
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
def atomic_output(path: Path, force: bool, what: str, transaction: AtomicWrite | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Refuses to overwrite ``path`` without ``force``. With ``transaction`` the file is only staged
    there: the caller commits it together with the rest of its outputs.
    """
    path = Path(path)
    refuse_existing(path, what, force=force)
    with contextlib.ExitStack() as stack:
        aw = transaction if transaction is not None else stack.enter_context(AtomicWrite())
        try:
            tmp = aw.file(path, suffix=path.suffix or ".tmp")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the {what} ({exc.strerror})") from exc
        try:
            yield tmp
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the {what} ({one_line(exc.strerror or exc)})") from exc
        if transaction is None:
            try:
                aw.commit()
            except OSError as exc:
                raise OutputError(f"{path}: cannot write the {what} ({one_line(exc.strerror or exc)})") from exc


def write_report(report: dict, path: Path, force: bool, transaction: AtomicWrite | None = None) -> None:
    """Write ``report`` as JSON atomically (or stage it in ``transaction``); refuse to overwrite without ``force``."""
    with atomic_output(path, force, "report", transaction) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


#: largest |alpha| a report may hold (learned merges stay within a few units; 1e300 would write Inf)
MAX_ALPHA = 1e6
#: most candidates and blocks a report may list
MAX_CANDIDATES = 100_000
MAX_BLOCKS = 10_000_000


def read_report(path: Path) -> dict:
    """The fit report at ``path``, with every field ``apply`` uses validated (types, sizes, ranges).

    Raises:
        TwamergeError: one line naming the file and the field at fault.
    """
    report = load_json(path, "report", TwamergeError)
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION or "merge" not in report:
        raise TwamergeError(f"{path}: not a twamerge fit report (report_version {REPORT_VERSION} with a 'merge' section)")
    validate_report(report, path)
    return report


def validate_report(report: dict, source: str | Path) -> None:
    """Check the parts of a report that ``apply`` reads; raise ``TwamergeError`` naming the field."""
    f = Fields(source, TwamergeError)
    if isinstance(report.get("report_version"), bool):
        raise f.expected("report_version", f"the integer {REPORT_VERSION}", report["report_version"])
    cands = f.list(f.get(report, "candidates", "candidates"), "candidates", min_len=1, max_len=MAX_CANDIDATES)
    for i, c in enumerate(cands):
        f.object(c, f"candidates[{i}]")
        f.string(f.get(c, "path", f"candidates[{i}].path"), f"candidates[{i}].path", max_len=1 << 16)
        f.string(f.get(c, "sha256", f"candidates[{i}].sha256"), f"candidates[{i}].sha256", pattern="[0-9a-f]{64}",
                 what="64 lower-case hex digits")
    k = len(cands)
    merge = f.object(report["merge"], "merge")
    alphas = f.list(f.get(merge, "block_alphas", "merge.block_alphas"), "merge.block_alphas", min_len=1,
                    max_len=MAX_BLOCKS)
    for b, row in enumerate(alphas):
        f.numbers(row, f"merge.block_alphas[{b}]", length=k, bound=MAX_ALPHA)
    f.numbers(f.get(merge, "default_alphas", "merge.default_alphas"), "merge.default_alphas", length=k,
              bound=MAX_ALPHA)
    key_block = f.object(f.get(merge, "key_block", "merge.key_block"), "merge.key_block")
    for key, b in key_block.items():
        f.integer(b, f"merge.key_block[{key!r}]", 0, len(alphas))
    out_dtype = merge.get("out_dtype")
    if out_dtype is not None:
        f.string(out_dtype, "merge.out_dtype", what="a dtype name or null", max_len=32)
        try:
            parse_dtype(out_dtype)
        except TwamergeError as exc:
            raise f.fail("merge.out_dtype", str(exc)) from None
    f.string(merge.get("recalibrated_buffers", ""), "merge.recalibrated_buffers",
             what="base64 text of a safetensors blob")
    f.str_map(f.get(merge, "metadata", "merge.metadata"), "merge.metadata")


# -- the recalibrated BatchNorm statistics of a merge, carried in the report as base64 safetensors ----------------


def encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """``tensors`` as base64 text of a safetensors blob (``merge.recalibrated_buffers``); "" for none."""
    return base64.b64encode(st_save({k: v.contiguous() for k, v in tensors.items()})).decode() if tensors else ""


def decode_tensors(blob: str, source: str | Path = "report") -> dict[str, torch.Tensor]:
    """The tensors :func:`encode_tensors` wrote; raises ``TwamergeError`` naming ``source`` for anything else."""
    if not blob:
        return {}
    try:
        return st_load(base64.b64decode(blob, validate=True))
    except Exception as exc:  # noqa: BLE001 - binascii, safetensors and torch errors alike
        raise TwamergeError(f"{source}: merge.recalibrated_buffers: not base64 of a safetensors blob "
                            f"({one_line(exc)[:200]})") from None


def recalibrated_buffers(report_path: str | Path, blob: str,
                         merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The report's recalibrated buffers, each checked against the merged tensor it replaces."""
    buffers = decode_tensors(blob, report_path)
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
