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

from collections.abc import Callable
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


LISSA_SOLVERS = ("auto", "cg", "recursion")
LISSA_SPACES = ("auto", "gram", "full")


@dataclass
class LissaResult:
    """Solution of ``(H + lam I) x = v`` for every query row, plus how the iteration went.

    ``residual`` is the largest relative residual ``||v - (H + lam I) x|| / ||v||``, recomputed
    from the returned solution in the gradients' own space (not the solver's running estimate).
    ``alpha`` is the recursion's final step (0.0 for conjugate gradients, whose steps vary).
    """

    solution: torch.Tensor
    iterations: int
    residual: float
    alpha: float
    converged: bool
    alpha_halvings: int = 0
    solver: str = "cg"
    space: str = "full"


@dataclass
class _System:
    """One linear system ``A X = rhs`` (rows) in the coordinates a solver iterates in.

    ``inner`` is the row-wise inner product under which ``A`` is self-adjoint and whose norm equals
    the residual norm in gradient space once multiplied by ``norm_factor``.
    """

    apply: Callable[[torch.Tensor], torch.Tensor]
    inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rhs: torch.Tensor
    start: torch.Tensor
    norm_factor: float


def _full_system(G: torch.Tensor, V: torch.Tensor, lam: float) -> _System:
    """``X (H + lam I) = V`` in the ``d``-dim gradient space, started at ``V / lam``.

    ``V / lam`` is already exact on the directions no training gradient spans (there
    ``H + lam I = lam I``), so only the span of ``G`` is left to iterate; with no damping it starts at 0.
    """
    start = V / lam if lam > 0 else torch.zeros_like(V)
    return _System(
        apply=lambda X: fisher_matvec(G, X, lam),
        inner=torch.linalg.vecdot,
        rhs=V,
        start=start,
        norm_factor=1.0,
    )


def _gram_system(G: torch.Tensor, V: torch.Tensor, lam: float) -> _System:
    """The same system reduced to ``n`` dims: ``x = (v - G^T u) / lam`` with ``(K / n + lam I) u = G v / n``.

    ``K = G G^T``. Substituting ``x`` gives ``v - (H + lam I) x = -G^T r / lam`` with
    ``r = G v / n - (K / n + lam I) u``, so the gradient-space residual norm is
    ``sqrt(r^T K r) / lam``: iterating on ``u`` under the ``K`` inner product (in which
    ``K / n + lam I`` is self-adjoint) reproduces, step for step, the ``d``-dim iteration started at
    ``v / lam``, at ``O(n^2)`` instead of ``O(n d)`` per step and query. Needs ``lam > 0``.
    """
    K = (G @ G.T).double()
    n = G.shape[0]
    rhs = (V @ G.T).double() / n
    return _System(
        apply=lambda U: torch.addmm(U, U, K, beta=lam, alpha=1.0 / n),
        inner=lambda A, B: torch.linalg.vecdot(A @ K, B),
        rhs=rhs,
        start=torch.zeros_like(rhs),
        norm_factor=1.0 / lam,
    )


def _power_top(system: _System, dim: int, dtype: torch.dtype, iters: int, seed: int, lam: float) -> float:
    """Power-iteration estimate of ``lambda_max(H)`` (a lower bound) through ``system.apply``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b = torch.randn(1, dim, generator=gen, dtype=torch.float64).to(dtype)
    estimate = 0.0
    for _ in range(iters):
        norm = system.inner(b, b).clamp_min(0).sqrt()
        if float(norm) == 0:
            return 0.0
        b = b / norm
        Hb = system.apply(b) - lam * b
        estimate = float(system.inner(Hb, b))
        b = Hb
    return estimate


def _squared_threshold(system: _System, v_norm: torch.Tensor, tol: float) -> torch.Tensor:
    """Per row, the squared solver-space residual norm at which the relative residual reaches ``tol``."""
    return (tol * v_norm / system.norm_factor).square()


def _conjugate_gradients(
    system: _System, v_norm: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """Conjugate gradients on every row at once (each row has its own step lengths).

    ``H`` has rank at most ``n``, so in exact arithmetic CG ends within ``min(n, d) + 1`` steps; its
    error falls like ``((sqrt(k) - 1) / (sqrt(k) + 1))^t`` (``k`` the condition number) rather than
    the recursion's ``(1 - 1/k)^t``.
    """
    X = system.start.clone()
    R = system.rhs - system.apply(X)
    P = R.clone()
    rr = system.inner(R, R)
    stop = _squared_threshold(system, v_norm, tol)
    tiny = torch.finfo(rr.dtype).tiny
    iterations = 0
    # Few, fused ops per step: with n ~ 100 the step costs more in dispatch than in arithmetic.
    while bool((rr > stop).any()) and iterations < max_iter:
        AP = system.apply(P)
        step = (rr / system.inner(P, AP).clamp_min(tiny)).unsqueeze(1)  # rr = 0 gives a zero step
        X.addcmul_(P, step)
        R.addcmul_(AP, step, value=-1.0)
        rr_next = system.inner(R, R)
        P = torch.addcmul(R, P, (rr_next / rr.clamp_min(tiny)).unsqueeze(1))
        rr = rr_next
        iterations += 1
    return X, iterations


def _recursion(
    system: _System, v_norm: torch.Tensor, tol: float, max_iter: int, alpha: float
) -> tuple[torch.Tensor, int, float, int]:
    """The damped Neumann recursion (Richardson) ``x <- x + alpha (v - (H + lam I) x)``, halving
    ``alpha`` whenever some row's residual grows (the step was too long for the spectrum)."""
    X = system.start.clone()
    R = system.rhs - system.apply(X)
    previous = system.inner(R, R)
    stop = _squared_threshold(system, v_norm, tol)
    halvings = iterations = 0
    while bool((previous > stop).any()) and iterations < max_iter:
        X.add_(R, alpha=alpha)
        R = system.rhs - system.apply(X)
        iterations += 1
        current = system.inner(R, R)
        if bool((current > previous * (1 + 1e-6) ** 2).any()):
            alpha /= 2.0
            halvings += 1
        previous = current
    return X, iterations, alpha, halvings


def lissa_solve(
    G: torch.Tensor,
    V: torch.Tensor,
    lam: float,
    tol: float = 1e-6,
    max_iter: int = 10_000,
    *,
    solver: str = "auto",
    space: str = "auto",
    scale: float | None = None,
    power_iters: int = 20,
    seed: int = 0,
) -> LissaResult:
    """Solve ``(H + lam I) x_j = v_j`` for all query rows at once, iteratively, with ``H = G^T G / n``.

    LiSSA is defined by the damped Neumann recursion ``r <- v + r - alpha (H + lam I) r``,
    ``x = alpha r`` (Richardson iteration ``x <- x + alpha (v - (H + lam I) x)``), whose error
    shrinks by ``1 - alpha lam`` per step at best. With DataInf's damping ``lam`` is about
    ``lambda_max / (10 d)``, so it needs ~``10 d ln(1/tol)`` steps (millions for a 4608-dim block).
    The solvers on the same matrix-vector product:

    * ``solver="cg"``: conjugate gradients (the default; ``"auto"`` picks it unless a recursion
      ``scale`` is given). It converges within about ``rank(H) + 1 <= n + 1`` steps.
    * ``solver="recursion"``: the classic recursion, step ``alpha = 1 / scale``; by default
      ``scale = 1.1 * lambda_max_estimate + lam`` (``power_iters`` power iterations). Should some
      row's residual grow (the estimate was too low), ``alpha`` is halved.

    Both start at ``x = v / lam``, exact on the directions the training gradients do not span, so only
    their span is iterated. ``space="gram"`` iterates in that ``n``-dim span (``O(n^2)`` per step after
    one ``G G^T``, see :func:`_gram_system`), ``"full"`` in the ``d``-dim space (``O(n d)`` per
    step); ``"auto"`` takes ``gram`` when ``n <= d`` and ``lam > 0``. Either way the iterates are the
    same. Stops when the largest relative residual ``||v - (H + lam I) x|| / ||v||`` is below ``tol``
    or after ``max_iter`` steps; the returned residual is recomputed from the solution in ``d`` dims.
    """
    _check(G, V)
    if lam < 0:
        raise ValueError(f"LiSSA needs a non-negative damping, got {lam}")
    if solver not in LISSA_SOLVERS:
        raise ValueError(f"unknown LiSSA solver {solver!r}; use one of {', '.join(LISSA_SOLVERS)}")
    if space not in LISSA_SPACES:
        raise ValueError(f"unknown LiSSA space {space!r}; use one of {', '.join(LISSA_SPACES)}")
    if max_iter < 0:
        raise ValueError(f"LiSSA max_iter must be >= 0, got {max_iter}")
    if solver == "auto":
        solver = "cg" if scale is None else "recursion"
    n, d = G.shape
    if space == "auto":
        space = "gram" if n <= d and lam > 0 else "full"
    if space == "gram" and lam <= 0:
        raise ValueError("the gram space needs a positive damping; use space='full'")
    system = _gram_system(G, V, lam) if space == "gram" else _full_system(G, V, lam)
    v_norm = V.norm(dim=1).double().clamp_min(torch.finfo(torch.float64).tiny)
    alpha, halvings = 0.0, 0
    if solver == "cg":
        X, iterations = _conjugate_gradients(system, v_norm, tol, max_iter)
    else:
        if scale is None:
            dim = n if space == "gram" else d
            scale = 1.1 * _power_top(system, dim, system.rhs.dtype, power_iters, seed, lam) + lam
        if scale <= 0:
            raise ValueError(
                "LiSSA step scale must be positive; the gradients are all zero or the damping is zero"
            )
        X, iterations, alpha, halvings = _recursion(system, v_norm, tol, max_iter, 1.0 / scale)
    solution = (V - (X.to(G.dtype) @ G)) / lam if space == "gram" else X
    solution = solution.to(V.dtype)
    true_rel = (V - fisher_matvec(G, solution, lam)).norm(dim=1).double() / v_norm
    rel = float(true_rel.max()) if V.numel() else 0.0
    return LissaResult(solution, iterations, rel, alpha, rel < tol, halvings, solver, space)
