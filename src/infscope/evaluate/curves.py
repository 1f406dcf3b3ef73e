"""Curves of a ranking against binary ground truth: the detection curve and the ROC curve.

Both curves have one point per distinct score (plus the origin), walking from the highest score
down, so a tie group becomes one straight segment: the expected curve under random tie-breaking.
That makes their areas invariant to row order; the ROC area equals the Mann-Whitney AUROC.

- Detection curve: ``x`` = share of rows inspected in score order, ``y`` = share of the noisy rows
  found so far. A random ranking gives the diagonal (area 0.5); a perfect one reaches ``y = 1`` at
  ``x = n_noisy / n`` (area ``1 - n_noisy / (2 n)``).
- ROC curve: false-positive rate against true-positive rate.

Areas are computed on the full curves; :func:`subsample_curve` thins a curve for storage only.
"""

from __future__ import annotations

import numpy as np

from infscope.evaluate.metrics import RankSteps, rank_steps


def detection_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share inspected (x) against share of positives found (y); needs at least one positive."""
    return detection_curve_from_steps(rank_steps(scores, positives))


def detection_curve_from_steps(steps: RankSteps) -> tuple[np.ndarray, np.ndarray]:
    """:func:`detection_curve` from precomputed :class:`RankSteps` (one sort for many metrics)."""
    n, n_pos = steps.inspected[-1], steps.hits[-1]
    if n_pos == 0:
        raise ValueError("the detection curve needs at least one positive row")
    return steps.inspected / n, steps.hits / n_pos


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds; needs positives and negatives."""
    return roc_curve_from_steps(rank_steps(scores, positives))


def roc_curve_from_steps(steps: RankSteps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`roc_curve` from precomputed :class:`RankSteps`."""
    n_pos = steps.hits[-1]
    n_neg = steps.inspected[-1] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the ROC curve needs at least one positive and one negative row")
    return (steps.inspected - steps.hits) / n_neg, steps.hits / n_pos, steps.thresholds


def expected_hits_at(scores: np.ndarray, positives: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Expected positives among the top ``k`` rows for each ``k`` (ties shared out; see metrics)."""
    return expected_hits_from_steps(rank_steps(scores, positives), ks)


def expected_hits_from_steps(steps: RankSteps, ks: np.ndarray) -> np.ndarray:
    """:func:`expected_hits_at` from precomputed :class:`RankSteps` (linear inside a tie group)."""
    return np.interp(np.asarray(ks, dtype=np.float64), steps.inspected, steps.hits)


def curve_area(x: np.ndarray, y: np.ndarray) -> float:
    """Area under a piecewise-linear curve by the trapezoid rule (x non-decreasing)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def subsample_curve(*arrays: np.ndarray, max_points: int = 201) -> tuple[np.ndarray, ...]:
    """Keep at most ``max_points`` evenly spaced points of a curve (always the first and last).

    Indices rather than x values are spaced evenly, so vertical ROC segments survive. Only for
    storage and plotting: areas are computed on the full curve.
    """
    length = len(arrays[0])
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if length <= max_points:
        return tuple(np.asarray(a) for a in arrays)
    keep = np.unique(np.round(np.linspace(0, length - 1, max_points)).astype(np.int64))
    return tuple(np.asarray(a)[keep] for a in arrays)
