"""Subset utilities for the sampled data values: what a model trained on a subset scores on validation.

A utility is any picklable callable ``utility(subset) -> float`` with an attribute ``n`` (the number of
training rows); ``subset`` is a 1-D array of row indices. :class:`LogisticUtility` is the default
proxy: a logistic regression trained on the subset's embeddings, scored on validation embeddings by
accuracy or negative log loss (both "higher = better").

Why a home-made solver: the samplers call the utility thousands of times on small subsets, where
scikit-learn's per-fit overhead (input checks, scipy L-BFGS) dominates (3-25 ms per fit). The
``"newton"`` solver fits one-vs-rest L2 logistic regressions for all classes at once by damped Newton
steps with batched ``(d+1) x (d+1)`` solves, well under a millisecond for small ``d``; it minimises
exactly scikit-learn's objective ``sum_i logloss_i + ||w||^2 / (2C)`` (intercept not penalised) per
class. For wide embeddings (``d > 64`` by default) ``"auto"`` uses scikit-learn's multinomial
``LogisticRegression`` instead, whose cost grows more gently with ``d``.

Degenerate subsets have no fitted model: the empty subset predicts uniformly (accuracy ``1/K``,
log loss ``log K``), a one-class subset predicts its class, with Laplace-smoothed probabilities
``(count + 1) / (|S| + K)`` for the log loss.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from infscope.errors import InfscopeError
from infscope.estimators.shapley_knn import as_matrix

METRICS = ("accuracy", "neg_log_loss")
SOLVERS = ("auto", "newton", "sklearn")
_NEWTON_MAX_DIM = 64
_PROB_FLOOR = 1e-6


@runtime_checkable
class SubsetUtility(Protocol):
    """What the samplers need: the number of training rows and the utility of any subset of them."""

    n: int

    def __call__(self, subset: np.ndarray) -> float: ...


def _objective(theta: np.ndarray, xa: np.ndarray, targets: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Per-class L2 logistic objective ``sum_i log(1 + e^z) - t z + 0.5 theta' P theta``."""
    z = xa @ theta.T
    return (np.logaddexp(0.0, z) - targets * z).sum(0) + 0.5 * (theta * theta * penalty).sum(1)


def fit_ovr_logistic(
    x: np.ndarray, targets: np.ndarray, c: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """One-vs-rest L2 logistic regressions for all columns of ``targets`` (n x K, 0/1) at once.

    Returns ``theta`` (K x (d+1)): weights then intercept per class. Damped Newton: the step is halved
    for the classes whose objective did not decrease, so every iteration is a descent step.
    """
    n, d = x.shape
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    penalty = np.concatenate([np.full(d, 1.0 / c), [0.0]])
    theta = np.zeros((targets.shape[1], d + 1))
    prior = np.clip(targets.mean(0), 1e-3, 1 - 1e-3)
    theta[:, -1] = np.log(prior / (1 - prior))
    objective = _objective(theta, xa, targets, penalty)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(xa @ theta.T)))
        grad = (p - targets).T @ xa + theta * penalty
        weights = p * (1.0 - p)
        hessian = (weights.T[:, :, None] * xa[None]).transpose(0, 2, 1) @ xa  # K batched X' W X
        hessian += np.diag(penalty + 1e-12)
        step = np.linalg.solve(hessian, grad[..., None])[..., 0]
        scale = np.ones(len(theta))
        for _halving in range(30):
            trial = theta - scale[:, None] * step
            new = _objective(trial, xa, targets, penalty)
            worse = new > objective + 1e-12 * np.abs(objective)
            if not worse.any():
                break
            scale[worse] *= 0.5
        theta, objective = trial, np.minimum(new, objective)
        if float(np.max(np.abs(scale[:, None] * step))) < tol:
            break
    return theta


class LogisticUtility:
    """Proxy utility: a logistic regression fitted on ``train_x[subset]``, scored on the validation set.

    ``metric`` is ``"accuracy"`` or ``"neg_log_loss"``; ``c`` the inverse L2 strength; ``solver``
    ``"newton"`` (one-vs-rest, fast for small ``d``), ``"sklearn"`` (multinomial LogisticRegression)
    or ``"auto"`` (newton up to 64 features). Picklable, so chains can run in worker processes.
    """

    def __init__(
        self,
        train_x: object,
        train_y: object,
        val_x: object,
        val_y: object,
        *,
        metric: str = "accuracy",
        c: float = 1.0,
        solver: str = "auto",
        max_iter: int = 100,
    ) -> None:
        if metric not in METRICS:
            raise InfscopeError(f"unknown utility metric {metric!r}; use one of {', '.join(METRICS)}")
        if solver not in SOLVERS:
            raise InfscopeError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
        if not c > 0:
            raise InfscopeError(f"c (inverse regularisation) must be positive, got {c}; pass e.g. c=1.0")
        train = as_matrix(train_x, "train_x")
        val = as_matrix(val_x, "val_x")
        if train.shape[1] != val.shape[1]:
            raise InfscopeError(
                f"train_x has {train.shape[1]} features but val_x has {val.shape[1]}; embed both the same way"
            )
        labels_train, labels_val = np.asarray(train_y), np.asarray(val_y)
        if labels_train.shape != (len(train),) or labels_val.shape != (len(val),):
            raise InfscopeError("labels must be one per row (1-D train_y and val_y); check their shapes")
        self.classes, codes = np.unique(np.concatenate([labels_train, labels_val]), return_inverse=True)
        self.train_x, self.val_x = train, val
        self.train_y, self.val_y = codes[: len(train)], codes[len(train) :]
        self.n = len(train)
        self.metric, self.c, self.max_iter = metric, float(c), int(max_iter)
        self.solver = (
            solver if solver != "auto" else ("newton" if train.shape[1] <= _NEWTON_MAX_DIM else "sklearn")
        )

    def _score(self, proba: np.ndarray) -> float:
        """Accuracy or negative log loss of class probabilities ``proba`` (n_val x K) on validation."""
        if self.metric == "accuracy":
            return float(np.mean(np.argmax(proba, axis=1) == self.val_y))
        picked = proba[np.arange(len(self.val_y)), self.val_y]
        return float(np.mean(np.log(np.maximum(picked, _PROB_FLOOR))))

    def _degenerate(self, labels: np.ndarray) -> float:
        """Utility of a subset with fewer than two classes (no model can be fitted)."""
        k = len(self.classes)
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        if self.metric == "accuracy":
            if len(labels) == 0:
                return 1.0 / k
            return float(np.mean(self.val_y == labels[0]))
        proba = (counts + 1.0) / (len(labels) + k)
        return float(np.mean(np.log(proba[self.val_y])))

    def _proba(self, x: np.ndarray, labels: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Validation class probabilities (n_val x K) of the proxy fitted on ``(x, labels)``."""
        proba = np.zeros((len(self.val_y), len(self.classes)))
        if self.solver == "newton":
            if len(present) == 2:
                theta = fit_ovr_logistic(
                    x, (labels == present[1])[:, None].astype(np.float64), self.c, self.max_iter
                )
                z = self.val_x @ theta[0, :-1] + theta[0, -1]
                p1 = 1.0 / (1.0 + np.exp(-z))
                proba[:, present[0]], proba[:, present[1]] = 1.0 - p1, p1
                return proba
            targets = (labels[:, None] == present[None, :]).astype(np.float64)
            theta = fit_ovr_logistic(x, targets, self.c, self.max_iter)
            ovr = 1.0 / (1.0 + np.exp(-(self.val_x @ theta[:, :-1].T + theta[:, -1])))
            proba[:, present] = ovr / ovr.sum(1, keepdims=True)
            return proba
        # scikit-learn is an optional dependency (the "test" extra); imported only on this path.
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=self.c, max_iter=max(self.max_iter, 200)).fit(x, labels)
        proba[:, model.classes_] = model.predict_proba(self.val_x)
        return proba

    def __call__(self, subset: np.ndarray) -> float:
        index = np.asarray(subset, dtype=np.intp).reshape(-1)
        labels = self.train_y[index]
        present = np.unique(labels)
        if len(present) < 2:
            return self._degenerate(labels)
        return self._score(self._proba(self.train_x[index], labels, present))
