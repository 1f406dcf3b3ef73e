"""Optimizer-aware gradient cosines over checkpoints: LESS and TrackStar.

Both compare a training example with the query by the cosine of *preconditioned, randomly
projected* gradients at each saved checkpoint ``c`` and sum over checkpoints weighted by the
learning rate of the epoch that ended there (as TracIn does):

    score(z) = -sum_c lr_c cos(P phi_c(query), P psi_c(z))      (higher = more harmful)

- **LESS** (Xia et al., 2024): a training row is represented by the Adam update it would cause,
  computed from the checkpoint's saved moments ``m, v``:
  ``psi(g) = m' / (sqrt(v') + eps)`` with ``m' = beta1 m + (1 - beta1) g`` and
  ``v' = beta2 v + (1 - beta2) g^2`` (no bias correction), while the query keeps its plain
  gradient, ``phi(v) = v`` (the query loss is what SGD-style first-order change is measured on).
- **TrackStar** (Chang et al., 2024): both sides are divided elementwise by the square root of the
  bias-corrected second moment, ``phi(g) = psi(g) = g / (sqrt(v / (1 - beta2^t)) + eps)``, which
  evens out parameters with very different gradient scales.

``P`` is a seeded random projection per block (:func:`~infscope.grads.projection.projection_matrix`,
the same matrix for train and query rows and for every checkpoint). ``proj_dim`` (8192 by
default, as in LESS) is split over blocks in proportion to their size, or is the dimension of every
block with ``per_block=True``; a block no larger than its share is left unprojected, and
``proj_dim=None`` turns projection off. Inner products and norms are summed over blocks before
dividing, so the cosine is over the concatenation of all blocks.

The gradients must be unprojected (the preconditioners act on parameters); moments come from
:func:`infscope.models.optimizer_state.checkpoint_block_moments`. Aggregation (``query_mean``)
defaults to ``"cosine"``: the mean of per-query cosines, as LESS averages over validation examples
(the row mean of the ``aggregate=False`` matrix); ``"gradient"`` uses the mean query gradient.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import (
    Progress,
    check_gradient_set,
    check_same_blocks,
    make_scores,
    resolve_dtype,
)
from infscope.estimators.cosine import (
    CosineAccumulator,
    check_query_mean,
    load_queries,
    no_self_score,
    reduce_cosines,
)
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet
from infscope.grads.projection import KINDS, projection_matrix
from infscope.models.optimizer_state import BlockMoments

DEFAULT_PROJ_DIM = 8192
CHUNK_ELEMENTS = 1 << 24  # bounds the (rows, d) temporaries of the train-row features


def split_dim(total: int, dims: Mapping[str, int]) -> dict[str, int]:
    """Share ``total`` projected dimensions over blocks in proportion to their size (largest remainder).

    Every block gets at least one; with ``total >= sum(dims)`` every block keeps its own size.
    """
    full = sum(dims.values())
    if total >= full:
        return dict(dims)
    exact = {name: total * d / full for name, d in dims.items()}
    out = {name: int(math.floor(x)) for name, x in exact.items()}
    spare = total - sum(out.values())
    for name in sorted(exact, key=lambda n: out[n] - exact[n])[:spare]:
        out[name] += 1
    return {name: max(1, k) for name, k in out.items()}


def _unpack(
    index: int, item: Any
) -> tuple[GradientSet, GradientSet | None, Mapping[str, BlockMoments], float]:
    """One checkpoint as ``(train, query or None, moments, lr)``; accepts 4-tuples and ``(train, moments, lr)``."""
    if isinstance(item, tuple | list) and len(item) == 4:
        train, query, moments, lr = item
    elif isinstance(item, tuple | list) and len(item) == 3:
        (train, moments, lr), query = item, None
    else:
        raise InfscopeError(
            f"checkpoint {index} is not a (train, query, moments, lr) or (train, moments, lr) tuple; "
            "pass one tuple per checkpoint"
        )
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise InfscopeError(
            f"checkpoint {index} learning rate {lr!r} is not a number; pass a float"
        ) from None
    if not math.isfinite(lr) or lr < 0:
        raise InfscopeError(f"checkpoint {index} learning rate {lr} is invalid; pass a non-negative weight")
    if not isinstance(moments, Mapping):
        raise InfscopeError(
            f"checkpoint {index} moments must be a {{block: BlockMoments}} dict; "
            "build it with optimizer_state.checkpoint_block_moments"
        )
    return train, query, moments, lr


class AdamCosine(ABC):
    """Shared machinery of LESS and TrackStar: checkpoints, projection, streaming cosines, the sign.

    ``fit`` takes one tuple per checkpoint, ``(train GradientSet, query GradientSet, {block:
    BlockMoments}, lr)`` or ``(train, moments, lr)``; ``score`` then takes the queries (one
    GradientSet per checkpoint, in order), or nothing when they were given to ``fit``.
    """

    name = "adam_cosine"

    def __init__(
        self,
        *,
        proj_dim: int | None = DEFAULT_PROJ_DIM,
        per_block: bool = False,
        seed: int = 0,
        proj_kind: str = "rademacher",
        query_mean: str = "cosine",
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        if proj_dim is not None and int(proj_dim) < 1:
            raise InfscopeError(f"proj_dim must be >= 1 or None (no projection), got {proj_dim}")
        if proj_kind not in KINDS:
            raise InfscopeError(f"unknown projection kind {proj_kind!r}; use one of {', '.join(KINDS)}")
        self.proj_dim = None if proj_dim is None else int(proj_dim)
        self.per_block = bool(per_block)
        self.seed = int(seed)
        self.proj_kind = proj_kind
        self.query_mean = check_query_mean(query_mean)
        self.dtype = resolve_dtype(dtype)
        self.checkpoints: list[tuple[GradientSet, Mapping[str, BlockMoments], float]] = []
        self.queries: list[GradientSet] | None = None
        self.out_dims: dict[str, int] = {}
        self._matrices: dict[str, torch.Tensor] = {}
        self.fit_seconds = 0.0

    def fit(self, checkpoints: Sequence[tuple]) -> AdamCosine:
        """Check every checkpoint's gradients and moments and choose the projected size of each block."""
        start = time.perf_counter()
        items = [_unpack(i, item) for i, item in enumerate(checkpoints)]
        if not items:
            raise InfscopeError(
                "no checkpoints given; pass one (train, query, moments, lr) tuple per checkpoint"
            )
        first = check_gradient_set(items[0][0], "checkpoint 0 training")
        for index, (train, _, moments, _) in enumerate(items):
            check_gradient_set(train, f"checkpoint {index} training")
            if train.ids != first.ids:
                raise InfscopeError(
                    f"checkpoint {index} has other training ids than checkpoint 0; compute every checkpoint on the same rows"
                )
            if train.block_names != first.block_names:
                raise InfscopeError(
                    f"checkpoint {index} has other gradient blocks than checkpoint 0; use the same layers"
                )
            check_same_blocks(first, train)
            for name in train.block_names:
                m = moments.get(name)
                if not isinstance(m, BlockMoments):
                    raise InfscopeError(
                        f"checkpoint {index} has no Adam moments for block {name!r}; "
                        "build them with optimizer_state.checkpoint_block_moments"
                    )
                if m.dim != train.block_dim(name):
                    raise InfscopeError(
                        f"checkpoint {index} moments of block {name!r} have {m.dim} values for "
                        f"{train.block_dim(name)} gradient dims; collect unprojected gradients"
                    )
        given = [query is not None for _, query, _, _ in items]
        if any(given) and not all(given):
            raise InfscopeError("query gradients given for some checkpoints only; give them for all or none")
        self.checkpoints = [(train, moments, lr) for train, _, moments, lr in items]
        self.queries = [query for _, query, _, _ in items] if all(given) else None
        dims = {name: first.block_dim(name) for name in first.block_names}
        if self.proj_dim is None:
            self.out_dims = dict(dims)
        elif self.per_block:
            self.out_dims = {name: min(self.proj_dim, d) for name, d in dims.items()}
        else:
            self.out_dims = split_dim(self.proj_dim, dims)
        self._matrices = {}
        self.fit_seconds = time.perf_counter() - start
        return self

    def _project(self, name: str, X: torch.Tensor) -> torch.Tensor:
        """Rows of ``X`` through block ``name``'s seeded projection (unchanged when not reduced)."""
        d, k = X.shape[1], self.out_dims[name]
        if k >= d:
            return X
        mat = self._matrices.get(name)
        if mat is None:
            mat = projection_matrix(d, k, seed=self.seed, name=name, kind=self.proj_kind)
            self._matrices[name] = mat
        return X @ mat.to(X.dtype)

    def _resolve_queries(self, query: GradientSet | Sequence[GradientSet] | None) -> list[GradientSet]:
        if not self.checkpoints:
            raise InfscopeError(f"{self.name} estimator is not fitted; call fit(checkpoints) first")
        if query is None:
            if self.queries is None:
                raise InfscopeError(
                    f"{self.name} needs query gradients; pass them to score() or in the fit tuples"
                )
            queries = self.queries
        else:
            queries = [query] if isinstance(query, GradientSet) else list(query)
        if len(queries) != len(self.checkpoints):
            raise InfscopeError(
                f"got {len(queries)} query gradient set(s) for {len(self.checkpoints)} checkpoint(s); "
                "pass one query GradientSet per checkpoint, in the same order"
            )
        for index, (qset, (train, _, _)) in enumerate(zip(queries, self.checkpoints, strict=True)):
            check_gradient_set(qset, f"checkpoint {index} query")
            check_same_blocks(train, qset)
            if qset.ids != queries[0].ids:
                raise InfscopeError(
                    f"checkpoint {index} query ids differ from checkpoint 0; use the same queries"
                )
        return queries

    def score(
        self,
        query: GradientSet | Sequence[GradientSet] | None = None,
        *,
        aggregate: bool = True,
        progress: Progress = None,
    ) -> Scores:
        """``-sum_c lr_c cos_c`` for every training row (higher = more harmful).

        ``aggregate=True`` gives one vector (see ``query_mean``); ``False`` a ``(n_query, n_train)``
        matrix. ``progress`` is called with each block name once it is done (per checkpoint).
        """
        queries = self._resolve_queries(query)
        start = time.perf_counter()
        train_ids = self.checkpoints[0][0].ids
        n = len(train_ids)
        mean_first = aggregate and self.query_mean == "gradient"
        q = 1 if mean_first else len(queries[0].ids)
        total = torch.zeros(1 if aggregate else q, n, dtype=torch.float64)
        for (train, moments, lr), qset in zip(self.checkpoints, queries, strict=True):
            acc = CosineAccumulator(q, n)
            for name in train.block_names:
                m = moments[name]
                V = load_queries(qset, name, self.dtype, mean_first)
                U = self._project(name, self._query_features(V, m))
                acc.add_query(U)
                G = train.load_block(name, self.dtype)
                rows = max(1, CHUNK_ELEMENTS // max(1, G.shape[1]))
                for first in range(0, n, rows):
                    F = self._project(name, self._train_features(G[first : first + rows], m))
                    acc.add_train(U, F, first)
                if progress is not None:
                    progress(name)
            total += lr * reduce_cosines(acc.cosines(), aggregate, self.query_mean)
        meta = {**self._meta(), "seconds_score": time.perf_counter() - start}
        return make_scores(-total, train_ids, queries[0].ids, self.name, aggregate, meta)

    def self_score(self, *, progress: Progress = None) -> Scores:
        """Not defined for a normalised method: raises (use ``tracin`` self-influence)."""
        raise no_self_score(self.name)

    def _meta(self) -> dict[str, Any]:
        first_block = self.checkpoints[0][0].block_names[0]
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "query_mean": self.query_mean,
            "normalised": True,
            "checkpoint_lrs": [lr for _, _, lr in self.checkpoints],
            "n_checkpoints": len(self.checkpoints),
            "adam_steps": [moments[first_block].step for _, moments, _ in self.checkpoints],
            "projection": {
                "dim": self.proj_dim,
                "per_block": self.per_block,
                "seed": self.seed,
                "kind": self.proj_kind,
                "total_dim": sum(self.out_dims.values()),
                "projected_blocks": sum(
                    1 for name, k in self.out_dims.items() if k < self.checkpoints[0][0].block_dim(name)
                ),
            },
            "seconds_fit": self.fit_seconds,
        }

    @abstractmethod
    def _train_features(self, G: torch.Tensor, m: BlockMoments) -> torch.Tensor:
        """Training rows ``(r, d)`` as the vectors compared (before projection)."""

    @abstractmethod
    def _query_features(self, V: torch.Tensor, m: BlockMoments) -> torch.Tensor:
        """Query rows ``(q, d)`` as the vectors compared (before projection); must be linear in ``V``."""


class LESS(AdamCosine):
    """LESS: cosine of the query gradient with each row's Adam update ``m'/(sqrt(v') + eps)``."""

    name = "less"

    def _train_features(self, G: torch.Tensor, m: BlockMoments) -> torch.Tensor:
        exp_avg = m.exp_avg.to(G.dtype)
        exp_avg_sq = m.exp_avg_sq.to(G.dtype)
        first = m.beta1 * exp_avg + (1 - m.beta1) * G
        second = m.beta2 * exp_avg_sq + (1 - m.beta2) * G.square()
        return first / (second.sqrt() + m.eps)

    def _query_features(self, V: torch.Tensor, m: BlockMoments) -> torch.Tensor:
        return V


class TrackStar(AdamCosine):
    """TrackStar: cosine of gradients both divided by ``sqrt(v_hat) + eps`` (bias-corrected second moment)."""

    name = "trackstar"

    def _scale(self, m: BlockMoments, dtype: torch.dtype) -> torch.Tensor:
        if m.step < 1:
            raise InfscopeError(
                "TrackStar needs the second moment of a trained checkpoint (Adam step 0 found); "
                "use a checkpoint saved after at least one optimizer step"
            )
        v_hat = m.exp_avg_sq.double() / (1 - m.beta2**m.step)
        return (1.0 / (v_hat.sqrt() + m.eps)).to(dtype)

    def _train_features(self, G: torch.Tensor, m: BlockMoments) -> torch.Tensor:
        return G * self._scale(m, G.dtype)

    def _query_features(self, V: torch.Tensor, m: BlockMoments) -> torch.Tensor:
        return V * self._scale(m, V.dtype)
