"""twamerge: merge saved checkpoints with Trainable Weight Averaging (TWA).

Library first: everything the ``twamerge`` command does is a function here, and importing the
package pulls in neither typer, rich nor triton.
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    AverageConfig,
    DataConfig,
    EvalConfig,
    FitConfig,
    InspectConfig,
    ModelConfig,
    OutputConfig,
    ReadConfig,
)
from .errors import (  # noqa: E402
    BackendUnavailableError,
    CheckpointError,
    CheckpointMismatchError,
    DataError,
    FitError,
    InvalidArgumentError,
    ModelError,
    NonFiniteError,
    OutputError,
    TwamergeError,
)
from .inspect_ckpt import inspect_checkpoints  # noqa: E402
from .io import CheckpointSet, expand_paths, open_candidates, open_checkpoints, write_checkpoint  # noqa: E402
from .merge import average_checkpoints, linear_merge  # noqa: E402
from .methods import METHODS  # noqa: E402
from .pipeline import apply_report, evaluate_checkpoints, fit  # noqa: E402

__all__ = [
    "AverageConfig",
    "EvalConfig",
    "InspectConfig",
    "BackendUnavailableError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointSet",
    "DataConfig",
    "DataError",
    "FitConfig",
    "FitError",
    "InvalidArgumentError",
    "ModelConfig",
    "METHODS",
    "ModelError",
    "NonFiniteError",
    "OutputConfig",
    "OutputError",
    "ReadConfig",
    "TwamergeError",
    "__version__",
    "apply_report",
    "average_checkpoints",
    "evaluate_checkpoints",
    "expand_paths",
    "fit",
    "inspect_checkpoints",
    "linear_merge",
    "open_candidates",
    "open_checkpoints",
    "write_checkpoint",
]
