"""Built-in generators: reproducibility, split sizes, and answers checked by independent code."""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import pytest

from infscope.data.builtin import BUILTIN_DATASETS, make_builtin
from infscope.data.math_templates import TEMPLATES
from infscope.data.sentences import ADJECTIVES, ADVERBS, METHOD_NAMES, NOUNS, PLACES, TRANSFORMS, VERBS
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError

FIXED = ["the quick farmer painted the green barn", "every tiny robot in the park chased the dragon"]
# Hand-written expected outputs (not produced by the code under test).
EXPECTED = {
    "reverse_words": [
        "barn green the painted farmer quick the",
        "dragon the chased park the in robot tiny every",
    ],
    "alternate_case": [
        "ThE qUiCk FaRmEr PaInTeD tHe GrEeN bArN",
        "EvErY tInY rObOt In ThE pArK cHaSeD tHe DrAgOn",
    ],
    "insert_one": ["the 1 quick 1 farmer 1 painted 1 the 1 green 1 barn", None],
    "star_vowels": [
        "th* q**ck f*rm*r p**nt*d th* gr**n b*rn",
        "*v*ry t*ny r*b*t *n th* p*rk ch*s*d th* dr*g*n",
    ],
    "double_consonants": ["tthhe qquicckk ffarrmmerr ppainnttedd tthhe ggrreenn bbarrnn", None],
    "capitalize_words": [
        "The Quick Farmer Painted The Green Barn",
        "Every Tiny Robot In The Park Chased The Dragon",
    ],
    "remove_vowels": ["th qck frmr pntd th grn brn", "vry tny rbt n th prk chsd th drgn"],
    "append_ly": ["thely quickly farmerly paintedly thely greenly barnly", None],
    "remove_consonants": ["e ui ae aie e ee a", "ee i oo i e a ae e ao"],
    "repeat_words": ["the the quick quick farmer farmer painted painted the the green green barn barn", None],
}


def _reference(name: str, sentence: str) -> str:
    """A second, plain-loop implementation of each transformation."""
    vowels = "aeiou"
    words = sentence.split()
    if name == "reverse_words":
        return " ".join(words[::-1])
    if name == "alternate_case":
        out, k = "", 0
        for ch in sentence:
            if ch == " ":
                out += ch
            else:
                out += ch.upper() if k % 2 == 0 else ch.lower()
                k += 1
        return out
    if name == "insert_one":
        return " ".join(w if i == 0 else "1 " + w for i, w in enumerate(words))
    if name == "star_vowels":
        return "".join("*" if ch in vowels else ch for ch in sentence)
    if name == "double_consonants":
        return "".join(ch if ch in vowels or ch == " " else ch + ch for ch in sentence)
    if name == "capitalize_words":
        return " ".join(w.capitalize() for w in words)
    if name == "remove_vowels":
        return "".join(ch for ch in sentence if ch not in vowels)
    if name == "append_ly":
        return " ".join(f"{w}ly" for w in words)
    if name == "remove_consonants":
        return "".join(ch for ch in sentence if ch in vowels or ch == " ")
    if name == "repeat_words":
        return " ".join(x for w in words for x in (w, w))
    raise AssertionError(name)


@pytest.mark.parametrize("index", range(10))
def test_each_transform_matches_hand_results_and_reference(index):
    name, fn = TRANSFORMS[index]
    for sentence, expected in zip(FIXED, EXPECTED[name], strict=True):
        assert fn(sentence) == _reference(name, sentence)
        if expected is not None:
            assert fn(sentence) == expected


def test_generated_outputs_follow_the_class_transform():
    split = make_builtin("sentence_transform", per_class=12, n_test_per_class=2, paraphrase=True)
    for row in split.train + split.test:
        cls = row["class"]
        assert METHOD_NAMES[cls] in row["instruction"]
        sentence = row["instruction"].split(": ", 1)[1]
        assert 6 <= len(sentence.split()) <= 12
        assert row["output"] == _reference(TRANSFORMS[cls][0], sentence)
        assert row["id"].startswith(f"st-c{cls}-")
    assert len({row["instruction"].split(METHOD_NAMES[row["class"]])[0] for row in split.train}) > 2


def test_word_bank_words_have_vowel_and_consonant():
    for word in (
        ADJECTIVES
        + NOUNS
        + VERBS
        + ADVERBS
        + PLACES
        + ("the", "one", "every", "in", "near", "at", "and", "before")
    ):
        assert re.fullmatch(r"[a-z]+", word)
        assert set(word) & set("aeiou") and set(word) - set("aeiou"), word


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_counts_ids_and_byte_reproducibility(name, tmp_path):
    split = make_builtin(name, seed=3, n_classes=4, per_class=20, n_test_per_class=5)
    assert Counter(r["class"] for r in split.train) == {c: 15 for c in range(4)}
    assert Counter(r["class"] for r in split.test) == {c: 5 for c in range(4)}
    ids = [r["id"] for r in split.train + split.test]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z]+-c\d-\d{4}", i) for i in ids)
    assert len(split.label_names) == 4
    first = write_rows(split.train, tmp_path / "a.jsonl").read_bytes()
    again = make_builtin(name, seed=3, n_classes=4, per_class=20, n_test_per_class=5)
    assert write_rows(again.train, tmp_path / "b.jsonl").read_bytes() == first
    other = make_builtin(name, seed=4, n_classes=4, per_class=20, n_test_per_class=5)
    assert write_rows(other.train, tmp_path / "c.jsonl").read_bytes() != first


def test_classification_view():
    split = make_builtin("sentence_transform_cls", n_classes=10, per_class=5, n_test_per_class=1)
    assert split.task == "classification"
    assert split.label_names == [name for name, _ in TRANSFORMS]
    for row in split.train:
        sentence, transformed = row["text"].split(" => ")
        assert row["label"] == row["class"]
        assert transformed == _reference(split.label_names[row["label"]], sentence)


# Independent answer formulas, by template order; slots are the question's integers in order.
MATH_FORMULAS = [
    lambda a, b, c, d: a * b - c * d,
    lambda a, b, c, d: a * b + c * d,
    lambda a, b, c, d: a * b - c * d,
    lambda a, b, c, d: a * b - a * b * c / 100 + d,
    lambda a, b, c, d: a * (1 + b * c / 100) - d,
    lambda a, b, c, d: a * b + c * d,
    lambda a, b, c, d: (a * b - c) / d,
    lambda a, b, c, d: a + b * c - d,
    lambda a, b, c, d: a * b * c - d,
    lambda a, b, c, d: a * c + b * d,
]

MATH_FORMULAS_NAMES = [template.name for template in TEMPLATES]


@pytest.mark.parametrize("paraphrase", [False, True])
def test_math_answers_are_correct_integers(paraphrase):
    plain = make_builtin("math_no_reason", seed=1, per_class=60, n_test_per_class=10, paraphrase=paraphrase)
    reason = make_builtin("math_reason", seed=1, per_class=60, n_test_per_class=10, paraphrase=paraphrase)
    for row in plain.train + plain.test:
        slots = [Fraction(x) for x in re.findall(r"\d+", row["instruction"])]
        assert len(slots) == 4, row["instruction"]
        expected = MATH_FORMULAS[row["class"]](*slots)
        assert expected.denominator == 1 and expected >= 0, row
        assert row["output"] == str(int(expected))
    for row in reason.train:
        slots = [Fraction(x) for x in re.findall(r"\d+", row["instruction"])]
        expected = int(MATH_FORMULAS[row["class"]](*slots))
        assert row["output"].endswith(f"The answer is {expected}.")
        assert len(row["output"]) > len(f"The answer is {expected}.")
    assert plain.label_names[0] == "slices_left"


def test_bad_arguments():
    with pytest.raises(InfscopeError, match="1 to 10 classes"):
        make_builtin("math_reason", n_classes=11)
    with pytest.raises(InfscopeError, match="--test-per-class"):
        make_builtin("math_reason", per_class=5, n_test_per_class=5)
    with pytest.raises(InfscopeError, match="--per-class"):
        make_builtin("math_reason", per_class=0)


_TRANSFORM_INDEX = {name: k for k, (name, _) in enumerate(TRANSFORMS)}


def test_instruction_mix_takes_turns_and_each_row_follows_its_task():
    split = make_builtin("instruction_mix", seed=2, n_classes=15, per_class=6, n_test_per_class=1)
    names = split.label_names
    assert [n.split(":")[0] for n in names[:6]] == ["transform", "solve", "answer"] * 2
    assert len(set(names)) == 15
    math_index = {template_name: k for k, template_name in enumerate(MATH_FORMULAS_NAMES)}
    kinds = Counter()
    for row in split.train + split.test:
        kind, name = names[row["class"]].split(":")
        kinds[kind] += 1
        if kind == "transform":
            assert METHOD_NAMES[_TRANSFORM_INDEX[name]] in row["instruction"]
            sentence = row["instruction"].split("transform: ", 1)[1]
            assert row["output"] == _reference(name, sentence)
            continue
        slots = [Fraction(x) for x in re.findall(r"\d+", row["instruction"])]
        expected = int(MATH_FORMULAS[math_index[name]](*slots))
        if kind == "answer":
            assert row["output"] == str(expected) and math_index[name] >= 5
        else:
            assert row["output"].endswith(f"The answer is {expected}.") and math_index[name] < 5
    assert kinds == {"transform": 30, "solve": 30, "answer": 30}
