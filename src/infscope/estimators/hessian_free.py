"""Hessian-free influence and TracIn: gradient dot products, optionally over several checkpoints.

With ``H = I`` the influence ``-v^T H^{-1} g_z`` is the plain dot product ``-v . g_z``. TracIn
(Pruthi et al., 2020) sums it over checkpoints ``c`` weighted by the learning rate in force there:
``score(z) = sum_c lr_c * (-v_c . g_{z,c})``, with train and query gradients taken at each
checkpoint. One checkpoint with ``lr = 1`` is the hessian-free score. Self-influence is
``sum_c lr_c ||g_{z,c}||^2``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import (
    Progress,
    check_gradient_set,
    check_same_blocks,
    make_scores,
    query_matrix,
    resolve_dtype,
)
from infscope.estimators.primitives import squared_norms
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet

Checkpoints = GradientSet | Sequence[tuple[GradientSet, float]]


class HessianFree:
    """Gradient dot products (``H = I``), summed over blocks and learning-rate-weighted checkpoints.

    ``fit`` takes one :class:`GradientSet` (learning rate 1) or a list of ``(GradientSet, lr)``
    pairs, one per checkpoint; ``score`` then takes one query :class:`GradientSet` per checkpoint,
    in the same order.
    """

    name = "hessian_free"

    def __init__(self, *, dtype: torch.dtype | str = torch.float32) -> None:
        self.dtype = resolve_dtype(dtype)
        self.checkpoints: list[tuple[GradientSet, float]] = []
        self.fit_seconds = 0.0

    def fit(self, train: Checkpoints) -> HessianFree:
        """Remember the training gradients of every checkpoint with its learning rate."""
        start = time.perf_counter()
        pairs = [(train, 1.0)] if isinstance(train, GradientSet) else list(train)
        if not pairs:
            raise InfscopeError(
                "no checkpoints given; pass a GradientSet or a list of (GradientSet, lr) pairs"
            )
        checked: list[tuple[GradientSet, float]] = []
        for index, pair in enumerate(pairs):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise InfscopeError(
                    f"checkpoint {index} is not a (GradientSet, lr) pair; pass pairs like (grads, 1e-4)"
                )
            grads, lr = check_gradient_set(pair[0], f"checkpoint {index} training"), float(pair[1])
            if checked and grads.ids != checked[0][0].ids:
                raise InfscopeError(
                    f"checkpoint {index} has other training ids than checkpoint 0; compute every checkpoint on the same rows"
                )
            checked.append((grads, lr))
        self.checkpoints = checked
        self.fit_seconds = time.perf_counter() - start
        return self

    def _queries(self, query: GradientSet | Sequence[GradientSet]) -> list[GradientSet]:
        if not self.checkpoints:
            raise InfscopeError("hessian_free estimator is not fitted; call fit(train_gradients) first")
        queries = [query] if isinstance(query, GradientSet) else list(query)
        if len(queries) != len(self.checkpoints):
            raise InfscopeError(
                f"got {len(queries)} query gradient set(s) for {len(self.checkpoints)} checkpoint(s); "
                "pass one query GradientSet per checkpoint, in the same order"
            )
        for index, (q, (train, _)) in enumerate(zip(queries, self.checkpoints, strict=True)):
            check_gradient_set(q, f"checkpoint {index} query")
            check_same_blocks(train, q)
            if q.ids != queries[0].ids:
                raise InfscopeError(
                    f"checkpoint {index} query ids differ from checkpoint 0; use the same queries"
                )
        return queries

    def _meta(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "checkpoint_lrs": [lr for _, lr in self.checkpoints],
            "n_checkpoints": len(self.checkpoints),
            "seconds_fit": self.fit_seconds,
        }

    def score(
        self, query: GradientSet | Sequence[GradientSet], *, aggregate: bool = True, progress: Progress = None
    ) -> Scores:
        """``sum_c lr_c * (-v_c . g_{z,c})`` (higher = more harmful); see ``Estimator.score`` for modes.

        ``progress`` is called with each block name once that block is done (per checkpoint).
        """
        queries = self._queries(query)
        start = time.perf_counter()
        train_ids = self.checkpoints[0][0].ids
        q = 1 if aggregate else len(queries[0].ids)
        total = torch.zeros(q, len(train_ids), dtype=torch.float64)
        for (train, lr), qset in zip(self.checkpoints, queries, strict=True):
            for name in train.block_names:
                G = train.load_block(name, self.dtype)
                V = query_matrix(qset, name, self.dtype, aggregate)
                total -= lr * (V @ G.T).double()
                if progress is not None:
                    progress(name)
        meta = {**self._meta(), "seconds_score": time.perf_counter() - start}
        return make_scores(total, train_ids, queries[0].ids, self.name, aggregate, meta)

    def self_score(self, *, progress: Progress = None) -> Scores:
        """``sum_c lr_c ||g_{z,c}||^2`` over all blocks."""
        if not self.checkpoints:
            raise InfscopeError("hessian_free estimator is not fitted; call fit(train_gradients) first")
        total = torch.zeros(len(self.checkpoints[0][0].ids), dtype=torch.float64)
        for train, lr in self.checkpoints:
            for name in train.block_names:
                G = train.load_block(name, self.dtype)
                total += lr * squared_norms(G).double()
                if progress is not None:
                    progress(name)
        meta = {**self._meta(), "self_influence": True}
        return Scores(total.numpy(), self.checkpoints[0][0].ids, None, f"{self.name}_self", meta)
