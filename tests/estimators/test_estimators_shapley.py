"""Shapley-family data values against independent references.

References: exact enumeration over all 2^8 subsets of 8 rows written here with plain loops (Shapley,
Beta and Banzhaf weights from their textbook definitions, ``math.lgamma`` for the Beta function), a
plain bagging loop for Data-OOB, scikit-learn for the proxy logistic regression.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from infscope.errors import InfscopeError
from infscope.estimators.shapley import (
    LogisticUtility,
    as_harm,
    banzhaf,
    beta_shapley,
    beta_weights,
    data_oob,
    knn_shapley,
    mtm_check,
    tmc_shapley,
)
from infscope.estimators.shapley_utility import fit_ovr_logistic

N = 8


class TinyUtility:
    """A small non-additive utility on 8 rows: a saturating sum plus a pair bonus and a clash."""

    n = N

    def __init__(self) -> None:
        self.weights = np.array([0.9, 0.6, 0.4, 0.3, 0.2, 0.1, -0.2, -0.5])

    def __call__(self, subset: np.ndarray) -> float:
        members = set(int(i) for i in subset)
        value = math.tanh(sum(self.weights[i] for i in members))
        if 1 in members and 2 in members:
            value += 0.3
        if 3 in members and 4 in members:
            value -= 0.25
        return value


class Saturating:
    """``U(S) = min(|S|, 3) / 3``: reaches U(all) after 3 rows, so truncation loses nothing."""

    n = N

    def __call__(self, subset: np.ndarray) -> float:
        return min(len(subset), 3) / 3.0


class Parity:
    """A utility far from any monotone transform of a modular function: parity of |S & {0..3}|."""

    n = N

    def __call__(self, subset: np.ndarray) -> float:
        return float(sum(1 for i in subset if i < 4) % 2)


def all_subsets(n: int) -> list[tuple[int, ...]]:
    return [combo for size in range(n + 1) for combo in itertools.combinations(range(n), size)]


def exact_semivalue(utility, n: int, weight_of_size) -> np.ndarray:
    """sum over S not holding i of weight(|S|) * (U(S + i) - U(S)), by plain loops."""
    cache = {subset: utility(np.array(subset, dtype=int)) for subset in all_subsets(n)}
    values = np.zeros(n)
    for i in range(n):
        for subset in all_subsets(n):
            if i in subset:
                continue
            with_i = tuple(sorted(subset + (i,)))
            values[i] += weight_of_size(len(subset)) * (cache[with_i] - cache[subset])
    return values


def shapley_weight(n: int):
    return lambda size: math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)


def beta_weight(n: int, alpha: float, beta: float):
    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    return lambda size: math.exp(log_beta(size + beta, n - 1 - size + alpha) - log_beta(alpha, beta))


def banzhaf_weight(n: int):
    return lambda size: 1.0 / 2 ** (n - 1)


# ----------------------------------------------------------------------------------------------- KNN


def knn_utility_loop(train_x, train_y, val_x, val_y, subset, k: int) -> float:
    """Mean over validation points of (1/K) * matches among the min(K, |S|) nearest rows of S."""
    total = 0.0
    for x, y in zip(val_x, val_y, strict=True):
        ranked = sorted(subset, key=lambda i: float(np.sum((train_x[i] - x) ** 2)))
        total += sum(1.0 for i in ranked[:k] if train_y[i] == y) / k
    return total / len(val_y)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_shapley_equals_enumeration(k):
    rng = np.random.default_rng(k)
    train_x, val_x = rng.normal(size=(N, 4)), rng.normal(size=(5, 4))
    train_y, val_y = rng.integers(0, 3, N), rng.integers(0, 3, 5)

    def utility(subset):
        return knn_utility_loop(train_x, train_y, val_x, val_y, list(subset), k)

    expected = exact_semivalue(utility, N, shapley_weight(N))
    got = knn_shapley(train_x, train_y, val_x, val_y, k=k)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_knn_shapley_string_labels_chunks_and_efficiency():
    rng = np.random.default_rng(7)
    train_x, val_x = rng.normal(size=(300, 6)), rng.normal(size=(37, 6))
    names = np.array(["ant", "bee", "cat"])
    train_y, val_y = names[rng.integers(0, 3, 300)], names[rng.integers(0, 3, 37)]
    whole = knn_shapley(train_x, train_y, val_x, val_y, k=5)
    np.testing.assert_allclose(
        knn_shapley(train_x, train_y, val_x, val_y, k=5, chunk_size=4), whole, atol=1e-12
    )
    full = knn_utility_loop(train_x, train_y, val_x, val_y, list(range(300)), 5)
    assert whole.sum() == pytest.approx(full, abs=1e-10)


def test_knn_shapley_rejects_bad_input():
    x = np.zeros((4, 3))
    with pytest.raises(InfscopeError, match="features"):
        knn_shapley(x, [0, 1, 0, 1], np.zeros((2, 2)), [0, 1])
    with pytest.raises(InfscopeError, match="positive integer"):
        knn_shapley(x, [0, 1, 0, 1], x, [0, 1, 0, 1], k=0)
    with pytest.raises(InfscopeError, match="one per row"):
        knn_shapley(x, [0, 1], x, [0, 1, 0, 1])
    with pytest.raises(InfscopeError, match="NaN"):
        knn_shapley(np.full((4, 3), np.nan), [0, 1, 0, 1], x, [0, 1, 0, 1])


# ------------------------------------------------------------------------------------ sampled values


def test_tmc_shapley_matches_enumeration():
    utility = TinyUtility()
    expected = exact_semivalue(utility, N, shapley_weight(N))
    result = tmc_shapley(utility, truncation=None, stop="none", max_permutations=3000, seed=3)
    assert result.n_samples == 3000 and result.n_utility_calls == 3000 * N
    assert np.max(np.abs(result.values - expected)) < 0.02  # worst-row standard error ~0.004
    assert np.all(np.abs(result.values - expected) < 5 * result.stderr + 1e-9)


def test_beta_shapley_matches_enumeration_and_weights():
    np.testing.assert_allclose(beta_weights(N, 1.0, 1.0), np.full(N, 1.0 / N), atol=1e-12)
    per_size = beta_weight(N, 16.0, 1.0)
    np.testing.assert_allclose(
        beta_weights(N, 16.0, 1.0), [math.comb(N - 1, s) * per_size(s) for s in range(N)], rtol=1e-10
    )
    utility = TinyUtility()
    expected = exact_semivalue(utility, N, beta_weight(N, 16.0, 1.0))
    result = beta_shapley(utility, truncation=None, stop="none", max_permutations=12000, seed=4)
    assert np.max(np.abs(result.values - expected)) < 0.05  # worst-row standard error ~0.012
    assert np.all(np.abs(result.values - expected) < 5 * result.stderr + 1e-9)


def test_banzhaf_msr_matches_enumeration():
    utility = TinyUtility()
    expected = exact_semivalue(utility, N, banzhaf_weight(N))
    result = banzhaf(utility, stop="none", max_samples=20000, seed=5)
    assert result.n_utility_calls == 20000
    assert np.max(np.abs(result.values - expected)) < 0.04  # ~4 standard errors of the worst row


def test_truncation_is_exact_for_a_saturating_utility_and_saves_calls():
    full = tmc_shapley(Saturating(), truncation=None, stop="none", max_permutations=40, seed=1)
    cut = tmc_shapley(Saturating(), truncation=1e-9, stop="none", max_permutations=40, seed=1)
    np.testing.assert_allclose(cut.values, full.values, atol=1e-12)
    assert cut.n_utility_calls == 40 * 3 < full.n_utility_calls


def test_stopping_rules():
    easy = Saturating()
    rhat = tmc_shapley(easy, truncation=None, min_permutations=40, max_permutations=4000, seed=0)
    assert rhat.converged and rhat.n_samples < 4000 and rhat.rhat < 1.05
    relative = tmc_shapley(easy, truncation=None, stop="relative", rtol=0.05, max_permutations=4000, seed=0)
    assert relative.converged and relative.n_samples < 4000
    budget = tmc_shapley(easy, truncation=None, stop="none", max_permutations=50, n_chains=4, seed=0)
    assert not budget.converged and budget.n_samples == 52  # ceil(50 / 4) per chain
    with pytest.raises(InfscopeError, match="n_chains >= 2"):
        tmc_shapley(easy, n_chains=1)
    with pytest.raises(InfscopeError, match="stopping rule"):
        banzhaf(easy, stop="sometimes")
    with pytest.raises(InfscopeError, match="utility must be callable"):
        banzhaf(np.zeros(3))


def _small_logistic_utility() -> LogisticUtility:
    rng = np.random.default_rng(11)
    train_x, val_x = rng.normal(size=(24, 3)), rng.normal(size=(30, 3))
    train_y = (train_x[:, 0] + 0.7 * rng.normal(size=24) > 0).astype(int)
    val_y = (val_x[:, 0] > 0).astype(int)
    return LogisticUtility(train_x, train_y, val_x, val_y)


def test_parallel_chains_are_identical_to_serial():
    utility = _small_logistic_utility()
    for method, budget in ((tmc_shapley, {"max_permutations": 8}), (banzhaf, {"max_samples": 80})):
        serial = method(utility, stop="none", seed=9, n_jobs=1, check_every=1, **budget)
        parallel = method(utility, stop="none", seed=9, n_jobs=2, check_every=1, **budget)
        assert np.array_equal(serial.values, parallel.values)
        assert np.array_equal(serial.subsets, parallel.subsets)
        other = method(utility, stop="none", seed=10, n_jobs=1, check_every=1, **budget)
        assert not np.array_equal(serial.values, other.values)


def test_recorded_subsets_carry_their_utilities():
    utility = _small_logistic_utility()
    result = tmc_shapley(utility, stop="none", max_permutations=4, record=10)
    assert result.subsets.shape == (40, 24) and len(result.utilities) == 40
    for mask, value in zip(result.subsets[::7], result.utilities[::7], strict=True):
        assert utility(np.flatnonzero(mask)) == value


# --------------------------------------------------------------------------------- proxy utility


def test_newton_logistic_matches_sklearn():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 4))
    y = rng.integers(0, 3, 80)
    y[x[:, 0] > 0.8] = 0
    theta = fit_ovr_logistic(x, (y[:, None] == np.arange(3)).astype(float), c=0.5)
    reference = OneVsRestClassifier(LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000)).fit(x, y)
    for cls, estimator in enumerate(reference.estimators_):
        np.testing.assert_allclose(theta[cls, :-1], estimator.coef_[0], atol=1e-6)
        assert theta[cls, -1] == pytest.approx(estimator.intercept_[0], abs=1e-6)


def test_logistic_utility_values():
    rng = np.random.default_rng(5)
    train_x, val_x = rng.normal(size=(40, 3)), rng.normal(size=(25, 3))
    train_y, val_y = (train_x[:, 1] > 0).astype(int), (val_x[:, 1] > 0).astype(int)
    acc = LogisticUtility(train_x, train_y, val_x, val_y)
    model = LogisticRegression(tol=1e-12, max_iter=10_000).fit(train_x[:30], train_y[:30])
    assert acc(np.arange(30)) == pytest.approx(np.mean(model.predict(val_x) == val_y))
    assert acc(np.array([], dtype=int)) == 0.5
    one = np.flatnonzero(train_y == 1)[:3]
    assert acc(one) == pytest.approx(np.mean(val_y == 1))
    nll = LogisticUtility(train_x, train_y, val_x, val_y, metric="neg_log_loss")
    proba = model.predict_proba(val_x)[np.arange(25), val_y]
    assert nll(np.arange(30)) == pytest.approx(np.mean(np.log(proba)), abs=1e-6)
    assert nll(one) == pytest.approx(np.mean(np.log(np.where(val_y == 1, 4 / 5, 1 / 5))))
    with pytest.raises(InfscopeError, match="metric"):
        LogisticUtility(train_x, train_y, val_x, val_y, metric="f1")


# -------------------------------------------------------------------------------------------- OOB


def test_data_oob_equals_plain_bagging_loop():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=50) > 0).astype(int)
    y[:5] = 1 - y[:5]
    got = data_oob(x, y, n_estimators=30, seed=13)

    bags = np.random.default_rng(13)
    hits, seen = [0.0] * 50, [0] * 50
    for _ in range(30):
        bag = bags.integers(0, 50, size=50)
        model = LogisticRegression(max_iter=500).fit(x[bag], y[bag])
        for row in range(50):
            if row not in set(bag.tolist()):
                hits[row] += float(model.predict(x[row : row + 1])[0] == y[row])
                seen[row] += 1
    expected = np.array(hits) / np.array(seen)
    np.testing.assert_array_equal(got, expected)
    assert got[:5].mean() < got[5:].mean()


# -------------------------------------------------------------------------------------------- MTM


def test_mtm_check_separates_mtm_from_non_modular_utilities():
    masks = np.array([[i in subset for i in range(N)] for subset in all_subsets(N)])
    weights = TinyUtility().weights
    mtm = np.array([math.tanh(float(weights @ mask)) for mask in masks])
    exact = mtm_check(weights, masks, mtm)
    assert exact.r2 == pytest.approx(1.0, abs=1e-12) and exact.nrmse == pytest.approx(0.0, abs=1e-6)
    assert exact.trustworthy

    def mtm_utility(subset):
        return math.tanh(float(weights[np.asarray(subset, dtype=int)].sum()))

    shapley = exact_semivalue(mtm_utility, N, shapley_weight(N))
    assert mtm_check(shapley, masks, mtm).r2 > 0.95

    parity = Parity()
    parity_utilities = np.array([parity(np.flatnonzero(mask)) for mask in masks])
    parity_shapley = exact_semivalue(parity, N, shapley_weight(N))
    far = mtm_check(parity_shapley, masks, parity_utilities)
    assert far.r2 < 0.2 and far.nrmse > 0.9 and not far.trustworthy
    with pytest.raises(InfscopeError, match="shapes"):
        mtm_check(weights, masks[:, :3], mtm)


def test_as_harm_negates():
    np.testing.assert_array_equal(as_harm([0.5, -1.0]), [-0.5, 1.0])
