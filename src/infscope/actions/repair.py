"""The ``repair`` action (instruction data): an expert rewrites the response of each flagged row.

A repair is kept only if the repaired row leaves the flagged range: its loss under the tuned model
(re-scored by the caller's ``rescore``) must fall below ``threshold``, the loss above which rows count
as flagged (the loop uses the lowest loss among the rows the loss baseline would flag with the same
budget, so for ``--method loss`` this is exactly the flagged range of the method itself). Otherwise,
and when the expert gives no usable answer, the original stays and the row is marked for a person
(a ``review`` record).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from infscope.actions.changes import REVIEW, Change
from infscope.actions.flagging import Budget, flag
from infscope.data.formatting import prompt_response_view, with_response


def repair(
    rows: Sequence[Mapping[str, Any]],
    scores: np.ndarray,
    budget: Budget,
    expert: Any,
    rescore: Callable[[list[dict[str, Any]]], np.ndarray],
    threshold: float,
    *,
    eligible: np.ndarray | None = None,
    round: int = 1,
    method: str = "",
) -> list[Change]:
    """``repair`` changes for kept rewrites and ``review`` records for the rest, in flagged order.

    ``expert.rewrite(rows)`` returns one result per row (``id``, ``text``, ``error``); ``rescore``
    maps repaired rows to their losses (one batched call).
    """
    positions = flag(scores, budget, eligible)
    if not len(positions):
        return []
    flagged = [dict(rows[i]) for i in positions]
    results = {str(r.id): r for r in expert.rewrite(flagged)}
    usable = [
        j for j, row in enumerate(flagged)
        if (res := results.get(str(row["id"]))) is not None and res.error is None and res.text and res.text.strip()
    ]  # fmt: skip
    repaired = [with_response(flagged[j], results[str(flagged[j]["id"])].text) for j in usable]
    new_losses = (
        dict(zip(usable, np.asarray(rescore(repaired), dtype=np.float64), strict=True)) if usable else {}
    )
    spec = getattr(expert, "spec", "expert")
    out = []
    for j, (i, row) in enumerate(zip(positions, flagged, strict=True)):
        row_id, score = str(row["id"]), float(scores[i])
        before = prompt_response_view(row)[1]
        if j not in new_losses:
            res = results.get(row_id)
            why = "no answer" if res is None else (res.error or "empty answer")
            out.append(
                Change(
                    round,
                    row_id,
                    REVIEW,
                    before,
                    None,
                    score,
                    method,
                    f"{spec} gave no repair ({why}); check by hand",
                )
            )
            continue
        text = results[row_id].text
        loss = float(new_losses[j])
        if loss < threshold:
            out.append(
                Change(
                    round,
                    row_id,
                    "repair",
                    before,
                    text,
                    score,
                    method,
                    f"{spec} rewrite: loss {loss:.3f} < flagged threshold {threshold:.3f}",
                )
            )
        else:
            out.append(
                Change(
                    round,
                    row_id,
                    REVIEW,
                    before,
                    None,
                    score,
                    method,
                    f"{spec} rewrite still flagged (loss {loss:.3f} >= {threshold:.3f}); check by hand",
                )
            )
    return out  # fmt: skip
