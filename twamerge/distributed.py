"""Everything that knows about ranks: process-group setup, the column split, collectives, failure agreement.

A distributed fit (``torchrun --nproc_per_node N -m twamerge fit ...``) splits the padded flat
parameter space into N contiguous, group-aligned column ranges of equal padded width ``chunk``.
Rank ``r`` owns ``[r * chunk, min((r + 1) * chunk, D))``: it reads only those columns of every
candidate, stores only that slice of the quantized basis and runs combine/project only on it.
Per step the traffic is that of data-parallel training: one all-gather of the parameters, one
reduce-scatter of the gradients, and one all-reduce of the tiny ``[B, R]`` coefficient gradient.

Failure agreement: a rank that fails must not leave the others blocked in a collective. Every
collective that can follow a failure carries an error flag (one extra element of the payload);
when any rank raised, all ranks exchange the messages and raise together: the failing rank its own
error, the others :class:`RankFailedError` naming it. Code between two flagged collectives runs
inside :meth:`Comm.phase`, which ends with such a flagged (empty) all-reduce.

A sharded model (``twamerge.sharding``) runs collectives of its own inside every forward and
backward, on a process group of its own, where no error flag can ride along. A rank that fails
there breaks that group before it joins the agreement (``Comm.on_failure``), so that its peers,
blocked in one of those collectives, get an error at once and join the agreement too; their errors
say only that a peer went away (:func:`is_peer_failure`), so the agreement names the rank that
failed first for a reason of its own.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .errors import TwamergeError, one_line

log = logging.getLogger(__name__)

# How long a rank waits in a collective for the others (a hung peer, a slow filesystem).
TIMEOUT = datetime.timedelta(minutes=30)
_SYNCED = "_twamerge_synced"
_RELEASED = "_twamerge_released"


class RankFailedError(TwamergeError):
    """Another rank of a distributed fit failed; this rank stopped with it."""


# The Works of the latest collectives, kept until later ones push them out (see wait_collective).
_RECENT_WORKS: collections.deque = collections.deque(maxlen=8)


def wait_collective(work) -> None:
    """Wait for a collective started with ``async_op=True`` and keep its Work alive past this call.

    Gloo's worker threads release a finished collective just after the caller wakes up. If that
    release drops the last reference to a tensor created in Python it must take the GIL, and when it
    lands after interpreter shutdown began the process aborts with SIGABRT ("terminate called
    without an active exception", pytorch/pytorch#190489): a rank that raised right after its last
    collective could die that way instead of exiting with its error. While this module holds the
    Work, the worker thread's release is a plain decrement; the tensors are freed here, on the
    caller's thread, when the Work leaves the deque several collectives later (a worker thread
    preempted that long releases mid-run, where taking the GIL is harmless) or at exit. The cost is
    that the last 8 collectives' tensors stay alive until the next collective or exit.
    """
    work.wait()
    _RECENT_WORKS.append(work)


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its env contract) started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def split_columns(n_cols: int, group_size: int, world_size: int) -> tuple[int, list[tuple[int, int]]]:
    """Split ``n_cols`` flat columns into ``world_size`` contiguous group-aligned ranges.

    Returns:
        ``(chunk, ranges)``: every range starts at ``r * chunk`` (a multiple of ``group_size``) and
        holds at most ``chunk`` columns; the last ranges may be shorter or empty. Equal padded widths
        are what the all-gather and reduce-scatter need.
    """
    if n_cols % group_size:
        raise ValueError(f"n_cols={n_cols} is not a multiple of group_size={group_size}")
    groups = n_cols // group_size
    chunk = -(-groups // world_size) * group_size
    ranges = [(min(r * chunk, n_cols), min((r + 1) * chunk, n_cols)) for r in range(world_size)]
    return chunk, ranges


@dataclass
class Comm:
    """This rank's view of the process group, with the collectives the fit needs.

    A fit always runs with a ``Comm``: :class:`SingleProcess` (world size 1) when there is one rank,
    so one process runs the same code as every rank of a distributed fit. ``device`` is where
    collective buffers must live (CUDA for NCCL, CPU for gloo).
    """

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False
    # Called with the error before this rank joins an agreement as a failing rank (see the module docstring).
    on_failure: list[Callable[[BaseException], None]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part ``[lo, hi)`` of ``n`` rows (near-equal parts, earlier ranks larger)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def all_gather(self, out: torch.Tensor, local: torch.Tensor) -> None:
        """``out`` [N * chunk] <- every rank's ``local`` [chunk], in rank order."""
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        wait_collective(fn(out, local, async_op=True))

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> None:
        """``out`` [chunk] <- this rank's chunk of the sum over ranks of ``full`` [N * chunk]."""
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        wait_collective(fn(out, full, async_op=True))

    def sum(self, t: torch.Tensor, error: BaseException | None = None) -> torch.Tensor:
        """All-reduce (sum) ``t`` with an error flag riding along; raises on every rank if any rank failed.

        Args:
            t: any shape, float32/float64 (a new tensor of the same shape and dtype is returned).
            error: this rank's failure since the last agreement, if any.
        """
        if error is not None:
            self.release_peers(error)
        flat = t.detach().reshape(-1)
        buf = torch.empty(flat.numel() + 1, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32,
                          device=self.device)
        buf[:-1] = flat.to(buf.device, buf.dtype)
        buf[-1] = 1.0 if error is not None else 0.0
        wait_collective(dist.all_reduce(buf, async_op=True))
        if float(buf[-1]) > 0:
            self._fail(error)
        return buf[:-1].to(t.device, t.dtype).view(t.shape)

    def check(self, error: BaseException | None = None) -> None:
        """Agree on success: raise on every rank if any rank passes an error."""
        self.sum(torch.zeros(0), error)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a block that has no collectives inside; its end is a point where all ranks agree on success."""
        error: BaseException | None = None
        try:
            yield
        except (Exception, KeyboardInterrupt) as exc:
            if getattr(exc, _SYNCED, False):
                raise
            error = exc
            log.debug("rank %d failed in phase %s: %s", self.rank, name, exc)
        self.check(error)

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's JSON-serialisable ``obj``, decoded from JSON on every rank (rank 0 included)."""
        payload = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        wait_collective(dist.broadcast(size, src=0, async_op=True))
        buf = torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        wait_collective(dist.broadcast(buf, src=0, async_op=True))
        return json.loads(bytes(buf.cpu().numpy()))

    def gather_objects(self, obj: object) -> list:
        """Every rank's JSON-serialisable ``obj``, in rank order, on every rank.

        JSON rather than torch's pickle-based object collectives: no rank unpickles what another sent.
        """
        payload = json.dumps(obj).encode()
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        self.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.int64, device=self.device))
        longest = int(sizes.max())
        mine = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        everyone = torch.zeros(self.world_size * longest, dtype=torch.uint8, device=self.device)
        self.all_gather(everyone, mine)
        rows = everyone.view(self.world_size, longest).cpu()
        return [json.loads(bytes(rows[r, :int(sizes[r])].numpy())) for r in range(self.world_size)]

    def release_peers(self, error: BaseException) -> None:
        """Run the ``on_failure`` callbacks (each at most once per error): this rank failed, and peers may be
        waiting for it in collectives that carry no error flag."""
        if getattr(error, _RELEASED, False):
            return
        for callback in self.on_failure:
            try:
                callback(error)
            except Exception as exc:  # noqa: BLE001 - the agreement must still run; the error is what matters
                log.debug("rank %d: releasing its peers failed: %s", self.rank, exc)
        setattr(error, _RELEASED, True)

    def _fail(self, error: BaseException | None) -> None:
        mine = None if error is None else [one_line(error), is_peer_failure(error)]
        reports = self.gather_objects(mine)
        failed = [r for r, m in enumerate(reports) if m is not None]
        # The rank to name: the first that failed for a reason of its own, not because a peer went away.
        first = next((r for r in failed if not reports[r][1]), failed[0])
        if error is not None and (first == self.rank or not reports[self.rank][1]):
            setattr(error, _SYNCED, True)
            raise error
        exc = RankFailedError(f"rank {first} of {self.world_size} failed, so every rank stopped and nothing was "
                              f"written: {reports[first][0]}")
        setattr(exc, _SYNCED, True)
        raise exc

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer left it (a closed connection, a
    timeout): what a rank sees when another rank fails inside a sharded forward or backward."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("gloo" in text or "Connection closed by peer" in text)


class SingleProcess(Comm):
    """The one rank of a single-process fit: every collective is the identity, a failure raises as is.

    With one rank, ``chunk`` is the whole padded flat space: callers may pass the same buffer as
    ``out`` and ``local`` (or ``full``), and the gather and scatter cost nothing.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__(rank=0, world_size=1, device=torch.device(device))

    def all_gather(self, out: torch.Tensor, local: torch.Tensor) -> None:
        if out.data_ptr() != local.data_ptr():
            out.copy_(local)

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> None:
        if out.data_ptr() != full.data_ptr():
            out.copy_(full)

    def sum(self, t: torch.Tensor, error: BaseException | None = None) -> torch.Tensor:
        if error is not None:
            raise error
        return t.detach().clone()

    def broadcast_object(self, obj: object) -> object:
        # The same JSON round trip as several ranks: one rank returns what every rank would.
        return json.loads(json.dumps(obj))

    def gather_objects(self, obj: object) -> list:
        return [json.loads(json.dumps(obj))]


def init(device: torch.device) -> Comm:
    """Join (or start) the process group; a :class:`SingleProcess` when there is only one rank.

    Uses an existing default group when the caller already initialised one (tests, user scripts);
    otherwise torchrun's env vars (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...). The backend is NCCL
    for CUDA devices and gloo for CPU.
    """
    collective_device = device if device.type == "cuda" else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world < 2:
            return SingleProcess(collective_device)
        return Comm(dist.get_rank(), world, collective_device)
    if not launched_by_torchrun():
        return SingleProcess(collective_device)
    if not dist.is_available():
        raise TwamergeError("this torch build has no torch.distributed; run a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"backend": backend, "timeout": TIMEOUT}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return Comm(dist.get_rank(), dist.get_world_size(), collective_device, owns_group=True)


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def quiet_other_ranks(argv: list[str]) -> bool:
    """Under torchrun, make every rank but 0 print nothing but errors: ``-q`` for the CLI, stdout to devnull.

    Called by ``python -m twamerge`` before the CLI parses ``argv`` (modified in place). Returns
    whether this process was silenced.
    """
    if not launched_by_torchrun() or os.environ.get("RANK") == "0":
        return False
    argv.insert(1, "-q")
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return True
