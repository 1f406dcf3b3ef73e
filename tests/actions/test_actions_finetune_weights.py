"""Row-weighted fine-tuning: the batch loss is the per-row-weighted mean (checked against a plain
per-row loop on tiny-llama), all-one weights train bit-for-bit like no weights, zero weights equal
leaving the rows out, and a run never resumes across two weightings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.models.encode import collate, encode_rows
from infscope.models.finetune import FinetuneConfig, batch_loss, finetune, row_weights
from infscope.models.lora import LoraSpec
from infscope.models.loss import token_loss
from infscope.models.registry import load_model

ROWS = [
    {"id": f"r{i}", "instruction": f"Name the color of item {i}.", "input": "", "output": color}
    for i, color in enumerate(["red", "blue", "green", "red", "blue bright", "green"])
]
VAL = [{"id": "v0", "instruction": "Name the color of item 9.", "input": "", "output": "green"}]
WEIGHTS = {"r0": 0.5, "r1": 2.0, "r2": 0.0, "r3": 1.0, "r4": 3.0, "r5": 0.25}
# one batch per epoch: the first epoch's train loss is the loss of the untouched model
CONFIG = FinetuneConfig(
    epochs=2, lr=5e-3, batch_size=8, lora=LoraSpec(r=4, dropout=0.0), record_dynamics=False
)


def _adapter(loaded):
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_" in n}


def _train(tmp_path, name, rows=ROWS, weights=None, config=CONFIG):
    loaded = load_model("tiny-llama")
    result = finetune(loaded, rows, VAL, config, tmp_path / name, progress=False, weights=weights)
    return result, _adapter(loaded)


def test_batch_loss_is_the_weighted_mean():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert batch_loss(losses).item() == pytest.approx(7 / 3)
    assert batch_loss(losses, torch.tensor([1.0, 0.0, 3.0])).item() == pytest.approx((1 + 12) / 4)
    assert batch_loss(losses, torch.zeros(3)).item() == 0.0


def test_row_weights_checks():
    assert row_weights(None, ["a"]) is None
    assert row_weights({"a": 1.0}, ["a", "b"]) is None  # all one (absent rows count 1) = no weights
    assert row_weights({"b": 2.0}, ["a", "b"]).tolist() == [1.0, 2.0]
    for bad in ({"z": 1.0}, {"a": -1.0}, {"a": float("nan")}, {"a": 0.0, "b": 0.0}):
        with pytest.raises(InfscopeError):
            row_weights(bad, ["a", "b"])


def test_weighted_train_loss_equals_a_per_row_reference(tmp_path):
    result, _ = _train(tmp_path, "weighted", weights=WEIGHTS)
    # reference: each row alone through the base model (LoRA B starts at zero), float64 weighted mean
    base = load_model("tiny-llama")
    enc = encode_rows(ROWS, base.tokenizer, task="causal", max_length=CONFIG.max_length)
    per_row = []
    with torch.no_grad():
        for i in range(len(ROWS)):
            batch = collate(enc, [i])
            logits = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_row.append(float(token_loss(logits, batch["labels"])[0]))
    w = np.array([WEIGHTS[r["id"]] for r in ROWS])
    reference = float((w * np.array(per_row)).sum() / w.sum())
    assert result.checkpoints[0].train_loss == pytest.approx(reference, rel=1e-5)
    assert abs(reference - float(np.mean(per_row))) > 1e-3  # the weights matter


def test_all_one_weights_equal_no_weights_bit_for_bit(tmp_path):
    plain, plain_adapter = _train(tmp_path, "plain")
    ones, ones_adapter = _train(tmp_path, "ones", weights={r["id"]: 1.0 for r in ROWS})
    assert [c.train_loss for c in ones.checkpoints] == [c.train_loss for c in plain.checkpoints]
    assert [c.val_loss for c in ones.checkpoints] == [c.val_loss for c in plain.checkpoints]
    for name, tensor in plain_adapter.items():
        assert torch.equal(tensor, ones_adapter[name]), name


def test_zero_weights_equal_leaving_rows_out(tmp_path):
    drop = {"r1", "r4"}
    _, weighted = _train(tmp_path, "zeros", weights={i: 0.0 for i in drop})
    _, subset = _train(tmp_path, "subset", rows=[r for r in ROWS if r["id"] not in drop])
    for name, tensor in subset.items():
        torch.testing.assert_close(weighted[name], tensor, rtol=1e-4, atol=1e-6)


def test_resume_never_mixes_weightings(tmp_path):
    _train(tmp_path, "run", weights=WEIGHTS)
    with pytest.raises(InfscopeError, match="other data or settings"):
        _train(tmp_path, "run", weights={**WEIGHTS, "r0": 0.7})
    again, _ = _train(tmp_path, "run", weights=WEIGHTS)  # same weights: resumes, nothing to do
    assert again.resumed_from == CONFIG.epochs
