"""Out-of-fold scores: each row judged by a model that never saw it (K-fold fine-tunes).

- ``oof_loss``: the row's loss under the fold model trained on the other K-1 folds. In-sample loss
  shrinks as a model memorises its rows, noisy ones included; out-of-sample loss does not, and it
  beats more complex detectors on real text label errors (Chong et al. 2022).
- ``cleanlab`` (classification): confident learning on the out-of-fold class probabilities
  (Northcutt et al. 2021), written here without the cleanlab package: rows ranked by
  self-confidence ``1 - p(given label)``; the meta holds the confident joint's estimate of how many
  labels are wrong (per class threshold ``t_j`` = mean ``p_j`` of rows labelled ``j``; a row counts
  off-diagonal when another class clears its threshold with a higher probability).

Both declare the ``refit`` need: scoring fine-tunes K models with the run's own settings (cached in
the run, resumable), so these methods cost K fine-tunes on (K-1)/K of the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infscope.errors import InfscopeError
from infscope.estimators.baselines import from_values
from infscope.estimators.inputs import REFIT, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.scores import Scores


def fold_of(ids: list[str], k: int, seed: int) -> np.ndarray:
    """A seeded assignment of rows to ``k`` folds of (nearly) equal size."""
    if not 2 <= k <= len(ids):
        raise InfscopeError(f"k={k} folds need 2 <= k <= the number of rows ({len(ids)}); pass --options k=5")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.empty(len(ids), dtype=np.int64)
    folds[order] = np.arange(len(ids)) % k
    return folds


def confident_joint_issues(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows the confident joint puts off the diagonal (their given label is probably wrong)."""
    n_classes = probs.shape[1]
    thresholds = np.array(
        [probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(n_classes)]
    )
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -np.inf)
    best = masked.argmax(axis=1)
    has_any = above.any(axis=1)
    return has_any & (best != labels)


def self_confidence_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``1 - p(given label)`` per row: higher = more likely mislabelled."""
    return 1.0 - probs[np.arange(len(labels)), labels]


def _oof_loss(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("oof_loss", lambda k=5: None, options)
    oof = inputs.out_of_fold(int(options.get("k", 5)))
    return from_values(oof.losses, inputs.train_ids, "oof_loss", {"k": oof.k, "family": "out_of_fold"})


def _cleanlab(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("cleanlab", lambda k=5: None, options)
    oof = inputs.out_of_fold(int(options.get("k", 5)))
    if oof.probs is None or oof.labels is None:
        raise InfscopeError(
            "cleanlab needs class probabilities: use it on classification runs (oof_loss otherwise)"
        )
    issues = confident_joint_issues(oof.probs, oof.labels)
    meta = {"k": oof.k, "family": "out_of_fold", "estimated_issues": int(issues.sum())}
    return from_values(self_confidence_scores(oof.probs, oof.labels), inputs.train_ids, "cleanlab", meta)


REGISTER = [
    Method(
        "oof_loss",
        (REFIT,),
        _oof_loss,
        "each row's loss under a K-fold model that never saw it",
        family="out_of_fold",
    ),
    Method(
        "cleanlab",
        (REFIT,),
        _cleanlab,
        "confident learning on out-of-fold class probabilities (self-confidence ranking)",
        family="out_of_fold",
        tasks=("classification",),
    ),
]
