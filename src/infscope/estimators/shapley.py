"""Shapley-family data values on embeddings: KNN-Shapley, Data-OOB, TMC-Shapley, Beta Shapley, Banzhaf.

All functions return VALUES, higher = more valuable (the data-valuation convention); the rest of
infscope ranks by "higher = more harmful", so use :func:`as_harm` when handing values on.

- :func:`knn_shapley` exact closed form for a KNN classifier (Jia et al. 2019), no sampling.
- :func:`data_oob` out-of-bag correctness of bagged logistic regressions (Kwon & Zou 2023).
- :func:`tmc_shapley`, :func:`beta_shapley`, :func:`banzhaf`: sampled semivalues of a subset utility
  (default proxy: :class:`LogisticUtility`), all through the one seeded chain sampler of
  :mod:`infscope.estimators.subset_sampling` (stopping rules, truncation, ``n_jobs`` processes).
- :func:`mtm_check` says whether "keep the top-k by value" can be trusted for the utility.

Semivalues, for reference: ``phi_i = sum_{k=0}^{n-1} p_k * mean_{|S|=k, i not in S} [U(S + i) - U(S)]``
with a probability distribution ``p`` over cardinalities. Shapley: ``p_k = 1/n``. Banzhaf:
``p_k = C(n-1, k) / 2^(n-1)``. Beta(alpha, beta) Shapley (Kwon & Zou 2022):
``p_k = C(n-1, k) B(k + beta, n - 1 - k + alpha) / B(alpha, beta)``, i.e. a row joins a subset whose
inclusion rate ``t`` has density ``t^(beta-1) (1-t)^(alpha-1) / B(alpha, beta)``; ``(1, 1)`` is
Shapley and the default ``(16, 1)`` puts most weight on small subsets, where one row matters most.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators.inputs import EMBEDDINGS, MethodInputs
from infscope.estimators.method import Method
from infscope.estimators.scores import Scores
from infscope.estimators.shapley_knn import knn_shapley
from infscope.estimators.shapley_mtm import MTMCheck, mtm_check
from infscope.estimators.shapley_oob import data_oob
from infscope.estimators.shapley_utility import LogisticUtility, SubsetUtility
from infscope.estimators.subset_sampling import (
    SampledValues,
    SamplerSpec,
    StopRule,
    check_utility,
    run_chains,
)

__all__ = [
    "LogisticUtility",
    "MTMCheck",
    "SampledValues",
    "SubsetUtility",
    "as_harm",
    "banzhaf",
    "beta_shapley",
    "beta_weights",
    "data_oob",
    "knn_shapley",
    "mtm_check",
    "tmc_shapley",
]


def as_harm(values: object) -> np.ndarray:
    """Values turned into infscope's "higher = more harmful" scores: ``-values``."""
    return -np.asarray(values, dtype=np.float64)


def beta_weights(n: int, alpha: float = 16.0, beta: float = 1.0) -> np.ndarray:
    """Cardinality distribution ``p_k`` (k = 0..n-1) of Beta(alpha, beta) Shapley; sums to 1."""
    if n < 1:
        raise InfscopeError(f"beta_weights needs n >= 1, got {n}")
    if not (alpha > 0 and beta > 0):
        raise InfscopeError(f"Beta Shapley needs alpha > 0 and beta > 0, got ({alpha}, {beta}); e.g. (16, 1)")
    k = torch.arange(n, dtype=torch.float64)
    a, b = torch.tensor(float(alpha), dtype=torch.float64), torch.tensor(float(beta), dtype=torch.float64)
    log_choose = (
        torch.lgamma(torch.tensor(n, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(n - k)
    )
    log_beta_num = torch.lgamma(k + b) + torch.lgamma(n - 1 - k + a) - torch.lgamma(n - 1 + a + b)
    log_beta_den = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return torch.exp(log_choose + log_beta_num - log_beta_den).numpy()


def _permutation_semivalue(
    utility: SubsetUtility,
    *,
    alpha: float = 16.0,
    beta: float = 1.0,
    truncation: float | None = 0.01,
    stop: str = "gelman_rubin",
    rhat_threshold: float = 1.05,
    rtol: float = 0.01,
    min_permutations: int = 40,
    max_permutations: int = 400,
    check_every: int = 10,
    n_chains: int = 4,
    seed: int = 0,
    n_jobs: int = 1,
    record: int = 500,
    mp_context: str | None = None,
    weighted: bool = True,
) -> SampledValues:
    """Shared body of TMC and Beta Shapley: U(empty), U(all) once, then the permutation chains.

    ``weighted`` weighs position ``k`` of a permutation by ``n * p_k`` of Beta(alpha, beta); without
    it every position counts the same (plain Shapley) and ``alpha``, ``beta`` are ignored.
    """
    weights = None
    if weighted:
        n = check_utility(utility)
        weights = n * beta_weights(n, alpha, beta)
    if truncation is not None and not truncation >= 0:
        raise InfscopeError(f"truncation must be >= 0 or None (off), got {truncation}")
    n = check_utility(utility)
    empty = float(utility(np.zeros(0, dtype=np.intp)))
    full = float(utility(np.arange(n))) if truncation is not None else 0.0
    spec = SamplerSpec("permutation", n, weights, truncation, full, empty, record)
    rule = StopRule(stop, rhat_threshold, rtol, min_permutations, max_permutations, check_every)
    return run_chains(utility, spec, rule, n_chains=n_chains, seed=seed, n_jobs=n_jobs, mp_context=mp_context)


def _permutation_function(name: str, weighted: bool, doc: str) -> Callable[..., SampledValues]:
    """The public function ``name``: :func:`_permutation_semivalue` with ``weighted`` fixed.

    Its signature is the shared one without ``weighted`` (and without ``alpha``, ``beta`` when
    unweighted), so a caller sees the real keyword options and an unknown one is a ``TypeError``.
    """
    shared = inspect.signature(_permutation_semivalue)
    hidden = ("weighted",) if weighted else ("weighted", "alpha", "beta")
    signature = shared.replace(parameters=[p for p in shared.parameters.values() if p.name not in hidden])

    def value(*args: Any, **kwargs: Any) -> SampledValues:
        return _permutation_semivalue(**signature.bind(*args, **kwargs).arguments, weighted=weighted)

    value.__signature__ = signature  # type: ignore[attr-defined]
    value.__name__ = value.__qualname__ = name
    value.__doc__ = doc
    return value


tmc_shapley = _permutation_function(
    "tmc_shapley",
    False,
    """Truncated Monte Carlo Shapley (Ghorbani & Zou 2019) of every row of ``utility``.

    ``truncation``: stop a scan once ``|U(all) - U(prefix)| <= truncation * |U(all)|`` (None = off,
    unbiased). ``stop``: ``"gelman_rubin"`` (R-hat < ``rhat_threshold``), ``"relative"`` (L1 change
    per round < ``rtol``) or ``"none"``. Permutation counts are totals over ``n_chains`` chains;
    ``check_every`` is per chain per round. ``record`` subsets per chain are kept for :func:`mtm_check`.
    """,
)
beta_shapley = _permutation_function(
    "beta_shapley",
    True,
    """Beta(alpha, beta) Shapley (Kwon & Zou 2022) by weighted permutation sampling.

    Same sampler and arguments as :func:`tmc_shapley`; the marginal contribution of the row at
    position ``k`` of a permutation is weighted by ``n * p_k`` (:func:`beta_weights`).
    """,
)


def banzhaf(
    utility: SubsetUtility,
    *,
    stop: str = "gelman_rubin",
    rhat_threshold: float = 1.05,
    rtol: float = 0.01,
    min_samples: int = 200,
    max_samples: int = 2000,
    check_every: int = 50,
    n_chains: int = 4,
    seed: int = 0,
    n_jobs: int = 1,
    record: int = 500,
    mp_context: str | None = None,
) -> SampledValues:
    """Data Banzhaf by maximum sample reuse (Wang & Jia 2023): one utility call per sampled subset.

    Each subset holds every row with probability 1/2; the value of row ``i`` is the mean utility of
    the subsets holding it minus the mean of those without it. Sample counts are totals over chains.
    """
    rule = StopRule(stop, rhat_threshold, rtol, min_samples, max_samples, check_every)
    spec = SamplerSpec("msr", check_utility(utility), record=record)
    return run_chains(utility, spec, rule, n_chains=n_chains, seed=seed, n_jobs=n_jobs, mp_context=mp_context)


# ---------------------------------------------------------------- registry rows


def reduce_dims(train_x: np.ndarray, query_x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sets projected on the top ``dims`` principal directions of the training embeddings."""
    mean = train_x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(train_x - mean, full_matrices=False)
    basis = vt[: max(1, min(dims, vt.shape[0]))].T
    return (train_x - mean) @ basis, (query_x - mean) @ basis


def _valued(name: str, value: Callable[..., Any], *, sampled: bool, defaults: dict[str, Any]) -> Method:
    """A registry row: ``value(embeddings, options)`` -> values, returned as harm (``-value``)."""

    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        merged = {**defaults, **options}
        emb = inputs.embeddings()
        dims = int(merged.pop("dims", 32))
        meta: dict[str, Any] = {"family": "value", "dims": dims}
        if sampled:
            train_x, query_x = reduce_dims(emb.train_x, emb.query_x, dims)
            utility = LogisticUtility(
                train_x, emb.train_y, query_x, emb.query_y, metric=merged.pop("metric", "accuracy")
            )
            result = value(utility, seed=inputs.seed, **merged)
            check = mtm_check(result.values, result.subsets, result.utilities, seed=inputs.seed)
            meta.update(
                converged=bool(result.converged),
                n_utility_calls=int(result.n_utility_calls),
                mtm_r2=float(check.r2_heldout if check.r2_heldout is not None else check.r2),
                mtm_trustworthy=bool(check.trustworthy),
            )
            if not check.trustworthy:
                warnings.warn(
                    f"{name}: the utility is far from a monotone transform of a sum of values "
                    f"(MTM held-out R^2 {meta['mtm_r2']:.2f}), so keeping the top-k rows by value may not "
                    "keep the best subset; check the ranking with a retrain (infscope clean)",
                    stacklevel=2,
                )
            values = result.values
        elif name == "knn_shapley":
            values = value(emb.train_x, emb.train_y, emb.query_x, emb.query_y, **merged)
        else:
            values = value(emb.train_x, emb.train_y, seed=inputs.seed, **merged)
        return Scores(as_harm(values), list(inputs.train_ids), None, name, meta)

    summaries = {
        "knn_shapley": "exact KNN-Shapley value on the tuned model's embeddings (minus: low value = harmful)",
        "data_oob": "Data-OOB: out-of-bag correctness of bagged logistic regressions on embeddings",
        "tmc_shapley": "truncated Monte Carlo Shapley of a logistic proxy on embeddings, with the MTM check",
        "beta_shapley": "Beta(16,1) Shapley of a logistic proxy on embeddings, with the MTM check",
        "banzhaf": "Banzhaf value (maximum sample reuse) of a logistic proxy on embeddings, with the MTM check",
    }
    return Method(name, (EMBEDDINGS,), compute, summaries[name], family="value")


REGISTER = [
    _valued("knn_shapley", knn_shapley, sampled=False, defaults={"k": 10}),
    _valued("data_oob", data_oob, sampled=False, defaults={}),
    _valued("tmc_shapley", tmc_shapley, sampled=True, defaults={"max_permutations": 200}),
    _valued("beta_shapley", beta_shapley, sampled=True, defaults={"max_permutations": 200}),
    _valued("banzhaf", banzhaf, sampled=True, defaults={"max_samples": 1000}),
]
