"""The quantized-basis layout, defined once, and the argument checks every backend shares.

A basis ``P`` has ``R`` rows (directions) and ``D`` columns (flat parameters). ``D`` is a multiple of
``group_size`` and ``group_size`` a multiple of 8, so a group always starts on a byte boundary.

Packed codes (``bits`` in 1, 2, 4, 8)
    ``codes``  uint8   [R, D * bits // 8]
    ``scales`` float32 [R, D // group_size]
    ``zeros``  float32 [R, D // group_size]   (the group minimum: an offset in value units)

    Column ``j`` of row ``i`` lives in byte ``j * bits // 8`` of that row, at bit offset
    ``(j % (8 // bits)) * bits`` (least significant bits first). With ``q`` the code,
    ``P[i, j] ~= zeros[i, g] + scales[i, g] * q`` where ``g = j // group_size``.

    Quantization of a group with minimum ``lo`` and maximum ``hi`` (asymmetric min/max):
        scale = (hi - lo) / (2**bits - 1)
        inv   = 1 / scale            (0 when scale == 0, so a constant group codes to 0 exactly)
        q     = clamp(floor((x - lo) * inv + 0.5), 0, 2**bits - 1)
    Every backend computes these expressions in this order in float32, which is what lets the
    tests compare codes exactly.

Float storage (``bits`` in 16, 32)
    ``codes``  float16 / float32 [R, D];  ``scales`` and ``zeros`` are empty float32 [R, 0].

Blocks
    ``group_block`` int32 [D // group_size] gives the block id of every group; blocks are
    contiguous runs of groups in ascending order (non-decreasing ids; a block never shares a
    group with another).
"""

from __future__ import annotations

import torch

PACKED_BITS = (1, 2, 4, 8)
FLOAT_BITS = (16, 32)
SUPPORTED_BITS = PACKED_BITS + FLOAT_BITS
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise ValueError(f"group_size={group_size!r} must be a positive multiple of 8")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; expected one of {names}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} with shape {tuple(t.shape)} is not contiguous; call .contiguous() first")


def storage_dtype(bits: int) -> torch.dtype:
    """dtype of ``codes`` for a bit width."""
    check_bits(bits)
    return {16: torch.float16, 32: torch.float32}.get(bits, torch.uint8)


def codes_shape(rows: int, cols: int, bits: int) -> tuple[int, int]:
    return (rows, cols) if bits in FLOAT_BITS else (rows, cols * bits // 8)


def n_cols_of(codes: torch.Tensor, bits: int) -> int:
    """Number of basis columns ``D`` held by ``codes``."""
    return codes.shape[1] if bits in FLOAT_BITS else codes.shape[1] * 8 // bits


def check_basis(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> tuple[int, int]:
    """Validate a stored basis; returns ``(R, D)``."""
    check_bits(bits)
    check_group_size(group_size)
    check_dtype("codes", codes, (storage_dtype(bits),))
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [R, cols]; got shape {tuple(codes.shape)}")
    rows, cols = codes.shape[0], n_cols_of(codes, bits)
    if cols % group_size:
        raise ValueError(f"basis has {cols} columns, not a multiple of group_size={group_size}")
    n_groups = 0 if bits in FLOAT_BITS else cols // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_dtype(name, t, (torch.float32,))
        if tuple(t.shape) != (rows, n_groups):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(rows, n_groups)} for bits={bits}")
    for name, t in (("codes", codes), ("scales", scales), ("zeros", zeros)):
        check_contiguous(name, t)
    return rows, cols


def check_group_block(group_block: torch.Tensor, cols: int, group_size: int) -> None:
    check_dtype("group_block", group_block, (torch.int32,))
    if tuple(group_block.shape) != (cols // group_size,):
        raise ValueError(
            f"group_block has shape {tuple(group_block.shape)}; expected ({cols // group_size},) "
            f"= D / group_size for D={cols}"
        )
    check_contiguous("group_block", group_block)


def check_rows_contiguous(name: str, t: torch.Tensor) -> None:
    """A 2-D [K, n] input whose rows are contiguous (column stride 1); the rows may lie apart (a column
    slice of a wider tensor)."""
    if isinstance(t, Rows):
        return  # each row was checked when the Rows was made
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} with shape {tuple(t.shape)} is not contiguous along its rows; call .contiguous() first")


def check_same_device(anchor_name: str, anchor: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but {anchor_name} is on {anchor.device}; move them to one device")


class Rows:
    """K equal-length 1-D tensors taken as the rows of a ``[K, n]`` input of ``gram`` / ``orth_quantize``
    without stacking them: the candidates' tensors where they lie (memory maps of their files). The C
    kernels read the rows in place through K pointers; every other backend gets ``stack()``.

    ``rows[:, a:b]`` slices the columns (views); ``rows[k]`` is row ``k``.
    """

    def __init__(self, rows):
        self.rows = [r.reshape(-1) for r in rows]
        if not self.rows:
            raise ValueError("Rows needs at least one row")
        first = self.rows[0]
        for r in self.rows:
            if r.shape != first.shape or r.dtype != first.dtype or r.device != first.device:
                raise ValueError(f"rows differ: {tuple(r.shape)} {r.dtype} {r.device} against "
                                 f"{tuple(first.shape)} {first.dtype} {first.device}")
            check_contiguous("a row", r)
        self.dtype, self.device = first.dtype, first.device
        self.shape = torch.Size((len(self.rows), first.shape[0]))

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return 2

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.rows[key]
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice):
            return Rows([r[key[1]] for r in self.rows])
        raise TypeError(f"Rows takes rows[k] or rows[:, a:b]; got {key!r}")

    def stack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows as one ``[K, n]`` tensor (a copy; into ``out`` when given)."""
        if out is None:
            return torch.stack(self.rows)
        for o, r in zip(out, self.rows):
            o.copy_(r)
        return out


def stacked(x):
    """``x`` as a tensor: :meth:`Rows.stack` of a :class:`Rows`, else ``x`` itself."""
    return x.stack() if isinstance(x, Rows) else x


# One argument check per op, shared by the torch reference and the Triton launcher: both raise the
# same errors for the same bad input, before any work or launch.


def check_gram_args(x: torch.Tensor) -> tuple[int, int]:
    """Returns ``(K, n)``."""
    check_dtype("x", x, INPUT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [K, n]; got shape {tuple(x.shape)}")
    check_rows_contiguous("x", x)
    return x.shape[0], x.shape[1]


def check_orth_quantize_args(x: torch.Tensor, mean: torch.Tensor, transform: torch.Tensor, bits: int,
                             group_size: int) -> tuple[int, int, int]:
    """Returns ``(K, n, R)``."""
    check_bits(bits)
    check_group_size(group_size)
    check_dtype("x", x, INPUT_DTYPES)
    check_dtype("mean", mean, (torch.float32,))
    check_dtype("transform", transform, (torch.float32,))
    if x.dim() != 2 or transform.dim() != 2 or transform.shape[1] != x.shape[0]:
        raise ValueError(
            f"shapes do not chain: x {tuple(x.shape)} must be [K, n] and transform {tuple(transform.shape)} [R, K]"
        )
    k, n = x.shape
    if tuple(mean.shape) != (n,):
        raise ValueError(f"mean has shape {tuple(mean.shape)}; expected ({n},)")
    if n % group_size:
        raise ValueError(f"x has {n} columns, not a multiple of group_size={group_size}; pad the chunk")
    check_rows_contiguous("x", x)
    for name, t in (("mean", mean), ("transform", transform)):
        check_contiguous(name, t)
    check_same_device("x", x, mean=mean, transform=transform)
    return k, n, transform.shape[0]


def check_orth_quantize_out(out, rows: int, n: int, bits: int, group_size: int, device: torch.device):
    """Validate optional ``out = (codes, scales, zeros)`` for ``orth_quantize``: the layout's dtypes and
    shapes for ``rows`` x ``n``, each contiguous along its rows (column slices of a whole basis are
    fine), on ``device``. Returns ``out`` as a tuple, or None."""
    if out is None:
        return None
    codes, scales, zeros = out
    n_groups = 0 if bits in FLOAT_BITS else n // group_size
    check_dtype("out codes", codes, (storage_dtype(bits),))
    for name, t, shape in (("out codes", codes, codes_shape(rows, n, bits)), ("out scales", scales, (rows, n_groups)),
                           ("out zeros", zeros, (rows, n_groups))):
        if name != "out codes":
            check_dtype(name, t, (torch.float32,))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
        check_rows_contiguous(name, t)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to one device")
    return codes, scales, zeros


def check_combine_args(mean: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       beta: torch.Tensor, group_block: torch.Tensor, bits: int, group_size: int,
                       out: torch.Tensor | None) -> tuple[int, int]:
    """Returns ``(R, D)``; ``out`` is checked when given."""
    rows, cols = check_basis(codes, scales, zeros, bits, group_size)
    check_group_block(group_block, cols, group_size)
    check_dtype("mean", mean, (torch.float32,))
    check_dtype("beta", beta, (torch.float32,))
    if tuple(mean.shape) != (cols,):
        raise ValueError(f"mean has shape {tuple(mean.shape)}; expected ({cols},)")
    if beta.dim() != 2 or beta.shape[1] != rows:
        raise ValueError(f"beta has shape {tuple(beta.shape)}; expected [n_blocks, {rows}]")
    check_contiguous("mean", mean)
    check_contiguous("beta", beta)
    if out is not None:
        check_dtype("out", out, INPUT_DTYPES)
        if tuple(out.shape) != (cols,):
            raise ValueError(f"out has shape {tuple(out.shape)}; expected ({cols},)")
        check_contiguous("out", out)
    check_same_device("mean", mean, codes=codes, scales=scales, zeros=zeros, beta=beta, group_block=group_block,
                      out=out)
    return rows, cols


def check_project_args(grad: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_block: torch.Tensor, bits: int, group_size: int) -> tuple[int, int]:
    """Returns ``(R, D)``."""
    rows, cols = check_basis(codes, scales, zeros, bits, group_size)
    check_group_block(group_block, cols, group_size)
    check_dtype("grad", grad, INPUT_DTYPES)
    if tuple(grad.shape) != (cols,):
        raise ValueError(f"grad has shape {tuple(grad.shape)}; expected ({cols},)")
    check_contiguous("grad", grad)
    check_same_device("grad", grad, codes=codes, scales=scales, zeros=zeros, group_block=group_block)
    return rows, cols
