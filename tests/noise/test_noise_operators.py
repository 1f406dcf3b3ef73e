"""Noise operators: never crash, never return their input, cosmetic ones never change a digit."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infscope.noise.label import shift_number
from infscope.noise.registry import NoiseContext, all_operators
from infscope.noise.text import digit_sequence

OPS = all_operators()
TEXT_OPS = sorted(name for name, op in OPS.items() if op.fields != ("label",))
COSMETIC = sorted(name for name, op in OPS.items() if op.cosmetic)
CTX = NoiseContext(
    row_id="r0",
    pools={
        "output": (["r0", "r1", "r2"], ["mine", "Another answer.", "A third answer."]),
        "input": (["r0", "r1", "r2"], ["", "Some context.", "Other context."]),
    },
    classes=[0, 1, 2],
    class_counts={0: 10, 1: 2, 2: 1},
)
TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.sampled_from(["the", "is", "a", "3.14", "receive", ",", ".", "x2", "Hello!", "\n", "  "]),
        max_size=30,
    ).map(" ".join),
)


def test_expected_operators_are_registered():
    families = {op.family for op in OPS.values()}
    assert families == {"grammar", "semantic", "quality", "label"}
    assert {"response_swap", "label_flip", "wrong_numeric", "typo_keyboard", "truncate_response"} <= set(OPS)
    assert OPS["response_swap"].label_changed and OPS["label_flip"].label_changed
    assert not OPS["typo_misspelling"].label_changed
    assert all(0.0 <= op.severity <= 1.0 for op in OPS.values())


@settings(max_examples=150, deadline=None)
@given(text=TEXT, seed=st.integers(0, 2**32))
def test_no_text_operator_crashes_or_returns_its_input(text, seed):
    for name in TEXT_OPS:
        result = OPS[name].apply(text, random.Random(seed), CTX)
        assert result is None or (isinstance(result, str) and result != text), name


@settings(max_examples=200, deadline=None)
@given(text=TEXT, seed=st.integers(0, 2**32))
def test_cosmetic_operators_never_change_digits(text, seed):
    for name in COSMETIC:
        result = OPS[name].apply(text, random.Random(seed), CTX)
        if result is not None:
            assert digit_sequence(result) == digit_sequence(text), (name, text, result)


def test_cosmetic_operators_keep_numbers_intact_on_prose():
    text = "The price is 3.14 dollars, or 1,000 cents. It is a good deal and people receive it."
    for name in COSMETIC:
        for seed in range(30):
            result = OPS[name].apply(text, random.Random(seed), CTX)
            assert result is not None and result != text
            assert "3.14" in result and "1,000" in result, (name, result)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("typo_misspelling", "I receive mail", "I recieve mail"),
        ("agreement_error", "It is red", "It are red"),
        ("typo_transposition", "ab", "ba"),
        ("topic_drift", "x", None),
        ("truncate_response", "one", None),
        ("typo_keyboard", "12 34", None),
    ],
)
def test_known_edits(name, text, expected):
    assert OPS[name].apply(text, random.Random(0), CTX) == expected


def test_keyboard_typo_uses_a_neighbouring_key():
    for seed in range(20):
        result = OPS["typo_keyboard"].apply("g", random.Random(seed), CTX)
        assert result in set("tyfhvbr")


def test_truncation_keeps_a_proper_prefix():
    text = "one two three four five six seven eight"
    for seed in range(20):
        result = OPS["truncate_response"].apply(text, random.Random(seed), CTX)
        assert text.startswith(result) and 0 < len(result.split()) < 8


def test_response_swap_takes_another_rows_output():
    for seed in range(20):
        assert OPS["response_swap"].apply("mine", random.Random(seed), CTX) in {
            "Another answer.",
            "A third answer.",
        }


@settings(max_examples=100, deadline=None)
@given(classes=st.lists(st.integers(0, 50), min_size=2, max_size=8, unique=True), seed=st.integers(0, 2**32))
def test_label_flip_never_keeps_the_label(classes, seed):
    ctx = NoiseContext(classes=classes, class_counts={c: 1 + c for c in classes})
    for label in classes:
        for name in ("label_flip", "label_flip_balanced"):
            new = OPS[name].apply(label, random.Random(seed), ctx)
            assert new != label and new in classes


def test_label_flip_is_uniform_over_other_classes():
    ctx = NoiseContext(classes=[0, 1, 2, 3])
    draws = [OPS["label_flip"].apply(0, random.Random(s), ctx) for s in range(3000)]
    for c in (1, 2, 3):
        assert abs(draws.count(c) / 3000 - 1 / 3) < 0.04


def test_balanced_flip_favours_rare_classes():
    ctx = NoiseContext(classes=[0, 1, 2], class_counts={0: 1, 1: 1, 2: 9})
    draws = [OPS["label_flip_balanced"].apply(0, random.Random(s), ctx) for s in range(3000)]
    # weights 1/1 and 1/9 for classes 1 and 2 -> P(1) = 0.9
    assert abs(draws.count(1) / 3000 - 0.9) < 0.03


@pytest.mark.parametrize("token", ["0", "7", "12.50", "1,000", "3.0", "999"])
def test_shift_number_changes_value_and_keeps_format(token):
    for seed in range(30):
        new = shift_number(token, random.Random(seed))
        assert new != token and float(new.replace(",", "")) >= 0
        assert ("." in new) == ("." in token)
        if "." in token:
            assert len(new.split(".")[1]) == len(token.split(".")[1])


def test_wrong_numeric_changes_the_final_answer_only():
    text = "3 apples plus 4 apples is 7."
    for seed in range(20):
        new = OPS["wrong_numeric"].apply(text, random.Random(seed), CTX)
        assert new.startswith("3 apples plus 4 apples is ") and new != text
    assert OPS["wrong_numeric"].apply("no numbers here", random.Random(0), CTX) is None
