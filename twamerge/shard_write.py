"""The merged checkpoint of a sharded fit, written with no rank holding the whole model.

Each rank holds its rows of every merged parameter (``sharding.ShardedBinding.merge``: computed from the
files in float64, the numbers one process writes). Rank 0 writes the checkpoint tensor by tensor,
receiving each tensor's rows from one rank after the other straight into the file: its memory holds one
rank's rows of one tensor beyond its own share. The output is the one a single process writes (``io.writer``: the same
safetensors bytes, shards, index, model folder, side files and card), which is why this scheme was
chosen over every rank writing shards of its own: those would be N files of row pieces that no loader
takes as a model, and the output would depend on the number of ranks.

Every rank walks the same tensors in the same order (:func:`_plan`); before each gathered tensor the
ranks agree on success (``Comm.check``), so a failure on rank 0 while writing (a full disk) stops every
rank there, and one before the first tensor meets the others at that first agreement.

Only safetensors are streamed; a ``.pt`` output (``torch.save`` takes the whole state dict at once) and
LoRA adapters are refused before any work (:func:`check_sharded_output`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import wait_collective
from .errors import OutputError, one_line
from .io import AtomicWrite
from .io.formats.safetensors import ST_DTYPES
from .io.hashing import remember_sha256, sha256_file
from .io.writer import (
    check_output,
    copy_side_files,
    is_dir_output,
    plan_shards,
    previous_output_files,
    set_config_dtype,
)
from .sharding import row_split

log = logging.getLogger(__name__)

_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


def check_sharded_output(cs, out: Path) -> None:
    """Fail before any work when a sharded fit cannot write ``out`` (see the module docstring)."""
    from .io.adapters import AdapterSet

    if isinstance(cs, AdapterSet):
        raise OutputError("--shard-model on: LoRA adapters are merged by one process; use --shard-model off")
    out = Path(out)
    if not is_dir_output(out, cs.hf_dir) and out.suffix.lower() != ".safetensors":
        raise OutputError(f"output {out}: a sharded fit (--shard-model on) writes .safetensors (a file or a model "
                          f"folder) tensor by tensor; {out.suffix} needs the whole model in one process: use "
                          ".safetensors or --shard-model off")


def _meta(binding, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor to write as a meta tensor of its whole shape and dtype (what the plan and header need)."""
    out = {}
    for key, t in tensors.items():
        piece = binding.rows_of(key)
        shape = binding.layout.shapes[piece.index] if piece is not None and not piece.replicated else t.shape
        out[key] = torch.empty(shape, dtype=t.dtype, device="meta")
    return out


def _plan(meta: dict[str, torch.Tensor], out: Path, max_shard_size: int | None,
          source_dir: Path | None) -> tuple[bool, Path, list[tuple[str, list[str]]]]:
    """``(is_dir, base, [(file name, its keys in write order)])``: what ``io.writer.write_checkpoint`` makes."""
    is_dir = is_dir_output(out, source_dir)
    shards = plan_shards(meta, max_shard_size)
    base = Path("model.safetensors") if is_dir else Path(out.name)
    names = [base.name] if len(shards) == 1 else [
        f"{base.stem}-{i + 1:05d}-of-{len(shards):05d}{base.suffix}" for i in range(len(shards))]
    return is_dir, base, [(name, sorted(keys)) for name, keys in zip(names, shards)]


def _sharded(binding, key: str) -> bool:
    piece = binding.rows_of(key)
    return piece is not None and not piece.replicated


def _gather(binding, key: str, rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """Every rank's rows of ``key``, in rank order, on rank 0 (one rank's at a time, received as they are
    written: rank 0 holds one piece beyond its own); the other ranks send theirs and yield nothing.

    Preceded by an agreement on success (see the module docstring)."""
    comm = binding.comm
    comm.check(None)
    if comm.world_size == 1:
        yield rows
        return
    piece = binding.rows_of(key)
    n0 = binding.layout.shapes[piece.index][0]
    sizes = [(hi - lo) * piece.inner for lo, hi in (row_split(n0, comm.world_size, r) for r in range(comm.world_size))]
    if not comm.is_main:
        if sizes[comm.rank]:
            wait_collective(dist.isend(rows.reshape(-1).to(comm.device).contiguous(), dst=0))
        return
    yield rows
    buffer = torch.empty(max(sizes), dtype=rows.dtype, device=comm.device)
    for r in range(1, comm.world_size):
        if sizes[r]:
            wait_collective(dist.irecv(buffer[: sizes[r]], src=r))
            yield buffer[: sizes[r]]


def send_rows(binding, tensors: Mapping[str, torch.Tensor], out: Path, max_shard_size: int | None,
              source_dir: Path | None) -> None:
    """The part of every rank but 0 in :func:`write_sharded`: send its rows of each tensor, in the write's order."""
    _, _, files = _plan(_meta(binding, tensors), Path(out), max_shard_size, source_dir)
    for _, keys in files:
        for key in keys:
            if _sharded(binding, key):
                for _ in _gather(binding, key, tensors[key]):
                    pass


def write_sharded(binding, tensors: Mapping[str, torch.Tensor], out: Path, *, metadata: dict[str, str],
                  force: bool = False, max_shard_size: int | None = None, source_dir: Path | None = None,
                  tokenizer: Path | None = None, model_card: str | None = None,
                  transaction: AtomicWrite | None = None) -> list[Path]:
    """Rank 0's part: write ``tensors`` (whole, or this rank's rows of a sharded parameter) as
    ``io.writer.write_checkpoint`` writes them, gathering each sharded tensor's rows from every rank as
    it is written. Returns the paths written (shards first, index last)."""
    out = Path(out)
    metadata = {"format": "pt", **metadata}
    check_output(out, force=force, hf_source_dir=source_dir, max_shard_size=max_shard_size)
    meta = _meta(binding, tensors)
    is_dir, base, files = _plan(meta, out, max_shard_size, source_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {out.parent}: {one_line(e)}") from e
    written: list[tuple[Path, Path]] = []
    try:
        with contextlib.ExitStack() as stack:
            aw = transaction if transaction is not None else stack.enter_context(AtomicWrite())
            tmp_dir = aw.directory(out) if is_dir else None

            def stage(final_name: str) -> Path:
                if tmp_dir is not None:
                    written.append((tmp_dir / final_name, out / final_name))
                else:
                    written.append((aw.file(out.parent / final_name), out.parent / final_name))
                return written[-1][0]

            weight_map = {}
            for name, keys in files:
                _stream(binding, tensors, meta, keys, stage(name), metadata)
                weight_map.update({k: name for k in keys})
            if len(files) > 1:
                total = sum(t.numel() * t.element_size() for t in meta.values())
                index = {"metadata": {"total_size": total, **metadata},
                         "weight_map": {k: weight_map[k] for k in meta}}
                stage(f"{base.name}.index.json").write_text(json.dumps(index, indent=2))
            if tmp_dir is not None and (source_dir is not None or tokenizer is not None):
                copied = copy_side_files(source_dir, tmp_dir, tokenizer=tokenizer)
                set_config_dtype(tmp_dir / "config.json", meta)
                log.info("copied %s", ", ".join(copied) or "nothing")
            if tmp_dir is not None and model_card is not None:
                stage("README.md").write_text(model_card)
            for tmp, final in written:
                log.info("wrote %s (%d bytes, sha256 %s)", final, tmp.stat().st_size, sha256_file(tmp))
            previous = previous_output_files(out, base.name) if force and not is_dir else []
            for stale in set(previous) - {final for _, final in written}:
                aw.obsolete(stale)
                log.info("removing %s, part of the output this one replaces", stale)
            if transaction is None:
                aw.commit()
    except OutputError:
        raise
    except OSError as e:  # a full disk, a file-size limit
        raise OutputError(f"cannot write {out}: {one_line(e)[:300]}") from None
    return [final for _, final in written]


def _stream(binding, tensors: Mapping[str, torch.Tensor], meta: dict[str, torch.Tensor], keys: list[str],
            path: Path, metadata: dict[str, str]) -> None:
    """One safetensors file of ``keys`` (sorted), laid out as ``io.writer.save_safetensors`` lays it out,
    each sharded tensor gathered as it is written."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in keys:
        t = meta[key]
        if t.dtype not in _ST_NAMES:
            raise TypeError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (len(blob).to_bytes(8, "little"), blob):
            f.write(part)
            sha.update(part)
        for key in keys:
            parts = _gather(binding, key, tensors[key]) if _sharded(binding, key) else [tensors[key]]
            for t in parts:
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    data = memoryview(t.reshape(-1).view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy())
                    f.write(data)
                    sha.update(data)
    remember_sha256(path, sha.hexdigest())
