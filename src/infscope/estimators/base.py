"""The estimator protocol, the sign convention, and the block-wise scoring loop they all share.

Sign convention (higher = more harmful)
---------------------------------------
Let ``theta*`` minimise ``R(theta) = (1/n) sum_i L(z_i, theta) (+ regulariser)`` and upweight one
training example ``z`` by ``eps``: ``theta*(eps) = argmin R(theta) + eps L(z, theta)``. At the
optimum ``grad R(theta*(eps)) + eps g_z = 0``; differentiating in ``eps`` at 0 gives
``H dtheta/deps + g_z = 0``, so ``dtheta/deps = -H^{-1} g_z`` (``H`` the Hessian of ``R``,
``g_z = grad L(z, theta*)``). For a query loss with gradient ``v``, the chain rule gives

    score(z) = d L_query / d eps = v^T dtheta/deps = -v^T H^{-1} g_z   (Koh & Liang, 2017).

A **positive** score means upweighting ``z`` **raises** the query loss: ``z`` is harmful. Removing
``z`` is ``eps = -1/n``, so the leave-one-out change of the query loss is ``~ -score(z) / n``:
dropping a harmful example lowers the query loss. Every estimator returns this quantity, with
``H`` replaced by its damped approximation ``(H_block + lam I)`` and summed over blocks;
TracIn / hessian-free uses ``H = I``. Self-influence ``g_z^T (H + lam I)^{-1} g_z`` is positive
and large for examples the rest of the data does not explain.

Block-wise
----------
Parameters are split into blocks (one LoRA matrix each). Every method treats a block as if it were
independent of the others (block-diagonal ``H``), chooses a damping per block and sums the block
scores. Blocks are loaded one at a time, so an on-disk store never has to fit in memory.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators.primitives import datainf_damping
from infscope.estimators.scores import Scores
from infscope.grads.base import GradientSet

Damping = float | Mapping[str, float] | None
Progress = Callable[[str], None] | None
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@runtime_checkable
class Estimator(Protocol):
    """What every influence method offers: fit once on training gradients, then score queries."""

    name: str

    def fit(self, train: Any) -> Estimator: ...

    def score(self, query: Any, *, aggregate: bool = True) -> Scores: ...

    def self_score(self) -> Scores: ...


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.float32/float64`` or their names."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InfscopeError(f"unsupported compute dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def check_gradient_set(grads: Any, role: str) -> GradientSet:
    """Refuse anything that is not a non-empty :class:`GradientSet`."""
    if not isinstance(grads, GradientSet):
        raise InfscopeError(
            f"{role} gradients must be a GradientSet (InMemoryGradients or GradientStore), got {type(grads).__name__}"
        )
    if len(grads.ids) == 0:
        raise InfscopeError(f"{role} gradients hold no examples; compute gradients for at least one example")
    return grads


def check_same_blocks(train: GradientSet, query: GradientSet) -> None:
    """Query gradients must cover every training block with the same dimension."""
    available = set(query.block_names)
    missing = [name for name in train.block_names if name not in available]
    if missing:
        raise InfscopeError(
            f"query gradients lack {len(missing)} training block(s), e.g. {missing[0]!r}; "
            "compute query gradients on the same layers"
        )
    for name in train.block_names:
        if train.block_dim(name) != query.block_dim(name):
            raise InfscopeError(
                f"block {name!r} has {train.block_dim(name)} dims for train but {query.block_dim(name)} "
                "for query; compute both with the same model, LoRA config and projection"
            )


def resolve_damping(name: str, G: torch.Tensor, damping: Damping, scale: float) -> tuple[float, str]:
    """Damping for one block and where it came from: ``given`` (float or per-block dict) or ``rule``.

    The rule is DataInf's ``scale * mean_i ||g_i||^2 / d``.
    """
    if isinstance(damping, Mapping) and name in damping:
        value, source = float(damping[name]), "given"
    elif damping is not None and not isinstance(damping, Mapping):
        value, source = float(damping), "given"
    else:
        value, source = datainf_damping(G, scale), "rule"
    if not np.isfinite(value) or value < 0:
        raise InfscopeError(f"damping {value} for block {name!r} is invalid; pass a non-negative number")
    return value, source


def query_matrix(query: GradientSet, name: str, dtype: torch.dtype, aggregate: bool) -> torch.Tensor:
    """The query block as ``(q, d)``, or its mean row ``(1, d)`` in aggregate mode."""
    V = query.load_block(name, dtype)
    return V.mean(dim=0, keepdim=True) if aggregate else V


def make_scores(
    total: torch.Tensor, train_ids: list[str], query_ids: list[str], method: str, aggregate: bool, meta: dict
) -> Scores:
    """Wrap a summed ``(q, n)`` score tensor (``q = 1`` when aggregated) into :class:`Scores`."""
    values = total.double().cpu().numpy()
    if aggregate:
        values = values[0]
    meta = {"aggregate": aggregate, "n_train": len(train_ids), "n_query": len(query_ids), **meta}
    return Scores(values, train_ids, query_ids, method, meta)


class BlockwiseEstimator(ABC):
    """Damped inverse-Hessian influence, one block at a time, block scores summed.

    Subclasses supply :meth:`_solve` (``X = V (H_block + lam I)^{-1}``) and :meth:`_self`
    (``g_z^T (H_block + lam I)^{-1} g_z`` per row); this class handles damping, streaming,
    validation, the sign and the metadata.

    ``damping``: ``None`` (the per-block rule ``damping_scale * mean ||g||^2 / d``), one float for
    every block, or a dict ``{block: float}`` (blocks it omits use the rule).
    """

    name = "blockwise"
    default_dtype: torch.dtype = torch.float64

    def __init__(
        self, *, damping: Damping = None, damping_scale: float = 0.1, dtype: torch.dtype | str | None = None
    ) -> None:
        if damping_scale <= 0:
            raise InfscopeError(f"damping_scale {damping_scale} must be positive; the DataInf paper uses 0.1")
        self.damping = damping
        self.damping_scale = float(damping_scale)
        self.dtype = resolve_dtype(dtype if dtype is not None else self.default_dtype)
        self.train: GradientSet | None = None
        self.lams: dict[str, float] = {}
        self.lam_source: dict[str, str] = {}
        self.fit_seconds = 0.0
        self._reset_info()

    def params(self) -> dict[str, Any]:
        """Method parameters recorded in every :class:`Scores` meta."""
        return {"damping_scale": self.damping_scale, "dtype": str(self.dtype).removeprefix("torch.")}

    def fit(self, train: GradientSet) -> BlockwiseEstimator:
        """Remember the training gradients and choose the damping of every block (one pass)."""
        start = time.perf_counter()
        self.train = check_gradient_set(train, "training")
        if isinstance(self.damping, Mapping):
            unknown = sorted(set(self.damping) - set(train.block_names))
            if unknown:
                raise InfscopeError(
                    f"damping given for unknown block {unknown[0]!r}; use the gradient block names"
                )
        self.lams, self.lam_source = {}, {}
        for name in train.block_names:
            G = train.load_block(name, self.dtype)
            self.lams[name], self.lam_source[name] = resolve_damping(
                name, G, self.damping, self.damping_scale
            )
            self._fit_block(name, G, self.lams[name])
        self.fit_seconds = time.perf_counter() - start
        return self

    def _fit_block(self, name: str, G: torch.Tensor, lam: float) -> None:  # noqa: B027 - optional hook
        """Optional per-block precomputation."""

    def _require_fit(self) -> GradientSet:
        if self.train is None:
            raise InfscopeError(f"{self.name} estimator is not fitted; call fit(train_gradients) first")
        return self.train

    def _base_meta(self) -> dict[str, Any]:
        return {
            **self.params(),
            "damping": dict(self.lams),
            "damping_source": dict(self.lam_source),
            "seconds_fit": self.fit_seconds,
        }

    def score(self, query: GradientSet, *, aggregate: bool = True, progress: Progress = None) -> Scores:
        """Influence of every training example on the query loss (higher = more harmful).

        ``aggregate=True`` scores against the mean query gradient (one vector over training
        examples: noise detection); ``aggregate=False`` returns a ``(n_query, n_train)`` matrix.
        ``progress`` is called with each block name once that block is done (for progress bars).
        """
        train = self._require_fit()
        query = check_gradient_set(query, "query")
        check_same_blocks(train, query)
        start = time.perf_counter()
        self._reset_info()
        q = 1 if aggregate else len(query.ids)
        total = torch.zeros(q, len(train.ids), dtype=torch.float64)
        for name in train.block_names:
            lam = self.lams[name]
            if lam > 0 or self.lam_source[name] == "given":  # an all-zero block contributes nothing
                G = train.load_block(name, self.dtype)
                try:
                    X = self._solve(name, G, query_matrix(query, name, self.dtype, aggregate), lam)
                except ValueError as exc:
                    raise InfscopeError(f"{self.name}, block {name!r}: {exc}") from None
                total -= (X @ G.to(X.dtype).T).double()
            if progress is not None:
                progress(name)
        meta = {**self._base_meta(), "seconds_score": time.perf_counter() - start, **self._score_meta()}
        return make_scores(total, train.ids, query.ids, self.name, aggregate, meta)

    def self_score(self, *, progress: Progress = None) -> Scores:
        """Self-influence ``g_z^T (H + lam I)^{-1} g_z`` summed over blocks (positive; higher = more unusual)."""
        train = self._require_fit()
        start = time.perf_counter()
        self._reset_info()
        total = torch.zeros(len(train.ids), dtype=torch.float64)
        for name in train.block_names:
            lam = self.lams[name]
            if lam > 0 or self.lam_source[name] == "given":
                try:
                    total += self._self(name, train.load_block(name, self.dtype), lam).double()
                except ValueError as exc:
                    raise InfscopeError(f"{self.name}, block {name!r}: {exc}") from None
            if progress is not None:
                progress(name)
        meta = {**self._base_meta(), "self_influence": True, "seconds_score": time.perf_counter() - start}
        meta.update(self._score_meta())
        return Scores(total.numpy(), train.ids, None, f"{self.name}_self", meta)

    def _reset_info(self) -> None:
        self._block_info: dict[str, dict[str, Any]] = {}
        self._warnings: list[str] = []

    def _warn(self, name: str, flag: str, message: str) -> None:
        """Warn the user and record ``flag`` for block ``name`` in the scores' metadata."""
        self._block_info.setdefault(name, {})[flag] = True
        self._warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=4)

    def _score_meta(self) -> dict[str, Any]:
        """Per-block details gathered while scoring (iterations, warnings)."""
        meta: dict[str, Any] = {}
        if self._block_info:
            meta["blocks"] = self._block_info
        if self._warnings:
            meta["warnings"] = list(self._warnings)
        return meta

    @abstractmethod
    def _solve(self, name: str, G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
        """``V (H_block + lam I)^{-1}`` as a ``(q, d)`` tensor."""

    @abstractmethod
    def _self(self, name: str, G: torch.Tensor, lam: float) -> torch.Tensor:
        """``g_z^T (H_block + lam I)^{-1} g_z`` for every training row, ``(n,)``."""
