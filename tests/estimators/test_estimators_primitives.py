"""Primitives against independent float64 references (explicit inverses, plain loops, eigvalsh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscope.estimators.primitives import (
    datainf_apply,
    datainf_damping,
    datainf_self,
    dense_solve,
    lissa_solve,
    top_eigenvalue,
    woodbury_solve,
)


def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def test_datainf_damping_is_scaled_mean_squared_norm_per_dim() -> None:
    G = _rand((7, 5), 0)
    expected = 0.1 * sum(float(G[i] @ G[i]) for i in range(7)) / 7 / 5
    assert datainf_damping(G) == pytest.approx(expected, rel=1e-12)
    assert datainf_damping(G, scale=0.5) == pytest.approx(5 * expected, rel=1e-12)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_datainf_apply_equals_average_of_rank_one_inverses(chunk: int) -> None:
    G, V, lam = _rand((11, 6), 1), _rand((3, 6), 2), 0.37
    g, d = G.numpy(), 6
    approx_inverse = sum(np.linalg.inv(np.outer(gi, gi) + lam * np.eye(d)) for gi in g) / len(g)
    got = datainf_apply(G, V, lam, chunk_size=chunk).numpy()
    assert _rel(got, V.numpy() @ approx_inverse) < 1e-12


def test_datainf_self_equals_quadratic_form_of_the_approximation() -> None:
    G, lam = _rand((9, 4), 3), 0.2
    g = G.numpy()
    approx_inverse = sum(np.linalg.inv(np.outer(gi, gi) + lam * np.eye(4)) for gi in g) / len(g)
    expected = np.array([gi @ approx_inverse @ gi for gi in g])
    assert _rel(datainf_self(G, lam, chunk_size=4).numpy(), expected) < 1e-12


@pytest.mark.parametrize(("n", "d"), [(40, 6), (8, 30)])
def test_woodbury_solve_equals_dense_solve(n: int, d: int) -> None:
    G, V, lam = _rand((n, d), 4), _rand((3, d), 5), 0.05
    g = G.numpy()
    H = g.T @ g / n
    expected = np.linalg.solve(H + lam * np.eye(d), V.numpy().T).T
    got = woodbury_solve(G.float(), V.float(), lam)
    assert got.dtype == torch.float64
    assert _rel(got.numpy(), np.linalg.solve(H + lam * np.eye(d), V.float().double().numpy().T).T) < 1e-6
    assert _rel(woodbury_solve(G, V, lam).numpy(), expected) < 1e-10


def test_woodbury_refuses_zero_damping_when_singular() -> None:
    with pytest.raises(ValueError, match="positive damping"):
        woodbury_solve(_rand((3, 10), 6), _rand((1, 10), 7), 0.0)


def test_dense_solve_matches_numpy() -> None:
    A = _rand((5, 5), 8)
    H = A @ A.T
    V = _rand((2, 5), 9)
    expected = np.linalg.solve(H.numpy() + 0.3 * np.eye(5), V.numpy().T).T
    assert _rel(dense_solve(H, V, 0.3).numpy(), expected) < 1e-12


def test_top_eigenvalue_matches_eigvalsh() -> None:
    G = _rand((50, 8), 10)
    G[:, 0] *= 4  # a clear top direction
    expected = np.linalg.eigvalsh(G.numpy().T @ G.numpy() / 50)[-1]
    assert top_eigenvalue(G, iters=50) == pytest.approx(expected, rel=1e-6)


def _exact(G: torch.Tensor, V: torch.Tensor, lam: float) -> np.ndarray:
    g = G.numpy()
    return np.linalg.solve(g.T @ g / len(g) + lam * np.eye(g.shape[1]), V.numpy().T).T


def _wrong_flipped_damping(
    G: torch.Tensor, V: torch.Tensor, lam: float, alpha: float, iters: int
) -> torch.Tensor:
    """A common bug: the damping enters with the wrong sign, so the fixed point solves (H - lam I)."""
    n = G.shape[0]
    R = V.clone()
    for _ in range(iters):
        R = V + R - alpha * ((R @ G.T) @ G / n - lam * R)
    return alpha * R


def _matches_exact(solution: np.ndarray, exact: np.ndarray) -> bool:
    return _rel(solution, exact) < 1e-4


@pytest.mark.parametrize(("n", "d"), [(60, 10), (12, 40)])
def test_lissa_converges_to_exact_and_reports_iterations(n: int, d: int) -> None:
    G, V = _rand((n, d), 11), _rand((4, d), 12)
    lam = datainf_damping(G, scale=1.0)
    result = lissa_solve(G, V, lam, tol=1e-8, max_iter=50_000)
    exact = _exact(G, V, lam)
    assert result.converged and 1 < result.iterations < 50_000
    assert result.residual < 1e-8
    assert _matches_exact(result.solution.numpy(), exact)
    # The same check rejects the flipped-damping recursion run with the same step and iterations.
    wrong = _wrong_flipped_damping(G, V, lam, result.alpha, result.iterations)
    assert not _matches_exact(wrong.numpy(), exact)


def test_lissa_halves_an_unsafe_step_and_still_converges() -> None:
    G, V = _rand((30, 6), 13), _rand((2, 6), 14)
    lam = 0.1
    top = float(np.linalg.eigvalsh(G.numpy().T @ G.numpy() / 30)[-1])
    result = lissa_solve(G, V, lam, tol=1e-8, scale=0.3 * (top + lam), max_iter=100_000)
    assert result.alpha_halvings >= 1 and result.converged
    assert _matches_exact(result.solution.numpy(), _exact(G, V, lam))


def test_lissa_stops_at_max_iter_and_says_so() -> None:
    G, V = _rand((30, 6), 15), _rand((2, 6), 16)
    result = lissa_solve(G, V, 1e-4, tol=1e-12, max_iter=5)
    assert result.iterations == 5 and not result.converged and result.residual > 1e-12
