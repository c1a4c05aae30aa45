"""Typed errors. The CLI prints each as one ``error: ...`` line and exits 1, or 2 for an
``InvalidArgumentError`` (a usage error, like a bad option); any other exception is a bug."""


class TwamergeError(Exception):
    """Base class for every error twamerge raises on bad input or an impossible request."""


class CheckpointError(TwamergeError):
    """A checkpoint file cannot be found, opened, or decoded safely."""


class CheckpointMismatchError(TwamergeError):
    """Candidate checkpoints disagree on keys, shapes or dtypes."""


class InvalidArgumentError(TwamergeError, ValueError):
    """A user-supplied value is out of range or inconsistent with the inputs (e.g. 3 weights for 4
    checkpoints). Also a ``ValueError``, so library callers may catch either; the CLI exits 2 on it."""


class NonFiniteError(TwamergeError):
    """A tensor or loss holds NaN or Inf."""


class OutputError(TwamergeError):
    """The output cannot be written (exists without --force, folder not writable, ...)."""


class DataError(TwamergeError):
    """Validation data cannot be opened or does not fit the model."""


class ModelError(TwamergeError):
    """A --model spec cannot be resolved or the model does not fit the checkpoints."""


class FitError(TwamergeError):
    """The coefficient fit cannot proceed (non-finite loss, interrupted, ...)."""


class BackendUnavailableError(TwamergeError):
    """A forced compute backend (e.g. triton) cannot run here."""


def one_line(err: BaseException | str) -> str:
    """``err``'s text on one line (whitespace runs collapsed); the exception's type name when it has none."""
    text = " ".join(str(err).split())
    return text or (type(err).__name__ if isinstance(err, BaseException) else "")
