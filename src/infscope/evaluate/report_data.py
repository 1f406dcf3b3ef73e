"""Everything the HTML report shows about one run's scores, as one JSON-ready dict.

:func:`build_report_data` takes the scores of several methods on the same training rows and the
noise manifest, and collects: the leaderboard, per-group AUROC matrices (methods x noise families,
and x operators), ROC and detection curves per method, clean-vs-noisy score histograms and the
Spearman rank correlation between methods. The report layer only draws; it computes nothing.
Every value is a plain Python number, string, list or ``None`` (never NaN).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.evaluate.aggregate import leaderboard
from infscope.evaluate.detection import (
    GROUP_DEFINITION,
    MAX_CURVE_POINTS,
    align_scores,
    detection_report,
    group_reports,
    manifest_flags,
)
from infscope.evaluate.jsonable import to_jsonable
from infscope.evaluate.metrics import average_ranks


def spearman_matrix(vectors: np.ndarray) -> np.ndarray:
    """Spearman correlation between the rows of ``vectors`` (m, n), ties by average ranks.

    A constant row has no defined correlation: its entries are NaN (the diagonal too).
    """
    ranks = average_ranks(np.atleast_2d(np.asarray(vectors, dtype=np.float64)))
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = centred / norms[:, None]
        corr = np.clip(unit @ unit.T, -1.0, 1.0)
    corr[norms == 0, :] = np.nan
    corr[:, norms == 0] = np.nan
    return corr


def score_histograms(values: np.ndarray, noisy: np.ndarray, bins: int = 30) -> dict[str, Any]:
    """Counts of clean and noisy scores on shared bin edges (finite scores only)."""
    finite = np.isfinite(values)
    edges = np.histogram_bin_edges(values[finite], bins=bins) if finite.any() else np.array([0.0, 1.0])
    clean, _ = np.histogram(values[finite & ~noisy], bins=edges)
    dirty, _ = np.histogram(values[finite & noisy], bins=edges)
    return {
        "edges": edges,
        "clean": clean,
        "noisy": dirty,
        "n_nonfinite": int((~finite).sum()),
    }


def _group_matrix(reports: Mapping[str, Mapping[str, Mapping[str, Any]]], metric: str) -> dict[str, Any]:
    """``{methods, groups, values}`` with ``values[i][j]`` = metric of method i on group j (or None)."""
    methods = list(reports)
    groups = sorted({label for per_group in reports.values() for label in per_group})
    values = [[reports[m].get(g, {}).get(metric) for g in groups] for m in methods]
    sizes = {g: next((reports[m][g]["n_noisy"] for m in methods if g in reports[m]), 0) for g in groups}
    return {"methods": methods, "groups": groups, "values": values, "n_noisy": sizes, "metric": metric}


def build_report_data(
    scores: Mapping[str, object],
    manifest: pd.DataFrame,
    *,
    costs: Mapping[str, Mapping[str, float]] | None = None,
    by: Sequence[str] = ("family", "operator"),
    ks: Iterable[int] = (),
    bins: int = 30,
    max_curve_points: int = MAX_CURVE_POINTS,
) -> dict[str, Any]:
    """Collect the report's tables, curves, histograms and correlations for ``scores`` (method -> scores).

    Each value of ``scores`` is anything :func:`~infscope.evaluate.detection.align_scores` accepts;
    a plain array is taken to be in manifest row order. ``costs`` maps a method to its
    ``seconds`` and ``peak_mb``. Methods appear in leaderboard order (best AUROC first).
    Returns ``n, n_noisy, methods, leaderboard, detection`` (per-method headline metrics with
    precision/recall at k), ``curves`` (per method: ``roc``, ``detection``, ``auroc``,
    ``curve_area``), ``group_auroc`` (per ``by`` column: a methods x groups matrix),
    ``histograms`` and ``correlation`` (``methods``, Spearman ``matrix``).
    """
    if not scores:
        raise InfscopeError("no scores to report; score the run with at least one method first")
    manifest_ids = manifest["id"].astype(str).tolist() if "id" in manifest.columns else None
    noisy = manifest_flags(manifest)
    for column in by:
        if column not in manifest.columns:
            raise InfscopeError(f"manifest lacks column {column!r}; pass by=... with columns it has")
    aligned: dict[str, np.ndarray] = {}
    for method, given in scores.items():
        plain = isinstance(given, (np.ndarray, list, tuple))
        if plain and len(given) != len(manifest):
            raise InfscopeError(
                f"scores of {method!r} have {len(given)} values but the manifest has {len(manifest)} rows; "
                "pass one score per manifest row, or a table with ids"
            )
        aligned[str(method)] = align_scores(given, manifest, ids=manifest_ids if plain else None)

    checked_ks = list(ks)
    reports = {
        method: detection_report(values, noisy, ks=checked_ks, max_curve_points=max_curve_points)
        for method, values in aligned.items()
    }
    costs = costs or {}
    rows = [
        {
            "method": method,
            "auroc": report["auroc"],
            "ap": report["ap"],
            "p_at_k": report["p_at_n_noisy"],
            "seconds": costs.get(method, {}).get("seconds"),
            "peak_mb": costs.get(method, {}).get("peak_mb"),
        }
        for method, report in reports.items()
    ]
    board = leaderboard(rows)
    methods = board["method"].tolist()

    group_auroc = {}
    for column in by:
        per_method = {
            method: group_reports(
                aligned[method], noisy, manifest[column].to_numpy(), ks=(), max_curve_points=2
            )
            for method in methods
        }
        group_auroc[column] = _group_matrix(per_method, "auroc")

    data = {
        "n": int(noisy.shape[0]),
        "n_noisy": int(noisy.sum()),
        "methods": methods,
        "leaderboard": board,
        "detection": {
            m: {
                key: reports[m][key]
                for key in (
                    "auroc",
                    "ap",
                    "p_at_n_noisy",
                    "precision_at_k",
                    "recall_at_k",
                    "curve_area",
                    "undefined",
                )
            }
            for m in methods
        },
        "curves": {
            m: {
                "roc": reports[m]["roc"],
                "detection": reports[m]["curve"],
                "auroc": reports[m]["auroc"],
                "curve_area": reports[m]["curve_area"],
            }
            for m in methods
        },
        "group_auroc": group_auroc,
        "group_definition": GROUP_DEFINITION,
        "histograms": {m: score_histograms(aligned[m], noisy, bins=bins) for m in methods},
        "correlation": {
            "methods": methods,
            "spearman": spearman_matrix(np.stack([aligned[m] for m in methods])),
        },
    }
    return to_jsonable(data)
