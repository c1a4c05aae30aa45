"""twamerge: merge saved checkpoints with Trainable Weight Averaging (TWA)."""

__version__ = "0.1.0"
