"""LiSSA's solvers against textbook float64 references (numpy CG / recursion loops, dense solves),
on gradient blocks with a realistic spectrum (a shared mean direction, a decaying low-rank part and
DataInf's damping, so the condition number is in the thousands like real LoRA blocks)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.estimators.exact import Exact
from infscope.estimators.lissa import LiSSA
from infscope.estimators.primitives import datainf_damping, lissa_solve
from infscope.grads.base import InMemoryGradients


def _block(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows = 2 * mean direction + k^-1 spectrum on 10 directions + small isotropic floor."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(10, d - 1)
    basis = torch.linalg.qr(torch.randn(d, rank + 1, generator=gen, dtype=torch.float64))[0]
    coef = torch.randn(n, rank, generator=gen, dtype=torch.float64) / torch.arange(1, rank + 1)
    mean = (1 + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64)) * basis[:, :1].T
    return (
        2 * mean
        + coef @ basis[:, 1:].T
        + 0.02 * torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.5
    )


def _dense(G: torch.Tensor, V: torch.Tensor, lam: float) -> np.ndarray:
    g, v = G.numpy(), V.numpy()
    A = g.T @ g / g.shape[0] + lam * np.eye(g.shape[1])
    return np.linalg.solve(A, v.T).T


def _operator(G: torch.Tensor, lam: float) -> np.ndarray:
    g = G.numpy()
    return g.T @ g / g.shape[0] + lam * np.eye(g.shape[1])


def _cg_reference(A: np.ndarray, b: np.ndarray, x: np.ndarray, steps: int) -> np.ndarray:
    """Textbook conjugate gradients, one vector, ``steps`` steps from ``x``."""
    r = b - A @ x
    p = r.copy()
    for _ in range(steps):
        Ap = A @ p
        a = (r @ r) / (p @ Ap)
        x = x + a * p
        r_next = r - a * Ap
        p = r_next + (r_next @ r_next) / (r @ r) * p
        r = r_next
    return x


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def test_realistic_block_is_ill_conditioned_and_only_cg_converges() -> None:
    G, V = _block(40, 300, 0), _block(3, 300, 1)
    lam = datainf_damping(G, 0.1)
    top = float(np.linalg.eigvalsh(G.numpy().T @ G.numpy() / 40)[-1])
    assert (top + lam) / lam > 1000  # like DataInf-damped LoRA blocks: the recursion's weak spot
    expected = _dense(G, V, lam)
    for space in ("gram", "full"):
        result = lissa_solve(G, V, lam, tol=1e-8, space=space)
        assert result.converged and result.solver == "cg" and result.space == space
        assert result.iterations <= 40 + 5 and result.residual < 1e-8
        assert _rel(result.solution.numpy(), expected) < 1e-6
    stalled = lissa_solve(G, V, lam, tol=1e-8, max_iter=300, solver="recursion")
    assert not stalled.converged and stalled.iterations == 300
    assert _rel(stalled.solution.numpy(), expected) > 1e-3


@pytest.mark.parametrize("space", ["gram", "full"])
def test_cg_equals_textbook_cg_from_v_over_lam_step_for_step(space: str) -> None:
    G, V = _block(30, 120, 2), _block(2, 120, 3)
    lam = datainf_damping(G, 0.1)
    A = _operator(G, lam)
    for steps in (1, 4):
        got = lissa_solve(G, V, lam, tol=0.0, max_iter=steps, solver="cg", space=space)
        assert got.iterations == steps
        for j in range(2):
            v = V[j].numpy()
            assert _rel(got.solution[j].numpy(), _cg_reference(A, v, v / lam, steps)) < 1e-9


@pytest.mark.parametrize("space", ["gram", "full"])
def test_recursion_equals_plain_neumann_loop_step_for_step(space: str) -> None:
    G, V = _block(30, 120, 4), _block(2, 120, 5)
    lam = datainf_damping(G, 0.1)
    A = _operator(G, lam)
    scale = 1.1 * float(np.linalg.eigvalsh(A)[-1])
    got = lissa_solve(G, V, lam, tol=0.0, max_iter=7, solver="auto", space=space, scale=scale)
    assert got.solver == "recursion" and got.iterations == 7 and got.alpha_halvings == 0
    X = V.numpy() / lam
    for _ in range(7):
        X = X + (V.numpy() - X @ A) / scale
    assert _rel(got.solution.numpy(), X) < 1e-10


def test_lissa_solve_rejects_bad_options() -> None:
    G, V = _block(10, 20, 6), _block(1, 20, 7)
    with pytest.raises(ValueError, match="unknown LiSSA solver"):
        lissa_solve(G, V, 0.1, solver="newton")
    with pytest.raises(ValueError, match="positive damping"):
        lissa_solve(G, V, 0.0, space="gram")
    with pytest.raises(InfscopeError, match="unknown LiSSA space"):
        LiSSA(space="tiny")


DIMS = {"l0.A": 200, "l0.B": 150, "l1.A": 90, "l1.B": 25, "l2.A": 60}


def _grads(n: int, seed: int, prefix: str) -> InMemoryGradients:
    blocks = {name: _block(n, d, seed + 10 * k) for k, (name, d) in enumerate(DIMS.items())}
    return InMemoryGradients([f"{prefix}{i}" for i in range(n)], blocks)


@pytest.mark.filterwarnings("ignore:exact self-influence")
def test_default_lissa_matches_exact_silently_on_realistic_blocks() -> None:
    train, query = _grads(40, 100, "t"), _grads(6, 200, "q")
    exact = Exact().fit(train)
    lissa = LiSSA().fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vector = lissa.score(query)
        matrix = lissa.score(query, aggregate=False)
        self_scores = lissa.self_score()
    want = exact.score(query).values
    assert np.abs(vector.values - want).max() / np.abs(want).max() < 1e-5
    assert _rel(matrix.values, exact.score(query, aggregate=False).values) < 1e-5
    assert _rel(self_scores.values, exact.self_score().values) < 1e-5
    assert vector.meta["not_converged"] == {} and self_scores.meta["not_converged"] == {}
    info = vector.meta["blocks"]
    assert info["l0.A"]["space"] == "gram" and info["l1.B"]["space"] == "full"  # n=40 > d=25
    assert all(b["solver"] == "cg" and b["converged"] and b["residual"] < 1e-6 for b in info.values())


def test_unconverged_blocks_are_listed_and_warned_once() -> None:
    train, query = _grads(40, 300, "t"), _grads(3, 400, "q")
    with pytest.warns(UserWarning) as caught:
        scores = LiSSA(max_iter=2).fit(train).score(query)
    assert len(caught) == 1
    residuals = {name: scores.meta["blocks"][name]["residual"] for name in DIMS}
    assert scores.meta["not_converged"] == residuals and min(residuals.values()) > 1e-6
    message = str(caught[0].message)
    assert "'l0.A', 'l0.B', 'l1.A' and 2 more" in message and "'l1.B'" not in message
    assert f"{max(residuals.values()):.2e}" in message
    assert "raise max_iter or use exact" in message
    assert scores.meta["warnings"] == [message]


def test_classic_recursion_is_still_available_and_converges_when_well_conditioned() -> None:
    train, query = _grads(40, 500, "t"), _grads(3, 600, "q")
    kwargs = {"damping": 5.0, "tol": 1e-9, "max_iter": 20_000}
    got = LiSSA(solver="recursion", **kwargs).fit(train).score(query)
    want = Exact(damping=5.0).fit(train).score(query).values
    assert _rel(got.values, want) < 1e-7
    assert got.meta["solver"] == "recursion" and got.meta["not_converged"] == {}
    assert all(b["solver"] == "recursion" and b["alpha"] > 0 for b in got.meta["blocks"].values())
