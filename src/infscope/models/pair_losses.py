"""Batched losses of recombined (instruction, response) pairs, and classifier logits, for pair scores.

A pair score compares the loss of a response under its own instruction with its loss under other
instructions, or under none. :func:`pair_losses` takes a list of ``(response row, prompt row)``
index pairs, builds one training-style row per pair with :func:`pair_row`, encodes them exactly as
fine-tuning does (:func:`infscope.models.encode.encode_rows`), and runs the forward passes in
length-sorted batches, so padding is small and each distinct pair runs once.

:func:`pair_row` is the only place that recombines rows; it goes through
:func:`infscope.data.formatting.prompt_response_view` / ``with_response`` / ``with_instruction``,
so Alpaca and chat rows work alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from infscope.data.formatting import prompt_response_view, with_instruction, with_response
from infscope.errors import InfscopeError
from infscope.models.encode import IGNORE_INDEX, Encoded, batches, encode_rows
from infscope.models.loss import check_finite, forward_logits, model_device, per_example_loss

EMPTY = -1
"""Prompt index meaning "no instruction": the response under an empty instruction and input."""


def pair_row(prompt_row: Mapping[str, Any] | None, response_row: Mapping[str, Any], pair_id: str) -> dict:
    """A row with the prompt part of ``prompt_row`` and the response of ``response_row`` (Alpaca or chat).

    The prompt part is everything but the response: Alpaca ``instruction`` and ``input``; chat
    system and earlier turns plus the last user turn. ``prompt_row=None`` gives the empty
    instruction: the response row with an empty instruction (and, for Alpaca, an empty input; a
    chat row keeps its earlier turns). The result has id ``pair_id`` (ids must be unique to encode).
    """
    response = prompt_response_view(response_row)[1]
    row = with_response(response_row if prompt_row is None else prompt_row, response)
    if prompt_row is None:
        row = with_instruction({**row, "input": ""} if "input" in row else row, "")
    row["id"] = pair_id
    return row


def _check_pairs(pairs: Any, n: int) -> np.ndarray:
    array = np.asarray(pairs, dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InfscopeError(
            f"pairs must have shape (m, 2) (response index, prompt index), got {array.shape}; fix the call"
        )
    if array.size and (array.min() < EMPTY or array.max() >= n or array[:, 0].min() < 0):
        raise InfscopeError(
            f"pair indices must lie in 0..{n - 1} (prompt index {EMPTY} for no instruction); fix the pairs"
        )
    return array


def _rid(rows: Sequence[Mapping[str, Any]], position: int) -> str:
    return "no instruction" if position == EMPTY else str(rows[position].get("id", f"#{position}"))


def length_sorted(encoded: Encoded) -> np.ndarray:
    """Row positions sorted by token count (stable), so each batch pads to a similar width."""
    return np.argsort(encoded.lengths, kind="stable")


def pair_losses(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    pairs: Any,
    *,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Mean token loss of response ``r`` under prompt ``p`` for every ``(r, p)`` in ``pairs`` (float64, ``(m,)``).

    ``pairs`` is an int array ``(m, 2)`` of row positions: column 0 the response's row, column 1
    the prompt's row or :data:`EMPTY`. Duplicate pairs run once. The loss is
    :func:`infscope.models.loss.per_example_loss` on the encoded pair rows (response tokens and EOS
    only when ``response_only``), in eval mode and without gradients.
    """
    index = _check_pairs(pairs, len(rows))
    if index.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    unique, inverse = np.unique(index, axis=0, return_inverse=True)
    built = [
        pair_row(rows[p] if p != EMPTY else None, rows[r], f"{_rid(rows, r)} (prompt of {_rid(rows, p)})")
        for r, p in unique.tolist()
    ]
    encoded = encode_rows(built, tokenizer, task="causal", max_length=max_length, response_only=response_only)
    order = length_sorted(encoded)
    losses = np.empty(len(unique), dtype=np.float64)
    losses[order] = per_example_loss(model, encoded.subset(order), batch_size, device=device)
    return losses[inverse.reshape(-1)]


def classifier_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    label_names: Sequence[Any] | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(n, K)`` (float64) and label indices ``(n,)`` of classification rows, in row order.

    Rows are encoded as fine-tuning encodes them and run in length-sorted batches, in eval mode
    without gradients; the model's train/eval mode is restored afterwards.
    """
    encoded = encode_rows(
        rows, tokenizer, task="classification", max_length=max_length, label_names=label_names
    )
    order = length_sorted(encoded)
    sorted_rows = encoded.subset(order)
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for batch in batches(sorted_rows, batch_size):
                parts.append(forward_logits(model, batch, dev).double().cpu())
    finally:
        model.train(was_training)
    logits = np.empty((len(encoded), parts[0].shape[1]), dtype=np.float64)
    logits[order] = torch.cat(parts).numpy()
    labels = np.asarray(encoded.labels, dtype=np.int64)
    if labels.max() >= logits.shape[1]:
        raise InfscopeError(
            f"labels go up to {int(labels.max())} but the classifier has {logits.shape[1]} outputs; "
            "load the model with the right num_labels"
        )
    check_finite(logits.sum(axis=1), encoded.ids)
    return logits, labels


def prompt_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Mean of the last hidden state over each row's prompt tokens, ``(n, hidden)`` float64.

    The prompt is every token without a loss target in the fine-tuning encoding, so this follows
    the row layout of :func:`encode_rows`. Meant as the ``embeddings`` for nearest-prompt
    competitors of :mod:`infscope.estimators.pair`.
    """
    encoded = encode_rows(rows, tokenizer, task="causal", max_length=max_length, response_only=True)
    order = length_sorted(encoded)
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for batch in batches(encoded.subset(order), batch_size):
                mask = (batch["attention_mask"] == 1) & (batch["labels"] == IGNORE_INDEX)
                out = model(
                    input_ids=batch["input_ids"].to(dev),
                    attention_mask=batch["attention_mask"].to(dev),
                    output_hidden_states=True,
                )
                hidden = out.hidden_states[-1].double().cpu()
                weights = mask.double().unsqueeze(-1)
                parts.append((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))
    finally:
        model.train(was_training)
    out_array = np.empty((len(encoded), parts[0].shape[1]), dtype=np.float64)
    out_array[order] = torch.cat(parts).numpy()
    return out_array
