"""Row embeddings from a (tuned) model: the mean of the last hidden state over each row's tokens.

The representation the Shapley-family values and representation-similarity methods work on: one
batched forward pass per batch, padding excluded, returned in row order as float64.
"""

from __future__ import annotations

import numpy as np
import torch

from infscope.models.encode import Encoded, batches
from infscope.models.loss import model_device


@torch.no_grad()
def mean_hidden_states(model: torch.nn.Module, encoded: Encoded, *, batch_size: int = 8) -> np.ndarray:
    """``(n, hidden)`` mean of the last layer's hidden states over each row's non-padding tokens."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    try:
        for batch in batches(encoded, batch_size, with_index=True):
            mask = batch["attention_mask"].to(device)
            hidden = model(
                input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True
            ).hidden_states[-1]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            if out is None:
                out = np.zeros((len(encoded), pooled.shape[-1]), dtype=np.float64)
            out[batch["index"].numpy()] = pooled.double().cpu().numpy()
    finally:
        model.train(was_training)
    return out if out is not None else np.zeros((0, 0))
