"""The DataInf paper's formula as a plain per-example loop: an independent check of our estimator.

Kwon et al. (2023) approximate, per block ``l``, the damped inverse Fisher by the average of the
inverses of its rank-one terms, so for a (mean) validation gradient ``v``::

    A_l v = (1 / (n lam_l)) sum_i [ v - (v . g_il) / (lam_l + ||g_il||^2) g_il ]
    lam_l = 0.1 * (1/n) sum_i ||g_il||^2 / d_l
    I(z_k) = - sum_l (A_l v_l) . g_kl          (our sign: higher = more harmful)

Here every sum over training rows is a Python loop over single rows in float64 NumPy, written
from the formula above without reusing :mod:`infscope.estimators`, so agreement with the
vectorised estimator is evidence rather than tautology. It is O(n) Python steps per block: meant
for checks on small stores, not for production scoring.
"""

from __future__ import annotations

import numpy as np
import torch

from infscope.grads.base import GradientSet


def block_damping(G: np.ndarray, scale: float = 0.1) -> float:
    """``scale * mean_i ||g_i||^2 / d``, summed row by row."""
    n, d = G.shape
    total = 0.0
    for i in range(n):
        total += float(G[i] @ G[i])
    return scale * total / n / d


def reference_datainf(
    train: GradientSet,
    query: GradientSet,
    *,
    damping_scale: float = 0.1,
    damping: float | None = None,
) -> np.ndarray:
    """DataInf influence of every training row on the mean query loss, ``(n_train,)`` float64.

    ``damping`` fixes one ``lam`` for every block (as dattri does); ``None`` uses the paper's
    per-block rule with ``damping_scale``.
    """
    n = len(train.ids)
    scores = np.zeros(n, dtype=np.float64)
    for name in train.block_names:
        G = train.load_block(name, torch.float64).numpy()
        V = query.load_block(name, torch.float64).numpy()
        v = V.sum(axis=0) / V.shape[0]
        lam = block_damping(G, damping_scale) if damping is None else float(damping)
        if lam <= 0:
            continue  # an all-zero block carries no influence
        transformed = np.zeros_like(v)
        for i in range(n):
            g = G[i]
            transformed += v - (float(v @ g) / (lam + float(g @ g))) * g
        transformed /= n * lam
        for k in range(n):
            scores[k] -= float(transformed @ G[k])
    return scores
