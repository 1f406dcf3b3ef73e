"""LiSSA (Agarwal et al., 2017; Koh & Liang, 2017): iterative damped inverse-Hessian-vector products.

Solves ``(H_block + lam I) x = v`` for every query by the damped recursion
``r <- v + r - alpha (H + lam I) r`` (``x = alpha r``), with a step ``alpha`` chosen safely from a
power-iteration estimate of ``lambda_max(H)`` (:func:`~infscope.estimators.primitives.lissa_solve`).
Full-batch and deterministic: it converges to the exact estimator, and reports per block how many
iterations it took and the final relative residual.
"""

from __future__ import annotations

from typing import Any

import torch

from infscope.estimators.base import BlockwiseEstimator, Damping
from infscope.estimators.primitives import lissa_solve


class LiSSA(BlockwiseEstimator):
    """Iterative influence; the damping rule is the same as ``exact`` and ``datainf`` unless given."""

    name = "lissa"
    default_dtype = torch.float64

    def __init__(
        self,
        *,
        damping: Damping = None,
        damping_scale: float = 0.1,
        dtype: torch.dtype | str | None = None,
        tol: float = 1e-6,
        max_iter: int = 10_000,
        scale: float | None = None,
        power_iters: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__(damping=damping, damping_scale=damping_scale, dtype=dtype)
        self.tol, self.max_iter, self.scale = float(tol), int(max_iter), scale
        self.power_iters, self.seed = int(power_iters), int(seed)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "scale": self.scale,
            "power_iters": self.power_iters,
            "seed": self.seed,
        }

    def _solve(self, name: str, G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
        result = lissa_solve(
            G,
            V,
            lam,
            tol=self.tol,
            max_iter=self.max_iter,
            scale=self.scale,
            power_iters=self.power_iters,
            seed=self.seed,
        )
        self._block_info.setdefault(name, {}).update(
            {
                "iterations": result.iterations,
                "residual": result.residual,
                "alpha": result.alpha,
                "converged": result.converged,
                "alpha_halvings": result.alpha_halvings,
            }
        )
        if not result.converged:
            self._warn(
                name,
                "not_converged",
                f"LiSSA did not converge on block {name!r} (relative residual {result.residual:.2e} after "
                f"{result.iterations} iterations); raise max_iter or the damping",
            )
        return result.solution

    def _self(self, name: str, G: torch.Tensor, lam: float) -> torch.Tensor:
        return (self._solve(name, G, G, lam) * G).sum(dim=1)
