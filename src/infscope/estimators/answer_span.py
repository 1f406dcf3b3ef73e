"""``answer_loss``: the loss of a response's final number only (wrong final answers in reasoning data).

A worked answer ends with its result ("... 10 + 36 = 46. The answer is 46."). When the final
number is wrong, the reasoning before it still reads well, so the row's mean token loss moves
little: one or two surprised tokens among fifty. Scored alone, the final number is where the
damage is: a model that has learned the format predicts the result from the reasoning (often by
copying the last computed value), so a final number that disagrees with its own working is very
unlikely, while intermediate numbers, hard for a small model to compute, no longer dilute the score.

The final number is the last run of target tokens that carry digits, joined across ``,`` and ``.``
between digits (``1,234.5``) and ending at the token that starts the word. Rows without any digit
in their response score their mean token loss, so every row has a value; the count of such rows is
returned for the score's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators.baselines import from_values
from infscope.estimators.inputs import MODEL, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.scores import Scores
from infscope.models.encode import IGNORE_INDEX, encode_rows
from infscope.models.loss import per_token_losses
from infscope.models.pair_losses import length_sorted

_JOINERS = {",", "."}


def _has_digit(piece: str) -> bool:
    return any(ch.isdigit() for ch in piece)


def final_number_positions(pieces: Sequence[str]) -> list[int]:
    """Positions of the tokens that spell the last number in ``pieces`` (decoded target tokens).

    Walks back from the last token with a digit over digit tokens and over a lone ``,`` / ``.``
    sitting between digits, and stops after a token that begins with whitespace (the number's
    first token). Returns ``[]`` when no token has a digit.
    """
    last = next((i for i in range(len(pieces) - 1, -1, -1) if _has_digit(pieces[i])), None)
    if last is None:
        return []
    positions = [last]
    i = last
    while i > 0 and not pieces[i][:1].isspace():
        before = pieces[i - 1]
        if _has_digit(before) and not before[-1:].isspace():
            i -= 1
        elif before in _JOINERS and i >= 2 and _has_digit(pieces[i - 2]) and not pieces[i - 2][-1:].isspace():
            i -= 2
            positions.append(i + 1)
        else:
            break
        positions.append(i)
    return sorted(positions)


def target_pieces(tokenizer: Any, labels: Sequence[int]) -> list[str]:
    """Decoded text of each target token of one encoded row, in the order of its token losses."""
    ids = [int(t) for t in list(labels)[1:] if int(t) != IGNORE_INDEX]
    return [tokenizer.decode([t]) for t in ids]


def answer_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, int]:
    """Mean loss of the final number's tokens per row (float64 ``(n,)``), and how many rows had no number.

    Rows are encoded as fine-tuning encodes them and run in length-sorted batches in eval mode.
    A row whose response has no digit scores its mean target-token loss instead.
    """
    encoded = encode_rows(rows, tokenizer, task="causal", max_length=max_length, response_only=response_only)
    order = length_sorted(encoded)
    sorted_losses = per_token_losses(model, encoded.subset(order), batch_size, device=device)
    losses: list[np.ndarray] = [np.zeros(0)] * len(rows)
    for position, values in zip(order.tolist(), sorted_losses, strict=True):
        losses[position] = values
    out = np.empty(len(rows), dtype=np.float64)
    without_number = 0
    for i, values in enumerate(losses):
        span = final_number_positions(target_pieces(tokenizer, encoded.labels[i]))
        if span:
            out[i] = float(values[span].mean())
        else:
            without_number += 1
            out[i] = float(values.mean()) if values.size else 0.0
    return out, without_number


def _answer_loss(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("answer_loss", lambda model="checkpoint": None, options)
    which = options.get("model", "checkpoint")
    if which not in ("checkpoint", "base"):
        raise InfscopeError(f"answer_loss model={which!r} is unknown; use checkpoint or base")
    loaded = inputs.model(which)
    encode = inputs.encode_options()
    values, without_number = answer_loss(
        loaded.model,
        loaded.tokenizer,
        inputs.rows(),
        max_length=encode["max_length"],
        batch_size=encode["batch_size"],
        response_only=encode["response_only"],
    )
    meta = {"family": "token", "model": which, "rows_without_number": without_number}
    return from_values(values, inputs.train_ids, "answer_loss", meta)


REGISTER = [
    Method(
        "answer_loss",
        (MODEL,),
        _answer_loss,
        "loss of the response's final number only (wrong final answers in worked solutions)",
        family="token",
        tasks=("instruction",),
        options={"model": "checkpoint"},
    ),
]
