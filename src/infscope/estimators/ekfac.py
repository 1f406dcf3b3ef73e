"""EK-FAC and K-FAC influence on the LoRA layers (Grosse et al. 2023): Kronecker-factored curvature.

Per linear layer the curvature is ``S (x) A`` (factors from :mod:`infscope.grads.kfac`), with
eigenvectors ``Q = Q_S (x) Q_A`` and eigenvalues

- K-FAC: ``Lambda_kj = s_k a_j`` (products of the factors' eigenvalues);
- EK-FAC: ``Lambda_kj = mean_i (Q_S^T G_i Q_A)_kj^2``, the exact diagonal of the per-example
  Fisher in that eigenbasis (George et al. 2018), from the per-example gradients in the store
  (empirical Fisher) or from a sampled-label pass (true Fisher).

A query gradient ``V`` is preconditioned once per layer, ``P = Q_S [(Q_S^T V Q_A) / (Lambda + lam)] Q_A^T``,
and every training row scores ``-sum_layers <P, G_i>`` (higher = more harmful). The damping is
per layer: ``damping_scale x mean(Lambda)`` (kronfluence's heuristic, 0.1) unless given.
Blocks that group several layers (``block_by="module"`` or ``"layer"``) are split back into layers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators.base import (
    Damping,
    check_gradient_set,
    check_same_blocks,
    make_scores,
    query_matrix,
    resolve_dtype,
)
from infscope.estimators.inputs import KFAC_FACTORS, QUERY_GRADS, TRAIN_GRADS, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet
from infscope.grads.blocks import BLOCK_BY, BlockLayout
from infscope.grads.kfac import (
    FISHER,
    KFACFactors,
    LayerFactors,
    as_flat,
    as_matrices,
    rotate,
    rotate_back,
    rotated_square_sum,
)

STRATEGIES = ("ekfac", "kfac")


def block_members(factors: KFACFactors, train: GradientSet) -> dict[str, list[str]]:
    """Which factor layers (in order) make up each gradient block, whatever ``block_by`` made the store."""
    dims = {m: f.dim for m, f in factors.layers.items()}
    wanted = {b: train.block_dim(b) for b in train.block_names}
    for block_by in BLOCK_BY:
        layout = BlockLayout.build(dims, block_by)
        members = {b: layout.members[b] for b in wanted if b in layout.members}
        if len(members) == len(wanted) and all(layout.dims[b] == d for b, d in wanted.items()):
            return members
    missing = [b for b in wanted if b not in dims]
    example = missing[0] if missing else next(iter(wanted))
    raise InfscopeError(
        f"the K-FAC factors do not match gradient block {example!r}; collect factors and gradients "
        "on the same model, layers and checkpoint"
    )


class KroneckerInfluence:
    """EK-FAC (``strategy="ekfac"``) or K-FAC (``"kfac"``) influence from fitted Kronecker factors.

    ``damping``: ``None`` (per layer ``damping_scale * mean(Lambda)``), one float, or ``{layer: float}``.
    ``dtype``: compute dtype of the per-example work (rotations, dot products); eigenvectors are float64.
    """

    def __init__(
        self,
        factors: KFACFactors,
        *,
        strategy: str = "ekfac",
        damping: Damping = None,
        damping_scale: float = 0.1,
        dtype: torch.dtype | str = "float32",
    ) -> None:
        if strategy not in STRATEGIES:
            raise InfscopeError(f"unknown strategy {strategy!r}; use 'ekfac' or 'kfac'")
        if damping_scale <= 0:
            raise InfscopeError(f"damping_scale {damping_scale} must be positive; kronfluence uses 0.1")
        self.factors = factors
        self.strategy = strategy
        self.name = strategy
        self.damping = damping
        self.damping_scale = float(damping_scale)
        self.dtype = resolve_dtype(dtype)
        self.train: GradientSet | None = None
        self.members: dict[str, list[str]] = {}
        self.inverse: dict[str, torch.Tensor] = {}  # layer -> 1 / (Lambda + lam), float64 (out, in)
        self.lams: dict[str, float] = {}
        self.lambda_source = ""
        self.fit_seconds = 0.0

    def _damping_of(self, layer: str, eigen: torch.Tensor) -> float:
        if isinstance(self.damping, Mapping) and layer in self.damping:
            value = float(self.damping[layer])
        elif self.damping is not None and not isinstance(self.damping, Mapping):
            value = float(self.damping)
        else:
            value = self.damping_scale * float(eigen.mean())
        if not np.isfinite(value) or value < 0:
            raise InfscopeError(f"damping {value} for layer {layer!r} is invalid; pass a non-negative number")
        return value

    def _lambdas(self, layer: str, f: LayerFactors, G: torch.Tensor | None) -> torch.Tensor:
        a, _, s, _ = f.eigen()
        if self.strategy == "kfac":
            return torch.outer(s, a)
        if f.lambdas is not None:
            self.lambda_source = "factors"
            return f.lambdas.double()
        if G is None or G.shape[0] == 0:
            raise InfscopeError(
                f"no per-example gradients for layer {layer!r}; EK-FAC needs the training gradients"
            )
        self.lambda_source = "train gradients"
        return rotated_square_sum(G, f, self.dtype) / G.shape[0]

    def fit(self, train: GradientSet) -> KroneckerInfluence:
        """Eigen-decompose each layer's factors and fix ``1 / (Lambda + lam)`` (EK-FAC reads the train gradients)."""
        start = time.perf_counter()
        self.train = check_gradient_set(train, "training")
        self.members = block_members(self.factors, train)
        if isinstance(self.damping, Mapping):
            unknown = sorted(set(self.damping) - set(self.factors.layers))
            if unknown:
                raise InfscopeError(
                    f"damping given for unknown layer {unknown[0]!r}; use the LoRA module names"
                )
        self.inverse, self.lams = {}, {}
        for block, layers in self.members.items():
            need_g = self.strategy == "ekfac" and any(self.factors.layers[m].lambdas is None for m in layers)
            G = train.load_block(block, self.dtype) if need_g else None
            offset = 0
            for m in layers:
                f = self.factors.layers[m]
                part = None if G is None else G[:, offset : offset + f.dim]
                offset += f.dim
                eigen = self._lambdas(m, f, part)
                self.lams[m] = self._damping_of(m, eigen)
                self.inverse[m] = 1.0 / (eigen + self.lams[m])
        self.fit_seconds = time.perf_counter() - start
        return self

    def _require_fit(self) -> GradientSet:
        if self.train is None:
            raise InfscopeError(f"{self.name} estimator is not fitted; call fit(train_gradients) first")
        return self.train

    def precondition(self, block: str, V: torch.Tensor) -> torch.Tensor:
        """``(H_kron + lam I)^{-1}`` applied to the ``(q, d_block)`` rows of ``V``, layer by layer."""
        parts, offset = [], 0
        for m in self.members[block]:
            f = self.factors.layers[m]
            rotated = rotate(as_matrices(V[:, offset : offset + f.dim], f), f, torch.float64)
            parts.append(as_flat(rotate_back(rotated * self.inverse[m], f), f))
            offset += f.dim
        return torch.cat(parts, dim=1)

    def _meta(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "damping": dict(self.lams),
            "damping_scale": self.damping_scale,
            "damping_source": "given" if self.damping is not None else "0.1 x mean eigenvalue per layer",
            "fisher": self.factors.fisher,
            "lambdas_from": self.lambda_source if self.strategy == "ekfac" else "factor eigenvalues",
            "dtype": str(self.dtype).removeprefix("torch."),
            "factor_rows": self.factors.n_examples,
            "seconds_fit": self.fit_seconds,
        }

    def score(self, query: GradientSet, *, aggregate: bool = True) -> Scores:
        """Influence of every training row on the query loss (higher = more harmful); ``(q, n)`` if not aggregated."""
        train = self._require_fit()
        query = check_gradient_set(query, "query")
        check_same_blocks(train, query)
        start = time.perf_counter()
        q = 1 if aggregate else len(query.ids)
        total = torch.zeros(q, len(train.ids), dtype=torch.float64)
        for block in train.block_names:
            P = self.precondition(block, query_matrix(query, block, torch.float64, aggregate))
            G = train.load_block(block, self.dtype)
            total -= (P.to(self.dtype) @ G.T).double()
        meta = {**self._meta(), "seconds_score": time.perf_counter() - start}
        return make_scores(total, train.ids, query.ids, self.name, aggregate, meta)

    def self_score(self) -> Scores:
        """Self-influence ``g^T (H_kron + lam I)^{-1} g`` per training row (positive)."""
        train = self._require_fit()
        total = torch.zeros(len(train.ids), dtype=torch.float64)
        for block, layers in self.members.items():
            G, offset = train.load_block(block, self.dtype), 0
            for m in layers:
                f = self.factors.layers[m]
                rotated = rotate(as_matrices(G[:, offset : offset + f.dim], f), f, self.dtype)
                total += (rotated.square() * self.inverse[m].to(self.dtype)).sum(dim=(1, 2)).double()
                offset += f.dim
        return Scores(
            total.numpy(), train.ids, None, f"{self.name}_self", {**self._meta(), "self_influence": True}
        )


def _options(
    damping: Damping = None, damping_scale: float = 0.1, dtype: str = "float32", fisher: str = "empirical"
):
    """The options of ``ekfac`` and ``kfac`` (checked by name; see :class:`KroneckerInfluence`)."""


def _compute(strategy: str):
    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        check_options(strategy, _options, options)
        fisher = options.get("fisher", "empirical")
        if fisher not in FISHER:
            raise InfscopeError(
                f"unknown fisher {fisher!r}; use 'empirical' (row labels) or 'true' (sampled)"
            )
        kwargs = {k: v for k, v in options.items() if k != "fisher"}
        estimator = KroneckerInfluence(inputs.kfac_factors(fisher), strategy=strategy, **kwargs)
        return estimator.fit(inputs.train_grads()).score(inputs.query_grads(), aggregate=inputs.aggregate)

    return compute


NEEDS = (TRAIN_GRADS, QUERY_GRADS, KFAC_FACTORS)
REGISTER = [
    Method(
        "ekfac",
        NEEDS,
        _compute("ekfac"),
        "EK-FAC: eigenvalue-corrected Kronecker-factored curvature per LoRA matrix (Grosse et al. 2023)",
        per_query=True,
        options={"fisher": "empirical", "damping_scale": 0.1},
    ),
    Method(
        "kfac",
        NEEDS,
        _compute("kfac"),
        "K-FAC: Kronecker-factored curvature (A (x) S) per LoRA matrix, damped inverse",
        per_query=True,
        options={"fisher": "empirical", "damping_scale": 0.1},
    ),
]
