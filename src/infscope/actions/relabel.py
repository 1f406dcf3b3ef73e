"""The ``relabel`` action (classification): move a flagged row to the class that most lowers its loss.

Under the tuned model a row's loss for class ``c`` is ``-log p(c | text)``. A flagged row moves to
the other class with the lowest loss, but only when that loss is lower than the loss of its current
label by at least ``margin`` (in nats: ``log p(new) - log p(old) >= margin``), so the model must be
confidently of another opinion. :func:`class_losses` computes the loss matrix from a model;
:func:`relabel` is a pure function of that matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from infscope.actions.changes import Change
from infscope.actions.flagging import Budget, flag
from infscope.models.encode import batches, encode_rows
from infscope.models.loss import forward_logits, model_device


@torch.no_grad()
def class_losses(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    label_names: Sequence[Any],
    max_length: int = 256,
    batch_size: int = 8,
) -> np.ndarray:
    """``-log softmax`` of a classifier's logits for each row and class, shape ``(n_rows, n_classes)``."""
    encoded = encode_rows(
        rows, tokenizer, task="classification", max_length=max_length, label_names=label_names
    )
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = np.empty((len(encoded), len(label_names)), dtype=np.float64)
    try:
        for batch in batches(encoded, batch_size, with_index=True):
            logits = forward_logits(model, batch, device).float()
            out[batch["index"].numpy()] = (-torch.log_softmax(logits, dim=-1)).double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def relabel(
    rows: Sequence[Mapping[str, Any]],
    scores: np.ndarray,
    losses: np.ndarray,
    budget: Budget,
    *,
    margin: float = 0.5,
    eligible: np.ndarray | None = None,
    label_names: Sequence[Any] | None = None,
    round: int = 1,
    method: str = "",
) -> list[Change]:
    """A ``relabel`` change for each flagged row whose best other class beats its label by ``margin``.

    ``losses[i, c]`` is row ``i``'s loss if its label were ``c`` (all rows, same order as ``rows``).
    Flagged rows below the margin keep their label and get no change.
    """
    losses = np.asarray(losses, dtype=np.float64)
    out = []
    for i in flag(scores, budget, eligible):
        current = int(rows[i]["label"])
        others = losses[i].copy()
        others[current] = np.inf
        best = int(np.argmin(others))
        gain = float(losses[i, current] - losses[i, best])
        if not gain >= margin:
            continue
        name = (lambda c: f"{c} ({label_names[c]})") if label_names else str
        out.append(
            Change(round, str(rows[i]["id"]), "relabel", current, best, float(scores[i]), method,
                   f"loss {losses[i, current]:.3f} as {name(current)} vs {losses[i, best]:.3f} as "
                   f"{name(best)}: margin {gain:.3f} >= {margin:g}")
        )  # fmt: skip
    return out
