"""inject_noise: exact counts, guaranteed change, order independence, strata, label flips, errors."""

from __future__ import annotations

import copy
import math
import random

import pytest

from conftest import instruction_rows as word_rows
from infscope.data.formatting import format_text
from infscope.errors import InfscopeError
from infscope.noise.inject import inject_noise


def instruction_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """Longer rows than the shared default: instructions of up to 20 words, up to 4 output sentences."""
    return word_rows(
        n, seed, id_digits=4, instruction_words=(3, 20), output_words=(4, 12), output_sentences=(1, 4)
    )


def classification_rows(n: int = 120, k: int = 3) -> list[dict]:
    return [{"id": f"c{i}", "text": f"sentence {i} is about the topic", "label": i % k} for i in range(n)]


def by_id(result) -> dict:
    return {rec["id"]: rec for rec in result.manifest}


@pytest.mark.parametrize(("ratio", "n"), [(0.2, 200), (0.05, 200), (0.15, 10), (1.0, 37), (0.333, 50)])
def test_exact_count_is_round_half_up(ratio, n):
    result = inject_noise(instruction_rows(n), task="instruction", ratio=ratio, seed=1)
    expected = math.floor(ratio * n + 0.5)
    assert result.summary["target_noisy"] == expected
    assert sum(rec["is_noisy"] for rec in result.manifest) == expected
    assert result.summary["failures"]["count"] == 0


def test_family_split_is_exact():
    result = inject_noise(instruction_rows(200), task="instruction", ratio=0.2, strategy="balanced", seed=3)
    # 40 rows: 0.40/0.35/0.25 -> 16/14/10 exactly
    assert {f: c["actual"] for f, c in result.summary["families"].items()} == {
        "grammar": 16,
        "semantic": 14,
        "quality": 10,
    }
    heavy = inject_noise(
        instruction_rows(200), task="instruction", ratio=0.2, strategy="grammar_heavy", seed=3
    )
    assert {f: c["target"] for f, c in heavy.summary["families"].items()} == {
        "grammar": 24,
        "semantic": 10,
        "quality": 6,
    }


def test_every_targeted_row_changes_in_exactly_its_field_and_input_is_untouched():
    rows = instruction_rows(200)
    before = copy.deepcopy(rows)
    result = inject_noise(rows, task="instruction", ratio=0.3, strategy="all", seed=7)
    assert rows == before
    for row, new, rec in zip(rows, result.rows, result.manifest, strict=True):
        changed = {k for k in row if row[k] != new[k]}
        if rec["is_noisy"]:
            assert changed == {rec["field"], "text"}
            assert row[rec["field"]] == rec["original"] and new[rec["field"]] == rec["noisy"]
            assert new["text"] == format_text(new)
        else:
            assert changed == set()
            assert rec["family"] is None and rec["original"] is None


def test_manifest_has_one_record_per_row_in_input_order():
    rows = instruction_rows(50)
    result = inject_noise(rows, task="instruction", ratio=0.2, seed=0)
    assert [rec["id"] for rec in result.manifest] == [row["id"] for row in rows]
    from infscope.data.manifest import MANIFEST_FIELDS

    assert all(tuple(rec) == MANIFEST_FIELDS for rec in result.manifest)


def test_same_noise_per_id_whatever_the_row_order():
    rows = instruction_rows(150)
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    a = inject_noise(rows, task="instruction", ratio=0.2, seed=11)
    b = inject_noise(shuffled, task="instruction", ratio=0.2, seed=11)
    assert by_id(a) == by_id(b)
    rows_a = {r["id"]: r for r in a.rows}
    assert all(rows_a[r["id"]] == r for r in b.rows)


def test_seed_changes_noise_and_smaller_ratio_is_nested():
    rows = instruction_rows(200)
    small = {
        r["id"] for r in inject_noise(rows, task="instruction", ratio=0.1, seed=2).manifest if r["is_noisy"]
    }
    large = {
        r["id"] for r in inject_noise(rows, task="instruction", ratio=0.2, seed=2).manifest if r["is_noisy"]
    }
    other = {
        r["id"] for r in inject_noise(rows, task="instruction", ratio=0.2, seed=3).manifest if r["is_noisy"]
    }
    assert small < large and other != large


def test_class_stratified_sampling_is_balanced():
    rows = instruction_rows(200)  # 4 classes of 50
    result = inject_noise(rows, task="instruction", ratio=0.1, seed=0, sampling="class")
    per_class = {}
    for row, rec in zip(rows, result.manifest, strict=True):
        per_class[row["class"]] = per_class.get(row["class"], 0) + rec["is_noisy"]
    assert per_class == {0: 5, 1: 5, 2: 5, 3: 5}
    assert {k: v["actual"] for k, v in result.summary["strata"].items()} == {"0": 5, "1": 5, "2": 5, "3": 5}


def test_length_stratified_sampling_covers_quartiles():
    rows = [
        {"id": f"r{i}", "instruction": "w " * (i + 1), "input": "", "output": "An answer is here."}
        for i in range(80)
    ]
    result = inject_noise(rows, task="instruction", ratio=0.25, seed=0, sampling="length")
    noisy_idx = [i for i, rec in enumerate(result.manifest) if rec["is_noisy"]]
    # lengths strictly increase with i, so quartile q holds rows 20q..20q+19: 5 noisy in each
    assert [sum(20 * q <= i < 20 * q + 20 for i in noisy_idx) for q in range(4)] == [5, 5, 5, 5]
    assert set(result.summary["strata"]) == {"q1", "q2", "q3", "q4"}


def test_label_flip_on_classification_never_keeps_the_label():
    rows = classification_rows(120, 3)
    result = inject_noise(rows, task="classification", ratio=0.5, strategy="label", seed=4, sampling="class")
    noisy = [rec for rec in result.manifest if rec["is_noisy"]]
    assert len(noisy) == 60
    for rec in noisy:
        assert rec["field"] == "label" and rec["label_changed"] and rec["noisy"] != rec["original"]
        assert rec["noisy"] in {0, 1, 2}
    assert result.summary["classes"] == {
        "0": {"rows": 40, "noisy": 20},
        "1": {"rows": 40, "noisy": 20},
        "2": {"rows": 40, "noisy": 20},
    }


def test_operator_weights_select_single_operators():
    rows = classification_rows(60, 4)
    result = inject_noise(rows, task="classification", ratio=0.5, weights="label_flip_balanced=1", seed=0)
    assert result.summary["strategy"] == "custom"
    assert {rec["operator"] for rec in result.manifest if rec["is_noisy"]} == {"label_flip_balanced"}
    mixed = inject_noise(rows, task="classification", ratio=0.5, weights={"grammar": 1, "label": 1}, seed=0)
    assert {f: c["actual"] for f, c in mixed.summary["families"].items()} == {"grammar": 15, "label": 15}


def test_failures_are_counted_never_moved_to_another_field():
    rows = [{"id": f"r{i}", "instruction": "Say hi.", "input": "", "output": "Hi there."} for i in range(20)]
    result = inject_noise(
        rows, task="instruction", ratio=0.5, weights="grammar=1", field_weights={"input": 1.0}, seed=0
    )
    assert result.summary["failures"]["count"] == 10
    assert result.summary["actual_noisy"] == 0
    assert result.rows == rows


def test_wrong_numeric_on_math_outputs():
    rows = [
        {
            "id": f"m{i}",
            "instruction": f"What is {i} + {i}?",
            "input": "",
            "output": f"The answer is {2 * i}.",
        }
        for i in range(40)
    ]
    result = inject_noise(rows, task="instruction", ratio=0.5, strategy="all", seed=0)
    assert result.summary["families"]["label"]["actual"] == 5  # 20 rows / 4 families
    for rec in result.manifest:
        if rec["operator"] == "wrong_numeric":
            assert rec["label_changed"] and rec["field"] == "output" and rec["noisy"] != rec["original"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, "ratio must be in (0, 1]"),
        ({"ratio": 1.5}, "ratio must be in (0, 1]"),
        ({"ratio": 0.001}, "rounds to zero"),
        ({"ratio": 0.2, "strategy": "wild"}, "unknown noise strategy"),
        ({"ratio": 0.2, "weights": "grammar=0"}, "positive"),
        ({"ratio": 0.2, "weights": "grammar=-1"}, ">= 0"),
        ({"ratio": 0.2, "weights": "nonsense=1"}, "unknown noise family or operator"),
        ({"ratio": 0.2, "weights": "label_flip=1"}, "no operator that applies"),
        ({"ratio": 0.2, "sampling": "odd"}, "unknown sampling"),
        ({"ratio": 0.2, "field_weights": {"label": 1}}, "cannot be a noise target"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, message):
    with pytest.raises(InfscopeError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        inject_noise(instruction_rows(100), task="instruction", **kwargs)
    assert "\n" not in str(info.value)


def test_empty_dataset_is_an_error():
    with pytest.raises(InfscopeError, match="empty"):
        inject_noise([], task="instruction", ratio=0.2)
