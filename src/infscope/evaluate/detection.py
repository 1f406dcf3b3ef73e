"""How well one score finds the injected noise: AUROC, AP, precision/recall at k, detection curve.

:func:`detection_report` takes one score per training row (higher = more suspicious) and the
ground-truth ``is_noisy`` flags and returns a JSON-ready dict (plain floats, lists and ``None``;
never NaN). :func:`detection_from_manifest` aligns scores to a noise manifest by id first.

Per-group metrics (for example per noise family or operator) compare **the noisy rows of that group
against all clean rows**; other groups' noisy rows are left out. So "AUROC of family grammar" is the
probability that a random grammar-noised row scores above a random clean row. Noisy rows without a
group label are counted only in the overall metrics.

A metric that is undefined (no noisy rows, no clean rows, ``k`` larger than the rows) is ``None``
and ``report["undefined"][metric]`` says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.evaluate.curves import (
    curve_area,
    detection_curve_from_steps,
    expected_hits_from_steps,
    roc_curve_from_steps,
    subsample_curve,
)
from infscope.evaluate.metrics import (
    RankSteps,
    as_bool_vector,
    as_score_vector,
    auroc_from_steps,
    average_precision_from_steps,
    rank_steps,
)

GROUP_DEFINITION = "noisy rows of the group vs all clean rows"
MAX_CURVE_POINTS = 201


def _check_ks(ks: Iterable[int]) -> list[int]:
    """User cut-offs as positive ints (duplicates dropped, order kept)."""
    checked: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InfscopeError(f"k={k!r} is not a positive whole number; pass cut-offs like --k 10 --k 50")
        if int(k) not in checked:
            checked.append(int(k))
    return checked


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


_NO_NOISE = "no noisy rows, so there is nothing to find"
_NO_CLEAN = "no clean rows, so nothing to rank the noise against"


def _cutoff_metrics(steps: RankSteps, ks: Sequence[int], undefined: dict[str, str]) -> dict[str, Any]:
    """Precision and recall at ``k = n_noisy`` and each user ``k`` (keys ``str(k)``)."""
    n, n_noisy = int(steps.inspected[-1]), int(steps.hits[-1])
    all_ks = [n_noisy, *(k for k in ks if k != n_noisy)]
    valid = [k for k in all_ks if 1 <= k <= n]
    hits = dict(zip(valid, expected_hits_from_steps(steps, np.array(valid)), strict=True)) if valid else {}
    precision: dict[str, float | None] = {}
    recall: dict[str, float | None] = {}
    for k in all_ks:
        key = str(k)
        reason = _NO_NOISE if k == 0 else f"k={k} exceeds the {n} rows"
        precision[key] = float(hits[k] / k) if k in hits else None
        recall[key] = float(hits[k] / n_noisy) if k in hits and n_noisy else None
        if precision[key] is None:
            undefined[f"precision_at_k[{key}]"] = reason
        if recall[key] is None:
            undefined[f"recall_at_k[{key}]"] = reason if precision[key] is None else _NO_NOISE
    return {
        "k_noisy": n_noisy,
        "precision_at_k": precision,
        "recall_at_k": recall,
        "p_at_n_noisy": precision[str(n_noisy)],
    }


def _curve_metrics(steps: RankSteps, max_points: int, undefined: dict[str, str]) -> dict[str, Any]:
    """Detection curve (area on the full curve) and ROC curve, both thinned for storage."""
    n_noisy = steps.hits[-1]
    n_clean = steps.inspected[-1] - n_noisy
    result: dict[str, Any] = {"curve": None, "curve_area": None, "roc": None}
    if n_noisy:
        x, y = detection_curve_from_steps(steps)
        result["curve_area"] = curve_area(x, y)
        x, y = subsample_curve(x, y, max_points=max_points)
        result["curve"] = {"x": _floats(x), "y": _floats(y)}
    else:
        undefined["curve"] = _NO_NOISE
    if n_noisy and n_clean:
        fpr, tpr, _ = roc_curve_from_steps(steps)
        fpr, tpr = subsample_curve(fpr, tpr, max_points=max_points)
        result["roc"] = {"fpr": _floats(fpr), "tpr": _floats(tpr)}
    else:
        undefined["roc"] = _NO_NOISE if not n_noisy else _NO_CLEAN
    return result


def _metrics(scores: np.ndarray, noisy: np.ndarray, ks: Sequence[int], max_points: int) -> dict[str, Any]:
    """All metrics of one (scores, noisy) pair, without groups; one sort serves them all."""
    steps = rank_steps(scores, noisy)
    n_noisy = int(noisy.sum())
    undefined: dict[str, str] = {}
    report: dict[str, Any] = {
        "n": int(scores.shape[0]),
        "n_noisy": n_noisy,
        "n_clean": int(scores.shape[0]) - n_noisy,
    }
    report["auroc"] = auroc_from_steps(steps)
    if report["auroc"] is None:
        undefined["auroc"] = _NO_NOISE if not n_noisy else _NO_CLEAN
    report["ap"] = average_precision_from_steps(steps)
    if report["ap"] is None:
        undefined["ap"] = _NO_NOISE
    report.update(_cutoff_metrics(steps, ks, undefined))
    report.update(_curve_metrics(steps, max_points, undefined))
    report["undefined"] = undefined
    return report


def _group_labels(groups: object, n: int) -> np.ndarray:
    """Group labels as strings, with ``""`` for rows without a group (None, NaN or empty)."""
    array = np.asarray(groups, dtype=object)
    if array.ndim != 1 or array.shape[0] != n:
        raise InfscopeError(
            f"groups has shape {array.shape} but there are {n} scores; pass one label per row"
        )
    missing = pd.isna(array) | (array == "")
    return np.where(missing, "", array.astype(str)).astype(object)


def detection_report(
    scores: np.ndarray,
    is_noisy: np.ndarray,
    *,
    groups: object = None,
    ks: Iterable[int] = (),
    max_curve_points: int = MAX_CURVE_POINTS,
) -> dict[str, Any]:
    """Detection metrics of ``scores`` (n,) against ``is_noisy`` (n,), overall and per group.

    Returns ``n, n_noisy, n_clean, auroc, ap, k_noisy, precision_at_k, recall_at_k`` (dicts keyed
    by ``str(k)`` for ``k = n_noisy`` and each user ``k``), ``p_at_n_noisy``, ``curve`` (``x``,
    ``y``: the detection curve, at most ``max_curve_points`` points), ``curve_area`` (of the full
    curve), ``roc`` (``fpr``, ``tpr``), ``undefined`` (metric -> reason), and with ``groups`` also
    ``groups`` (label -> the same metrics for that group's noisy rows vs all clean rows) and
    ``group_definition``.
    """
    values = as_score_vector(scores)
    noisy = as_bool_vector(is_noisy, values.shape[0])
    checked_ks = _check_ks(ks)
    report = _metrics(values, noisy, checked_ks, max_curve_points)
    if groups is not None:
        report["groups"] = group_reports(
            values, noisy, groups, ks=checked_ks, max_curve_points=max_curve_points
        )
        report["group_definition"] = GROUP_DEFINITION
    return report


def group_reports(
    scores: np.ndarray,
    is_noisy: np.ndarray,
    groups: object,
    *,
    ks: Iterable[int] = (),
    max_curve_points: int = MAX_CURVE_POINTS,
) -> dict[str, dict[str, Any]]:
    """Metrics per group label: that group's noisy rows against all clean rows (labels sorted)."""
    values = as_score_vector(scores)
    noisy = as_bool_vector(is_noisy, values.shape[0])
    labels = _group_labels(groups, values.shape[0])
    checked_ks = _check_ks(ks)
    result: dict[str, dict[str, Any]] = {}
    for label in sorted(set(labels[noisy]) - {""}):
        keep = ~noisy | (labels == label)
        result[label] = _metrics(values[keep], noisy[keep], checked_ks, max_curve_points)
    return result


def _id_strings(values: object) -> np.ndarray:
    """Ids as a numpy unicode array (sortable and searchable without a Python loop)."""
    return np.asarray(pd.Series(values, dtype=object).astype(str).to_numpy(), dtype=str)


def _scored_ids(
    scores: object, ids: Sequence[Any] | None, id_column: str, score_column: str
) -> tuple[np.ndarray, np.ndarray]:
    """Scores in any accepted form as (string ids, values)."""
    if isinstance(scores, pd.DataFrame):
        missing = [c for c in (id_column, score_column) if c not in scores.columns]
        if missing:
            raise InfscopeError(
                f"score table lacks column(s) {', '.join(missing)}; it needs {id_column!r} and {score_column!r}"
            )
        found_ids, values = scores[id_column].to_numpy(), scores[score_column].to_numpy()
    elif isinstance(scores, pd.Series) and ids is None:
        found_ids, values = scores.index.to_numpy(), scores.to_numpy()
    elif hasattr(scores, "vector") and hasattr(scores, "train_ids") and ids is None:
        found_ids, values = list(scores.train_ids), np.asarray(scores.vector())
    else:
        if ids is None:
            raise InfscopeError(
                "scores given as a plain array need ids=...; pass the training row ids in score order"
            )
        values = np.asarray(scores)
        if values.ndim != 1 or len(ids) != values.shape[0]:
            raise InfscopeError(f"{len(ids)} ids for scores of shape {values.shape}; pass one id per score")
        found_ids = ids
    return _id_strings(found_ids), as_score_vector(values)


def _duplicates(ids: np.ndarray) -> np.ndarray:
    ordered = np.sort(ids)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _lookup(haystack: np.ndarray, needles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each needle in ``haystack`` (unique ids) and whether it was found, by sorting."""
    if haystack.size == 0:
        return np.zeros(needles.shape[0], dtype=np.int64), np.zeros(needles.shape[0], dtype=bool)
    order = np.argsort(haystack, kind="stable")
    sorted_ids = haystack[order]
    slot = np.minimum(np.searchsorted(sorted_ids, needles), sorted_ids.size - 1)
    return order[slot], sorted_ids[slot] == needles


def _describe_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(list(ids)[:5])
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > 5 else shown


def manifest_flags(manifest: pd.DataFrame) -> np.ndarray:
    """The manifest's ``is_noisy`` column as a bool vector (refusing anything but True/False/0/1)."""
    if "is_noisy" not in manifest.columns:
        raise InfscopeError(
            "manifest lacks column 'is_noisy'; read it with infscope.data.manifest.read_manifest"
        )
    return as_bool_vector(manifest["is_noisy"].to_numpy(), len(manifest), name="manifest column is_noisy")


def align_scores(
    scores: object,
    manifest: pd.DataFrame,
    *,
    ids: Sequence[Any] | None = None,
    id_column: str = "id",
    score_column: str = "score",
) -> np.ndarray:
    """Scores reordered to the manifest's row order, matched by id.

    ``scores`` is a DataFrame with ``id`` and ``score`` columns (``Scores.to_frame()``), a Series
    indexed by id, an object with ``vector()`` and ``train_ids`` (``Scores``), or an array plus
    ``ids``. Every manifest row needs a score and every score a manifest row; otherwise the error
    names the ids that do not match.
    """
    score_ids, values = _scored_ids(scores, ids, id_column, score_column)
    if id_column not in manifest.columns:
        raise InfscopeError(
            f"manifest lacks column {id_column!r}; read it with infscope.data.manifest.read_manifest"
        )
    manifest_ids = _id_strings(manifest[id_column].to_numpy())
    for name, fix, found_ids in (
        ("scores repeat", "give each training row one score", score_ids),
        ("manifest repeats", "rebuild it so each row appears once", manifest_ids),
    ):
        dup = _duplicates(found_ids)
        if dup.size:
            raise InfscopeError(f"{name} ids ({_describe_ids(dup)}); {fix}")
    position, found = _lookup(score_ids, manifest_ids)
    if not found.all():
        raise InfscopeError(
            f"no score for manifest ids {_describe_ids(manifest_ids[~found])}; "
            "score every training row or filter the manifest"
        )
    _, known = _lookup(manifest_ids, score_ids)
    if not known.all():
        raise InfscopeError(
            f"scored ids not in the manifest: {_describe_ids(score_ids[~known])}; "
            "use the manifest of the scored dataset"
        )
    return values[position]


def detection_from_manifest(
    scores: object,
    manifest: pd.DataFrame,
    *,
    ids: Sequence[Any] | None = None,
    by: Sequence[str] = ("family", "operator"),
    ks: Iterable[int] = (),
    id_column: str = "id",
    score_column: str = "score",
    max_curve_points: int = MAX_CURVE_POINTS,
) -> dict[str, Any]:
    """Detection report of scores aligned to a noise manifest by id.

    ``scores`` takes every form :func:`align_scores` accepts; mismatched ids are an error naming
    them. Returns :func:`detection_report`'s dict (rows in manifest order) plus
    ``by``: ``{column: {label: group metrics}}`` for each column in ``by``.
    """
    for column in by:
        if column not in manifest.columns:
            raise InfscopeError(
                f"manifest lacks column {column!r}; read it with infscope.data.manifest.read_manifest"
            )
    values = align_scores(scores, manifest, ids=ids, id_column=id_column, score_column=score_column)
    noisy = manifest_flags(manifest)
    report = detection_report(values, noisy, ks=ks, max_curve_points=max_curve_points)
    if by:
        report["by"] = {
            column: group_reports(
                values, noisy, manifest[column].to_numpy(), ks=ks, max_curve_points=max_curve_points
            )
            for column in by
        }
        report["group_definition"] = GROUP_DEFINITION
    return report


def summary_row(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a report (for leaderboards and tables)."""
    return {
        "auroc": report.get("auroc"),
        "ap": report.get("ap"),
        "p_at_k": report.get("p_at_n_noisy"),
        "curve_area": report.get("curve_area"),
        "n": report.get("n"),
        "n_noisy": report.get("n_noisy"),
    }
