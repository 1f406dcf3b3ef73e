"""Pure, batched linear algebra shared by the gradient-based estimators.

Notation for one block: ``G`` is the ``(n, d)`` matrix of per-example training gradients, ``V`` a
``(q, d)`` matrix of query gradients (one row per query), ``H = G^T G / n`` the empirical Fisher /
Gauss-Newton approximation of the Hessian, ``lam`` the damping. Every solver returns
``X = V (H + lam I)^{-1}`` as a ``(q, d)`` matrix: row ``j`` is ``(H + lam I)^{-1} v_j`` (``H`` is
symmetric, so rows of ``X`` are the solutions). Influence scores are then ``-X @ G^T``
(see :mod:`infscope.estimators.base` for the sign).

Functions never loop over examples in Python: row chunks bound memory, and all work is matrix
products. ``datainf_*`` and ``lissa_solve`` compute in the dtype of their inputs; the exact
solvers always compute in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 4096


def _check(G: torch.Tensor, V: torch.Tensor) -> None:
    if G.ndim != 2 or V.ndim != 2 or G.shape[1] != V.shape[1]:
        raise ValueError(
            f"expected G (n, d) and V (q, d) with equal d; got {tuple(G.shape)} and {tuple(V.shape)}"
        )


def squared_norms(G: torch.Tensor) -> torch.Tensor:
    """``||g_i||^2`` for every row (``vector_norm`` needs no ``(n, d)`` temporary)."""
    return torch.linalg.vector_norm(G, dim=1).square()


def datainf_damping(G: torch.Tensor, scale: float = 0.1) -> float:
    """DataInf's per-block damping ``scale * mean_i ||g_i||^2 / d`` (0.1 in the paper)."""
    n, d = G.shape
    if n == 0 or d == 0:
        raise ValueError("cannot choose a damping for an empty gradient block")
    return float(scale * squared_norms(G).double().mean() / d)


def datainf_apply(
    G: torch.Tensor,
    V: torch.Tensor,
    lam: float,
    *,
    sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """DataInf's closed-form approximation of ``V (H + lam I)^{-1}`` (Kwon et al. 2023, eq. 5 / Alg. 1).

    The inverse of the average of rank-one terms is replaced by the average of their inverses:
    ``(H + lam I)^{-1} ~ (1/n) sum_i (g_i g_i^T + lam I)^{-1}`` and, by Sherman-Morrison,
    ``(g g^T + lam I)^{-1} v = (1/lam) (v - (v.g) / (lam + ||g||^2) g)``. Summed over ``i``:
    ``(1/lam) (v - (1/n) sum_i w_i g_i)`` with ``w_i = (v.g_i) / (lam + ||g_i||^2)``, i.e.
    ``(1/lam) (V - (W @ G) / n)`` with ``W = (V G^T) / (lam + ||g||^2)``, streamed over row chunks.
    ``sq_norms`` (``||g_i||^2``, e.g. cached at fit time) saves one pass over ``G``.
    """
    _check(G, V)
    if lam <= 0:
        raise ValueError(f"DataInf needs a positive damping, got {lam}")
    n = G.shape[0]
    denom = lam + (squared_norms(G) if sq_norms is None else sq_norms.to(G.dtype))
    U = torch.zeros_like(V)
    for start in range(0, n, chunk_size):
        Gc = G[start : start + chunk_size]
        U += ((V @ Gc.T) / denom[start : start + chunk_size]) @ Gc
    return (V - U / n) / lam


def datainf_self(G: torch.Tensor, lam: float, *, chunk_size: int = 1024) -> torch.Tensor:
    """``g_z^T A g_z`` for every row, ``A`` DataInf's inverse approximation (see :func:`datainf_apply`).

    ``= (1/lam) (||g_z||^2 - (1/n) sum_i (g_z.g_i)^2 / (lam + ||g_i||^2))``, streamed over rows of z.
    """
    if lam <= 0:
        raise ValueError(f"DataInf needs a positive damping, got {lam}")
    n = G.shape[0]
    denom = lam + squared_norms(G)
    out = torch.empty(n, dtype=G.dtype, device=G.device)
    for start in range(0, n, chunk_size):
        Gc = G[start : start + chunk_size]
        K = Gc @ G.T
        out[start : start + chunk_size] = squared_norms(Gc) - (K * K / denom).sum(dim=1) / n
    return out / lam


def _cholesky(M: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite; increase the damping")
    return L


def woodbury_solve(G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact ``V (H + lam I)^{-1}`` in float64, ``H = G^T G / n``, for any block shape.

    With ``d > n`` it uses Woodbury's identity
    ``(lam I + G^T G / n)^{-1} = (1/lam) [I - G^T (n lam I + G G^T)^{-1} G]`` and a Cholesky solve
    of the ``n x n`` system; with ``d <= n`` it solves the ``d x d`` system directly (same value,
    smaller matrix). No eigendecomposition.
    """
    _check(G, V)
    G64, V64 = G.double(), V.double()
    n, d = G64.shape
    if d <= n:
        A = G64.T @ G64 / n
        A.diagonal().add_(lam)
        return torch.cholesky_solve(V64.T, _cholesky(A, "H + lam I")).T
    if lam <= 0:
        raise ValueError(
            f"a block with more dimensions ({d}) than rows ({n}) needs a positive damping, got {lam}"
        )
    M = G64 @ G64.T
    M.diagonal().add_(n * lam)
    inner = torch.cholesky_solve(G64 @ V64.T, _cholesky(M, "n lam I + G G^T"))
    return (V64 - (G64.T @ inner).T) / lam


def dense_solve(H: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """``V (H + lam I)^{-1}`` in float64 for a given symmetric ``(d, d)`` matrix ``H`` (Cholesky)."""
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] != V.shape[1]:
        raise ValueError(f"expected H ({V.shape[1]}, {V.shape[1]}), got {tuple(H.shape)}")
    A = H.double().clone()
    A.diagonal().add_(lam)
    return torch.cholesky_solve(V.double().T, _cholesky(A, "H + lam I")).T


def fisher_matvec(G: torch.Tensor, X: torch.Tensor, lam: float) -> torch.Tensor:
    """Rows of ``X (H + lam I)`` with ``H = G^T G / n``, without forming ``H``."""
    return (X @ G.T) @ G / G.shape[0] + lam * X


def top_eigenvalue(G: torch.Tensor, *, iters: int = 20, seed: int = 0) -> float:
    """Estimate the largest eigenvalue of ``H = G^T G / n`` by power iteration (a lower bound)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b = torch.randn(1, G.shape[1], generator=gen, dtype=G.dtype).to(G.device)
    estimate = 0.0
    for _ in range(iters):
        norm = b.norm()
        if norm == 0:
            return 0.0
        b = b / norm
        Hb = fisher_matvec(G, b, 0.0)
        estimate = float((Hb * b).sum())
        b = Hb
    return estimate


@dataclass
class LissaResult:
    """Solution of ``(H + lam I) x = v`` for every query row, plus how the iteration went."""

    solution: torch.Tensor
    iterations: int
    residual: float
    alpha: float
    converged: bool
    alpha_halvings: int = 0


def lissa_solve(
    G: torch.Tensor,
    V: torch.Tensor,
    lam: float,
    tol: float = 1e-6,
    max_iter: int = 10_000,
    *,
    scale: float | None = None,
    power_iters: int = 20,
    seed: int = 0,
) -> LissaResult:
    """Solve ``(H + lam I) x_j = v_j`` for all query rows at once by the damped LiSSA recursion.

    The recursion ``r <- v + r - alpha (H + lam I) r`` with ``x = alpha r`` is Richardson iteration
    ``x <- x + alpha (v - (H + lam I) x)``: its error shrinks by ``(I - alpha (H + lam I))`` per
    step, which contracts iff ``0 < alpha < 2 / (lambda_max(H) + lam)``. ``alpha = 1 / scale``;
    by default ``scale = 1.1 * lambda_max_estimate + lam`` from a few power iterations. Should the
    residual of some query grow (the estimate was too low), ``alpha`` is halved and the iteration
    continues. Stops when the largest relative residual ``||v - (H + lam I) x|| / ||v||`` < ``tol``.
    """
    _check(G, V)
    if lam < 0:
        raise ValueError(f"LiSSA needs a non-negative damping, got {lam}")
    if scale is None:
        scale = 1.1 * top_eigenvalue(G, iters=power_iters, seed=seed) + lam
    if scale <= 0:
        raise ValueError(
            "LiSSA step scale must be positive; the gradients are all zero or the damping is zero"
        )
    alpha = 1.0 / scale
    v_norm = V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
    X = torch.zeros_like(V)
    R = V.clone()
    previous = R.norm(dim=1)
    rel = float((previous / v_norm).max()) if V.numel() else 0.0
    halvings = 0
    iterations = 0
    while rel >= tol and iterations < max_iter:
        X = X + alpha * R
        R = V - fisher_matvec(G, X, lam)
        iterations += 1
        current = R.norm(dim=1)
        if bool((current > previous * (1 + 1e-6)).any()):
            alpha /= 2.0
            halvings += 1
        previous = current
        rel = float((current / v_norm).max())
    return LissaResult(X, iterations, rel, alpha, rel < tol, halvings)
