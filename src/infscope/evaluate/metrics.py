"""Rank metrics of a score against binary ground truth: average ranks, AUROC, AP, hits in the top k.

Convention: a higher score means more suspicious (for influence scores: more harmful). Ties are never
broken by row order, so every metric here is invariant to shuffling the rows:

- AUROC uses average ranks, which makes it the Mann-Whitney U statistic divided by ``P * N``
  (a tied positive/negative pair counts one half).
- AP is scikit-learn's step definition, ``sum_t (R_t - R_{t-1}) P_t`` over distinct score thresholds.
- Top-k counts share a tied group that straddles the cut-off proportionally: the value is the
  expectation under random tie-breaking.

Functions with a ``_rows`` suffix work on ``(m, n)`` matrices, one independent problem per row,
and return NaN where a row's metric is undefined; callers turn NaN into ``None`` plus a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infscope.errors import InfscopeError


def as_score_vector(scores: object, name: str = "scores") -> np.ndarray:
    """``scores`` as a float64 vector; NaN is refused because it has no place in a ranking."""
    try:
        values = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise InfscopeError(f"{name} must be numbers; pass one numeric score per row") from None
    if values.ndim != 1:
        raise InfscopeError(
            f"{name} must be one score per row (1-D), got shape {values.shape}; flatten it first"
        )
    bad = int(np.isnan(values).sum())
    if bad:
        raise InfscopeError(
            f"{name} contain {bad} NaN values; recompute them or drop those rows before evaluating"
        )
    return values


def as_bool_vector(values: object, n: int, name: str = "is_noisy") -> np.ndarray:
    """A 0/1 or boolean column as a bool vector of length ``n``; anything else is refused."""
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != n:
        raise InfscopeError(f"{name} has shape {array.shape} but there are {n} scores; pass one flag per row")
    if array.dtype == bool:
        return array
    if array.dtype.kind in "iufO":
        try:
            if bool(np.isin(array, (0, 1)).all()):  # strings such as "True" never equal 0 or 1
                return array.astype(bool)
        except TypeError:
            pass
    raise InfscopeError(f"{name} must hold only True/False (or 0/1); convert the column before evaluating")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis (ascending); tied values share the mean of their ranks.

    Works on a vector or on an ``(m, n)`` matrix row by row, fully vectorised: after sorting, each
    position finds the first and last position of its tie group with a running max / min.
    """
    array = np.asarray(values, dtype=np.float64)
    rows = np.atleast_2d(array)
    m, n = rows.shape
    if n == 0:
        return np.zeros_like(array)
    order = np.argsort(rows, axis=1, kind="stable")
    ordered = np.take_along_axis(rows, order, axis=1)
    position = np.broadcast_to(np.arange(1, n + 1), (m, n))
    starts = np.ones((m, n), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones((m, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, position, n + 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((m, n), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=1)
    return ranks.reshape(array.shape)


def auroc_rows(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` (m, n) for the bool ``positives`` (m, n); NaN without P or N."""
    scores = np.atleast_2d(scores)
    positives = np.atleast_2d(positives).astype(bool)
    ranks = average_ranks(scores)
    n_pos = positives.sum(axis=1).astype(np.float64)
    n_neg = positives.shape[1] - n_pos
    rank_sum = np.where(positives, ranks, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), result, np.nan)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """AUROC (Mann-Whitney, ties count one half) of one score vector; ``None`` without positives or negatives."""
    value = float(auroc_rows(scores, positives)[0])
    return None if np.isnan(value) else value


@dataclass(frozen=True)
class RankSteps:
    """Cumulative counts at the end of each tie group, highest scores first, starting with 0."""

    inspected: np.ndarray  # rows inspected so far
    hits: np.ndarray  # positive rows among them
    thresholds: np.ndarray  # score of each group (+inf for the origin)


def rank_steps(scores: np.ndarray, positives: np.ndarray) -> RankSteps:
    """Walk the rows from the highest score down and record counts at each distinct score."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    group_end = np.append(ordered[1:] != ordered[:-1], True) if ordered.size else np.zeros(0, dtype=bool)
    hits = np.cumsum(positives[order])[group_end]
    inspected = np.flatnonzero(group_end) + 1
    return RankSteps(
        inspected=np.concatenate(([0], inspected)).astype(np.float64),
        hits=np.concatenate(([0], hits)).astype(np.float64),
        thresholds=np.concatenate(([np.inf], ordered[group_end])),
    )


def auroc_from_steps(steps: RankSteps) -> float | None:
    """Mann-Whitney AUROC from :class:`RankSteps`: the ROC trapezoids summed in counts, divided once.

    Each tie group adds (its negatives) x (positives ranked above it + half of its own positives).
    """
    n_pos = steps.hits[-1]
    n_neg = steps.inspected[-1] - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    negatives = np.diff(steps.inspected - steps.hits)
    positives = np.diff(steps.hits)
    return float(np.sum(negatives * (steps.hits[:-1] + positives / 2.0)) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Average precision as scikit-learn defines it; ``None`` when there is no positive row."""
    return average_precision_from_steps(rank_steps(scores, positives))


def average_precision_from_steps(steps: RankSteps) -> float | None:
    """Average precision from :class:`RankSteps`: ``sum (R_t - R_{t-1}) P_t`` over distinct scores."""
    n_pos = steps.hits[-1]
    if n_pos == 0:
        return None
    recall = steps.hits[1:] / n_pos
    precision = steps.hits[1:] / steps.inspected[1:]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def top_k_hits_rows(scores: np.ndarray, positives: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Expected number of positives among the ``k[i]`` highest scores of each row ``i``.

    A tie group that straddles the cut-off contributes its share of positives times the number of
    places left, which is the expectation under random tie-breaking. Every ``k[i]`` must lie in ``1..n``.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positives = np.atleast_2d(positives).astype(bool)
    k = np.asarray(k, dtype=np.int64).reshape(-1)
    m, n = scores.shape
    if k.shape[0] != m or (k < 1).any() or (k > n).any():
        raise ValueError(f"k must hold one value in 1..{n} per row, got {k}")
    descending = -np.sort(-scores, axis=1)
    threshold = descending[np.arange(m), k - 1][:, None]
    above = scores > threshold
    tied = scores == threshold
    n_above = above.sum(axis=1)
    hits_above = (above & positives).sum(axis=1)
    n_tied = tied.sum(axis=1)
    hits_tied = (tied & positives).sum(axis=1)
    return hits_above + (k - n_above) * hits_tied / n_tied
