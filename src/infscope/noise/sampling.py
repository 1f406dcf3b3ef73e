"""Which rows get noise: exact counts, uniform or stratified, independent of row order.

Rows are ranked by a keyed hash of ``(seed, id)`` and the first ``k`` are taken (within each
stratum for stratified sampling), so the choice does not depend on input order and the noisy
set of a smaller ratio is contained in that of a larger one (uniform sampling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from infscope.errors import InfscopeError
from infscope.noise.rng import hash_order

K = TypeVar("K")
SAMPLINGS = ("uniform", "length", "class")


def target_count(ratio: float, n: int) -> int:
    """``round(ratio * n)`` (halves round up); a ratio outside (0, 1] or giving 0 rows is an error."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise InfscopeError(f"noise ratio must be in (0, 1], got {ratio}; e.g. --ratio 0.2")
    if n <= 0:
        raise InfscopeError("the dataset is empty; pass a file with at least one row")
    k = min(n, math.floor(ratio * n + 0.5))
    if k == 0:
        raise InfscopeError(
            f"ratio {ratio} of {n} rows rounds to zero noisy rows; use a ratio >= {0.5 / n:.4g} or more rows"
        )
    return k


def allocate(total: int, weights: Mapping[K, float]) -> dict[K, int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties by key order)."""
    keys = list(weights)
    if not keys:
        return {}
    w = np.asarray([weights[k] for k in keys], dtype=np.float64)
    share = w / w.sum() * total
    base = np.floor(share).astype(np.int64)
    rest = total - int(base.sum())
    order = np.lexsort((np.arange(len(keys)), -(share - base)))
    base[order[:rest]] += 1
    return {k: int(v) for k, v in zip(keys, base, strict=True)}


def length_strata(lengths: Sequence[int]) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Quartile label (``q1``..``q4``) of each length, and each quartile's [low, high] length."""
    values = np.asarray(lengths, dtype=np.float64)
    cuts = np.quantile(values, [0.25, 0.5, 0.75])
    index = np.searchsorted(cuts, values, side="right")
    labels = np.asarray([f"q{i + 1}" for i in range(4)], dtype=object)[index]
    ranges = {
        f"q{i + 1}": [float(values[index == i].min()), float(values[index == i].max())]
        for i in range(4)
        if (index == i).any()
    }
    return labels, ranges


def class_strata(values: Sequence[Any]) -> np.ndarray:
    """Stratum label of each row for class-stratified sampling (the class as a string)."""
    return np.asarray([str(v) for v in values], dtype=object)


def select_rows(
    ids: Sequence[str], k: int, seed: int, strata: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """Boolean mask of the ``k`` rows to corrupt, and per-stratum ``rows/target/actual`` counts.

    Strata get ``k`` in proportion to their size (largest remainder), so every stratum carries
    the same noise ratio up to rounding.
    """
    n = len(ids)
    order = hash_order(seed, ids, "select")
    mask = np.zeros(n, dtype=bool)
    if strata is None:
        mask[order[:k]] = True
        return mask, {"all": {"rows": n, "target": k, "actual": k}}
    names, inverse, sizes = np.unique(strata.astype(str), return_inverse=True, return_counts=True)
    quota = allocate(k, {str(name): int(size) for name, size in zip(names, sizes, strict=True)})
    ranked_strata = inverse[order]
    report = {}
    for s, name in enumerate(names):
        members = order[ranked_strata == s]
        take = quota[str(name)]
        mask[members[:take]] = True
        report[str(name)] = {"rows": int(sizes[s]), "target": take, "actual": take}
    return mask, report
