"""answer_loss and per-token losses against a one-row-at-a-time loop that finds the final number by
character offsets (a regex on the response text), not by decoding tokens."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FakeInputs
from infscope.data.formatting import format_prompt
from infscope.errors import InfscopeError
from infscope.estimators.answer_span import answer_loss, final_number_positions
from infscope.estimators.registry import FUSION_POOL, get_method
from infscope.models.encode import encode_rows
from infscope.models.loss import per_example_loss, per_token_losses

ROWS = [
    {"id": "a", "instruction": "Add 10 and 36.", "input": "", "output": "10 + 36 = 46. The answer is 46."},
    {"id": "b", "instruction": "Add 10 and 36.", "input": "", "output": "10 + 36 = 46. The answer is 57."},
    {
        "id": "c",
        "instruction": "Price?",
        "input": "two items",
        "output": "It costs 1,234.5 dollars in total.",
    },
    {"id": "d", "instruction": "Name a color.", "input": "", "output": "Blue is the color of the sky."},
    {"id": "e", "instruction": "Count.", "input": "", "output": "7"},
]
ENCODE = {"max_length": 256, "batch_size": 2, "response_only": True}
FINAL_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _ref_token_losses(model, tok, row) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One row alone, no padding: the loss of each response token and EOS, and each token's offsets."""
    prompt = tok(format_prompt(row))["input_ids"]
    enc = tok(row["output"], add_special_tokens=False, return_offsets_mapping=True)
    response = enc["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    predicting = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
    losses = F.cross_entropy(predicting, torch.tensor(response), reduction="none").numpy()
    return losses, list(enc["offset_mapping"])


def _ref_answer_loss(model, tok, row) -> float:
    losses, offsets = _ref_token_losses(model, tok, row)
    text = row["output"]
    matches = list(FINAL_NUMBER.finditer(text))
    if not matches:
        return float(losses.mean())
    start, end = matches[-1].span()
    inside = [j for j, (a, b) in enumerate(offsets) if a < end and b > start and text[a:b].strip()]
    return float(losses[inside].mean())


def test_per_token_losses_match_row_loop_and_average_to_the_row_loss(llama):
    model, tok = llama.model, llama.tokenizer
    encoded = encode_rows(ROWS, tok, task="causal", max_length=256, response_only=True)
    got = per_token_losses(model, encoded, batch_size=2)
    for row, values in zip(ROWS, got, strict=True):
        np.testing.assert_allclose(values, _ref_token_losses(model, tok, row)[0], rtol=1e-5, atol=1e-5)
    means = np.array([v.mean() for v in got])
    np.testing.assert_allclose(means, per_example_loss(model, encoded, batch_size=3), rtol=1e-6)


def test_answer_loss_matches_row_loop(llama):
    model, tok = llama.model, llama.tokenizer
    got, without_number = answer_loss(model, tok, ROWS, **ENCODE)
    want = np.array([_ref_answer_loss(model, tok, row) for row in ROWS])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert without_number == 1  # row d
    # the final number only: rows a and b share every token but the last number, and differ there
    assert got[0] != got[1]


@pytest.mark.parametrize(
    ("pieces", "want"),
    [
        ([" is", " ", "4", "6", ".", "</s>"], [2, 3]),  # digits split, the space its own token
        ([" is", " 4", "6", "."], [1, 2]),  # the first digit carries the space
        ([" 1", ",", "2", "3", "4", ".", "5", " dollars"], [0, 1, 2, 3, 4, 5, 6]),  # joined over , and .
        (["x", " 10", " +", " 36", " =", " 46", "."], [5]),  # the last number only
        (["46", "."], [0]),  # at the very start
        ([" 3", ".", " Then", " go"], [0]),  # a full stop after the number is not part of it
        ([" no", " digits"], []),
        ([" 12", ",", " 13"], [2]),  # ", " separates two numbers (whitespace after the comma)
    ],
)
def test_final_number_positions_hand_cases(pieces, want):
    assert final_number_positions(pieces) == want


def test_registry_method_equals_the_function_and_rejects_bad_options(llama):
    inputs = FakeInputs(llama, ROWS, ROWS[:1], {"task": "causal", **ENCODE})
    method = get_method("answer_loss")
    scores = method.compute(inputs, {})
    want, _ = answer_loss(llama.model, llama.tokenizer, ROWS, **ENCODE)
    np.testing.assert_allclose(scores.vector(), want)
    assert scores.method == "answer_loss" and scores.meta["rows_without_number"] == 1
    assert "answer_loss" in FUSION_POOL and method.tasks == ("instruction",)
    with pytest.raises(InfscopeError, match="model='tuned' is unknown"):
        method.compute(inputs, {"model": "tuned"})
    with pytest.raises(InfscopeError, match="no option"):
        method.compute(inputs, {"k": 3})


def test_classification_rows_have_no_token_losses(bert):
    rows = [{"id": "r0", "text": "good", "label": 0}]
    encoded = encode_rows(rows, bert.tokenizer, task="classification", max_length=16)
    with pytest.raises(InfscopeError, match="causal"):
        per_token_losses(bert.model, encoded)
