"""The merge methods, each declared once with its behaviour: a new method is one entry of :data:`METHODS`.

Every merge twamerge writes or reports is ``sum_k w_k c_k`` for some weights ``w`` (per block for
TWA). A :class:`Method` says where its weights come from:

- a data-free method supplies ``weights``, computed from the command's options (``average`` reads
  them through :func:`data_free_weights`);
- a fit baseline supplies ``score``: given a :class:`Scoring` (the fit's model, data and candidates,
  ``pipeline.FitScoring``), it returns its rows of the report. It also says which weights a row of
  its stands for (``row_weights``: ``--select best`` writes them, ``--init`` starts there) and which
  of its rows compete with TWA (``put_forward``).

The fit scores every baseline the settings keep, in registry order (the order of the report's rows);
``--init`` values (``config.Init``), the check that an ``--init`` start is scored, and ``--select
best``'s contenders are all read from here.

    method     needs data   weights
    candidate  yes          one-hot: each candidate on its own, scored
    uniform    no           1/K each (SWA, the uniform soup; the fit's start point)
    weighted   no           the user's, optionally normalised to sum to 1
    ema        no           an exponential moving average over the candidates in order
    greedy     yes          the greedy soup: a uniform average of the ingredients chosen on data
    twa        yes          learned per block by gradient descent (``fit.train_coefficients``)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .errors import InvalidArgumentError

__all__ = ["METHODS", "Method", "MethodResult", "Scoring", "Skip", "best_candidate", "by_init", "contenders",
           "data_free_weights", "ema_weights", "fit_baselines", "greedy_soup", "init_names", "is_better",
           "one_hot", "uniform_weights"]


@dataclass
class MethodResult:
    """One row of a fit's comparison table: a method's merge scored on the fit and held-out splits."""

    name: str
    kind: str  # the name of the method in METHODS that made it
    fit: dict | None = None  # {"loss", "metric", "n"} on the fit split
    heldout: dict | None = None  # the same on the held-out split
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "fit": self.fit, "heldout": self.heldout, **self.detail}


class Scoring(Protocol):
    """What a fit baseline scores with; the fit supplies it (``pipeline.FitScoring``).

    Scores are ``{"loss", "metric", "n"}`` dicts, None on a split without rows. Loading a merge
    re-estimates BatchNorm statistics on the fit rows (when the fit does); a candidate is scored as it is.
    """

    k: int  # the number of candidates
    higher_is_better: bool

    def candidate(self, i: int) -> MethodResult:
        """Candidate ``i`` alone, scored on both splits (once: later calls return the same row)."""
        ...

    def centre(self) -> dict:
        """``{"fit", "heldout"}`` scores of the uniform average, the subspace's mean (reads no weights)."""
        ...

    def merge(self, weights: list[float], heldout: bool = True) -> dict:
        """Load ``sum_k weights[k] c_k``, merged from the files, and score it: ``{"fit", "heldout"}`` (``{"fit"}``
        alone without heldout)."""
        ...

    def point(self, weights: list[float], heldout: bool = True, fit: bool = True) -> dict:
        """Load the point of the fit's quantized subspace whose coefficients are ``weights`` in every block (one
        combine of the basis: no file read) and score it on the splits asked: ``{"fit", "heldout"}``."""
        ...

    def heldout(self) -> dict | None:
        """The held-out score of the merge loaded last."""
        ...


@dataclass(frozen=True)
class Skip:
    """How a fit baseline is turned off: the ``FitConfig`` field that keeps it, and what turning it off
    drops (for error messages; the flag comes from the field's metadata)."""

    field: str
    what: str


@dataclass(frozen=True)
class Method:
    """One merge method and its behaviour.

    Attributes:
        name: the method's name, also the ``kind`` of its rows in a fit report.
        needs_data: whether its weights (or its scores) need validation data and a model.
        summary: one line for help texts and the README.
        weights: data-free methods: ``weights(k, weights=..., ema=..., normalize=...)``, one weight per candidate.
        score: fit baselines: the method's rows, scored through a :class:`Scoring`.
        row_weights: fit baselines: the candidate weights one of its rows stands for, ``row_weights(row, k)``.
        put_forward: fit baselines: which of its rows compete with TWA under ``--select best`` and
            serve as an ``--init`` start, ``put_forward(rows, higher_is_better)``; default: all its rows.
        one_candidate: its merge is one candidate as it is: loaded without re-estimating BatchNorm,
            and listed after the merges of several (ties under ``--select best`` go to those).
        init: the ``--init`` value that starts the fit at this method's merge, if any.
        skip: how a fit turns this baseline off, if it can.
    """

    name: str
    needs_data: bool
    summary: str
    weights: Callable[..., list[float]] | None = None
    score: Callable[[Scoring], list[MethodResult]] | None = None
    row_weights: Callable[[MethodResult, int], list[float]] | None = None
    put_forward: Callable[[list[MethodResult], bool], list[MethodResult]] | None = None
    one_candidate: bool = False
    init: str | None = None
    skip: Skip | None = None

    def enabled(self, cfg: object) -> bool:
        """Whether a fit with settings ``cfg`` scores and reports this baseline."""
        return self.skip is None or bool(getattr(cfg, self.skip.field))

    def contenders(self, rows: list[MethodResult], higher_is_better: bool) -> list[MethodResult]:
        """The rows of ``rows`` this method puts forward against TWA (its own rows unless ``put_forward``)."""
        if self.put_forward is not None:
            return self.put_forward(rows, higher_is_better)
        return [r for r in rows if r.kind == self.name]


# -- weights ----------------------------------------------------------------------------------------


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


def _uniform(k: int, **_: object) -> list[float]:
    return uniform_weights(k)


def _weighted(k: int, *, weights: Sequence[float], normalize: bool = True, **_: object) -> list[float]:
    w = check_weights(weights, k)
    if not normalize:
        return w
    total = sum(w)
    if abs(total) < 1e-12:
        raise InvalidArgumentError(f"weights {w} sum to 0 and cannot be normalized")
    return [x / total for x in w]


def _ema(k: int, *, ema: float, **_: object) -> list[float]:
    return ema_weights(k, float(ema))


def data_free_weights(k: int, *, weights: Sequence[float] | None = None, ema: float | None = None,
                      normalize: bool = True) -> tuple[str, list[float]]:
    """The data-free method the options ask for and its weights for ``k`` candidates: ``ema`` with a
    decay, ``weighted`` with weights, else ``uniform``. The one check of these options (``average``,
    ``AverageConfig``).

    Raises:
        InvalidArgumentError: both given, a weight count or value that does not fit, weights summing to 0.
    """
    if weights is not None and ema is not None:
        raise InvalidArgumentError("give either weights or an EMA decay, not both")
    method = METHODS["ema" if ema is not None else "weighted" if weights is not None else "uniform"]
    return method.name, method.weights(k, weights=weights, ema=ema, normalize=normalize)


# -- scoring the fit baselines ------------------------------------------------------------------------


def is_better(a: dict, b: dict, higher_is_better: bool) -> bool:
    """Whether metrics ``a`` are strictly better than ``b``."""
    return a["metric"] > b["metric"] if higher_is_better else a["metric"] < b["metric"]


def best_candidate(rows: list[MethodResult], split: str, higher_is_better: bool) -> MethodResult | None:
    """The candidate row with the best metric on ``split`` (the first of equals); None without candidates."""
    cands = [r for r in rows if r.kind == "candidate" and getattr(r, split) is not None]
    if not cands:
        return None
    sign = 1 if higher_is_better else -1
    return max(cands, key=lambda r: sign * getattr(r, split)["metric"])


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


def _candidate_rows(s: Scoring) -> list[MethodResult]:
    return [s.candidate(i) for i in range(s.k)]


def _uniform_rows(s: Scoring) -> list[MethodResult]:
    return [MethodResult("uniform", "uniform", **s.centre())]


def _greedy_rows(s: Scoring) -> list[MethodResult]:
    """Sort by fit-split metric, add each candidate to the running uniform soup if the fit metric strictly improves.

    The soups are tried in the fit's subspace (``Scoring.point``: one combine and one scoring pass of the fit
    rows each, no file read), the first one (the best candidate alone) too, so that every comparison is
    between points of the same quantized subspace; the fit split alone decides. The soup chosen is scored on
    the held-out rows (loaded again unless it was the last trial), then merged once from the files, exactly
    as ``--select best`` writes it, and scored: the row's figures are that exact soup's; ``subspace`` holds
    the subspace soup's (where ``--init greedy`` starts) and ``subspace_gap`` its held-out loss and metric
    minus the exact soup's.
    """
    candidates = [s.candidate(i) for i in range(s.k)]
    higher = s.higher_is_better
    sign = 1 if higher else -1
    order = sorted(range(s.k), key=lambda i: -sign * candidates[i].fit["metric"])
    loaded: list[list[float]] = []  # the weights of the soup loaded last

    def trial(weights: list[float]) -> dict:
        loaded[:] = [weights]
        return s.point(weights, heldout=False)

    first = trial(one_hot(s.k, order[:1]))
    soup, accepted = greedy_soup(order, first["fit"], s.k, trial, lambda a, b: is_better(a, b, higher))
    weights = one_hot(s.k, soup)
    heldout = s.heldout() if loaded[0] == weights else s.point(weights, fit=False)["heldout"]
    in_subspace = {"fit": (accepted or first)["fit"], "heldout": heldout}
    exact = s.merge(weights)
    return [MethodResult("greedy", "greedy", **exact, detail={
        "ingredients": [candidates[j].name for j in sorted(soup)], "indices": sorted(soup),
        "subspace": in_subspace, "subspace_gap": _heldout_gap(in_subspace["heldout"], exact["heldout"])})]


def _heldout_gap(approx: dict | None, exact: dict | None) -> dict | None:
    """``approx`` minus ``exact``, loss and metric (None without held-out rows)."""
    if approx is None or exact is None:
        return None
    return {"loss": approx["loss"] - exact["loss"], "metric": approx["metric"] - exact["metric"]}


def _best_on_fit(rows: list[MethodResult], higher_is_better: bool) -> list[MethodResult]:
    best = best_candidate(rows, "fit", higher_is_better)
    return [] if best is None else [best]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("candidate", True, "each candidate on its own", score=_candidate_rows,
           row_weights=lambda row, k: one_hot(k, [row.detail["index"]]), put_forward=_best_on_fit,
           one_candidate=True, init="best", skip=Skip("eval_candidates", "candidate scores")),
    Method("uniform", False, "the uniform average of the candidates (SWA, the uniform soup)", weights=_uniform,
           score=_uniform_rows, row_weights=lambda row, k: uniform_weights(k), init="uniform"),
    Method("weighted", False, "fixed weights, one per candidate (normalised to sum to 1 unless asked not to)",
           weights=_weighted),
    Method("ema", False, "an exponential moving average over the candidates in the given order", weights=_ema),
    Method("greedy", True, "the greedy soup: candidates by fit-split metric, each kept if it strictly improves it",
           score=_greedy_rows, row_weights=lambda row, k: one_hot(k, row.detail["indices"]), init="greedy",
           skip=Skip("greedy", "the greedy soup")),
    Method("twa", True, "trainable weight averaging: coefficients per block learned on the fit split"),
)}


def fit_baselines(cfg: object | None = None) -> list[Method]:
    """The methods a fit scores beside TWA (those with ``score``), in registry order; with ``cfg``, those it keeps."""
    return [m for m in METHODS.values() if m.score is not None and (cfg is None or m.enabled(cfg))]


def contenders() -> list[Method]:
    """The fit baselines in the order ``--select best`` breaks ties and ``--init`` lists its values:
    the merges of several candidates in registry order, then the lone candidate."""
    return sorted(fit_baselines(), key=lambda m: m.one_candidate)


def init_names() -> tuple[str, ...]:
    """The ``--init`` values: the start point each fit baseline offers (``config.Init``)."""
    return tuple(m.init for m in contenders() if m.init is not None)


def by_init(name: str) -> Method:
    """The method whose merge ``--init name`` starts the fit at."""
    return next(m for m in METHODS.values() if m.init == name)
