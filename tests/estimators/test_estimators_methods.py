"""Estimators (block-wise, both modes) against plain loops and dense float64 solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.estimators import ESTIMATORS, Estimator, get_estimator
from infscope.estimators.datainf import DataInf
from infscope.estimators.exact import Exact
from infscope.estimators.hessian_free import HessianFree
from infscope.estimators.lissa import LiSSA
from infscope.grads.base import InMemoryGradients

BLOCKS = {"layer0.A": 5, "layer0.B": 12, "layer1.A": 3}


def _grads(
    n: int, seed: int, prefix: str, blocks: dict[str, int] = BLOCKS, scale: float = 1.0
) -> InMemoryGradients:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: scale * (1 + i) * torch.randn(n, d, generator=gen, dtype=torch.float64)
        for i, (name, d) in enumerate(blocks.items())
    }
    return InMemoryGradients([f"{prefix}{i}" for i in range(n)], tensors)


def _np_blocks(grads: InMemoryGradients) -> dict[str, np.ndarray]:
    return {name: grads.load_block(name, torch.float64).numpy() for name in grads.block_names}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _datainf_loop(train: dict[str, np.ndarray], V: dict[str, np.ndarray], scale: float = 0.1) -> np.ndarray:
    """The DataInf paper's formula, one pair at a time:
    I(k) = sum_l (1/lam_l) [ (1/n) sum_i (L_0i L_ik) / (lam_l + L_ii) - L_0k ]."""
    n = next(iter(train.values())).shape[0]
    q = next(iter(V.values())).shape[0]
    out = np.zeros((q, n))
    for name, G in train.items():
        d = G.shape[1]
        lam = scale * sum(float(G[i] @ G[i]) for i in range(n)) / (n * d)
        for j in range(q):
            v = V[name][j]
            for k in range(n):
                acc = 0.0
                for i in range(n):
                    acc += float(v @ G[i]) * float(G[i] @ G[k]) / (lam + float(G[i] @ G[i]))
                out[j, k] += (acc / n - float(v @ G[k])) / lam
    return out


def _datainf_self_loop(train: dict[str, np.ndarray], scale: float = 0.1) -> np.ndarray:
    n = next(iter(train.values())).shape[0]
    out = np.zeros(n)
    for G in train.values():
        lam = scale * sum(float(G[i] @ G[i]) for i in range(n)) / (n * G.shape[1])
        for k in range(n):
            acc = sum(float(G[k] @ G[i]) ** 2 / (lam + float(G[i] @ G[i])) for i in range(n))
            out[k] += (float(G[k] @ G[k]) - acc / n) / lam
    return out


def _dense_exact(
    train: dict[str, np.ndarray], V: dict[str, np.ndarray], lams: dict[str, float]
) -> np.ndarray:
    total = 0.0
    for name, G in train.items():
        n, d = G.shape
        X = np.linalg.solve(G.T @ G / n + lams[name] * np.eye(d), V[name].T)  # (d, q)
        total = total - (G @ X).T
    return total


def test_datainf_equals_paper_loop_in_both_modes() -> None:
    train, query = _grads(14, 0, "t"), _grads(3, 1, "q")
    est = DataInf(dtype="float64").fit(train)
    V = _np_blocks(query)
    expected = _datainf_loop(_np_blocks(train), V)
    matrix = est.score(query, aggregate=False)
    assert matrix.values.shape == (3, 14) and matrix.query_ids == ["q0", "q1", "q2"]
    assert _rel(matrix.values, expected) < 1e-10
    mean_v = {name: v.mean(axis=0, keepdims=True) for name, v in V.items()}
    vector = est.score(query, aggregate=True)
    assert vector.values.shape == (14,)
    assert _rel(vector.values, _datainf_loop(_np_blocks(train), mean_v)[0]) < 1e-10
    # lambda per block follows the paper's rule
    for name, G in _np_blocks(train).items():
        assert vector.meta["damping"][name] == pytest.approx(0.1 * (G**2).sum(axis=1).mean() / G.shape[1])
    assert _rel(est.self_score().values, _datainf_self_loop(_np_blocks(train))) < 1e-10


def test_datainf_float32_default_is_close_to_float64() -> None:
    train, query = _grads(20, 2, "t"), _grads(4, 3, "q")
    f32 = get_estimator("datainf").fit(train).score(query, aggregate=False)
    f64 = get_estimator("datainf", dtype="float64").fit(train).score(query, aggregate=False)
    assert f32.meta["dtype"] == "float32"
    assert _rel(f32.values, f64.values) < 1e-4


@pytest.mark.parametrize("n", [40, 6])  # d < n for every block, and d > n for two of the blocks
def test_exact_equals_dense_solve(n: int) -> None:
    train, query = _grads(n, 4, "t"), _grads(3, 5, "q")
    est = Exact().fit(train)
    matrix = est.score(query, aggregate=False)
    expected = _dense_exact(_np_blocks(train), _np_blocks(query), est.lams)
    assert _rel(matrix.values, expected) < 1e-8
    mean_v = {name: v.mean(axis=0, keepdims=True) for name, v in _np_blocks(query).items()}
    assert _rel(est.score(query).values, _dense_exact(_np_blocks(train), mean_v, est.lams)[0]) < 1e-8


def test_exact_per_block_damping_overrides() -> None:
    train, query = _grads(10, 6, "t"), _grads(2, 7, "q")
    est = Exact(damping={"layer0.B": 0.5}).fit(train)
    assert est.lams["layer0.B"] == 0.5 and est.lam_source["layer0.B"] == "given"
    assert est.lam_source["layer0.A"] == "rule"
    expected = _dense_exact(_np_blocks(train), _np_blocks(query), est.lams)
    assert _rel(est.score(query, aggregate=False).values, expected) < 1e-8
    assert Exact(damping=0.25).fit(train).lams == dict.fromkeys(BLOCKS, 0.25)


def test_exact_self_score_and_degenerate_warning() -> None:
    train = _grads(30, 8, "t", blocks={"a": 4, "b": 6})
    est = Exact().fit(train)
    self_scores = est.self_score()
    expected = np.zeros(30)
    for name, G in _np_blocks(train).items():
        A = G.T @ G / 30 + est.lams[name] * np.eye(G.shape[1])
        expected += np.einsum("id,id->i", G, np.linalg.solve(A, G.T).T)
    assert _rel(self_scores.values, expected) < 1e-8
    assert "warnings" not in self_scores.meta
    small = _grads(5, 9, "t", blocks={"a": 4, "wide": 50})
    with pytest.warns(UserWarning, match="nearly constant"):
        degenerate = Exact().fit(small).self_score()
    assert degenerate.meta["blocks"]["wide"]["self_score_degenerate"] is True


def test_exact_with_given_hessian() -> None:
    train, query = _grads(10, 10, "t", blocks={"w": 4}), _grads(2, 11, "q", blocks={"w": 4})
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H = A @ A.T + 0.1 * torch.eye(4, dtype=torch.float64)
    scores = Exact(hessian={"w": H}, damping=0.0).fit(train).score(query, aggregate=False)
    G, V = _np_blocks(train)["w"], _np_blocks(query)["w"]
    assert _rel(scores.values, -(G @ np.linalg.solve(H.numpy(), V.T)).T) < 1e-10
    with pytest.raises(InfscopeError, match="expected"):
        Exact(hessian={"w": torch.eye(3)}).fit(train)
    with pytest.raises(InfscopeError, match="unknown block"):
        Exact(hessian={"nope": torch.eye(4)}).fit(train)


def test_lissa_converges_to_exact_and_records_iterations() -> None:
    train, query = _grads(25, 12, "t"), _grads(3, 13, "q")
    lissa = LiSSA(damping_scale=1.0, tol=1e-9, max_iter=100_000).fit(train)
    exact = Exact(damping_scale=1.0).fit(train)
    got = lissa.score(query, aggregate=False)
    assert _rel(got.values, exact.score(query, aggregate=False).values) < 1e-4
    for name in BLOCKS:
        info = got.meta["blocks"][name]
        assert info["converged"] and info["iterations"] > 1 and info["residual"] < 1e-9
    assert _rel(lissa.self_score().values, exact.self_score().values) < 1e-4


def test_lissa_not_converged_is_flagged() -> None:
    train, query = _grads(25, 14, "t"), _grads(2, 15, "q")
    with pytest.warns(UserWarning, match="did not converge") as caught:
        scores = LiSSA(max_iter=2, tol=1e-12).fit(train).score(query)
    assert len(caught) == 1 and len(scores.meta["warnings"]) == 1
    assert scores.meta["not_converged"] == {b: scores.meta["blocks"][b]["residual"] for b in BLOCKS}
    assert all(not scores.meta["blocks"][b]["converged"] for b in BLOCKS)


def test_tracin_multi_checkpoint_equals_weighted_loop() -> None:
    lrs = [1e-3, 5e-4, 1e-4]
    trains = [_grads(9, 20 + c, "t") for c in range(3)]
    queries = [_grads(4, 30 + c, "q") for c in range(3)]
    est = HessianFree().fit(list(zip(trains, lrs, strict=True)))
    matrix = est.score(queries, aggregate=False).values
    expected = np.zeros((4, 9))
    self_expected = np.zeros(9)
    for lr, tr, qu in zip(lrs, trains, queries, strict=True):
        for name in BLOCKS:
            G, V = _np_blocks(tr)[name], _np_blocks(qu)[name]
            for j in range(4):
                for k in range(9):
                    expected[j, k] += lr * -float(V[j] @ G[k])
            for k in range(9):
                self_expected[k] += lr * float(G[k] @ G[k])
    assert _rel(matrix, expected) < 1e-6
    assert _rel(est.score(queries).values, expected.mean(axis=0)) < 1e-6
    assert _rel(est.self_score().values, self_expected) < 1e-6


def test_hessian_free_single_checkpoint_is_negative_dot_product() -> None:
    train, query = _grads(8, 40, "t"), _grads(2, 41, "q")
    got = HessianFree(dtype="float64").fit(train).score(query, aggregate=False).values
    G = np.concatenate([_np_blocks(train)[n] for n in BLOCKS], axis=1)
    V = np.concatenate([_np_blocks(query)[n] for n in BLOCKS], axis=1)
    assert _rel(got, -(V @ G.T)) < 1e-12


def test_hessian_free_checks_checkpoint_inputs() -> None:
    est = HessianFree().fit([(_grads(5, 0, "t"), 1.0), (_grads(5, 1, "t"), 0.5)])
    with pytest.raises(InfscopeError, match="one query GradientSet per checkpoint"):
        est.score(_grads(2, 2, "q"))
    with pytest.raises(InfscopeError, match="other training ids"):
        HessianFree().fit([(_grads(5, 0, "t"), 1.0), (_grads(5, 1, "u"), 0.5)])


# The cosine forms normalise, so their aggregate is not a mean of the matrix (tests/test_estimators_cosine.py).
@pytest.mark.parametrize("name", sorted(set(ESTIMATORS) - {"grad_cos", "datainf_cos"}))
def test_every_estimator_aggregate_is_mean_of_matrix_and_sign_is_consistent(name: str) -> None:
    train, query = _grads(16, 50, "t"), _grads(5, 51, "q")
    kwargs = {"dtype": "float64"}
    if name == "lissa":
        kwargs.update(damping_scale=1.0, tol=1e-10, max_iter=100_000)
    est = get_estimator(name, **kwargs).fit(train)
    matrix, vector = est.score(query, aggregate=False), est.score(query, aggregate=True)
    assert _rel(vector.values, matrix.vector()) < 1e-8
    assert vector.meta["aggregate"] is True and matrix.meta["aggregate"] is False
    # A training example equal to the query gradient itself is the most helpful one (negative score):
    # upweighting it lowers the query loss. Its negation is the most harmful.
    probe = _grads(1, 52, "p")
    blocks = {
        n: torch.cat(
            [
                train.load_block(n, torch.float64),
                probe.load_block(n, torch.float64),
                -probe.load_block(n, torch.float64),
            ]
        )
        for n in BLOCKS
    }
    ids = train.ids + ["same", "opposite"]
    scores = get_estimator(name, **kwargs).fit(InMemoryGradients(ids, blocks)).score(probe)
    assert scores.helpful(1) == ["same"] and scores.harmful(1) == ["opposite"]
    self_scores = est.self_score()
    assert (self_scores.values > 0).all()


def test_errors_are_one_line_infscope_errors() -> None:
    train = _grads(6, 60, "t")
    with pytest.raises(InfscopeError, match="unknown estimator 'nope'"):
        get_estimator("nope")
    with pytest.raises(InfscopeError, match="has no option 'tol'"):
        get_estimator("exact", tol=1e-3)
    with pytest.raises(InfscopeError, match="not fitted"):
        DataInf().score(train)
    with pytest.raises(InfscopeError, match="lack 1 training block"):
        DataInf().fit(train).score(_grads(2, 61, "q", blocks={"layer0.A": 5, "layer0.B": 12}))
    with pytest.raises(InfscopeError, match="dims for train"):
        DataInf().fit(train).score(_grads(2, 62, "q", blocks={"layer0.A": 5, "layer0.B": 12, "layer1.A": 4}))
    with pytest.raises(InfscopeError, match="must be a GradientSet"):
        DataInf().fit(np.zeros((3, 3)))
    with pytest.raises(InfscopeError, match="damping"):
        DataInf(damping=-1.0).fit(train)
    with pytest.raises(InfscopeError, match="unknown block 'typo'"):
        DataInf(damping={"typo": 1.0}).fit(train)
    with pytest.raises(InfscopeError, match="positive damping"):
        DataInf(damping=0.0).fit(train).score(train)
    assert get_estimator("Hessian-Free").name == "hessian_free"


@pytest.mark.filterwarnings("ignore:exact self-influence")
@pytest.mark.parametrize("name", ["datainf", "exact", "hessian_free"])
def test_protocol_progress_and_zero_blocks(name: str) -> None:
    train, query = _grads(8, 70, "t"), _grads(2, 71, "q")
    blocks = {n: train.load_block(n, torch.float64) for n in BLOCKS}
    blocks["zero"] = torch.zeros(8, 4, dtype=torch.float64)
    qblocks = {n: query.load_block(n, torch.float64) for n in BLOCKS}
    qblocks["zero"] = torch.ones(2, 4, dtype=torch.float64)
    est = get_estimator(name, dtype="float64")
    assert isinstance(est, Estimator)
    with_zero = est.fit(InMemoryGradients(train.ids, blocks))
    seen: list[str] = []
    got = with_zero.score(InMemoryGradients(query.ids, qblocks), progress=seen.append)
    assert seen == [*BLOCKS, "zero"]
    reference = get_estimator(name, dtype="float64").fit(train).score(query)
    np.testing.assert_allclose(got.values, reference.values, rtol=1e-12)
    seen.clear()
    with_zero.self_score(progress=seen.append)
    assert seen == [*BLOCKS, "zero"]
