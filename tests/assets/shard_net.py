"""A model for the sharded fit's tests (``tests/assets/shard_net.py:build``).

Its layers are called as modules (each becomes an FSDP unit), one has fewer rows (3) than the tests
have ranks (4), and one parameter is 0-d (FSDP cannot shard it: it stays whole on every rank).
``fail_at`` makes the forward raise from that call on (a failure on one rank).
"""

import torch
from torch import nn


class ShardNet(nn.Module):
    def __init__(self, n_in: int = 64, hidden: int = 24, n_out: int = 10, fail_at: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_out)
        self.narrow = nn.Linear(hidden, 3)
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at and self.calls >= self.fail_at:
            raise RuntimeError(f"ShardNet fails on purpose at call {self.calls}")
        h = self.body(x.float())
        return self.gain * self.head(h) + self.narrow(h).mean(dim=-1, keepdim=True)


def build(**kwargs) -> nn.Module:
    return ShardNet(**kwargs)
