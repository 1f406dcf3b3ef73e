"""Which rows an action touches: the budget (``k`` rows, a fraction, or a score threshold) and the flagging.

Scores follow the package convention, higher = more harmful, so the flagged rows are the eligible
rows with the highest scores (non-finite scores last, ties in row order). ``--k`` reads as:

* ``10``: the 10 most harmful rows per round;
* ``0.1`` or ``10%``: that fraction of the eligible rows per round (rounded, at least one row);
* ``score:0.5``: every eligible row whose score is at least 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infscope.errors import InfscopeError

KINDS = ("count", "fraction", "threshold")


@dataclass(frozen=True)
class Budget:
    """How many rows one round may flag: ``kind`` is count, fraction or threshold."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InfscopeError(f"unknown budget kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not np.isfinite(self.value):
            raise InfscopeError(f"budget {self.value} is not a number; pass --k 10, --k 10% or --k score:0.5")
        if self.kind == "count" and (self.value < 1 or self.value != int(self.value)):
            raise InfscopeError(f"budget --k {self.value:g} rows is not a positive whole number; pass --k 10")
        if self.kind == "fraction" and not 0 < self.value <= 1:
            raise InfscopeError(f"budget fraction {self.value:g} is outside (0, 1]; pass --k 0.1 or --k 10%")

    @classmethod
    def parse(cls, text: str | int | float) -> Budget:
        """Read ``--k``: ``10`` rows, ``0.1`` / ``10%`` of the rows, or ``score:X`` (score at least X)."""
        raw = str(text).strip().lower()
        try:
            if raw.startswith("score:"):
                return cls("threshold", float(raw.removeprefix("score:")))
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise InfscopeError(
                f"cannot read budget --k {text!r}; pass a number of rows (10), a fraction (0.1 or 10%) "
                "or a score threshold (score:0.5)"
            ) from None
        if value <= 0:
            raise InfscopeError(f"budget --k {text} is 0 rows, so nothing would change; pass --k 10 or 10%")
        if raw.endswith("%") or value < 1:
            return cls("fraction", value)
        return cls("count", value)

    def count(self, n_eligible: int) -> int | None:
        """Rows to flag among ``n_eligible`` (``None`` for a threshold, which counts by score)."""
        if self.kind == "count":
            return min(int(self.value), n_eligible)
        if self.kind == "fraction":
            return min(n_eligible, max(1, int(round(self.value * n_eligible)))) if n_eligible else 0
        return None

    def describe(self) -> str:
        if self.kind == "count":
            return f"{int(self.value)} rows"
        if self.kind == "fraction":
            return f"{self.value:.0%} of rows"
        return f"score >= {self.value:g}"


def harm_order(scores: np.ndarray) -> np.ndarray:
    """Positions by decreasing score; non-finite scores last; ties keep row order."""
    v = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isfinite(v), -v, np.inf)
    return np.argsort(key, kind="stable")


def flag(
    scores: Sequence[float] | np.ndarray, budget: Budget, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Positions of the flagged rows, most harmful first (only ``eligible`` rows, a bool mask)."""
    v = np.asarray(scores, dtype=np.float64)
    ok = np.ones(len(v), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    order = harm_order(v)
    order = order[ok[order]]
    if budget.kind == "threshold":
        return order[np.isfinite(v[order]) & (v[order] >= budget.value)]
    return order[: budget.count(len(order))]
