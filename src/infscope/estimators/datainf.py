"""DataInf (Kwon et al., 2023): closed-form influence for LoRA gradients.

Per block, the damped inverse of ``H = (1/n) sum_i g_i g_i^T`` is replaced by the average of the
inverses of its rank-one terms, which Sherman-Morrison gives in closed form (see
:func:`~infscope.estimators.primitives.datainf_apply`). The cost is a few matrix products per
block, with no solve; the damping per block defaults to ``0.1 * mean ||g||^2 / d`` as in the paper.
"""

from __future__ import annotations

import torch

from infscope.estimators.base import BlockwiseEstimator
from infscope.estimators.primitives import datainf_apply, datainf_self, squared_norms
from infscope.grads.base import GradientSet


class DataInf(BlockwiseEstimator):
    """DataInf influence: ``-v^T A_block g_z`` summed over blocks, ``A`` the DataInf inverse approximation.

    Computes in float32 by default (no solve, so no loss of accuracy worth float64's cost); pass
    ``dtype="float64"`` for reference-grade numbers.
    """

    name = "datainf"
    default_dtype = torch.float32

    def _fit_block(self, name: str, G: torch.Tensor, lam: float) -> None:
        self._sq_norms[name] = squared_norms(G)

    def fit(self, train: GradientSet) -> DataInf:
        """Choose the damping per block and cache the squared gradient norms (one pass)."""
        self._sq_norms: dict[str, torch.Tensor] = {}
        super().fit(train)
        return self

    def _solve(self, name: str, G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
        return datainf_apply(G, V, lam, sq_norms=self._sq_norms.get(name))

    def _self(self, name: str, G: torch.Tensor, lam: float) -> torch.Tensor:
        return datainf_self(G, lam)
