"""How each peer compares with our methods on the same run: rank agreement, detection, speed.

For every :class:`PeerResult` the table gives the Spearman correlation with our score of the
closest method (``vs``; EK-FAC has no exact equivalent, so it is set against our exact and DataInf
scores), the max relative difference where the peer computes the *same* quantity (reference loop,
kronfluence identity, dattri DataInf at its single damping), the detection AUROC / AP against the
run's manifest, and seconds relative to our method timed in the same process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from infscope.peers.inputs import PeerInputs
from infscope.peers.result import PeerResult
from infscope.runs import RunLayout

#: Peers that compute exactly our quantity (same damping) -> the method they must equal.
SAME_QUANTITY = {"reference_datainf": "datainf", "kronfluence_identity": "hessian_free"}


def our_scores(inputs: PeerInputs, methods: Sequence[str]) -> dict[str, tuple[np.ndarray, float]]:
    """Our scores and scoring seconds per method, computed now from the run's gradient stores."""
    from infscope.estimators.inputs import GradientInputs
    from infscope.scoring import runnable, score_methods

    losses = None
    if inputs.run_dir is not None and inputs.checkpoint is not None:
        path = RunLayout(inputs.run_dir).losses(inputs.checkpoint, inputs.block_by)
        losses = pd.read_parquet(path) if path.is_file() else None
    given = GradientInputs(inputs.train_grads, inputs.val_grads, losses, seed=inputs.seed, task=inputs.task)
    wanted = [m for m in methods if runnable(m, given)]
    scored = score_methods(wanted, given)
    return {m: (s.vector(), float(s.meta["seconds"])) for m, s in scored.items()}


def _datainf_at(inputs: PeerInputs, damping: float) -> tuple[np.ndarray, float]:
    from infscope.estimators.registry import get_estimator

    start = time.perf_counter()
    values = get_estimator("datainf", damping=damping).fit(inputs.train_grads).score(inputs.val_grads)
    return values.vector(), time.perf_counter() - start


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / max |b|``: the accuracy of ``a`` as a copy of ``b``."""
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max() / scale) if scale > 0 else float("nan")


def _detection(result: PeerResult, manifest: pd.DataFrame | None) -> dict[str, Any]:
    if manifest is None or not manifest["is_noisy"].astype(bool).any():
        return {"auroc": None, "ap": None}
    from infscope.evaluate.detection import detection_from_manifest

    report = detection_from_manifest(result.scores, manifest, ids=result.train_ids, by=())
    return {"auroc": report.get("auroc"), "ap": report.get("ap")}


def compare_peers(
    results: Sequence[PeerResult],
    inputs: PeerInputs,
    *,
    ours: dict[str, tuple[np.ndarray, float]] | None = None,
) -> pd.DataFrame:
    """One row per peer (and one per our compared method): AUROC, AP, Spearman, rel. diff, seconds, ratio.

    ``ours`` maps method -> (scores aligned with ``inputs.train_ids``, seconds); computed with
    :func:`our_scores` when omitted.
    """
    from infscope.peers.registry import PEERS

    needed = sorted({m for r in results for m in PEERS[r.method].ours} | {"datainf"})
    ours = dict(ours) if ours is not None else our_scores(inputs, needed)
    rows: list[dict[str, Any]] = []
    for method, (values, seconds) in ours.items():
        fake = PeerResult(method, values, seconds, 0.0, None, inputs.train_ids)
        rows.append({"method": f"ours:{method}", **_detection(fake, inputs.manifest), "seconds": seconds})
    for result in results:
        row: dict[str, Any] = {**result.as_row(), "auroc": None, "ap": None}
        targets = [m for m in PEERS[result.method].ours if m in ours]
        if result.ok and targets:
            assert result.scores is not None
            vs = targets[0]
            ref, ref_seconds = ours[vs]
            if result.method == "dattri_datainf" and "damping" in result.meta:
                ref, ref_seconds = _datainf_at(inputs, float(result.meta["damping"]))
                vs = f"datainf(damping={float(result.meta['damping']):.3g})"
            row.update(_detection(result, inputs.manifest))
            row.update(
                vs=vs,
                spearman=spearman(result.scores, ref),
                spearman_datainf=spearman(result.scores, ours["datainf"][0]) if "datainf" in ours else None,
                rel_diff=max_rel_diff(result.scores, ref)
                if result.method in SAME_QUANTITY or vs.startswith("datainf(")
                else None,
                ratio=result.seconds / ref_seconds if ref_seconds > 0 else None,
            )
        rows.append(row)
    columns = ["method", "auroc", "ap", "vs", "spearman", "spearman_datainf", "rel_diff", "seconds", "ratio"]
    columns += ["peak_mb", "error"]
    return pd.DataFrame(rows).reindex(columns=columns)
