"""Inputs, fixtures and comparison rules shared by the kernel tests (tests/test_kernels_<op>.py).

Each op (gram, orth_quantize, combine, project) has a Triton kernel and a torch reference of the same
signature. On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest before triton is
imported); with TRITON_INTERPRET=0 and a CUDA device the same tests run compiled on the GPU.
Comparison rules:

* packed bytes, codes and float-storage codes: exact, whenever the basis ``P`` is computed without
  rounding (integer candidates, dyadic centre and transform), because every backend then applies
  layout.py's quantization expressions to identical floats;
* codes from arbitrary data: ``|dcode| <= 1`` (matmul summation order may move a value across a
  rounding boundary), with the dequantized error checked against half a step;
* scales, zeros and every float output: ``helpers.assert_close`` with ``TOLERANCES``.

A test module takes the two fixtures below with ``device = pytest.fixture(kernel_device, name="device")``
and ``poison_empty = pytest.fixture(poison_kernel_empty, autouse=True, name="poison_empty")``: declared in
the module itself, so a reader sees that every test there runs on poisoned ``torch.empty``.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from helpers import TOLERANCES, PoisonedTorch
from twamerge.kernels import dispatch, reference
from twamerge.kernels.layout import FLOAT_BITS

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable; kernels cannot be tested")
KERNEL_MODULES = ("gram", "orth_quantize", "combine", "project")


def dtype_id(dtype) -> str:
    return "default" if dtype is None else str(dtype).removeprefix("torch.")


def triton_ops():
    """The Triton launcher module of every op, by op name (imported here, after conftest set the interpreter)."""
    return {name: importlib.import_module(f"twamerge.kernels.triton_{name}") for name in KERNEL_MODULES}


def kernel_device():
    """Where the kernels run: CPU under the interpreter, else CUDA, else skip."""
    if dispatch.interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")


def poison_kernel_empty(monkeypatch):
    """Every ``torch.empty`` in the kernel modules and the reference returns NaN / 0xA5 garbage, so an
    element a kernel forgets to write shows up as a mismatch."""
    names = ["reference"] + (list(KERNEL_MODULES) if HAS_TRITON else [])
    for name in names:
        module = name if name == "reference" else f"triton_{name}"
        monkeypatch.setattr(importlib.import_module(f"twamerge.kernels.{module}"), "torch", PoisonedTorch())
    yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_inputs(k: int, r: int, n: int, dtype: torch.dtype, seed: int):
    """Integer candidates, a dyadic centre and a dyadic transform: P = T (x - m) is exact in float32 in
    any summation order (every partial sum is a multiple of 1/16 below 2**13)."""
    g = gen(seed)
    x = torch.randint(-8, 9, (k, n), generator=g).to(dtype)
    mean = torch.round(x.float().mean(dim=0) * 4) / 4
    transform = torch.randint(-4, 5, (r, k), generator=g).float() / 4
    return x, mean, transform


def block_ids(n_groups: int, kind: str) -> tuple[torch.Tensor, int]:
    """group_block for a block layout: one block, one block per group, or uneven runs."""
    if n_groups == 0:
        return torch.zeros(0, dtype=torch.int32), 1
    if kind == "global":
        return torch.zeros(n_groups, dtype=torch.int32), 1
    if kind == "per-group":
        return torch.arange(n_groups, dtype=torch.int32), n_groups
    # Uneven runs of 1, 2, 3, ... groups.
    ids, b = [], 0
    while len(ids) < n_groups:
        ids.extend([b] * (b + 1))
        b += 1
    return torch.tensor(ids[:n_groups], dtype=torch.int32), b


def random_basis(r: int, n: int, bits: int, group_size: int, seed: int):
    p = torch.randn(r, n, generator=gen(seed))
    return reference.quantize_torch(p, bits, group_size)


def basis_args(bits=4, gs=8, ng=4, r=2):
    """A small valid basis (codes, scales, zeros) and its one-block group_block, for the argument checks."""
    codes, scales, zeros = random_basis(r, gs * ng, bits, gs, seed=0)
    return codes, scales, zeros, torch.zeros(ng, dtype=torch.int32)


# (R, group_size, n_groups, block layout) for combine and project: tiny, 63 and 257 groups, odd group
# sizes, many small blocks.
BASIS_SHAPES = [
    (1, 8, 1, "global"),
    (2, 8, 63, "per-group"),
    (3, 32, 257, "runs"),
    (5, 128, 3, "runs"),
    (4, 24, 33, "per-group"),
    (1, 8, 1100, "runs"),
]
BASIS_IDS = [f"R{r}-G{gs}-NG{ng}-{kind}" for r, gs, ng, kind in BASIS_SHAPES]


def to_device(device, *tensors):
    return [t.to(device) for t in tensors]


def unpacked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.float() if bits in FLOAT_BITS else reference.unpack_codes_torch(codes, bits).int()


def sum_atol(ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    # Sums of many products: float32 rounding error grows with the size of the result, so the absolute
    # tolerance is the table's value scaled by the largest reference magnitude.
    return TOLERANCES[dtype][0] * max(1.0, ref.abs().max().item())
