"""project: the coefficient gradient P~ g, summed per block. The Triton kernel against the torch
reference (comparison rules in tests/kernel_fixtures.py), its argument checks, and the reference's
per-block reduction. The C loops for project are tested in tests/test_native.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from kernel_fixtures import (
    BASIS_IDS,
    BASIS_SHAPES,
    basis_args,
    block_ids,
    dtype_id,
    gen,
    kernel_device,
    needs_triton,
    poison_kernel_empty,
    random_basis,
    sum_atol,
    to_device,
    triton_ops,
)
from twamerge.kernels import reference
from twamerge.kernels.layout import SUPPORTED_BITS

device = pytest.fixture(kernel_device, name="device")
poison_empty = pytest.fixture(poison_kernel_empty, autouse=True, name="poison_empty")


@needs_triton
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("r,gs,ng,kind", BASIS_SHAPES, ids=BASIS_IDS)
def test_project_parity(r, gs, ng, kind, grad_dtype, bits, device):
    n = gs * ng
    codes, scales, zeros = random_basis(r, n, bits, gs, seed=r * 5 + ng)
    group_block, n_blocks = block_ids(ng, kind)
    grad = torch.randn(n, generator=gen(ng + 1)).to(grad_dtype)
    args = to_device(device, grad, codes, scales, zeros, group_block)
    ref = reference.project_torch(*args, n_blocks, bits, gs)
    out = triton_ops()["project"].project_triton(*args, n_blocks, bits, gs)
    assert out.dtype == torch.float32 and out.shape == (n_blocks, r)
    assert_close("project", ref, out, atol=sum_atol(ref))
    again = triton_ops()["project"].project_triton(*args, n_blocks, bits, gs)
    assert torch.equal(out, again), "project is not deterministic"


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("bits3", ValueError, "bits=3"),
        ("group12", ValueError, "group_size=12"),
        ("grad-int", TypeError, "grad has dtype int32"),
        ("grad-noncontig", ValueError, "grad with shape"),
        ("grad-shape", ValueError, "grad has shape"),
        ("zeros-dtype", TypeError, "zeros has dtype float16"),
        ("group-block-shape", ValueError, "group_block has shape"),
    ],
)
def test_project_bad_input(case, exc, match):
    codes, scales, zeros, gb = basis_args()
    grad, bits, gs = torch.zeros(32), 4, 8
    if case == "bits3":
        bits = 3
    elif case == "group12":
        gs = 12
    elif case == "grad-int":
        grad = torch.zeros(32, dtype=torch.int32)
    elif case == "grad-noncontig":
        grad = torch.zeros(32, 2)[:, 0]
    elif case == "grad-shape":
        grad = torch.zeros(40)
    elif case == "zeros-dtype":
        zeros = zeros.half()
    elif case == "group-block-shape":
        gb = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(exc, match=match):
        triton_ops()["project"].project_triton(grad, codes, scales, zeros, gb, 1, bits, gs)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_rejected():
    codes, scales, zeros, gb = basis_args()
    with pytest.raises(ValueError, match="one device"):
        triton_ops()["project"].project_triton(torch.zeros(32, device="cuda"), codes, scales, zeros, gb, 1, 4, 8)


def test_reduce_groups_keeps_a_small_block_exact_beside_a_large_one():
    """Each block is summed on its own: a tiny block after 10^5 large groups keeps float32 precision."""
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(3, 100_000, generator=g) * 1e3, torch.randn(3, 8, generator=g) * 1e-6
    group_block = torch.cat([torch.zeros(100_000, dtype=torch.int32), torch.full((8,), 2, dtype=torch.int32)])
    out = reference.reduce_groups(torch.cat([big, small], dim=1), group_block, 3)
    assert_close("large block", big.double().sum(1).float(), out[0], rtol=1e-6, atol=0)
    assert torch.equal(out[1], torch.zeros(3))  # a block with no groups (empty on this rank)
    assert_close("small block", small.double().sum(1).float(), out[2], rtol=1e-6, atol=0)
