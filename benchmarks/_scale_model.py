"""The MLP that benchmarks/scale.py merges: `depth` hidden layers of `width` units on 256 features, 10 classes."""

from torch import nn

IN_FEATURES = 256


def n_params(width: int, depth: int) -> int:
    return (IN_FEATURES * width + width) + (depth - 1) * (width * width + width) + (width * 10 + 10)


def build(width: int = 1024, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))
