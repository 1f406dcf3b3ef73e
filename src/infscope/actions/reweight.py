"""The ``reweight`` action: soft influence subsampling (Wang et al. 2020) as per-row training weights.

Each row keeps probability ``1 / (1 + exp(a * z))`` as its weight, ``z`` being its standardised score
(within its class for classification, so no class is starved) and ``a`` the strength: harmful rows
(high ``z``) weigh less, helpful rows more, an average row 0.5. Fine-tuning then trains on the
weighted mean of the rows' losses, so only the ratio of weights matters. ``a = 0`` gives every row
the same weight, which trains like no weights at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from infscope.actions.changes import Change
from infscope.errors import InfscopeError


def standardise(scores: np.ndarray, groups: Sequence[Any] | None = None) -> np.ndarray:
    """``(s - mean) / std`` within each group (population std); constant groups and non-finite scores get 0."""
    v = np.asarray(scores, dtype=np.float64)
    z = np.zeros(len(v))
    keys = (
        np.zeros(len(v), dtype=np.int64)
        if groups is None
        else np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    )
    finite = np.isfinite(v)
    for g in np.unique(keys):
        members = (keys == g) & finite
        if members.sum() == 0:
            continue
        mean, std = v[members].mean(), v[members].std()
        if std > 0:
            z[members] = (v[members] - mean) / std
    return z


def keep_probability(scores: np.ndarray, strength: float, groups: Sequence[Any] | None = None) -> np.ndarray:
    """Each row's weight ``1 / (1 + exp(strength * z))`` (``z`` from :func:`standardise`)."""
    if not np.isfinite(strength) or strength < 0:
        raise InfscopeError(f"reweight strength {strength} must be a number >= 0; pass e.g. --strength 1")
    z = standardise(scores, groups)
    return 1.0 / (1.0 + np.exp(np.clip(strength * z, -700, 700)))


def reweight(
    rows: Sequence[Mapping[str, Any]],
    scores: np.ndarray,
    *,
    strength: float = 1.0,
    by_class: bool = False,
    current: Mapping[str, float] | None = None,
    eligible: np.ndarray | None = None,
    round: int = 1,
    method: str = "",
) -> list[Change]:
    """A ``reweight`` change for every eligible row whose weight moves (``before`` its weight so far).

    The weights replace earlier ones (they are not multiplied): each round weighs the rows by the
    latest model's scores. Ineligible rows (canaries) keep weight 1 and take no part in the statistics.
    """
    ok = np.ones(len(rows), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    positions = np.flatnonzero(ok)
    groups = [rows[i]["label"] for i in positions] if by_class else None
    weights = keep_probability(np.asarray(scores, dtype=np.float64)[positions], strength, groups)
    current = current or {}
    out = []
    for i, w in zip(positions, weights, strict=True):
        row_id = str(rows[i]["id"])
        before = float(current.get(row_id, 1.0))
        if float(w) == before:
            continue
        scope = f"class {rows[i]['label']}" if by_class else "all rows"
        out.append(
            Change(round, row_id, "reweight", before, float(w), float(scores[i]), method,
                   f"keep probability 1/(1+exp({strength:g}*z)) of its {method} score, standardised over {scope}")
        )  # fmt: skip
    return out
