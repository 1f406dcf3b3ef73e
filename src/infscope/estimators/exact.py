"""Exact damped influence per block: ``-v^T (H_block + lam I)^{-1} g_z`` solved in float64.

``H_block`` is ``G^T G / n`` (the empirical Fisher / Gauss-Newton matrix the other methods
approximate), solved exactly through Woodbury's identity and a Cholesky factor, so the cost follows
``min(n, d)``. For a small model whose true Hessian is known (the leave-one-out check on logistic
regression), pass ``hessian={block: (d, d) matrix}``; that block then uses ``(hessian + lam I)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import BlockwiseEstimator, Damping
from infscope.estimators.primitives import dense_solve, woodbury_solve


class Exact(BlockwiseEstimator):
    """Exact block-diagonal influence (float64 Cholesky), optionally with given Hessian blocks."""

    name = "exact"
    default_dtype = torch.float64

    def __init__(
        self,
        *,
        damping: Damping = None,
        damping_scale: float = 0.1,
        dtype: torch.dtype | str | None = None,
        hessian: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(damping=damping, damping_scale=damping_scale, dtype=dtype)
        self.hessian = {name: torch.as_tensor(h, dtype=torch.float64) for name, h in (hessian or {}).items()}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "hessian_blocks": sorted(self.hessian)}

    def _fit_block(self, name: str, G: torch.Tensor, lam: float) -> None:
        H = self.hessian.get(name)
        if H is not None and tuple(H.shape) != (G.shape[1], G.shape[1]):
            raise InfscopeError(
                f"hessian for block {name!r} has shape {tuple(H.shape)}, expected ({G.shape[1]}, {G.shape[1]}); "
                "pass one square matrix per block"
            )

    def fit(self, train: Any) -> Exact:
        super().fit(train)
        unknown = sorted(set(self.hessian) - set(train.block_names))
        if unknown:
            raise InfscopeError(
                f"hessian given for unknown block {unknown[0]!r}; use the gradient block names"
            )
        return self

    def _solve(self, name: str, G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
        H = self.hessian.get(name)
        return woodbury_solve(G, V, lam) if H is None else dense_solve(H, V, lam)

    def _self(self, name: str, G: torch.Tensor, lam: float) -> torch.Tensor:
        n, d = G.shape
        if name not in self.hessian and n < d:
            self._warn(
                name,
                "self_score_degenerate",
                f"exact self-influence of block {name!r} is nearly constant: {n} training rows < {d} dims; "
                "use more rows, a projection, or datainf self-influence",
            )
        X = self._solve(name, G, G, lam)
        return (X * G.double()).sum(dim=1)
