"""make_canaries: seeded copies under fresh ids, each corrupted in its field by the named noise; errors."""

from __future__ import annotations

import copy
import random
import re

import numpy as np
import pytest

from conftest import instruction_rows
from infscope.data.formatting import format_text
from infscope.data.manifest import MANIFEST_FIELDS
from infscope.errors import InfscopeError
from infscope.noise.canaries import (
    _canary_ids,
    add_canaries,
    auto_canary_source,
    canary_mask,
    make_canaries,
    noise_seed,
    without_canary_sources,
)
from infscope.noise.registry import all_operators


def classification_rows(n: int = 60, k: int = 3) -> list[dict]:
    return [{"id": f"c{i}", "text": f"Sentence {i} is about the topic.", "label": i % k} for i in range(n)]


def math_rows(n: int = 40) -> list[dict]:
    return [
        {
            "id": f"m{i}",
            "instruction": f"What is {i} plus {i + 3}?",
            "input": "",
            "output": f"It is {2 * i + 3}.",
        }
        for i in range(n)
    ]


def check_canaries(rows: list[dict], result, *, operators: set[str]) -> None:
    """Every canary: fresh unique id, the source's other fields, changed exactly in the recorded field."""
    by_id = {row["id"]: row for row in rows}
    assert len(result.rows) == len(result.ids) == len(result.manifest)
    assert len(set(result.ids)) == len(result.ids)
    assert not set(result.ids) & set(by_id)
    assert [row["id"] for row in result.rows] == result.ids
    for number, (canary, record) in enumerate(zip(result.rows, result.manifest, strict=True), start=1):
        source = by_id[record["source_id"]]
        assert canary["id"] == record["id"] == f"canary-{number}-{source['id']}"
        assert set(MANIFEST_FIELDS) <= set(record)
        assert record["is_noisy"] is True and record["seed"] == result.noise_seed
        assert record["operator"] in operators
        target = record["field"]
        assert record["original"] == source[target] and record["noisy"] == canary[target]
        assert canary[target] != source[target]
        assert record["label_changed"] == all_operators()[record["operator"]].label_changed
        untouched = set(source) - {"id", target, "text"}
        assert {k: canary[k] for k in untouched} == {k: source[k] for k in untouched}
        if "instruction" in source and "text" in source:
            assert canary["text"] == format_text(canary)


def test_response_swap_canaries_take_another_rows_output_and_leave_rows_alone():
    rows = instruction_rows()
    before = copy.deepcopy(rows)
    result = make_canaries(rows, fraction=0.1, noise="response_swap", seed=3, task="instruction")
    assert rows == before
    assert len(result.ids) == 8 and result.weights == {"response_swap": 1.0}
    check_canaries(rows, result, operators={"response_swap"})
    outputs = {row["id"]: row["output"] for row in rows}
    for record in result.manifest:
        donors = [i for i, out in outputs.items() if out == record["noisy"] and i != record["source_id"]]
        assert donors, "a swapped output must be another user row's output"
        assert record["field"] == "output" and record["family"] == "semantic"
    assert result.source_ids == [r["source_id"] for r in result.manifest]


def test_canaries_are_seeded_and_ignore_row_order():
    rows = instruction_rows()
    first = make_canaries(rows, fraction=0.1, noise="grammar", seed=5, task="instruction")
    again = make_canaries(rows, fraction=0.1, noise="grammar", seed=5, task="instruction")
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    reordered = make_canaries(shuffled, fraction=0.1, noise="grammar", seed=5, task="instruction")
    assert first.rows == again.rows == reordered.rows
    assert first.manifest == again.manifest == reordered.manifest
    other = make_canaries(rows, fraction=0.1, noise="grammar", seed=6, task="instruction")
    assert other.source_ids != first.source_ids
    grammar_ops = {op.name for op in all_operators().values() if op.family == "grammar"}
    check_canaries(rows, first, operators=grammar_ops)
    assert first.noise_seed == noise_seed(5) != 5


@pytest.mark.parametrize(
    ("n", "fraction", "expected"), [(80, 0.1, 8), (50, 0.05, 3), (80, 0.001, 1), (10, 0.5, 5)]
)
def test_canary_count_rounds_halves_up_with_at_least_one(n, fraction, expected):
    rows = instruction_rows(n)
    result = make_canaries(rows, fraction=fraction, noise="quality", seed=0, task="instruction")
    assert len(result.rows) == expected


def test_label_flip_canaries_use_every_class_of_the_data():
    rows = classification_rows(60, k=3)
    before = copy.deepcopy(rows)
    result = make_canaries(rows, fraction=0.1, noise="label=1", seed=0, task="classification")
    assert rows == before
    check_canaries(rows, result, operators={"label_flip"})
    for canary, record in zip(result.rows, result.manifest, strict=True):
        assert record["field"] == "label" and canary["label"] in {0, 1, 2}
        assert canary["label"] != record["original"]
    named = make_canaries(
        rows,
        fraction=0.1,
        noise="label_flip",
        seed=0,
        task="classification",
        label_names=["a", "b", "c", "d"],
    )
    assert {c["label"] for c in named.rows} <= {0, 1, 2, 3}


def test_wrong_answer_alias_changes_the_final_number():
    rows = math_rows()
    result = make_canaries(rows, fraction=0.25, noise="wrong_answer", seed=1, task="instruction")
    assert result.weights == {"wrong_numeric": 1.0}
    check_canaries(rows, result, operators={"wrong_numeric"})
    for canary, record in zip(result.rows, result.manifest, strict=True):
        number = re.findall(r"\d+", record["original"])[-1]
        assert re.findall(r"\d+", canary["output"])[-1] != number


def test_chat_canaries_update_the_last_assistant_turn():
    rows = [
        {
            "id": f"t{i}",
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"Answer {'abc'[i % 3]} for you, friend {i}."},
            ],
        }
        for i in range(20)
    ]
    before = copy.deepcopy(rows)
    result = make_canaries(rows, fraction=0.2, noise="response_swap", seed=0, task="instruction")
    assert rows == before
    for canary, record in zip(result.rows, result.manifest, strict=True):
        assert canary["messages"][-1]["content"] == record["noisy"] != record["original"]
        assert canary["messages"][0] == next(r for r in rows if r["id"] == record["source_id"])["messages"][0]


def test_canary_ids_never_collide():
    taken = {"canary-1-a", "canary-3-a", "b"}
    ids = _canary_ids(["a", "b"], taken)
    assert ids == ["canary-5-a", "canary-2-b"]
    assert not set(ids) & taken


def test_canary_mask_marks_canary_ids():
    mask = canary_mask(["a", "canary-1-a", "b", "canary-2-b"], ["canary-2-b", "canary-1-a", "zzz"])
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, [False, True, False, True])


@pytest.mark.parametrize(
    ("rows", "task", "noise", "message"),
    [
        (instruction_rows(), "instruction", "label", "does not fit this instruction data"),
        (instruction_rows(), "instruction", "label_flip", "does not fit this instruction data"),
        (classification_rows(), "classification", "response_swap", "does not fit this classification data"),
        (classification_rows(), "classification", "wrong_context", "does not fit"),
        (instruction_rows(), "instruction", "sparkle", "unknown canary noise 'sparkle'"),
        (instruction_rows(), "instruction", "", "no canary noise given"),
    ],
)
def test_noise_that_does_not_fit_lists_the_valid_names(rows, task, noise, message):
    with pytest.raises(InfscopeError, match=message) as info:
        make_canaries(rows, fraction=0.1, noise=noise, seed=0, task=task)
    text = str(info.value)
    assert "\n" not in text
    valid = set(text.split("choose one of: ")[1].split(", "))
    assert {"grammar", "quality", "semantic", "typo_keyboard"} <= valid
    assert ("response_swap" in valid) == (task == "instruction")
    assert ("label_flip" in valid) == ("label" in valid) == (task == "classification")


@pytest.mark.parametrize("fraction", [0, -0.1, 0.51, 1.0, float("nan"), True])
def test_fraction_outside_range_is_an_error(fraction):
    with pytest.raises(InfscopeError, match=r"canary fraction must be in \(0, 0.5\]"):
        make_canaries(instruction_rows(), fraction=fraction, noise="grammar", seed=0, task="instruction")


def test_too_few_rows_that_can_take_the_noise_is_an_error():
    rows = instruction_rows(20)
    for row in rows:
        row["output"] = "Same answer for everyone."
    with pytest.raises(InfscopeError, match=r"only 0 of 20 rows can take canary noise response_swap"):
        make_canaries(rows, fraction=0.1, noise="response_swap", seed=0, task="instruction")


def test_validation_sourced_canaries_copy_validation_rows_only():
    """With ``sources`` the canaries copy held-out rows (no clean twin among the training rows)."""
    rows = instruction_rows()
    val = [dict(row, id=f"v-{row['id']}") for row in instruction_rows(30)]
    before_rows, before_val = copy.deepcopy(rows), copy.deepcopy(val)
    result = make_canaries(rows, fraction=0.1, noise="response_swap", seed=3, task="instruction", sources=val)
    assert rows == before_rows and val == before_val
    assert len(result.ids) == round(0.1 * len(rows))  # the count follows the training rows
    assert set(result.source_ids) <= {row["id"] for row in val}
    check_canaries(val, result, operators={"response_swap"})
    pool_outputs = {row["output"] for row in rows + val}
    for record in result.manifest:  # donors may be any row of the pool, never the source itself
        assert record["noisy"] in pool_outputs and record["noisy"] != record["original"]


def test_validation_sourced_canaries_leave_enough_validation_rows():
    rows = instruction_rows()
    val = [dict(row, id=f"v-{row['id']}") for row in instruction_rows(10)]
    with pytest.raises(InfscopeError, match=r"8 canaries from 10 validation rows would leave fewer than 4"):
        make_canaries(rows, fraction=0.1, noise="response_swap", seed=0, task="instruction", sources=val)


def test_without_canary_sources_removes_exactly_the_copied_validation_rows():
    val = [{"id": f"v{i}", "output": str(i)} for i in range(6)]
    record = {"source": "validation", "source_ids": ["v1", "v4"]}
    assert [r["id"] for r in without_canary_sources(val, record)] == ["v0", "v2", "v3", "v5"]
    assert without_canary_sources(val, {"source": "train", "source_ids": ["v1"]}) == val
    assert without_canary_sources(val, None) == val  # no canaries, or runs made before the source existed
    assert without_canary_sources(val, {"ids": ["canary-1-v1"]}) == val


def test_add_canaries_records_validation_source_and_source_ids(tmp_path):
    from infscope.runs import ModelSpec, RunDir, RunRecord, read_jsonl

    rows = instruction_rows()
    val = [dict(row, id=f"v-{row['id']}") for row in instruction_rows(30)]
    run = RunDir.create(
        tmp_path / "run", RunRecord(kind="finetune", model=ModelSpec(name="tiny-llama"), args={})
    )
    train = add_canaries(
        run,
        rows,
        fraction=0.1,
        noise="response_swap",
        seed=1,
        task="instruction",
        val=val,
        source="validation",
    )
    record = run.record.canaries
    assert record["source"] == "validation" and len(record["source_ids"]) == len(record["ids"]) == 8
    assert train[: len(rows)] == rows and [r["id"] for r in train[len(rows) :]] == record["ids"]
    assert [r["source_id"] for r in read_jsonl(run.layout.canaries)] == record["source_ids"]
    left = without_canary_sources(val, record)
    assert len(left) == len(val) - 8 and not {r["id"] for r in left} & set(record["source_ids"])
    with pytest.raises(
        InfscopeError, match=r"unknown canary source 'heldout'; use auto, validation or train"
    ):
        add_canaries(run, rows, fraction=0.1, noise="grammar", seed=1, task="instruction", source="heldout")


@pytest.mark.parametrize(
    ("n_canaries", "n_validation", "expected"),
    [
        (5, 10, "validation"),
        (6, 10, "train"),
        (4, 7, "train"),
        (3, 7, "validation"),
        (2, 5, "train"),
        (1, 0, "train"),
    ],
)
def test_auto_canary_source_keeps_half_the_validation_rows(n_canaries, n_validation, expected):
    assert auto_canary_source(n_canaries, n_validation) == expected
