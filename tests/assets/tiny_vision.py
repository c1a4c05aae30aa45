"""A tiny image classifier taking ``image`` [N, 3, H, W] float32 in [0, 1], and a --preprocess function."""

import torch
from torch import nn


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        assert image.dtype == torch.float32 and image.shape[1] == 3 and float(image.max()) <= 1.0
        return self.head(torch.relu(self.conv(image)).mean((2, 3)))


def build() -> nn.Module:
    return TinyConv()


def pixels_from_text(columns: dict) -> dict:
    """``{"pixels": ["0 1 2 ...", ...]}`` (64 numbers per row, 0..16) -> ``{"x": float32 [N, 64]}``."""
    return {"x": torch.tensor([[float(v) / 16 for v in row.split()] for row in columns["pixels"]])}
