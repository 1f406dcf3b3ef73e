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

import numpy as np
import torch

from infscope.errors import InfscopeError
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


def _permutation_values(
    utility: SubsetUtility,
    weights: np.ndarray | None,
    truncation: float | None,
    rule: StopRule,
    n_chains: int,
    seed: int,
    n_jobs: int,
    record: int,
    mp_context: str | None,
) -> SampledValues:
    """Shared body of TMC and Beta Shapley: U(empty), U(all) once, then the permutation chains."""
    if truncation is not None and not truncation >= 0:
        raise InfscopeError(f"truncation must be >= 0 or None (off), got {truncation}")
    n = check_utility(utility)
    empty = float(utility(np.zeros(0, dtype=np.intp)))
    full = float(utility(np.arange(n))) if truncation is not None else 0.0
    spec = SamplerSpec("permutation", n, weights, truncation, full, empty, record)
    return run_chains(utility, spec, rule, n_chains=n_chains, seed=seed, n_jobs=n_jobs, mp_context=mp_context)


def tmc_shapley(
    utility: SubsetUtility,
    *,
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
) -> SampledValues:
    """Truncated Monte Carlo Shapley (Ghorbani & Zou 2019) of every row of ``utility``.

    ``truncation``: stop a scan once ``|U(all) - U(prefix)| <= truncation * |U(all)|`` (None = off,
    unbiased). ``stop``: ``"gelman_rubin"`` (R-hat < ``rhat_threshold``), ``"relative"`` (L1 change
    per round < ``rtol``) or ``"none"``. Permutation counts are totals over ``n_chains`` chains;
    ``check_every`` is per chain per round. ``record`` subsets per chain are kept for :func:`mtm_check`.
    """
    rule = StopRule(stop, rhat_threshold, rtol, min_permutations, max_permutations, check_every)
    return _permutation_values(utility, None, truncation, rule, n_chains, seed, n_jobs, record, mp_context)


def beta_shapley(
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
) -> SampledValues:
    """Beta(alpha, beta) Shapley (Kwon & Zou 2022) by weighted permutation sampling.

    Same sampler and arguments as :func:`tmc_shapley`; the marginal contribution of the row at
    position ``k`` of a permutation is weighted by ``n * p_k`` (:func:`beta_weights`).
    """
    n = check_utility(utility)
    weights = n * beta_weights(n, alpha, beta)
    rule = StopRule(stop, rhat_threshold, rtol, min_permutations, max_permutations, check_every)
    return _permutation_values(utility, weights, truncation, rule, n_chains, seed, n_jobs, record, mp_context)


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
