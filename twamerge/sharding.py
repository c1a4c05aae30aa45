"""The model sharded over the ranks (``--shard-model``): FSDP2 composed with the sharded basis.

With ``--shard-model on`` (``auto``: when there is more than one rank) no rank holds the whole model,
its gradients or its basis; each holds about 1/N of every one of them (docs/how-it-works.md,
"Distributed fit"):

- **Build.** The model is built with its parameters on the meta device (:func:`parameters_on_meta`;
  buffers are built for real: they are small, and some are computed rather than stored), sharded
  with ``fully_shard`` by :func:`shard_units`'s rule, and each rank allocates only its rows of every
  parameter; their values come from the subspace's mean (``ShardedBinding.load_point`` at beta = 0).
- **Rows.** FSDP2 shards every parameter on its first dimension: rank r of N holds rows
  ``[r c, min((r + 1) c, n0))`` with ``c = ceil(n0 / N)``, none when ``r c >= n0`` (a parameter with
  fewer rows than ranks). Those rows are a contiguous piece of the flattened parameter, so of the flat
  space: the rank's owned columns (``subspace.Columns``), stored widened to whole quantization groups
  for its mean and basis (the layout starts every tensor at a whole group, ``make_layout(pad_tensors)``).
  FSDP cannot shard a 0-d parameter: those few stay whole on every rank (see ``_Piece``).
- **Step.** combine writes ``w = m + P~^T beta`` for the rank's columns into a local buffer, whose
  rows are copied into the parameter shards; forward and backward run FSDP's all-gathers and
  reduce-scatters on a process group of their own (:class:`ModelGroup`), summing the gradients over
  ranks rather than averaging them (the loss is one definition for 1 and N ranks: ``fit._step``). As
  each parameter's gradient shard arrives (a post-accumulate-grad hook) it is copied into the local
  buffer and dropped, and project reads the local buffer. So a rank holds 1/N of the weights, the
  local buffer, the mean and the basis, and the gradients of only the FSDP unit being reduced.
- **Scoring.** Every rank runs every forward pass (each holds collectives): scoring pads a rank
  with fewer batches with forwards whose results are dropped (:func:`balance_forwards`), and runs
  under ``no_grad``, not ``inference_mode`` (tensors FSDP allocates under inference mode cannot be
  updated by a later training step).
- **Merge and write.** A rank merges its rows of every parameter from the files (float64, as
  ``merge.linear_merge``: the same numbers), into its shards; rank 0 writes the checkpoint tensor by
  tensor, gathering one tensor's rows at a time (``shard_write``).

One process with ``--shard-model on`` is a world of one and runs the same code (FSDP over a group of one).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .distributed import TIMEOUT, Comm
from .errors import TwamergeError
from .merge import first_candidate, weighted_sum
from .subspace import Columns, FlatLayout, Subspace

log = logging.getLogger(__name__)


# The rows of a parameter this rank holds, recorded on the parameter (see copy_into).
_ROWS = "_twamerge_rows"

# Containers whose children are the units rather than the container itself (see shard_units).
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def enabled(setting: str, world_size: int) -> bool:
    """``--shard-model``: ``on``, ``off``, or ``auto`` (on when there is more than one rank)."""
    if setting not in ("auto", "on", "off"):
        raise TwamergeError(f"--shard-model {setting!r}: expected auto, on or off")
    return setting == "on" or (setting == "auto" and world_size > 1)


# -- building on the meta device ---------------------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build a model with every parameter on the meta device: no memory, no initialisation.

    Each parameter is moved to the meta device as it is registered (a layer's weight is allocated
    empty by its constructor and moved before the layer initialises it, so at most one parameter is
    ever allocated). Buffers stay real: some are computed at construction and saved nowhere
    (rotary frequencies, position ids), and they are small.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units of their own, before the root takes every other parameter.

    The rule: the transformer blocks when the model names their class (Hugging Face models list them
    in ``_no_split_modules``: ``LlamaDecoderLayer``, ``GPT2Block``...); else every child of the root
    that holds parameters, looking through containers (``Sequential``, ``ModuleList``, ``ModuleDict``)
    to their children, so an MLP's layers and a CNN's stages are units. A module holding a parameter
    that is also reachable from outside it (tied weights: an embedding and an output layer) is left
    to the root, since FSDP needs a shared parameter in one unit. A unit's parameters are gathered
    whole for its forward and backward: the peak holds about two units, so the smaller the units the
    closer a rank's memory to 1/N.
    """
    holders = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)

    def self_contained(unit: nn.Module) -> bool:
        inside = Counter(id(p) for m in unit.modules() for p in m._parameters.values() if p is not None)
        return bool(inside) and all(holders[pid] == n for pid, n in inside.items())

    names = set(getattr(model, "_no_split_modules", None) or [])
    units: list[nn.Module] = []
    if names:
        units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    else:
        def walk(module: nn.Module) -> None:
            for child in module.children():
                if isinstance(child, _CONTAINERS):
                    walk(child)
                elif any(True for _ in child.parameters()):
                    units.append(child)

        walk(model)
    return [u for u in units if self_contained(u)]


def called_units(model: nn.Module, units: list[nn.Module], inputs: dict | None) -> list[nn.Module]:
    """``units`` less those whose parameters the model uses outside their own forward (a parent reading
    ``self.fc1.weight`` instead of calling ``self.fc1``): FSDP gathers a unit's parameters when the unit
    is called, so those must stay with the root. Found by one forward of a copy of the model on the meta
    device (nothing computed, nothing allocated) watching every operation's parameters; when that
    forward cannot run on the meta device (an operation that reads values), ``units`` is kept."""
    if not units or inputs is None:
        return units
    import copy

    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    from .models import call_model

    names = {id(m): n for n, m in model.named_modules()}
    try:
        twin = copy.deepcopy(model).to("meta")
    except Exception as exc:  # noqa: BLE001 - a model that cannot be copied keeps the rule's units
        log.debug("the FSDP units are not checked: the model cannot be copied (%s)", exc)
        return units
    owner = {id(p): i for i, u in enumerate(units) for p in twin.get_submodule(names[id(u)]).parameters()}
    active: list[int] = []
    outside: set[int] = set()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for leaf in tree_leaves((args, kwargs or {})):
                i = owner.get(id(leaf))
                if i is not None and i not in active:
                    outside.add(i)
            return func(*args, **(kwargs or {}))

    hooks = []
    for i, unit in enumerate(units):
        twin_unit = twin.get_submodule(names[id(unit)])
        hooks.append(twin_unit.register_forward_pre_hook(lambda m, a, i=i: active.append(i)))
        hooks.append(twin_unit.register_forward_hook(lambda m, a, o: active.pop()))
    try:
        with torch.no_grad(), Watch():
            call_model(twin, {k: v.to("meta") for k, v in inputs.items()})
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.debug("the FSDP units are not checked: the model's forward does not run on the meta device (%s)", exc)
        return units
    finally:
        for hook in hooks:
            hook.remove()
    if outside:
        log.info("%d module(s) are not FSDP units of their own: the model uses their parameters outside their "
                 "forward (%s)", len(outside), ", ".join(names[id(units[i])] for i in sorted(outside))[:200])
    return [u for i, u in enumerate(units) if i not in outside]


def _params_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating parameter ``dtype`` (buffers keep theirs); tied parameters stay tied."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None or not p.is_floating_point():
                continue
            if id(p) not in done:
                done[id(p)] = p if p.dtype == dtype else nn.Parameter(p.detach().to(dtype), requires_grad=True)
            module._parameters[name] = done[id(p)]


# -- the process group of the model's collectives ------------------------------------------------------


def _socket_fds() -> set[int]:
    """This process's open socket descriptors (Linux; empty elsewhere)."""
    found = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in names:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                found.add(int(fd))
        except OSError:
            pass
    return found


class ModelGroup:
    """The process group FSDP's collectives run on, apart from the fit's own (``distributed.Comm``).

    The fit's agreements (an error flag riding on every collective of its own) need all ranks to
    reach the same collectives in order. FSDP's collectives run inside forward and backward, where a
    rank that fails leaves its peers blocked in one. On its own group they can be released without
    disturbing the fit's: the failing rank breaks this group (:meth:`release`) before it joins the
    agreement. With gloo that closes its connections of this group, so a peer blocked on it gets an
    error at once ("Connection closed by peer"), breaks its own, and joins the agreement. NCCL offers
    no way to end a peer's wait: there a failure inside forward or backward reaches the other ranks
    after this group's timeout (``distributed.TIMEOUT``), and torchrun then stops the job.

    With one rank and no process group yet (one process with ``--shard-model on``), a private
    in-memory group of one is made, and destroyed by :meth:`close`.
    """

    def __init__(self, comm: Comm, device: torch.device):
        from torch.distributed.device_mesh import DeviceMesh

        self.device = device
        self.made_default = False
        self.broken = False
        backend = "nccl" if device.type == "cuda" else "gloo"
        if comm.world_size == 1 and not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.made_default = True
        before = _socket_fds()
        if comm.world_size > 1:
            self.group = dist.new_group(backend=backend, timeout=TIMEOUT)
        else:
            self.group = dist.group.WORLD
        # This group's connections: the sockets it opened (its listening socket is left alone: gloo
        # aborts the process when that one is shut).
        self.sockets = [fd for fd in sorted(_socket_fds() - before) if _is_connected(fd)]
        self.mesh = DeviceMesh.from_group(self.group, device.type)

    def release(self, error: BaseException | None = None) -> None:
        """Break this group so that peers blocked in its collectives get an error (see the class docstring)."""
        if self.broken:
            return
        self.broken = True
        for fd in self.sockets:
            try:
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                s.close()

    def close(self) -> None:
        try:
            if self.group is not dist.group.WORLD and not self.broken and dist.is_initialized():
                dist.destroy_process_group(self.group)
        finally:
            if self.made_default and dist.is_initialized():
                dist.destroy_process_group()


def _is_connected(fd: int) -> bool:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and s.type == socket.SOCK_STREAM
    except OSError:
        return False
    finally:
        s.close()


# -- the binding --------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """This rank's part of one merged parameter: rows ``[r0, r1)`` (of ``n0``; elements ``[r0, r1) * inner``
    of the flattened parameter), at flat columns ``[start, start + numel)`` and local columns
    ``[local, local + numel)``; ``data`` is the rank's tensor of it (the FSDP shard; the whole parameter
    for a ``replicated`` one, which every rank holds and whose Gram terms rank 0 alone adds)."""

    key: str
    index: int  # in the layout
    param: nn.Parameter
    data: torch.Tensor  # [r1 - r0, *rest], contiguous
    r0: int
    r1: int
    inner: int
    start: int
    local: int = 0
    replicated: bool = False

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * self.inner

    def flat(self) -> torch.Tensor:
        return self.data.view(-1)


def row_split(n0: int, world_size: int, rank: int) -> tuple[int, int]:
    """FSDP2's rows of a parameter with ``n0`` rows on ``rank``: ``[r c, min((r + 1) c, n0))``, ``c = ceil(n0 / N)``."""
    c = -(-n0 // world_size)
    return min(rank * c, n0), min((rank + 1) * c, n0)


class ShardedBinding:
    """The model sharded by FSDP2, bound to the fit: what :class:`twamerge.fit.FlatBinding` is for a replicated
    model (the same methods), with 1/N of the memory per rank. See the module docstring.

    Args:
        model: built by :func:`parameters_on_meta` (or real: it is sharded all the same).
        layout: from ``make_layout(..., pad_tensors=True)``; its names are the model's merged parameters.
        comm: the ranks.
        dtype: the parameters' storage dtype (``pipeline.flat_dtype``: float32, or bfloat16).
        amp: the compute dtype (``--precision``): FSDP gathers the weights in it and reduces the
            gradients in float32 (``MixedPrecisionPolicy``); None: no mixed precision.
        aliases: the other names of tied parameters (``ModelKeys.alias_of``): a merge gives them the rows
            of the parameter they name.
        inputs: one batch of the model's inputs, to check the FSDP units (:func:`called_units`).
    """

    sharded = True

    def __init__(self, model: nn.Module, layout: FlatLayout, device: torch.device, comm: Comm,
                 dtype: torch.dtype = torch.float32, amp: torch.dtype | None = None,
                 aliases: dict[str, str] | None = None, inputs: dict | None = None):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model, self.layout, self.device, self.comm, self.dtype = model, layout, device, comm, dtype
        self.aliases = dict(aliases or {})  # other names of tied parameters -> their merged key
        self.group = ModelGroup(comm, device)
        comm.on_failure.append(self.group.release)
        try:
            _params_to(model, dtype)
            for p in model.parameters():
                p.requires_grad_(True)  # every merged parameter has a gradient, as with FlatBinding
            # FSDP cannot shard 0-d parameters: they stay whole on every rank.
            scalars = {p for p in model.parameters() if p.dim() == 0}
            policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp is not None else None
            # Every forward gathers the weights afresh, the root's too (FSDP keeps the root's gathered after a
            # forward by default): the fit writes new weights into the shards between forwards.
            kwargs = {"mesh": self.group.mesh, "ignored_params": scalars, "reshard_after_forward": True}
            if policy is not None:
                kwargs["mp_policy"] = policy
            units = called_units(model, shard_units(model), inputs)
            for unit in units:
                fully_shard(unit, **kwargs)
            fully_shard(model, **kwargs)
            for module in model.modules():
                if hasattr(module, "set_force_sum_reduction_for_comms"):
                    # Summed over ranks, not averaged (gloo has no PREMUL_SUM: the divide factor 1 needs sum
                    # reductions); both are set per FSDP module, they do not recurse.
                    module.set_force_sum_reduction_for_comms(True)
                    module.set_gradient_divide_factor(1.0)
            self._materialise(model, device)
            self.pieces = self._pieces()
            self.columns = self._columns()
            starts = self.columns.starts()
            span_of = {a: s for (a, _), s in zip(self.columns.spans, starts)}
            g = layout.group_size
            for piece in self.pieces:
                if piece.numel:
                    piece.local = span_of[piece.start // g * g] + piece.start % g
            # The weights of the rank's columns (combine's output) and then its gradients (project's input).
            self.local = torch.zeros(self.columns.n_local, dtype=dtype, device=device)
            self._of_param = {id(piece.param): piece for piece in self.pieces if not piece.replicated}
            self._hooks = [piece.param.register_post_accumulate_grad_hook(self._take_grad)
                           for piece in self.pieces if not piece.replicated]
            self._rows = {piece.key: piece for piece in self.pieces}
        except BaseException:
            comm.on_failure.remove(self.group.release)
            self.group.close()
            raise
        log.info("model sharded over %d rank(s): %d FSDP units and the root; this rank holds %d of %d columns",
                 comm.world_size, len(units), sum(p.numel for p in self.pieces), layout.n_params)

    # -- set-up ---------------------------------------------------------------------------------------

    @staticmethod
    def _materialise(model: nn.Module, device: torch.device) -> None:
        """Allocate every rank's shards on ``device`` (their values come later); buffers keep theirs."""
        buffers = [(m, name, b.to(device)) for m in model.modules() for name, b in m._buffers.items()
                   if b is not None]
        model.to_empty(device=device)
        for module, name, buffer in buffers:
            module._buffers[name] = buffer

    def _pieces(self) -> list[_Piece]:
        layout, comm = self.layout, self.comm
        pieces = []
        for i, key in enumerate(layout.names):
            param = self.model.get_parameter(key)
            shape = layout.shapes[i]
            local = getattr(param, "_local_tensor", None)
            if local is None:  # a 0-d parameter, whole on every rank
                pieces.append(_Piece(key, i, param, param.data, 0, 1, math.prod(shape), layout.offsets[i],
                                     replicated=True))
                continue
            n0 = shape[0]
            inner = math.prod(shape[1:])
            r0, r1 = row_split(n0, comm.world_size, comm.rank)
            if tuple(local.shape) != (r1 - r0, *shape[1:]) or not local.is_contiguous():
                raise AssertionError(f"{key}: FSDP holds a shard of shape {tuple(local.shape)} on rank {comm.rank}; "
                                     f"expected rows [{r0}, {r1}) of {shape} (this torch shards differently)")
            setattr(param, _ROWS, (r0, r1))
            pieces.append(_Piece(key, i, param, local, r0, r1, inner, layout.offsets[i] + r0 * inner))
        return pieces

    def _columns(self) -> Columns:
        """The rank's owned columns (its rows of every parameter; rank 0's for replicated ones) and their spans,
        widened to whole quantization groups."""
        g = self.layout.group_size
        spans, owned = [], []
        for piece in self.pieces:
            if piece.numel == 0:
                continue
            a, z = piece.start, piece.start + piece.numel
            spans.append((a // g * g, -(-z // g) * g))
            if not piece.replicated or self.comm.is_main:
                owned.append((a, z))
        return Columns(tuple(spans), tuple(owned))

    # -- the fit's step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def load_point(self, subspace: Subspace, beta: torch.Tensor, comm: Comm | None = None) -> None:
        """Make the model's merged parameters ``mean + P~^T beta``: combine into the local buffer, copied into
        the shards."""
        subspace.combine(beta.to(self.local.device), out=self.local)
        self._to_shards(self.local)

    def _to_shards(self, values: torch.Tensor) -> None:
        for piece in self.pieces:
            piece.flat().copy_(values[piece.local: piece.local + piece.numel])

    def zero_grad(self) -> None:
        """Clear the local buffer for the gradients the coming backward brings (``_take_grad``)."""
        self.local.zero_()
        for piece in self.pieces:
            piece.param.grad = None

    @torch.no_grad()
    def _take_grad(self, param: nn.Parameter) -> None:
        """FSDP has reduced ``param``'s gradient shard: keep it in the local buffer, free FSDP's copy."""
        piece = self._of_param[id(param)]
        grad = param.grad._local_tensor if hasattr(param.grad, "_local_tensor") else param.grad
        self.local[piece.local: piece.local + piece.numel].copy_(grad.reshape(-1))
        param.grad = None

    def coefficient_grad(self, subspace: Subspace, comm: Comm | None = None) -> torch.Tensor:
        """This rank's part of ``dL/dbeta`` [B, R]: project of the gradient shards (summed over ranks by the caller).

        A whole (0-d) parameter's gradient is this rank's part of it (each rank backpropagates its rows
        of the batch): every rank adds it, and the sum over ranks is the whole gradient.
        """
        with torch.no_grad():
            for piece in self.pieces:
                if piece.replicated and piece.param.grad is not None:
                    self.local[piece.local: piece.local + piece.numel].copy_(piece.param.grad.reshape(-1))
                    piece.param.grad = None
        return subspace.project(self.local)

    def check_grads_in_place(self) -> None:
        """Nothing to check: the gradients are copied out of FSDP's buffers as they arrive."""

    def buffer_bytes(self) -> int:
        """Bytes of this rank's weight shards and of its local buffer (weights, then gradients)."""
        shards = sum(piece.data.numel() * piece.data.element_size() for piece in self.pieces)
        return shards + self.local.numel() * self.local.element_size()

    def describe(self) -> dict:
        """This rank's share, for the report."""
        return {"columns": self.columns.n_local, "owned_columns": sum(b - a for a, b in self.columns.owned),
                "shard_model": True}

    def close(self) -> None:
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        if self.group.release in self.comm.on_failure:
            self.comm.on_failure.remove(self.group.release)
        self.group.close()

    # -- merges -----------------------------------------------------------------------------------------

    def merge(self, cs, weights, *, out_dtype: torch.dtype | None = None,
              progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, torch.Tensor]:
        """``sum_k w_k c_k`` of every key, this rank's rows of the sharded parameters (and their tied
        aliases), every other key whole; the parameters' rows land in their shards when the dtype is
        theirs (else they are returned, and loading the merge casts them in).

        ``weights``: K floats, or ``key -> K floats``. Returns ``{key: tensor}`` in ``cs.keys`` order;
        :meth:`rows_of` says which entries are rows.
        """
        from .methods import check_weights

        k = len(cs)
        fixed = None if callable(weights) else check_weights(weights, k)
        order = cs.keys_in_file_order()
        keys = progress(order) if progress is not None else order
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            w = fixed if fixed is not None else check_weights(weights(key), k, key)
            if not cs.is_float(key):
                out[key] = first_candidate(cs, key, w)[0]
                continue
            dtype = out_dtype or cs.dtype(key)
            piece = self.rows_of(key)
            # Into the parameter itself when it is the key's own (not a tied alias's) and of this dtype.
            into = piece is not None and piece.key == key and piece.data.dtype == dtype
            if piece is None or piece.replicated:
                result = piece.data if into else torch.empty(cs.shape(key), dtype=dtype)
                out[key] = weighted_sum(cs, key, w, result)
                continue
            out[key] = piece.data if into else torch.empty((piece.r1 - piece.r0, *cs.shape(key)[1:]), dtype=dtype)
            weighted_sum(cs, key, w, out[key], piece.r0 * piece.inner, piece.r1 * piece.inner)
        close = getattr(keys, "close", None)
        if close is not None:
            close()
        return {key: out[key] for key in cs.keys}

    def rows_of(self, key: str) -> _Piece | None:
        """The piece of the merged parameter ``key`` (or of the parameter a tied alias ``key`` names); None for
        keys that are not parameters."""
        return self._rows.get(self.aliases.get(key, key))

    def trained_point(self, subspace: Subspace, beta: torch.Tensor) -> torch.Tensor:
        """The trained point ``mean + P~^T beta`` over this rank's columns (in the local buffer, free once trained)."""
        return subspace.combine(beta.to(self.local.device), out=self.local)

    def quantization_gap(self, subspace: Subspace, trained: torch.Tensor, comm: Comm) -> float:
        """``|written - trained| / |trained - centre|`` over the merged parameters: each rank's rows, summed."""
        sq = torch.zeros(2, dtype=torch.float64)
        error = None
        try:
            for piece in self.pieces:
                if piece.numel == 0 or (piece.replicated and not comm.is_main):
                    continue
                span = slice(piece.local, piece.local + piece.numel)
                real, ref, centre = piece.flat(), trained[span], subspace.mean[span]
                sq += torch.stack([(real - ref).double().square().sum(),
                                   (ref - centre).double().square().sum()]).cpu()
        except Exception as exc:
            error = exc
        gap2, moved2 = comm.sum(sq, error).tolist()
        return math.sqrt(gap2) / math.sqrt(moved2) if moved2 > 0 else 0.0


# -- loading and scoring --------------------------------------------------------------------------------


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a model's parameter or buffer, sharded or not (``evaluation.load_state``).

    A parameter sharded by FSDP takes its rows of ``value`` (the whole tensor, read lazily: a
    memory-mapped candidate's other rows are never touched) or ``value`` itself when it already is this
    rank's rows (a sharded merge). A tensor that already is the target (a view of the fit's flat buffer, a
    shard) is left as it is.
    """
    local = getattr(target, "_local_tensor", None)
    if local is None:
        if not (target.data_ptr() == value.data_ptr() and target.dtype == value.dtype):
            target.copy_(value)
        return
    if local.data_ptr() == value.data_ptr() and local.dtype == value.dtype and local.shape == value.shape:
        return
    with torch.no_grad():
        if tuple(value.shape) == tuple(target.shape):
            # The rows ShardedBinding recorded (the DTensor's own mesh may name a group of an earlier fit:
            # torch caches meshes by their ranks).
            r0, r1 = getattr(target, _ROWS)
            local.copy_(value[r0:r1])
        elif tuple(value.shape) == tuple(local.shape):
            local.copy_(value)
        else:
            raise ValueError(f"a tensor of shape {tuple(value.shape)} fits neither the parameter "
                             f"{tuple(target.shape)} nor this rank's rows {tuple(local.shape)}")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` made ``model`` an FSDP module (never, when FSDP was not even imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def scoring_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """``inference_mode`` for scoring, ``no_grad`` for a sharded model (see the module docstring)."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def balance_forwards(model: nn.Module, data, index: torch.Tensor, batch_size: int, tokens: int | None, comm: Comm,
                     forward: Callable[[dict], object], device: torch.device) -> None:
    """Pad this rank's scoring of its share of ``index`` with forwards whose results are dropped, up to the
    batches of the rank with the most: every rank of a sharded model runs every forward pass. Nothing
    for a replicated model."""
    if comm.world_size == 1 or not is_sharded(model):
        return
    from .data import batch_rows, iter_batches

    counts = []
    for r in range(comm.world_size):
        lo, hi = _share(index.numel(), comm.world_size, r)
        counts.append(len(batch_rows(data, index[lo:hi], batch_size, None, tokens)))
    for _ in range(max(counts) - counts[comm.rank]):
        batch = next(iter_batches(data, index[:1], 1)).to(device)
        forward(batch.inputs)


def _share(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``Comm.shard``'s split of ``n`` rows, for any rank."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
