"""cleanlab (Northcutt et al., 2021) as a peer for classification runs: label-quality scores.

cleanlab ranks label issues from predicted class probabilities, which should be out-of-sample.
Cross-validated retraining would multiply the fine-tuning cost, so this adapter takes the
probabilities of the *first* epoch's checkpoint (the model has seen each row once and memorised
least): "out-of-sample-ish", as recorded in the meta. Our score is ``1 - label quality``, so
higher = more likely a harmful (mislabelled) row. Instruction runs have no labels: not applicable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from infscope.peers.inputs import PeerInputs
from infscope.peers.result import PeerUnavailable


@torch.no_grad()
def predicted_probabilities(model: torch.nn.Module, encoded, batch_size: int) -> np.ndarray:
    """Softmax class probabilities ``(n, k)`` of a sequence classifier, rows in encoded order."""
    from infscope.models.encode import batches

    model.eval()
    out = []
    for batch in batches(encoded, batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(torch.softmax(logits.double(), dim=-1))
    return torch.cat(out).numpy()


def cleanlab_scores(inputs: PeerInputs, *, checkpoint: str = "first") -> tuple[np.ndarray, dict[str, Any]]:
    """``1 - cleanlab.rank.get_label_quality_scores`` per training row (classification only).

    ``checkpoint``: ``"first"`` (default, least memorised) or ``"scored"`` (the checkpoint the
    gradients were taken at).
    """
    if inputs.task != "classification":
        raise PeerUnavailable("not applicable: cleanlab needs a classification run (this run is instruction)")
    if checkpoint not in ("first", "scored"):
        raise PeerUnavailable(f"unknown checkpoint {checkpoint!r}; use first or scored")
    from cleanlab.rank import get_label_quality_scores

    load = inputs.require_model()
    path = inputs.checkpoints[0] if checkpoint == "first" and inputs.checkpoints else inputs.checkpoint
    encoded = inputs.encode(inputs.ordered_train_rows())
    probs = predicted_probabilities(load(path), encoded, inputs.batch_size)
    labels = np.asarray(encoded.labels, dtype=np.int64)
    quality = get_label_quality_scores(labels, probs)
    meta = {"checkpoint": str(path), "probabilities": f"in-sample at {checkpoint} checkpoint"}
    return 1.0 - np.asarray(quality, dtype=np.float64), meta
