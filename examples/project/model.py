"""The project's network: a small MLP for 8x8 digit images (64 pixels scaled to [0, 1]).

``[tool.twamerge] model = "model.py:build"`` in pyproject.toml has twamerge call ``build(**model_args)``.
"""

from __future__ import annotations

from torch import nn


def build(hidden: int = 128) -> nn.Module:
    """pixels float32 [B, 64] -> logits float32 [B, 10]."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
