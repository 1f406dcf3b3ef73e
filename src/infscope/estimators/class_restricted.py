"""Class-restricted influence: each training row measured only against the query rows of its own class.

Label errors move a row's gradient toward another class; averaged over every query, that pull is
diluted by the classes the row has nothing to do with. Restricting the query to the row's class
(Nguyen-Duc et al. 2023) keeps the comparison where a wrong label shows. The score of row ``i`` is
the influence on the mean loss of the query rows of ``class(i)``; influence is linear in the query
gradient, so it is the mean of the per-query score matrix over those rows. A class without query
rows falls back to every query (counted in the meta).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from infscope.errors import InfscopeError
from infscope.estimators.datainf import DataInf
from infscope.estimators.hessian_free import HessianFree
from infscope.estimators.inputs import QUERY_GRADS, TRAIN_GRADS, MethodInputs
from infscope.estimators.method import Compute, Method, check_options
from infscope.estimators.scores import Scores


def row_classes(rows: Sequence[dict]) -> np.ndarray | None:
    """Each row's class: its ``label`` (classification) or ``class`` field; ``None`` if some row has neither."""
    for key in ("label", "class"):
        if rows and all(r.get(key) is not None for r in rows):
            return np.asarray([str(r[key]) for r in rows], dtype=object)
    return None


def class_restricted(
    matrix: np.ndarray, train_classes: np.ndarray, query_classes: np.ndarray
) -> tuple[np.ndarray, int]:
    """Per training row, the mean of its column over the query rows of its class; and how many fell back."""
    out = np.empty(matrix.shape[1], dtype=np.float64)
    fallback = 0
    overall = matrix.mean(axis=0)
    for cls in np.unique(train_classes):
        columns = train_classes == cls
        rows = query_classes == cls
        if rows.any():
            out[columns] = matrix[rows][:, columns].mean(axis=0)
        else:
            out[columns] = overall[columns]
            fallback += int(columns.sum())
    return out, fallback


def _restricted(name: str, cls: type) -> Compute:
    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        check_options(name, cls.__init__, options)
        train_classes, query_classes = row_classes(inputs.rows()), row_classes(inputs.query_rows())
        if train_classes is None or query_classes is None:
            raise InfscopeError(
                f"{name} needs a class per row (a label, or a 'class' field); use {name[6:]} instead"
            )
        train = inputs.train_grads()
        scores = cls(**options).fit(train).score(inputs.query_grads(), aggregate=False)
        by_id = dict(zip([str(r["id"]) for r in inputs.rows()], train_classes, strict=True))
        ordered = np.asarray([by_id[i] for i in scores.train_ids], dtype=object)
        values, fallback = class_restricted(np.asarray(scores.values), ordered, query_classes)
        meta = {**scores.meta, "aggregate": True, "class_restricted": True, "fallback_rows": fallback}
        return Scores(values, list(scores.train_ids), None, name, meta)

    return compute


REGISTER = [
    Method(
        "class_datainf",
        (TRAIN_GRADS, QUERY_GRADS),
        _restricted("class_datainf", DataInf),
        "DataInf against the query rows of the training row's own class (label errors)",
    ),
    Method(
        "class_hessian_free",
        (TRAIN_GRADS, QUERY_GRADS),
        _restricted("class_hessian_free", HessianFree),
        "gradient dot products with the mean query gradient of the row's own class",
    ),
]
