"""LiSSA (Agarwal et al., 2017; Koh & Liang, 2017): iterative damped inverse-Hessian-vector products.

Solves ``(H_block + lam I) x = v`` for every query with ``H_block = G^T G / n``. The method is the
damped Neumann recursion ``r <- v + r - alpha (H + lam I) r`` (``x = alpha r``), full-batch and
deterministic; ``solver="recursion"`` runs exactly that. With DataInf's damping a block's condition
number ``(lambda_max + lam) / lam`` reaches ~``10 d``, and the recursion, which gains a factor
``1 - lam / (lambda_max + lam)`` per step, stalls far from the answer within any practical budget.
So the default solver is **conjugate gradients on the same matrix-vector product**, which ends
within about ``n + 1`` steps since ``H`` has rank ``<= n``; both start from ``v / lam`` and iterate
in the ``n``-dim span of the training gradients when ``n <= d``
(:func:`~infscope.estimators.primitives.lissa_solve`). Each block records its solver, iterations
and final relative residual; blocks that stop unconverged are listed in
``meta["not_converged"]`` (``{block: residual}``) and one warning names them.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import BlockwiseEstimator, Damping, Progress
from infscope.estimators.primitives import LISSA_SOLVERS, LISSA_SPACES, lissa_solve
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet


class LiSSA(BlockwiseEstimator):
    """Iterative influence; the damping rule is the same as ``exact`` and ``datainf`` unless given.

    ``solver``: ``"cg"`` (conjugate gradients), ``"recursion"`` (the classic damped Neumann
    recursion, step ``1 / scale``) or ``"auto"`` (``cg`` unless ``scale`` is given). ``space``:
    ``"gram"`` iterates in the ``n``-dim span of the training gradients, ``"full"`` in ``d`` dims,
    ``"auto"`` picks the smaller. ``tol`` bounds the relative residual
    ``||v - (H + lam I) x|| / ||v||`` of every query; ``max_iter`` caps the steps per block.
    """

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
        solver: str = "auto",
        space: str = "auto",
        scale: float | None = None,
        power_iters: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__(damping=damping, damping_scale=damping_scale, dtype=dtype)
        if solver not in LISSA_SOLVERS:
            raise InfscopeError(f"unknown LiSSA solver {solver!r}; use one of {', '.join(LISSA_SOLVERS)}")
        if space not in LISSA_SPACES:
            raise InfscopeError(f"unknown LiSSA space {space!r}; use one of {', '.join(LISSA_SPACES)}")
        if not tol > 0 or int(max_iter) < 1:
            raise InfscopeError(
                f"LiSSA needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}; "
                "e.g. tol=1e-6, max_iter=10000"
            )
        self.tol, self.max_iter, self.scale = float(tol), int(max_iter), scale
        self.solver, self.space = solver, space
        self.power_iters, self.seed = int(power_iters), int(seed)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "solver": self.solver,
            "space": self.space,
            "scale": self.scale,
            "power_iters": self.power_iters,
            "seed": self.seed,
        }

    def score(self, query: GradientSet, *, aggregate: bool = True, progress: Progress = None) -> Scores:
        """Influence as in :meth:`BlockwiseEstimator.score`, plus ``meta["not_converged"]``."""
        return self._flag_not_converged(super().score(query, aggregate=aggregate, progress=progress))

    def self_score(self, *, progress: Progress = None) -> Scores:
        """Self-influence as in :meth:`BlockwiseEstimator.self_score`, plus ``meta["not_converged"]``."""
        return self._flag_not_converged(super().self_score(progress=progress))

    def _flag_not_converged(self, scores: Scores) -> Scores:
        """Record ``{block: residual}`` of blocks that stopped unconverged; warn once, naming them."""
        failed = {
            name: float(info["residual"])
            for name, info in self._block_info.items()
            if "converged" in info and not info["converged"]
        }
        scores.meta["not_converged"] = failed
        if failed:
            shown = ", ".join(repr(name) for name in list(failed)[:3])
            more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
            message = (
                f"LiSSA did not converge on {len(failed)} of {len(self._block_info)} blocks ({shown}{more}); "
                f"largest relative residual {max(failed.values()):.2e} > tol {self.tol:.0e} after "
                f"max_iter={self.max_iter}, so scores may be off; raise max_iter or use exact"
            )
            scores.meta.setdefault("warnings", []).append(message)
            warnings.warn(message, UserWarning, stacklevel=3)
        return scores

    def _solve(self, name: str, G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
        result = lissa_solve(
            G,
            V,
            lam,
            tol=self.tol,
            max_iter=self.max_iter,
            solver=self.solver,
            space=self.space,
            scale=self.scale,
            power_iters=self.power_iters,
            seed=self.seed,
        )
        self._block_info.setdefault(name, {}).update(
            {
                "solver": result.solver,
                "space": result.space,
                "iterations": result.iterations,
                "residual": result.residual,
                "alpha": result.alpha,
                "converged": result.converged,
                "alpha_halvings": result.alpha_halvings,
            }
        )
        return result.solution

    def _self(self, name: str, G: torch.Tensor, lam: float) -> torch.Tensor:
        return (self._solve(name, G, G, lam) * G).sum(dim=1)
