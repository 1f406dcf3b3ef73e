"""Class-detection attribution metric (the DataInf paper's check that scores point to the right data).

Each query belongs to a class, and so does each training row. A good influence method should find
the query's own class among the most *helpful* training rows. Scores follow the project convention
(higher = more harmful), so helpfulness is ``-matrix``. Per query:

- ``auc``: AUROC of "training row has the query's class" ranked by helpfulness (ties count one half);
- ``recall``: share of the query's class among the ``s`` most helpful rows, where ``s`` is the number
  of training rows of that class (a tie group at the cut-off is shared out proportionally).

Both are computed for all queries at once with matrix operations; neither depends on row order.
Queries whose class has no training row (or whose class covers every row) have an undefined AUC;
they are NaN in the per-query arrays and left out of the means.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infscope.errors import InfscopeError
from infscope.evaluate.metrics import auroc_rows, top_k_hits_rows


def _classes(values: object, n: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != n:
        raise InfscopeError(f"{name} has shape {array.shape}, expected ({n},); pass one class per row")
    return array


def class_detection(matrix: np.ndarray, train_classes: object, query_classes: object) -> dict[str, Any]:
    """Mean class-detection AUC and recall of a ``(q, n)`` score matrix (higher = more harmful).

    Returns ``auc`` and ``recall`` (means over queries where defined, ``None`` if none is),
    ``per_query_auc`` and ``per_query_recall`` (float arrays of length ``q``, NaN where undefined),
    ``n_queries``, ``n_undefined`` and ``undefined`` (a reason, or ``None``).
    """
    scores = np.asarray(matrix, dtype=np.float64)
    if scores.ndim != 2:
        raise InfscopeError(f"attribution needs a (queries, train) score matrix, got shape {scores.shape}")
    q, n = scores.shape
    if np.isnan(scores).any():
        raise InfscopeError("the score matrix contains NaN values; recompute the scores before evaluating")
    train = _classes(train_classes, n, "train_classes")
    query = _classes(query_classes, q, "query_classes")
    helpfulness = -scores
    same_class = query[:, None] == train[None, :]
    class_size = same_class.sum(axis=1)

    per_query_auc = auroc_rows(helpfulness, same_class) if q else np.zeros(0)
    per_query_recall = np.full(q, np.nan)
    has_class = class_size > 0
    if has_class.any():
        sizes = class_size[has_class]
        hits = top_k_hits_rows(helpfulness[has_class], same_class[has_class], sizes)
        per_query_recall[has_class] = hits / sizes

    defined = ~np.isnan(per_query_auc)
    n_undefined = int(q - defined.sum())
    reason = None
    if n_undefined:
        reason = (
            f"{n_undefined} of {q} queries have a class with no training row or covering every training row; "
            "their AUC is left out of the mean (their recall too when the class has no training row)"
        )
    recall_defined = ~np.isnan(per_query_recall)
    return {
        "auc": float(per_query_auc[defined].mean()) if defined.any() else None,
        "recall": float(per_query_recall[recall_defined].mean()) if recall_defined.any() else None,
        "per_query_auc": per_query_auc,
        "per_query_recall": per_query_recall,
        "n_queries": q,
        "n_undefined": n_undefined,
        "undefined": reason,
    }
