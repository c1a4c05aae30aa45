"""gram: the mean and Gram matrix of the centred candidates. The Triton kernel against the torch
reference, the kernel's argument checks, and the reference's own accuracy (comparison rules in
tests/kernel_fixtures.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close
from kernel_fixtures import dtype_id, gen, kernel_device, needs_triton, poison_kernel_empty, sum_atol, triton_ops
from twamerge.kernels import reference

device = pytest.fixture(kernel_device, name="device")
poison_empty = pytest.fixture(poison_kernel_empty, autouse=True, name="poison_empty")

GRAM_SHAPES = [(1, 1), (1, 257), (3, 63), (5, 257), (16, 1), (17, 127), (7, 6000)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("k,n", GRAM_SHAPES, ids=[f"K{k}-N{n}" for k, n in GRAM_SHAPES])
def test_gram_parity(k, n, dtype, device):
    x = (torch.randn(k, n, generator=gen(k * 1000 + n)) * 3 + 1).to(dtype).to(device)
    g_ref, m_ref = reference.gram_torch(x)
    g_out, m_out = triton_ops()["gram"].gram_triton(x)
    assert g_out.dtype == torch.float64 and m_out.dtype == torch.float32
    assert_close("mean", m_ref, m_out, atol=TOLERANCES[torch.float32][0] * 4)
    # float32 tiles against a float64 reference: scale the fp32 tolerance by the Gram's magnitude.
    assert_close("gram", g_ref, g_out, atol=sum_atol(g_ref), rtol=TOLERANCES[torch.float32][1])


@needs_triton
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("x-int", TypeError, "x has dtype int32"),
        ("x-float64", TypeError, "x has dtype float64"),
        ("x-noncontig", ValueError, "not contiguous"),
        ("x-1d", ValueError, "2-D"),
        ("k-too-large", ValueError, "at most 256"),
    ],
)
def test_gram_bad_input(case, exc, match):
    x = {
        "x-int": torch.zeros(2, 8, dtype=torch.int32),
        "x-float64": torch.zeros(2, 8, dtype=torch.float64),
        "x-noncontig": torch.zeros(8, 2).T,
        "x-1d": torch.zeros(8),
        "k-too-large": torch.zeros(257, 8),
    }[case]
    with pytest.raises(exc, match=match):
        triton_ops()["gram"].gram_triton(x)


def test_gram_of_a_row_slice_equals_the_contiguous_one():
    x = torch.randn(4, 300, generator=gen(5))
    wide = torch.zeros(4, 500)
    wide[:, 100:400] = x
    g1, m1 = reference.gram_torch(x)
    g2, m2 = reference.gram_torch(wide[:, 100:400])
    assert torch.equal(g1, g2) and torch.equal(m1, m2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_gram_reference_close_to_float64_on_nearly_parallel_candidates(dtype):
    """float32 partial products over runs of columns, summed in float64: the Gram matrix of fine-tunes
    that differ by 1e-4 of their magnitude stays within 1e-6 of the float64 one (measured about 1e-8)."""
    g = gen(3)
    n = 3 * reference.chunk_cols(8, 1) + 517  # several chunks and a partial run
    base = torch.randn(n, generator=g)
    x = (base + 1e-4 * torch.randn(8, n, generator=g)).to(dtype)
    exact = x.double() - x.double().mean(dim=0)
    g_exact = exact @ exact.T
    g_out, m = reference.gram_torch(x)
    assert float((g_out - g_exact).abs().max() / g_exact.norm()) < 1e-6
    assert_close("mean", x.double().mean(dim=0).float(), m)


def test_gram_is_not_finite_when_an_input_is_not():
    for bad in (float("nan"), float("inf"), float("-inf")):
        for k in (1, 2, 5):
            for row in range(k):
                x = torch.randn(k, 1000, generator=gen(k))
                x[row, 613] = bad
                g, _ = reference.gram_torch(x)
                assert not bool(torch.isfinite(g).all()), (bad, k, row)
