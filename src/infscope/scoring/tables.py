"""Saved scores and ranked tables of a run, and their detection metrics against a manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.evaluate.detection import detection_from_manifest, summary_row
from infscope.runs import RunLayout

MATRIX_SUFFIX = ".matrix"


def save_scores(layout: RunLayout, scored: dict[str, Scores], *, suffix: str = "") -> None:
    """Write ``scores/<method><suffix>.npz`` and, for vectors, the ranked ``results`` tables."""
    for method, scores in scored.items():
        scores.save(layout.scores(method + suffix))
        if np.ndim(scores.values) == 1:
            scores.write_table(layout.results(method + suffix, "parquet"))
            scores.write_table(layout.results(method + suffix, "csv"))


def remove_epoch_scores(layout: RunLayout, methods: Sequence[str]) -> None:
    """Delete ``<method>@epoch-N`` scores and tables of ``methods`` left by an earlier ``--checkpoint all``."""
    for method in methods:
        for folder, pattern in ((layout.scores_dir, f"{method}@*.npz"), (layout.results_dir, f"{method}@*")):
            for path in folder.glob(pattern):
                path.unlink()


def load_scores(layout: RunLayout) -> dict[str, Scores]:
    """Every per-row score vector saved in the run (``{method: Scores}``, sorted by name)."""
    paths = sorted(p for p in layout.scores_dir.glob("*.npz") if not p.name.endswith(MATRIX_SUFFIX + ".npz"))
    if not paths:
        raise InfscopeError(f"{layout.root} has no scores; run `infscope score {layout.root}` first")
    return {p.stem: Scores.load(p) for p in paths}


def detection_evaluation(
    scores: dict[str, Scores], manifest: pd.DataFrame, *, ks: Sequence[int] = ()
) -> dict:
    """Detection metrics of each method against the manifest: overall, per family and per operator.

    Returns ``{"n_train", "n_noisy", "detection": {method: report}, "leaderboard": [rows]}``; each
    leaderboard row carries the method's scoring seconds and peak memory from its Scores meta.
    Rows the manifest does not list count as clean (a user's list of known-bad rows is enough).
    """
    n_noisy = int(manifest["is_noisy"].astype(bool).sum())
    out: dict[str, Any] = {"n_train": len(manifest), "n_noisy": n_noisy, "detection": {}, "leaderboard": []}
    if not n_noisy:
        return out
    for method, s in scores.items():
        report = detection_from_manifest(
            s.vector(), manifest, ids=s.train_ids, by=("family", "operator"), ks=ks
        )
        out["detection"][method] = report
        out["leaderboard"].append(
            {
                "method": method,
                **summary_row(report),
                "seconds": s.meta.get("seconds"),
                "peak_mb": s.meta.get("peak_rss_mb"),
                "canary_auroc": s.meta.get("canary_auroc"),
            }
        )
    return out
