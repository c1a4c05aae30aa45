"""The paper protocol's network: a small CNN with BatchNorm and one residual block, for 28x28 Fashion-MNIST
images stored flattened (784 pixels in [0, 1]).

`twamerge fit ... --model examples/early_training/cnn.py:build` calls ``build(**model_args)``; the model has
BatchNorm, so `twamerge fit` re-estimates its statistics for every merge it scores (``--bn-recalibrate auto``).
"""

from __future__ import annotations

from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + BN(conv(ReLU(BN(conv(x))))), then ReLU: a ResNet basic block without a shortcut projection."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.body(x))


class SmallCNN(nn.Module):
    """pixels float32 [B, 784] -> logits float32 [B, n_classes]."""

    def __init__(self, width: int = 16, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width),  # 28x28
            nn.MaxPool2d(2),  # 14x14
            conv_bn(width, 2 * width),
            nn.MaxPool2d(2),  # 7x7
            Residual(2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, pixels):
        return self.head(self.features(pixels.view(-1, 1, 28, 28)))


def build(width: int = 16, n_classes: int = 10) -> nn.Module:
    return SmallCNN(width, n_classes)
