"""Batching of encoded rows: batch edges, padding values, trimming, ids."""

from __future__ import annotations

import pytest
import torch

from infscope.errors import InfscopeError
from infscope.grads.batching import RowSource, as_row_source, batch_bounds


def test_batch_bounds_never_cross_breaks():
    assert batch_bounds(10, 4, [4, 8]) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(10, 3, [4]) == [(0, 3), (3, 4), (4, 7), (7, 10)]
    assert batch_bounds(5, 8) == [(0, 5)]
    with pytest.raises(InfscopeError, match="batch_size"):
        batch_bounds(5, 0)


def test_row_source_pads_per_batch_and_trims():
    cols = {
        "id": ["a", "b", "c"],
        "input_ids": [[5, 6, 7, 8], [9], [1, 2]],
        "labels": [[-100, 6, 7, 8], [9], [-100, 2]],
        "pad_token_id": 3,
        "task": "causal",
    }
    source = as_row_source(cols)
    assert isinstance(source, RowSource) and source.n == 3 and source.ids == ["a", "b", "c"]
    batch = source.batch(1, 3)
    assert batch["input_ids"].tolist() == [[9, 3], [1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 0], [1, 1]]  # synthesised from the lengths
    assert batch["labels"].tolist() == [[9, -100], [-100, 2]]
    padded = {
        "input_ids": torch.tensor([[4, 4, 0, 0], [4, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]),
        "labels": torch.tensor([1, 0]),
    }
    trimmed = as_row_source(padded, ids=["x", "y"]).batch(0, 2)
    assert trimmed["input_ids"].shape == (2, 2) and trimmed["labels"].tolist() == [1, 0]
    with pytest.raises(InfscopeError, match="ids"):
        as_row_source(padded, ids=["x"])
    assert as_row_source([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]) is None  # ready batches
