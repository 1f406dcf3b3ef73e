"""Encoding masks, padding, truncation and per-example loss against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ALPACA_ROWS
from infscope.data.formatting import format_prompt
from infscope.errors import InfscopeError
from infscope.models.encode import IGNORE_INDEX, batches, encode_rows
from infscope.models.loss import per_example_loss, token_loss

ROWS = list(ALPACA_ROWS)


def test_encode_masks_prompt_and_adds_eos(llama):
    tok = llama.tokenizer
    enc = encode_rows(ROWS, tok, task="causal")
    assert enc.ids == ["a", "b", "c"] and enc.truncated == []
    for row, ids, labels in zip(ROWS, enc.input_ids, enc.labels, strict=True):
        prompt = tok(format_prompt(row))["input_ids"]
        response = tok(row["output"], add_special_tokens=False)["input_ids"]
        assert prompt[0] == tok.bos_token_id
        assert ids == prompt + response + [tok.eos_token_id]
        assert labels == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
    assert enc.n_targets().tolist() == [
        len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in ROWS
    ]


def test_encode_full_text_labels_everything(llama):
    enc = encode_rows(ROWS, llama.tokenizer, task="instruction", response_only=False)
    assert enc.labels == enc.input_ids


def test_batches_pad_right_with_ignored_labels(llama):
    enc = encode_rows(ROWS, llama.tokenizer, task="causal")
    batch = next(batches(enc, 3))
    lengths = [len(s) for s in enc.input_ids]
    assert batch["input_ids"].shape == (3, max(lengths))
    for j, n in enumerate(lengths):
        assert batch["attention_mask"][j].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][j, :n].tolist() == enc.input_ids[j]
        assert (batch["input_ids"][j, n:] == llama.tokenizer.pad_token_id).all()
        assert batch["labels"][j, :n].tolist() == enc.labels[j]
        assert (batch["labels"][j, n:] == IGNORE_INDEX).all()


def test_shuffled_batches_are_a_seeded_permutation(llama):
    enc = encode_rows(ROWS * 1, llama.tokenizer, task="causal")
    order = [b["index"].tolist() for b in batches(enc, 2, shuffle=True, seed=3, with_index=True)]
    again = [b["index"].tolist() for b in batches(enc, 2, shuffle=True, seed=3, with_index=True)]
    assert order == again and sorted(sum(order, [])) == [0, 1, 2]


def test_truncation_keeps_bos_and_some_response(llama):
    long_row = {
        "id": "long",
        "instruction": "word " * 200,
        "input": "",
        "output": "the end of the answer " * 10,
    }
    enc = encode_rows([long_row, ROWS[0]], llama.tokenizer, task="causal", max_length=64)
    ids, labels = enc.input_ids[0], enc.labels[0]
    assert len(ids) == 64 and enc.truncated == ["long"]
    assert ids[0] == llama.tokenizer.bos_token_id
    n_targets = sum(t != IGNORE_INDEX for t in labels)
    assert n_targets >= 16
    response = llama.tokenizer(long_row["output"], add_special_tokens=False)["input_ids"]
    assert ids[-n_targets:] == response[:n_targets]  # the response is cut from the right


def test_empty_output_is_an_error_naming_rows(llama):
    rows = [*ROWS, {"id": "empty", "instruction": "x", "input": "", "output": "  "}]
    with pytest.raises(InfscopeError, match="empty"):
        encode_rows(rows, llama.tokenizer, task="causal")


def test_classification_labels_and_names(bert):
    rows = [{"id": "1", "text": "good film", "label": "pos"}, {"id": "2", "text": "bad film", "label": "neg"}]
    enc = encode_rows(rows, bert.tokenizer, task="classification", label_names=["neg", "pos"])
    assert enc.labels == [1, 0]
    assert enc.input_ids[0] == bert.tokenizer("good film")["input_ids"]
    with pytest.raises(InfscopeError, match="label"):
        encode_rows(rows, bert.tokenizer, task="classification")


def _loop_causal_loss(model, enc) -> np.ndarray:
    """Reference: each row alone (no padding), plain cross-entropy over its target tokens."""
    out = []
    with torch.no_grad():
        for ids, labels in zip(enc.input_ids, enc.labels, strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            out.append(F.cross_entropy(logits[:-1][keep], target[keep]).item())
    return np.array(out)


def test_per_example_loss_matches_row_loop(llama):
    rows = ROWS + [
        {"id": f"x{i}", "instruction": "Repeat.", "input": "a b " * i, "output": "a b " * (i + 1)}
        for i in range(5)
    ]
    enc = encode_rows(rows, llama.tokenizer, task="causal")
    llama.model.train()
    losses = per_example_loss(llama.model, enc, batch_size=3)
    assert llama.model.training  # mode restored
    llama.model.eval()
    np.testing.assert_allclose(losses, _loop_causal_loss(llama.model, enc), rtol=1e-5, atol=1e-5)
    assert len(set(np.round(losses, 6))) == len(rows)


def test_per_example_loss_classification_matches_loop(bert):
    rows = [{"id": str(i), "text": "word " * (i + 1), "label": i % 3} for i in range(7)]
    enc = encode_rows(rows, bert.tokenizer, task="classification")
    losses = per_example_loss(bert.model, enc, batch_size=4)
    with torch.no_grad():
        ref = [
            F.cross_entropy(
                bert.model(input_ids=torch.tensor([ids])).logits.double(), torch.tensor([lab])
            ).item()
            for ids, lab in zip(enc.input_ids, enc.labels, strict=True)
        ]
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-6)


def test_token_loss_ignores_masked_positions():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, 4]])
    got = token_loss(logits, labels)
    row0 = (
        F.cross_entropy(logits[0, 0:1], labels[0, 1:2]) + F.cross_entropy(logits[0, 1:2], labels[0, 2:3])
    ) / 2
    row1 = F.cross_entropy(logits[1, 2:3], labels[1, 3:4])
    torch.testing.assert_close(got, torch.stack([row0, row1]))


def test_nan_loss_names_the_rows(llama):
    enc = encode_rows(ROWS, llama.tokenizer, task="causal")

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 8)
            logits[1] = float("nan")
            return type("Out", (), {"logits": logits})()

    enc.input_ids = [[min(t, 7) for t in s] for s in enc.input_ids]
    enc.labels = [[t if t == IGNORE_INDEX else min(t, 7) for t in s] for s in enc.labels]
    with pytest.raises(InfscopeError, match="rows b"):
        per_example_loss(Broken(), enc, batch_size=3)


def test_forward_losses_equal_full_logits(llama):
    from infscope.models.loss import forward_losses

    rows = ROWS + [{"id": "z", "instruction": "A much longer instruction " * 4, "input": "", "output": "ok"}]
    enc = encode_rows(rows, llama.tokenizer, task="causal")
    batch = next(batches(enc, 4))
    with torch.no_grad():
        full = token_loss(
            llama.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
        fast = forward_losses(llama.model, batch, torch.device("cpu"))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
