"""The merge methods, each declared once: its name, whether it needs data, and how it makes its weights.

Every merge twamerge writes or reports is ``sum_k w_k c_k`` for some weights ``w`` (per block for
TWA). This module says where each method's weights come from; ``average`` (the data-free ones),
the fit's baselines and ``--init`` (the ones scored on data) and the CLI's skip flags all read
:data:`METHODS`, so a new method is declared here once.

    method     needs data   weights
    uniform    no           1/K each (SWA, the uniform soup; the fit's start point)
    weighted   no           the user's, optionally normalised to sum to 1
    ema        no           an exponential moving average over the candidates in order
    candidate  yes          one-hot: each candidate on its own, scored
    greedy     yes          the greedy soup: a uniform average of the ingredients chosen on data
    twa        yes          learned per block by gradient descent (``fit.train_coefficients``)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InvalidArgumentError

__all__ = ["BASELINES", "METHODS", "Method", "ema_weights", "greedy_soup", "one_hot", "uniform_weights"]


@dataclass(frozen=True)
class Method:
    """One merge method.

    Attributes:
        name: the method's name, also the ``kind`` of its rows in a fit report.
        needs_data: whether its weights (or its scores) need validation data and a model.
        summary: one line for help texts and the README.
        init: the ``--init`` value that starts the fit at this method's merge, if any.
        skip_field: the ``FitConfig`` field that turns this fit baseline off (``--no-...``), if any.
    """

    name: str
    needs_data: bool
    summary: str
    init: str | None = None
    skip_field: str | None = None

    def enabled(self, cfg: object) -> bool:
        """Whether a fit with settings ``cfg`` reports this baseline."""
        return self.skip_field is None or bool(getattr(cfg, self.skip_field))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uniform", False, "the uniform average of the candidates (SWA, the uniform soup)", init="uniform"),
    Method("weighted", False, "fixed weights, one per candidate (normalised to sum to 1 unless asked not to)"),
    Method("ema", False, "an exponential moving average over the candidates in the given order"),
    Method("candidate", True, "each candidate on its own", init="best", skip_field="eval_candidates"),
    Method("greedy", True, "the greedy soup: candidates by fit-split metric, each kept if it strictly improves it",
           init="greedy", skip_field="greedy"),
    Method("twa", True, "trainable weight averaging: coefficients per block learned on the fit split"),
)}

# The fit's baselines in the order they are scored (the greedy soup needs the candidates' scores).
BASELINES: tuple[Method, ...] = (METHODS["candidate"], METHODS["uniform"], METHODS["greedy"])


def uniform_weights(k: int) -> list[float]:
    """``[1/k] * k``: the SWA / uniform-soup weights."""
    if k < 1:
        raise InvalidArgumentError(f"need at least one candidate for uniform weights, got {k}")
    return [1.0 / k] * k


def ema_weights(k: int, decay: float) -> list[float]:
    """Weights of an exponential moving average over ``k`` checkpoints taken in order.

    ``e_1 = c_1``, ``e_j = decay * e_{j-1} + (1 - decay) * c_j``; so ``w_1 = decay^(k-1)`` and
    ``w_j = (1 - decay) * decay^(k-j)`` for ``j >= 2``. They sum to 1.
    """
    if not (0.0 <= decay <= 1.0) or math.isnan(decay):
        raise InvalidArgumentError(f"EMA decay {decay!r} must lie in [0, 1] (e.g. 0.9)")
    if k < 1:
        raise InvalidArgumentError(f"need at least one candidate for EMA weights, got {k}")
    return [decay ** (k - 1)] + [(1.0 - decay) * decay ** (k - j) for j in range(2, k + 1)]


def one_hot(k: int, chosen: Sequence[int]) -> list[float]:
    """The uniform average of the candidates ``chosen`` (one of them: that candidate alone)."""
    return [1.0 / len(chosen) if i in chosen else 0.0 for i in range(k)]


def check_weights(w: Sequence[float], k: int, key: str | None = None) -> list[float]:
    """``w`` as floats, one per candidate and finite."""
    where = f" for {key!r}" if key is not None else ""
    w = [float(x) for x in w]
    if len(w) != k:
        raise InvalidArgumentError(f"got {len(w)} weights{where} for {k} checkpoints; give exactly one per checkpoint")
    if not all(math.isfinite(x) for x in w):
        raise InvalidArgumentError(f"weights{where} must be finite, got {w}")
    return w


def data_free_weights(k: int, *, weights: Sequence[float] | None = None, ema: float | None = None,
                      normalize: bool = True) -> tuple[str, list[float]]:
    """The data-free method asked for and its weights: ``ema`` with a decay, ``weighted`` with weights,
    else ``uniform``.

    Raises:
        InvalidArgumentError: both given, a weight count or value that does not fit, weights summing to 0.
    """
    if weights is not None and ema is not None:
        raise InvalidArgumentError("give either weights or an EMA decay, not both")
    if ema is not None:
        return "ema", ema_weights(k, float(ema))
    if weights is None:
        return "uniform", uniform_weights(k)
    w = check_weights(weights, k)
    total = sum(w)
    if normalize:
        if abs(total) < 1e-12:
            raise InvalidArgumentError(f"weights {w} sum to 0 and cannot be normalized")
        w = [x / total for x in w]
    return "weighted", w


def greedy_soup(order: Sequence[int], first_score: dict, k: int,
                try_soup: Callable[[list[float]], dict], better: Callable[[dict, dict], bool],
                on_accept: Callable[[dict], dict] | None = None) -> tuple[list[int], dict | None]:
    """The greedy soup (Wortsman et al.): start from the best candidate, add each next one if it strictly helps.

    Args:
        order: candidate indices, best first (by the fit-split metric).
        first_score: the fit-split score of ``order[0]`` alone.
        k: the number of candidates.
        try_soup: scores a trial merge given its weights (loads, recalibrates, scores the fit split):
            returns ``{"fit": score, ...}``.
        better: ``better(a, b)`` when score ``a`` is strictly better than ``b``.
        on_accept: called with an accepted trial's result while that trial is still the loaded one
            (e.g. to score the held-out split only for the soups that are kept); returns the result kept.

    Returns:
        (the ingredients in ``order``'s order, what ``try_soup`` returned for the last accepted trial,
        or None when no candidate was added to the first).
    """
    soup, best, accepted = [order[0]], first_score, None
    for i in order[1:]:
        trial = soup + [i]
        result = try_soup(one_hot(k, trial))
        if better(result["fit"], best):
            soup, best, accepted = trial, result["fit"], on_accept(result) if on_accept else result
    return soup, accepted
