"""Per-example losses whose sum is back-propagated to get per-example gradients.

Every loss here returns a ``(b,)`` tensor: each example's own loss. The gradient engine
back-propagates the *sum* of it, so the gradient that lands on example ``i`` is exactly the
gradient of example ``i``'s loss (a batch mean would scale it by ``1/b``).

A loss function has the signature ``loss_fn(model, batch) -> (b,) tensor``. :func:`default_loss`
picks one from the batch:

- ``input_ids`` with 2-D ``labels``: causal LM, shifted cross-entropy, ``-100`` ignored, mean over
  that row's target tokens (rows without targets get loss 0 and gradient 0);
- ``input_ids`` with 1-D ``labels``: sequence classification, cross-entropy per row;
- ``inputs`` (a plain feature tensor, e.g. logistic regression): ``model(inputs)``; integer labels
  use cross-entropy, float labels binary cross-entropy on a single logit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infscope.errors import InfscopeError

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]

#: Batch keys that describe rows but are not model inputs.
NON_INPUT_KEYS = frozenset({"labels", "ids", "id", "inputs"})


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS and isinstance(v, torch.Tensor)}


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's target tokens (labels ``-100`` ignored).

    Only positions that predict some target are projected onto the vocabulary (``logits_to_keep``),
    which skips most of the language-model head's cost on the shared prompt part of a batch.
    """
    labels = batch["labels"]
    inputs = _model_inputs(batch)
    from infscope.models.loss import positions_to_keep

    try:
        keep = positions_to_keep(labels)
    except RuntimeError:  # under torch.func transforms (vmap) the cut-off cannot be read: keep all
        keep = 0
    try:
        logits = _logits(model(**inputs, logits_to_keep=keep) if keep else model(**inputs))
    except TypeError:  # models without ``logits_to_keep``
        logits = _logits(model(**inputs))
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    shifted = labels[:, 1:]
    pred = logits[:, :-1].flatten(0, 1)
    if pred.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses the small losses
        pred = pred.float()
    token = F.cross_entropy(pred, shifted.flatten(), ignore_index=-100, reduction="none").view(shifted.shape)
    counts = (shifted != -100).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counts.to(token.dtype)


def classification_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each row's logits against its integer label."""
    logits = _logits(model(**_model_inputs(batch)))
    return F.cross_entropy(logits, batch["labels"].long(), reduction="none")


def plain_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Loss of a plain model called as ``model(inputs)``: CE for integer, BCE for float labels."""
    logits = _logits(model(batch["inputs"]))
    labels = batch["labels"]
    if labels.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits.reshape(labels.shape), labels, reduction="none")
    return F.cross_entropy(logits, labels.long(), reduction="none")


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Choose the per-example loss from the batch keys (see the module docstring)."""
    if "labels" not in batch:
        raise InfscopeError("batch has no 'labels'; encode rows with labels or pass loss_fn=")
    if "inputs" in batch:
        return plain_loss(model, batch)
    if batch["labels"].ndim == 2:
        return causal_lm_loss(model, batch)
    if batch["labels"].ndim == 1:
        return classification_loss(model, batch)
    raise InfscopeError(f"labels of shape {tuple(batch['labels'].shape)} are not supported; pass loss_fn=")
