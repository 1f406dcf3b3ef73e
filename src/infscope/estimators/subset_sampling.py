"""The one sampler behind TMC-Shapley, Beta Shapley and Banzhaf: seeded chains, rounds, stopping rules.

Two sample kinds share the machinery:

- ``"permutation"`` (TMC-Shapley, Beta Shapley): draw a random order of the rows and scan it, one
  utility call per prefix; the row at position ``k`` (``k`` rows before it) receives the weighted
  marginal contribution ``w_k * (U(prefix + row) - U(prefix))``. ``w_k = 1`` gives Shapley; ``w_k = n p_k``
  gives any semivalue with cardinality distribution ``p_k`` (the position of a row in a random
  permutation is uniform on ``0..n-1``, so the weighted mean is unbiased). Truncation (Ghorbani & Zou
  2019): once ``|U(all) - U(prefix)| <= truncation * |U(all)|`` the rest of the scan contributes 0.
- ``"msr"`` (maximum sample reuse, Wang & Jia 2023): draw a subset with every row in with probability
  1/2, call the utility once, and credit it to every row: Banzhaf(i) = mean U over subsets holding i
  minus mean U over subsets without i. For the stopping rule each subset also gives each row the
  unbiased single-sample estimate ``2 U(S) (+1 if i in S else -1)``.

Chains: ``n_chains`` independent chains, chain ``c`` seeded by ``SeedSequence(seed).spawn(n_chains)[c]``.
Work proceeds in rounds of ``check_every`` samples per chain; after each round the stopping rule looks
at the pooled estimate. A chain's work depends only on its own seed and the round sizes, so the result
is bit-identical for any ``n_jobs`` (chains run in a ``ProcessPoolExecutor`` when ``n_jobs > 1``,
the utility shipped once per worker through the pool initializer).

Stopping rules: ``"gelman_rubin"`` stops when the largest per-row potential scale reduction factor
(R-hat of the per-row samples across chains) falls below ``rhat_threshold``; ``"relative"`` stops
when the L1 change of the pooled values over one round is below ``rtol`` times their L1 norm;
``"none"`` runs to ``max_samples``. ``min_samples`` (total over chains) always holds first.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infscope.errors import InfscopeError
from infscope.estimators.shapley_utility import SubsetUtility

STOP_RULES = ("gelman_rubin", "relative", "none")
KINDS = ("permutation", "msr")


@dataclass(frozen=True)
class SamplerSpec:
    """What a chain samples: the kind, per-position weights, truncation, and the fixed utilities."""

    kind: str
    n: int
    weights: np.ndarray | None = None  # permutation: weight of a row at position k (length n)
    truncation: float | None = None  # permutation: relative tolerance to U(all); None = off
    full_utility: float = 0.0
    empty_utility: float = 0.0
    record: int = 0  # the first `record` evaluated subsets of each chain (with utilities) kept for mtm_check


@dataclass
class ChainState:
    """Running sums of one chain; picklable, so it travels to a worker and back each round."""

    rng: np.random.Generator
    n: int
    count: int = 0
    calls: int = 0
    total: np.ndarray = field(init=False)
    total_sq: np.ndarray = field(init=False)
    in_sum: np.ndarray = field(init=False)
    in_count: np.ndarray = field(init=False)
    out_sum: np.ndarray = field(init=False)
    out_count: np.ndarray = field(init=False)
    subsets: list[np.ndarray] = field(default_factory=list)
    utilities: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        zeros = np.zeros(self.n)
        self.total, self.total_sq = zeros.copy(), zeros.copy()
        self.in_sum, self.in_count, self.out_sum, self.out_count = (zeros.copy() for _ in range(4))

    def keep(self, mask: np.ndarray, utility: float, cap: int) -> None:
        """Record one evaluated subset (as a boolean mask) while under the per-chain cap."""
        if len(self.subsets) < cap:
            self.subsets.append(mask.copy())
            self.utilities.append(utility)


@dataclass
class SampledValues:
    """Values from the sampler plus what it learnt on the way.

    ``values`` (higher = more valuable), ``stderr`` (Monte Carlo standard error per row), ``n_samples``
    (permutations or subsets, over all chains), ``n_utility_calls``, ``converged`` (the stopping rule
    fired before ``max_samples``), ``rhat`` (largest per-row R-hat at the end, NaN with one chain),
    and ``subsets`` (m x n bool) / ``utilities`` (m) recorded for :func:`mtm_check`.
    """

    values: np.ndarray
    stderr: np.ndarray
    n_samples: int
    n_utility_calls: int
    converged: bool
    rhat: float
    subsets: np.ndarray
    utilities: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _permutation_steps(utility: SubsetUtility, spec: SamplerSpec, state: ChainState, steps: int) -> None:
    """Scan ``steps`` random permutations, adding each row's weighted marginal contribution."""
    n = spec.n
    weights = np.ones(n) if spec.weights is None else spec.weights
    tolerance = None if spec.truncation is None else spec.truncation * abs(spec.full_utility)
    for _ in range(steps):
        order = state.rng.permutation(n)
        marginals = np.zeros(n)
        mask = np.zeros(n, dtype=bool)
        previous = spec.empty_utility
        for position in range(n):
            if tolerance is not None and abs(spec.full_utility - previous) <= tolerance:
                break  # truncated: the remaining rows contribute 0
            mask[order[position]] = True
            current = float(utility(order[: position + 1]))
            state.calls += 1
            state.keep(mask, current, spec.record)
            marginals[position] = current - previous
            previous = current
        sample = np.zeros(n)
        sample[order] = weights * marginals
        state.total += sample
        state.total_sq += sample * sample
        state.count += 1


def _msr_steps(utility: SubsetUtility, spec: SamplerSpec, state: ChainState, steps: int) -> None:
    """Evaluate ``steps`` uniform random subsets and credit each utility to members and non-members."""
    for _ in range(steps):
        mask = state.rng.random(spec.n) < 0.5
        value = float(utility(np.flatnonzero(mask)))
        state.calls += 1
        state.keep(mask, value, spec.record)
        state.in_sum += np.where(mask, value, 0.0)
        state.in_count += mask
        state.out_sum += np.where(mask, 0.0, value)
        state.out_count += ~mask
        sample = np.where(mask, 2.0 * value, -2.0 * value)
        state.total += sample
        state.total_sq += sample * sample
        state.count += 1


def advance(utility: SubsetUtility, spec: SamplerSpec, state: ChainState, steps: int) -> ChainState:
    """Run ``steps`` more samples of one chain in place and return it."""
    if spec.kind == "permutation":
        _permutation_steps(utility, spec, state, steps)
    else:
        _msr_steps(utility, spec, state, steps)
    return state


_WORKER_UTILITY: SubsetUtility | None = None


def _init_worker(utility: SubsetUtility) -> None:
    """Pool initializer: keep the utility in the worker so rounds ship only the chain state."""
    global _WORKER_UTILITY
    _WORKER_UTILITY = utility


def _advance_in_worker(spec: SamplerSpec, state: ChainState, steps: int) -> ChainState:
    assert _WORKER_UTILITY is not None, "worker started without a utility"
    return advance(_WORKER_UTILITY, spec, state, steps)


def pooled_values(spec: SamplerSpec, chains: list[ChainState]) -> np.ndarray:
    """The estimate from all chains: mean weighted marginal (permutation) or the MSR difference."""
    if spec.kind == "permutation":
        count = sum(chain.count for chain in chains)
        return sum(chain.total for chain in chains) / max(count, 1)
    in_sum, in_count = sum(c.in_sum for c in chains), sum(c.in_count for c in chains)
    out_sum, out_count = sum(c.out_sum for c in chains), sum(c.out_count for c in chains)
    inside = np.divide(in_sum, in_count, out=np.zeros(spec.n), where=in_count > 0)
    outside = np.divide(out_sum, out_count, out=np.zeros(spec.n), where=out_count > 0)
    return inside - outside


def standard_errors(chains: list[ChainState]) -> np.ndarray:
    """Monte Carlo standard error per row from the pooled per-row samples."""
    count = sum(chain.count for chain in chains)
    if count < 2:
        return np.full(chains[0].n, np.nan)
    mean = sum(chain.total for chain in chains) / count
    var = (sum(chain.total_sq for chain in chains) - count * mean * mean) / (count - 1)
    return np.sqrt(np.maximum(var, 0.0) / count)


def gelman_rubin(chains: list[ChainState]) -> float:
    """Largest per-row R-hat across chains (NaN with one chain or fewer than 2 samples per chain)."""
    counts = {chain.count for chain in chains}
    per_chain = min(counts)
    if len(chains) < 2 or per_chain < 2 or len(counts) != 1:
        return float("nan")
    means = np.stack([chain.total / per_chain for chain in chains])
    within = np.stack(
        [
            (chain.total_sq - per_chain * m * m) / (per_chain - 1)
            for chain, m in zip(chains, means, strict=True)
        ]
    )
    w = np.maximum(within, 0.0).mean(0)
    b = per_chain * means.var(0, ddof=1)
    pooled = (per_chain - 1) / per_chain * w + b / per_chain
    # rows that never varied (e.g. always truncated) have converged trivially
    rhat = np.sqrt(np.divide(pooled, w, out=np.ones_like(w), where=w > 1e-300))
    return float(rhat.max())


@dataclass(frozen=True)
class StopRule:
    """When to stop: the rule, its threshold, and the sample budget (totals over chains)."""

    rule: str = "gelman_rubin"
    rhat_threshold: float = 1.05
    rtol: float = 0.01
    min_samples: int = 100
    max_samples: int = 1000
    check_every: int = 10

    def __post_init__(self) -> None:
        if self.rule not in STOP_RULES:
            raise InfscopeError(f"unknown stopping rule {self.rule!r}; use one of {', '.join(STOP_RULES)}")
        if self.max_samples < 1 or self.check_every < 1 or self.min_samples < 0:
            raise InfscopeError(
                "max_samples and check_every must be at least 1 and min_samples at least 0; fix the sampler budget"
            )


def check_utility(utility: object) -> int:
    """The number of rows of a valid utility; anything else is refused with the fix."""
    n = getattr(utility, "n", None)
    if not callable(utility) or isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise InfscopeError(
            "utility must be callable on an index array and expose n (the number of rows); "
            "use LogisticUtility(train_x, train_y, val_x, val_y)"
        )
    if n < 1:
        raise InfscopeError("the utility has no training rows; pass at least one row")
    return int(n)


def run_chains(
    utility: SubsetUtility,
    spec: SamplerSpec,
    rule: StopRule,
    *,
    n_chains: int = 4,
    seed: int = 0,
    n_jobs: int = 1,
    mp_context: str | None = None,
) -> SampledValues:
    """Run seeded chains in rounds until the stopping rule fires or the budget is spent."""
    n = check_utility(utility)
    if n_chains < 1 or n_jobs < 1:
        raise InfscopeError(f"n_chains and n_jobs must be at least 1, got {n_chains} and {n_jobs}")
    if rule.rule == "gelman_rubin" and n_chains < 2:
        raise InfscopeError(
            "the Gelman-Rubin stopping rule needs n_chains >= 2; raise n_chains or use stop='relative'"
        )
    chains = [ChainState(np.random.default_rng(s), n) for s in np.random.SeedSequence(seed).spawn(n_chains)]
    per_chain_budget = math.ceil(rule.max_samples / n_chains)
    executor = None
    if n_jobs > 1:
        context = multiprocessing.get_context(mp_context) if mp_context else None
        executor = ProcessPoolExecutor(
            max_workers=min(n_jobs, n_chains),
            mp_context=context,
            initializer=_init_worker,
            initargs=(utility,),
        )
    converged, previous = False, None
    try:
        while chains[0].count < per_chain_budget:
            steps = min(rule.check_every, per_chain_budget - chains[0].count)
            if executor is None:
                chains = [advance(utility, spec, chain, steps) for chain in chains]
            else:
                futures = [executor.submit(_advance_in_worker, spec, chain, steps) for chain in chains]
                chains = [future.result() for future in futures]
            values = pooled_values(spec, chains)
            if sum(chain.count for chain in chains) < rule.min_samples:
                previous = values
                continue
            if rule.rule == "gelman_rubin":
                converged = gelman_rubin(chains) < rule.rhat_threshold
            elif rule.rule == "relative" and previous is not None:
                scale = max(float(np.abs(values).sum()), 1e-12)
                converged = float(np.abs(values - previous).sum()) / scale < rule.rtol
            previous = values
            if converged:
                break
    finally:
        if executor is not None:
            executor.shutdown()
    subsets = [mask for chain in chains for mask in chain.subsets]
    return SampledValues(
        values=pooled_values(spec, chains),
        stderr=standard_errors(chains),
        n_samples=sum(chain.count for chain in chains),
        n_utility_calls=sum(chain.calls for chain in chains),
        converged=converged,
        rhat=gelman_rubin(chains),
        subsets=np.array(subsets, dtype=bool).reshape(len(subsets), n),
        utilities=np.array([u for chain in chains for u in chain.utilities], dtype=np.float64),
        meta={"kind": spec.kind, "n_chains": n_chains, "seed": seed, "stop": rule.rule},
    )
