"""Each cleaning action against a hand-computed expectation on a small table; budget, flagging,
output in the input's format, audit log and undo, the test-overlap guard, canaries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from infscope.actions.audit import audit_header, read_audit, undo, write_audit
from infscope.actions.changes import Change, apply_changes
from infscope.actions.drop import drop
from infscope.actions.flagging import Budget, flag
from infscope.actions.loop import _eligible, check_test_overlap
from infscope.actions.metrics import exact_match, final_number
from infscope.actions.output import cleaned_records, read_input, write_cleaned
from infscope.actions.relabel import relabel
from infscope.actions.repair import repair
from infscope.actions.reweight import keep_probability, reweight
from infscope.errors import InfscopeError

ROWS = [
    {"id": f"r{i}", "text": f"sentence number {i}", "label": lab} for i, lab in enumerate([0, 0, 1, 1, 2])
]
SCORES = np.array([0.1, 0.9, np.nan, 0.5, 0.9])


def test_budget_parsing():
    assert Budget.parse("10") == Budget("count", 10)
    assert Budget.parse("0.1") == Budget("fraction", 0.1)
    assert Budget.parse("10%") == Budget("fraction", 0.1)
    assert Budget.parse("score:0.5") == Budget("threshold", 0.5)
    for bad in ("0", "0%", "abc", "-3", "2.5"):
        with pytest.raises(InfscopeError):
            Budget.parse(bad)


def test_flag_orders_by_harm_and_respects_budget_and_eligibility():
    # highest first, ties in row order, NaN never flagged by a threshold and last otherwise
    assert flag(SCORES, Budget("count", 2)).tolist() == [1, 4]
    assert flag(SCORES, Budget("count", 9)).tolist() == [1, 4, 3, 0, 2]
    assert flag(SCORES, Budget("fraction", 0.4)).tolist() == [1, 4]  # round(0.4 * 5) = 2
    assert flag(SCORES, Budget("threshold", 0.5)).tolist() == [1, 4, 3]
    eligible = np.array([True, False, True, True, True])
    assert flag(SCORES, Budget("count", 2), eligible).tolist() == [4, 3]


def test_drop_removes_the_k_most_harmful_rows():
    changes = drop(ROWS, SCORES, Budget("count", 2), method="loss")
    assert [(c.id, c.action, c.score) for c in changes] == [("r1", "drop", 0.9), ("r4", "drop", 0.9)]
    assert changes[0].before == ROWS[1] and changes[0].after is None
    rows, weights = apply_changes(ROWS, {}, changes)
    assert [r["id"] for r in rows] == ["r0", "r2", "r3"] and weights == {}


def test_reweight_keep_probability_by_hand():
    # one group: scores 1..4, mean 2.5, population std sqrt(1.25)
    z = np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25)
    expected = [1 / (1 + math.exp(2.0 * v)) for v in z]
    np.testing.assert_allclose(keep_probability(np.array([1.0, 2, 3, 4]), 2.0), expected, rtol=1e-12)
    # per class: each class has z = -1, +1 -> weights 1/(1+e^-1), 1/(1+e)
    rows = [{"id": f"r{i}", "label": lab} for i, lab in enumerate([0, 0, 1, 1])]
    changes = reweight(rows, np.array([1.0, 3.0, 10.0, 20.0]), strength=1.0, by_class=True)
    low, high = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))
    assert [c.after for c in changes] == pytest.approx([low, high, low, high], abs=1e-12)
    assert [c.before for c in changes] == [1.0] * 4
    _, weights = apply_changes(rows, {}, changes)
    assert weights == pytest.approx({"r0": low, "r1": high, "r2": low, "r3": high})
    # a = 0: every row 0.5 (the same as no weights once the loss is a weighted mean)
    assert keep_probability(np.array([5.0, -1.0, 3.0]), 0.0).tolist() == [0.5, 0.5, 0.5]


def test_relabel_moves_only_confident_rows():
    losses = np.array(
        [
            [2.0, 0.5, 1.0],  # r0 (label 0): best other is 1, margin 1.5 -> moves
            [0.9, 1.0, 3.0],  # r1 (label 0): own label already best -> best other 1, margin -0.1
            [0.2, 0.3, 2.5],  # r2 (label 1): best other 0, margin 0.1 < 0.5 -> stays
            [9.0, 9.0, 0.1],  # r3 (label 1): margin 8.9, but not flagged
            [0.0, 0.0, 0.0],
        ]
    )
    scores = np.array([3.0, 2.0, 1.0, -1.0, -2.0])
    changes = relabel(ROWS, scores, losses, Budget("count", 3), margin=0.5, label_names=["a", "b", "c"])
    assert [(c.id, c.before, c.after) for c in changes] == [("r0", 0, 1)]
    assert "margin 1.500" in changes[0].reason
    rows, _ = apply_changes(ROWS, {}, changes)
    assert [r["label"] for r in rows] == [1, 0, 1, 1, 2]


@dataclass
class _Result:
    id: str
    text: str | None = None
    error: str | None = None


class _Expert:
    spec = "fake:expert"

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def rewrite(self, rows):
        self.seen.append([r["id"] for r in rows])
        return [_Result(r["id"], *self.answers[r["id"]]) for r in rows]


def test_repair_keeps_only_rewrites_that_leave_the_flagged_range():
    rows = [
        {"id": f"q{i}", "instruction": f"Add {i} and 1.", "input": "", "output": "wrong"} for i in range(4)
    ]
    expert = _Expert(
        {"q0": ("good", None), "q1": ("still bad", None), "q2": (None, "timeout"), "q3": ("x", None)}
    )
    new_loss = {"good": 0.2, "still bad": 2.0}
    changes = repair(
        rows,
        np.array([5.0, 4.0, 3.0, 0.0]),
        Budget("count", 3),
        expert,
        lambda batch: np.array([new_loss[r["output"]] for r in batch]),
        threshold=1.0,
        method="loss",
    )
    assert expert.seen == [["q0", "q1", "q2"]]
    assert [(c.id, c.action, c.after) for c in changes] == [
        ("q0", "repair", "good"),
        ("q1", "review", None),
        ("q2", "review", None),
    ]
    assert "timeout" in changes[2].reason and changes[1].before == "wrong"
    fixed, _ = apply_changes(rows, {}, changes)
    assert [r["output"] for r in fixed] == ["good", "wrong", "wrong", "wrong"]


def test_canaries_are_never_eligible():
    rows = [{"id": "canary-0"}, {"id": "a"}, {"id": "b"}]
    assert _eligible("drop", rows, set()).tolist() == [False, True, True]
    assert _eligible("relabel", rows, {"a"}).tolist() == [False, False, True]
    assert _eligible("drop", rows, {"a"}).tolist() == [False, True, True]


def _changes():
    return [
        Change(1, "r1", "drop", {}, None, 0.9, "loss", "x"),
        Change(1, "r3", "relabel", 1, 2, 0.5, "loss", "y"),
    ]


def test_cleaned_csv_keeps_columns_and_writes_label_names(tmp_path):
    path = tmp_path / "data.csv"
    frame = pd.DataFrame(
        {
            "sentence": [r["text"] for r in ROWS] + ["canary text"],
            "tag": ["a", "a", "b", "b", "c", "c"],
            "extra": range(6),
            "id": [r["id"] for r in ROWS] + ["canary-0"],
        }
    )
    frame.to_csv(path, index=False)
    from infscope.data.columns import ColumnMap

    data = read_input(path, ColumnMap(text="sentence", label="tag"))
    records = cleaned_records(data, _changes())
    assert [r["id"] for r in records] == ["r0", "r2", "r3", "r4"]  # r1 dropped, canary left out
    assert [r["tag"] for r in records] == ["a", "b", "c", "c"]  # r3 moved from b to c, by name
    assert list(records[0]) == ["sentence", "tag", "extra", "id"]
    out = write_cleaned(data, records, tmp_path / "cleaned.csv")
    assert pd.read_csv(out)["tag"].tolist() == ["a", "b", "c", "c"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_cleaned_keeps_the_input_format(tmp_path, suffix):
    from infscope.data.writing import write_rows

    path = write_rows(ROWS, tmp_path / f"data{suffix}")
    data = read_input(path)
    out = write_cleaned(data, cleaned_records(data, _changes(), {"r0": 0.25}), tmp_path / f"c{suffix}")
    back = read_input(out).rows
    assert [(r["id"], r["label"]) for r in back] == [("r0", 0), ("r2", 1), ("r3", 2), ("r4", 2)]
    assert [r["weight"] for r in back] == [0.25, 1.0, 1.0, 1.0]


def test_audit_undo_restores_bytes_and_refuses_other_files(tmp_path):
    source = tmp_path / "in.csv"
    raw = b'id,text,label\r\nr0,"a, quoted\ncell",0\nr1,caf\xc3\xa9,1\n'
    source.write_bytes(raw)
    cleaned = tmp_path / "cleaned.csv"
    cleaned.write_bytes(b"id,text,label\nr0,x,0\n")
    log = write_audit(
        tmp_path / "audit.jsonl", audit_header(source, "csv", cleaned, method="loss"), _changes()
    )
    header, changes = read_audit(log)
    assert header["method"] == "loss" and [c.id for c in changes] == ["r1", "r3"]
    restored = undo(log, tmp_path / "restored.csv", cleaned)
    assert restored.read_bytes() == raw
    other = tmp_path / "other.csv"
    other.write_bytes(b"id\nz\n")
    with pytest.raises(InfscopeError, match="does not match"):
        undo(log, tmp_path / "again.csv", other)
    assert not (tmp_path / "again.csv").exists()
    tampered = json.loads(log.read_text().split("\n")[0])
    tampered["input_sha256"] = "0" * 64
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(tampered) + "\n")
    with pytest.raises(InfscopeError, match="fingerprint"):
        undo(bad, tmp_path / "x.csv")


def test_test_overlap_is_refused():
    train = [{"id": "a", "text": "one", "label": 0}, {"id": "b", "text": "two", "label": 1}]
    check_test_overlap(train, [{"id": "c", "text": "three", "label": 0}])
    with pytest.raises(InfscopeError, match="same id 'a'"):
        check_test_overlap(train, [{"id": "a", "text": "other", "label": 0}])
    with pytest.raises(InfscopeError, match="identical text"):
        check_test_overlap(train, [{"id": "z", "text": "two", "label": 0}])


def test_final_number_exact_match():
    assert final_number("so 3 + 4 = 1,200.50 apples") == final_number("1200.5")
    assert exact_match(["The answer is 12.", "no number", "7"], ["12", "3", "The answer is 8."]).tolist() == [
        True,
        False,
        False,
    ]
