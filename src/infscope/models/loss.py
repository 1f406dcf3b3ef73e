"""Per-example loss: the mean loss over one row's target tokens (or its cross-entropy for a classifier).

:func:`token_loss` is the single definition of an example's loss, shared by fine-tuning, by
:func:`per_example_loss` and by the gradient hooks, so every stage scores the same quantity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from infscope.errors import InfscopeError
from infscope.models.encode import IGNORE_INDEX, Encoded, batches


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example loss, shape ``(batch,)``.

    Causal LM (``logits`` ``(b, t, V)``, ``labels`` ``(b, t)``): token ``t`` predicts label
    ``t + 1``; the loss is the mean cross-entropy over positions whose label is not ``-100``
    (rows without targets get 0). Classifier (``logits`` ``(b, K)``, ``labels`` ``(b,)``): the
    cross-entropy of each row. Computed in float32 whatever the model's dtype.
    """
    if labels.ndim == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    per_token, mask = target_token_losses(logits, labels)
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def target_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every causal target, ``(per_token, mask)``, both ``(b, t - 1)``.

    ``per_token[:, j]`` is the loss of label ``j + 1`` predicted at position ``j``; ``mask`` marks
    the real targets (label not ``-100``); masked entries are 0. Float32 whatever the model's dtype.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return per_token, shift_labels != IGNORE_INDEX


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def forward_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Logits of a padded batch (the labels stay out of the model so it computes no loss of its own)."""
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits


def positions_to_keep(labels: torch.Tensor) -> int:
    """How many final positions of a causal batch produce logits that some target needs.

    The logit at position ``t`` predicts label ``t + 1``, so positions before the earliest target
    minus one (the shared prompt part of the batch) need no vocabulary projection.
    """
    has_target = (labels != IGNORE_INDEX).any(dim=0)
    first = int(torch.nonzero(has_target)[0]) if has_target.any() else labels.shape[1] - 1
    return labels.shape[1] - max(first - 1, 0)


def forward_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Per-example losses of a padded batch, shape ``(batch,)`` (differentiable).

    For causal LMs only the positions that predict targets are projected onto the vocabulary
    (``logits_to_keep``), which saves time and memory on prompt-heavy rows; the losses equal
    :func:`token_loss` on the full logits.
    """
    return forward_logits_losses(model, batch, device)[2]


def forward_logits_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, labels, losses)`` of one forward pass, for callers that also read the logits.

    ``labels`` are cut to the positions ``logits`` cover (see :func:`forward_losses`), so
    ``token_loss(logits, labels)`` is ``losses``.
    """
    labels = batch["labels"].to(device)
    if labels.ndim == 1:
        logits = forward_logits(model, batch, device)
        return logits, labels, token_loss(logits, labels)
    keep = positions_to_keep(labels)
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
    }
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # models without ``logits_to_keep``
        logits = model(**inputs).logits
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    return logits, labels, token_loss(logits, labels)


def check_finite(losses: np.ndarray, ids: list[str]) -> np.ndarray:
    """Raise an :class:`InfscopeError` naming the rows whose loss is NaN or infinite."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        names = ", ".join(ids[i] for i in bad[:5]) + (f" and {bad.size - 5} more" if bad.size > 5 else "")
        raise InfscopeError(
            f"loss is NaN or infinite for rows {names}; check the model weights and dtype (try --dtype float32)"
        )
    return losses


def per_example_loss(
    model: torch.nn.Module, encoded: Encoded, batch_size: int = 8, *, device: str | torch.device | None = None
) -> np.ndarray:
    """Loss of every encoded row (float64 array in row order), in eval mode and without gradients.

    The model's train/eval mode is restored afterwards. ``device`` defaults to the model's.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    out = np.empty(len(encoded), dtype=np.float64)
    try:
        with torch.no_grad():
            for batch in batches(encoded, batch_size, with_index=True):
                losses = forward_losses(model, batch, dev)
                out[batch["index"].numpy()] = losses.double().cpu().numpy()
    finally:
        model.train(was_training)
    return check_finite(out, encoded.ids)


def per_token_losses(
    model: torch.nn.Module, encoded: Encoded, batch_size: int = 8, *, device: str | torch.device | None = None
) -> list[np.ndarray]:
    """The loss of every target token of every causal row, in row order (float64 arrays).

    Row ``i``'s array has one entry per target token (response tokens and EOS when encoded with
    ``response_only``), in text order; its mean is :func:`per_example_loss`'s value. Eval mode, no
    gradients, length-sorted batches are the caller's choice (``encoded`` is used as given).
    """
    if encoded.task != "causal":
        raise InfscopeError(
            "per-token losses need a causal LM's rows; classification rows have one loss each"
        )
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = [np.zeros(0)] * len(encoded)
    try:
        with torch.no_grad():
            for batch in batches(encoded, batch_size, with_index=True):
                logits, labels, _ = forward_logits_losses(model, batch, dev)
                per_token, mask = target_token_losses(logits, labels)
                per_token, mask = per_token.double().cpu(), mask.cpu()
                for row, index in enumerate(batch["index"].tolist()):
                    out[index] = per_token[row][mask[row]].numpy()
    finally:
        model.train(was_training)
    means = np.array([values.mean() if values.size else 0.0 for values in out])
    check_finite(means, encoded.ids)
    return out
