"""Cheap baselines in the same :class:`Scores` type (higher = more harmful / more suspicious).

- ``loss``: per-example training loss after fine-tuning; noisy examples stay hard to fit.
- ``base_loss``: per-example loss under the base model, before fine-tuning.
- ``grad_norm``: norm of the per-example gradient over all blocks (large = atypical).
- ``random``: seeded uniform noise, the floor every method must beat.

Losses come from :func:`infscope.models.loss.per_example_loss`; this module only wraps values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import check_gradient_set
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet


def from_values(values: Any, ids: Sequence[str], method: str, meta: dict | None = None) -> Scores:
    """Scores from one finite value per example (higher = more harmful)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] != len(ids):
        raise InfscopeError(
            f"{method}: got {array.shape} values for {len(ids)} ids; pass one value per example"
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InfscopeError(f"{method}: {bad} value(s) are NaN or infinite; recompute the per-example values")
    return Scores(array, list(ids), None, method, {"baseline": True, **(meta or {})})


def loss_scores(values: Any, ids: Sequence[str]) -> Scores:
    """Training loss after fine-tuning as a score."""
    return from_values(values, ids, "loss")


def base_loss_scores(values: Any, ids: Sequence[str]) -> Scores:
    """Loss under the base (not fine-tuned) model as a score."""
    return from_values(values, ids, "base_loss")


def grad_norm_scores(grads: GradientSet) -> Scores:
    """Euclidean norm of each example's gradient over all blocks, streamed block by block."""
    check_gradient_set(grads, "training")
    total = torch.zeros(len(grads.ids), dtype=torch.float64)
    for name in grads.block_names:
        G = grads.load_block(name, torch.float32)
        total += (G.double() ** 2).sum(dim=1)
    return from_values(total.sqrt().numpy(), grads.ids, "grad_norm")


def random_scores(ids: Sequence[str], seed: int) -> Scores:
    """Seeded uniform random scores in [0, 1)."""
    values = np.random.default_rng(seed).random(len(ids))
    return from_values(values, ids, "random", {"seed": int(seed)})


BASELINES: dict[str, Callable[..., Scores]] = {
    "loss": loss_scores,
    "base_loss": base_loss_scores,
    "grad_norm": grad_norm_scores,
    "random": random_scores,
}
