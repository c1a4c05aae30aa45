"""The demo's network: a small MLP for 8x8 digit images (64 pixels scaled to [0, 1]).

`twamerge fit ... --model examples/digits/model.py:build` calls ``build(**model_args)``.
"""

from __future__ import annotations

from torch import nn


def build(in_features: int = 64, hidden: int = 128, n_classes: int = 10) -> nn.Module:
    """pixels float32 [B, in_features] -> logits float32 [B, n_classes]."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )
