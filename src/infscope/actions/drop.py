"""The ``drop`` action: remove the flagged rows (the most harmful ones within the budget)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from infscope.actions.changes import Change
from infscope.actions.flagging import Budget, flag


def drop(
    rows: Sequence[Mapping[str, Any]],
    scores: np.ndarray,
    budget: Budget,
    *,
    eligible: np.ndarray | None = None,
    round: int = 1,
    method: str = "",
) -> list[Change]:
    """One ``drop`` change per flagged row, most harmful first; ``before`` holds the whole row."""
    return [
        Change(
            round=round,
            id=str(rows[i]["id"]),
            action="drop",
            before=dict(rows[i]),
            after=None,
            score=float(scores[i]),
            method=method,
            reason=f"among the most harmful rows by {method} ({budget.describe()})",
        )
        for i in flag(scores, budget, eligible)
    ]
