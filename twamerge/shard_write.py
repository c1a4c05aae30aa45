"""The merged checkpoint of a sharded fit, written with no rank holding the whole model.

Each rank holds its rows of every merged parameter (``sharding.ShardedBinding.merge``: computed from the
files in float64, the numbers one process writes). Rank 0 writes the checkpoint tensor by tensor,
receiving each tensor's rows from one rank after the other straight into the file: its memory holds one
rank's rows of one tensor beyond its own share. The output is the one a single process writes (``io.writer``: the same
safetensors bytes, shards, index, model folder, side files and card), which is why this scheme was
chosen over every rank writing shards of its own: those would be N files of row pieces that no loader
takes as a model, and the output would depend on the number of ranks.

Every rank walks the same tensors in the same order (:func:`send_rows`); before each gathered tensor the
ranks agree on success (``Comm.check``), so a failure on rank 0 while writing (a full disk) stops every
rank there, and one before the first tensor meets the others at that first agreement.

Only safetensors are streamed; a ``.pt`` output (``torch.save`` takes the whole state dict at once) and
LoRA adapters are refused before any work (:func:`check_sharded_output`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import wait_collective
from .errors import OutputError
from .io import AtomicWrite
from .io.writer import is_dir_output, plan_shards, write_checkpoint
from .sharding import row_split


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


def send_rows(binding, tensors: Mapping[str, torch.Tensor], max_shard_size: int | None) -> None:
    """The part of every rank but 0 in :func:`write_sharded`: send its rows of each tensor, in the order
    rank 0 writes them (``io.writer``: file by file of ``plan_shards``, sorted by name within a file)."""
    for keys in plan_shards(_meta(binding, tensors), max_shard_size):
        for key in sorted(keys):
            if _sharded(binding, key):
                for _ in _gather(binding, key, tensors[key]):
                    pass


def write_sharded(binding, tensors: Mapping[str, torch.Tensor], out: Path, *, metadata: dict[str, str],
                  force: bool = False, max_shard_size: int | None = None, source_dir: Path | None = None,
                  tokenizer: Path | None = None, model_card: str | None = None,
                  transaction: AtomicWrite | None = None) -> list[Path]:
    """Rank 0's part: write ``tensors`` (whole, or this rank's rows of a sharded parameter) with
    ``io.writer.write_checkpoint``, gathering each sharded tensor's rows from every rank as it is
    written. Returns the paths written (shards first, index last)."""

    def pieces(key: str):
        return _gather(binding, key, tensors[key]) if _sharded(binding, key) else [tensors[key]]

    return write_checkpoint(_meta(binding, tensors), out, metadata=metadata, force=force,
                            max_shard_size=max_shard_size, hf_source_dir=source_dir, tokenizer_dir=tokenizer,
                            model_card=model_card, transaction=transaction, pieces=pieces)
