"""Unit-normalised gradient similarity: ``grad_cos`` and ``datainf_cos``.

Raw dot products favour examples with large gradients (high loss, long outputs), whatever their
direction. Normalising removes the length and keeps the direction, which detects harmful data
better in practice (DATE-LM, 2025; TrackStar and LESS normalise for the same reason).

- ``grad_cos``: ``score(z) = -cos(v, g_z)`` with ``v`` the query gradient;
- ``datainf_cos``: ``score(z) = -cos(A v, g_z)`` with ``A v`` DataInf's preconditioned query
  direction (per block ``(G^T G / n + lam I)^{-1} v`` by its closed form, see
  :func:`~infscope.estimators.primitives.datainf_apply`).

The cosine is over the concatenation of all blocks (block dot products and squared norms are
summed before dividing), so a block matters in proportion to its share of the gradient, as for the
unnormalised methods. Higher = more harmful, as everywhere: a training gradient pointing along the
query gradient (``cos > 0``) lowers the query loss when upweighted, so its score is negative.

Aggregation (``aggregate=True``), chosen by ``query_mean``: ``"gradient"`` (default) takes the
cosine with the mean query gradient; ``"cosine"`` averages the per-query cosines (the row mean of
the ``aggregate=False`` matrix, as LESS does). Zero-norm vectors get cosine 0. Self-influence is
never normalised (a vector's cosine with itself is 1): ``self_score`` raises.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import (
    Damping,
    Progress,
    check_gradient_set,
    check_same_blocks,
    make_scores,
    resolve_dtype,
)
from infscope.estimators.datainf import DataInf
from infscope.estimators.primitives import squared_norms
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet

QUERY_MEANS = ("gradient", "cosine")


def check_query_mean(query_mean: str) -> str:
    """Refuse an unknown aggregation mode."""
    if query_mean not in QUERY_MEANS:
        raise InfscopeError(f"unknown query_mean {query_mean!r}; use one of {', '.join(QUERY_MEANS)}")
    return query_mean


def load_queries(query: GradientSet, name: str, dtype: torch.dtype, mean_first: bool) -> torch.Tensor:
    """The query block ``(q, d)``, or its mean row ``(1, d)`` when the query gradient is averaged first."""
    V = query.load_block(name, dtype)
    return V.mean(dim=0, keepdim=True) if mean_first else V


class CosineAccumulator:
    """Sums block dot products and squared norms of query and train features, then divides once.

    ``cos(u, g) = sum_b u_b . g_b / (sqrt(sum_b ||u_b||^2) sqrt(sum_b ||g_b||^2))``, accumulated in
    float64 one block (and one chunk of training rows) at a time.
    """

    def __init__(self, n_query: int, n_train: int) -> None:
        self.dot = torch.zeros(n_query, n_train, dtype=torch.float64)
        self.query_sq = torch.zeros(n_query, dtype=torch.float64)
        self.train_sq = torch.zeros(n_train, dtype=torch.float64)

    def add_query(self, U: torch.Tensor) -> None:
        """Add one block of query features ``(q, k)`` to the query norms."""
        self.query_sq += squared_norms(U).double()

    def add_train(self, U: torch.Tensor, F: torch.Tensor, start: int = 0) -> None:
        """Add one block of train features ``F`` (rows ``start:start + len(F)``) against queries ``U``."""
        stop = start + F.shape[0]
        self.dot[:, start:stop] += (U @ F.to(U.dtype).T).double()
        self.train_sq[start:stop] += squared_norms(F).double()

    def cosines(self) -> torch.Tensor:
        """The ``(q, n)`` cosine matrix (0 where either vector is zero)."""
        tiny = torch.finfo(torch.float64).tiny
        denom = self.query_sq.sqrt()[:, None] * self.train_sq.sqrt()[None, :]
        return self.dot / denom.clamp_min(tiny)


def reduce_cosines(cos: torch.Tensor, aggregate: bool, query_mean: str) -> torch.Tensor:
    """Average per-query cosines into one row when aggregating by ``"cosine"``; else unchanged."""
    if aggregate and query_mean == "cosine":
        return cos.mean(dim=0, keepdim=True)
    return cos


def no_self_score(name: str) -> InfscopeError:
    """The error of a normalised method asked for self-influence."""
    return InfscopeError(
        f"{name} has no self-influence (a gradient's cosine with itself is 1); "
        "use hessian_free or datainf self_score for the unnormalised self-influence"
    )


class GradCosine:
    """``-cos(v, g_z)`` over all blocks: gradient similarity with the length removed."""

    name = "grad_cos"

    def __init__(self, *, query_mean: str = "gradient", dtype: torch.dtype | str = torch.float32) -> None:
        self.query_mean = check_query_mean(query_mean)
        self.dtype = resolve_dtype(dtype)
        self.train: GradientSet | None = None
        self.fit_seconds = 0.0

    def fit(self, train: GradientSet) -> GradCosine:
        """Remember the training gradients (nothing to precompute: norms come with the dot products)."""
        start = time.perf_counter()
        self.train = check_gradient_set(train, "training")
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, query: GradientSet, *, aggregate: bool = True, progress: Progress = None) -> Scores:
        """``-cos`` of every training gradient with the query (higher = more harmful).

        ``aggregate=True`` gives one vector (see ``query_mean``); ``False`` a ``(n_query, n_train)`` matrix.
        """
        if self.train is None:
            raise InfscopeError(f"{self.name} estimator is not fitted; call fit(train_gradients) first")
        train = self.train
        query = check_gradient_set(query, "query")
        check_same_blocks(train, query)
        start = time.perf_counter()
        mean_first = aggregate and self.query_mean == "gradient"
        q = 1 if mean_first else len(query.ids)
        acc = CosineAccumulator(q, len(train.ids))
        for name in train.block_names:
            U = load_queries(query, name, self.dtype, mean_first)
            acc.add_query(U)
            acc.add_train(U, train.load_block(name, self.dtype))
            if progress is not None:
                progress(name)
        total = -reduce_cosines(acc.cosines(), aggregate, self.query_mean)
        meta = {
            "dtype": str(self.dtype).removeprefix("torch."),
            "query_mean": self.query_mean,
            "normalised": True,
            "seconds_fit": self.fit_seconds,
            "seconds_score": time.perf_counter() - start,
        }
        return make_scores(total, train.ids, query.ids, self.name, aggregate, meta)

    def self_score(self, *, progress: Progress = None) -> Scores:
        """Not defined for a normalised method: raises (use ``hessian_free`` self-influence)."""
        raise no_self_score(self.name)


class DataInfCosine(DataInf):
    """``-cos(A v, g_z)`` over all blocks, ``A v`` DataInf's preconditioned query direction per block.

    Damping as in :class:`~infscope.estimators.datainf.DataInf` (per-block rule by default). Blocks
    whose gradients are all zero (damping 0 by the rule) add nothing, as in DataInf.
    """

    name = "datainf_cos"

    def __init__(
        self,
        *,
        damping: Damping = None,
        damping_scale: float = 0.1,
        query_mean: str = "gradient",
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(damping=damping, damping_scale=damping_scale, dtype=dtype)
        self.query_mean = check_query_mean(query_mean)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "query_mean": self.query_mean, "normalised": True}

    def score(self, query: GradientSet, *, aggregate: bool = True, progress: Progress = None) -> Scores:
        """``-cos`` of every training gradient with the preconditioned query (higher = more harmful)."""
        train = self._require_fit()
        query = check_gradient_set(query, "query")
        check_same_blocks(train, query)
        start = time.perf_counter()
        self._reset_info()
        mean_first = aggregate and self.query_mean == "gradient"
        q = 1 if mean_first else len(query.ids)
        acc = CosineAccumulator(q, len(train.ids))
        for name in train.block_names:
            lam = self.lams[name]
            if lam > 0 or self.lam_source[name] == "given":
                G = train.load_block(name, self.dtype)
                try:
                    X = self._solve(name, G, load_queries(query, name, self.dtype, mean_first), lam)
                except ValueError as exc:
                    raise InfscopeError(f"{self.name}, block {name!r}: {exc}") from None
                acc.add_query(X)
                acc.add_train(X, G)
            if progress is not None:
                progress(name)
        total = -reduce_cosines(acc.cosines(), aggregate, self.query_mean)
        meta = {**self._base_meta(), "seconds_score": time.perf_counter() - start, **self._score_meta()}
        return make_scores(total, train.ids, query.ids, self.name, aggregate, meta)

    def self_score(self, *, progress: Progress = None) -> Scores:
        """Not defined for a normalised method: raises (use ``datainf`` self-influence)."""
        raise no_self_score(self.name)
