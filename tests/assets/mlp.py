"""Model factories for the fit tests (loaded by spec ``tests/assets/mlp.py:build``)."""

import torch
import torch.nn.functional as F
from torch import nn


class ScaledMLP(nn.Module):
    """An MLP whose layers use ``scale * weight``: checkpoints multiplied by 1/scale give the same function."""

    def __init__(self, n_in: int = 64, hidden: int = 32, n_out: int = 10, scale: float = 1.0,
                 batchnorm: bool = False, interrupt_at: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.bn = nn.BatchNorm1d(hidden) if batchnorm else None
        self.fc2 = nn.Linear(hidden, n_out)
        self.scale = scale
        self.interrupt_at = interrupt_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.interrupt_at and self.calls >= self.interrupt_at:
            raise KeyboardInterrupt
        s = self.scale
        h = F.linear(x.float(), self.fc1.weight * s, self.fc1.bias * s)
        if self.bn is not None:
            h = self.bn(h)
        return F.linear(F.relu(h), self.fc2.weight * s, self.fc2.bias * s)


def build(**kwargs) -> nn.Module:
    return ScaledMLP(**kwargs)


def broken(**kwargs) -> nn.Module:
    raise RuntimeError("this factory always fails")
