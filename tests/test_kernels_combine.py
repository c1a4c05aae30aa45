"""combine: w = m + P~^T beta, decoded from the quantized basis. The Triton kernel against the torch
reference (comparison rules in tests/kernel_fixtures.py) and its argument checks. The C loops for
combine are tested in tests/test_native.py."""

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
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, None], ids=dtype_id)
@pytest.mark.parametrize("r,gs,ng,kind", BASIS_SHAPES, ids=BASIS_IDS)
def test_combine_parity(r, gs, ng, kind, out_dtype, bits, device):
    n = gs * ng
    codes, scales, zeros = random_basis(r, n, bits, gs, seed=r * 7 + ng)
    group_block, n_blocks = block_ids(ng, kind)
    mean = torch.randn(n, generator=gen(ng))
    beta = torch.randn(n_blocks, r, generator=gen(r))
    args = to_device(device, mean, codes, scales, zeros, beta, group_block)
    ref = reference.combine_torch(*args, bits, gs)
    if out_dtype is None:
        out = triton_ops()["combine"].combine_triton(*args, bits, gs)
        assert out.dtype == torch.float32
    else:
        buf = torch.full((n,), float("nan"), dtype=out_dtype, device=device)
        out = triton_ops()["combine"].combine_triton(*args, bits, gs, out=buf)
        assert out is buf
        ref = ref.to(out_dtype)
    assert_close("combine", ref, out, atol=sum_atol(ref, out.dtype))


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("bits3", ValueError, "bits=3"),
        ("group12", ValueError, "group_size=12"),
        ("codes-dtype", TypeError, "codes has dtype float32"),
        ("scales-shape", ValueError, "scales has shape"),
        ("codes-noncontig", ValueError, "codes with shape"),
        ("group-block-dtype", TypeError, "group_block has dtype int64"),
        ("group-block-shape", ValueError, "group_block has shape"),
        ("mean-shape", ValueError, "mean has shape"),
        ("beta-shape", ValueError, "beta has shape"),
        ("out-dtype", TypeError, "out has dtype int32"),
        ("out-noncontig", ValueError, "out with shape"),
    ],
)
def test_combine_bad_input(case, exc, match):
    codes, scales, zeros, gb = basis_args()
    mean, beta, bits, gs, out = torch.zeros(32), torch.zeros(1, 2), 4, 8, None
    if case == "bits3":
        bits = 3
    elif case == "group12":
        gs = 12
    elif case == "codes-dtype":
        codes = codes.float()
    elif case == "scales-shape":
        scales = scales[:, :3].contiguous()
    elif case == "codes-noncontig":
        codes = torch.zeros(16, 2, dtype=torch.uint8).T
    elif case == "group-block-dtype":
        gb = gb.long()
    elif case == "group-block-shape":
        gb = gb[:3].contiguous()
    elif case == "mean-shape":
        mean = torch.zeros(31)
    elif case == "beta-shape":
        beta = torch.zeros(1, 3)
    elif case == "out-dtype":
        out = torch.zeros(32, dtype=torch.int32)
    elif case == "out-noncontig":
        out = torch.zeros(32, 2)[:, 0]
    with pytest.raises(exc, match=match):
        triton_ops()["combine"].combine_triton(mean, codes, scales, zeros, beta, gb, bits, gs, out)
