"""One record per edited row, and how a list of them turns rows into the cleaned rows.

A :class:`Change` is one line of the audit log: the round, the row id, the action (``drop``,
``reweight``, ``relabel``, ``repair``, or ``review`` for a flagged row left for a person), the value
before and after (the whole row for a drop, the weight, the label, the response text), the row's
score, the scoring method and a reason in words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from infscope.data.formatting import with_response

ACTIONS = ("drop", "reweight", "relabel", "repair")
#: A flagged row whose repair was not kept: nothing in the data changes, a person should look.
REVIEW = "review"
CANARY_PREFIX = "canary-"


def is_canary(row_id: Any) -> bool:
    """Canary rows calibrate detectors; they are never acted on nor shown in any output."""
    return str(row_id).startswith(CANARY_PREFIX)


@dataclass
class Change:
    """One change to one row (a line of the audit log)."""

    round: int
    id: str
    action: str
    before: Any
    after: Any
    score: float | None
    method: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "change", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Change:
        return cls(
            **{k: data[k] for k in ("round", "id", "action", "before", "after", "score", "method", "reason")}
        )


def apply_changes(
    rows: Sequence[Mapping[str, Any]], weights: Mapping[str, float], changes: Iterable[Change]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The rows and row weights after ``changes`` (in order); the inputs are not modified.

    ``drop`` removes the row, ``reweight`` sets its weight, ``relabel`` its label, ``repair`` its
    response (``output``, or the last assistant turn of a chat row); ``review`` changes nothing.
    """
    by_id = {str(r["id"]): dict(r) for r in rows}
    new_weights = dict(weights)
    dropped: set[str] = set()
    for change in changes:
        if change.action == "drop":
            dropped.add(change.id)
            new_weights.pop(change.id, None)
        elif change.action == "reweight":
            new_weights[change.id] = float(change.after)
        elif change.action == "relabel":
            by_id[change.id]["label"] = int(change.after)
        elif change.action == "repair":
            by_id[change.id] = with_response(by_id[change.id], str(change.after))
    kept = [by_id[str(r["id"])] for r in rows if str(r["id"]) not in dropped]
    return kept, new_weights


def touched(changes: Iterable[Change]) -> set[str]:
    """Ids of the rows an action already handled (changed or left for review)."""
    return {c.id for c in changes}


def changed_rows(changes: Iterable[Change]) -> int:
    """Number of distinct rows whose data or weight changed (``review`` records do not count)."""
    return len({c.id for c in changes if c.action != REVIEW})
