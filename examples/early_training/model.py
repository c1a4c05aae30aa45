"""The early-training example's network: an MLP for 28x28 Fashion-MNIST images (flattened, scaled to [0, 1]).

`twamerge fit ... --model examples/early_training/model.py:build` calls ``build(**model_args)``.
"""

from __future__ import annotations

from torch import nn


def build(in_features: int = 784, hidden: int = 512, n_classes: int = 10) -> nn.Module:
    """pixels float32 [B, in_features] -> logits float32 [B, n_classes]."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden // 2),
        nn.ReLU(),
        nn.Linear(hidden // 2, n_classes),
    )
