"""One comparison helper and one tolerance table for every floating-point check."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype. Relaxing one needs a written reason beside it.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float64: (1e-10, 1e-10),
}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, *, atol: float | None = None,
                 rtol: float | None = None) -> None:
    """Compare ``out`` with ``ref``; on failure report max abs error, relative RMS error, the mismatch
    count, the first mismatched indices and NaN/Inf disagreements."""
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    d_atol, d_rtol = TOLERANCES.get(ref.dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    r, o = ref.detach().double().cpu(), out.detach().double().cpu()
    nan_mismatch = (r.isnan() != o.isnan()) | (r.isinf() != o.isinf())
    finite = r.isfinite() & o.isfinite()
    bad = (~finite & nan_mismatch) | (finite & ((r - o).abs() > atol + rtol * r.abs()))
    if bad.any():
        diff = (r - o)[finite].abs()
        rel_rms = ((r - o)[finite].norm() / r[finite].norm().clamp_min(1e-30)).item()
        first = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{r.numel()} mismatches (atol={atol}, rtol={rtol}); "
            f"max abs err {diff.max().item() if diff.numel() else float('nan'):.3e}, rel RMS {rel_rms:.3e}, "
            f"NaN/Inf disagreements {int(nan_mismatch.sum())}, first at {first}"
        )


class PoisonedTorch:
    """Stands in for the ``torch`` module inside a twamerge.kernels module: ``empty`` returns poisoned memory."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xA5)
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t
