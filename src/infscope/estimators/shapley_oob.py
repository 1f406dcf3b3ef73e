"""Data-OOB (Kwon & Zou 2023): a row's value is how often the bagged models that never saw it get it right.

Draw ``n_estimators`` bootstrap samples (``round(max_samples * n)`` rows with replacement each), fit a
logistic regression (scikit-learn) on each, and predict every out-of-bag row. The value of row ``i``
is its mean out-of-bag correctness ``1[model_b(x_i) = y_i]`` over the bags ``b`` that left it out.
A mislabelled row disagrees with what the other rows teach, so it gets a low value: VALUES, higher =
more valuable. Bags are drawn from one ``numpy.random.default_rng(seed)`` in order, one
``integers(0, n, size)`` call per bag. A bag that holds one class predicts that class. A row that no
bag left out (vanishingly rare for ``n_estimators >= 50``) gets the mean of the other rows' values,
with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np

from infscope.errors import InfscopeError
from infscope.estimators.shapley_knn import as_matrix


def data_oob(
    train_x: object,
    train_y: object,
    n_estimators: int = 100,
    seed: int = 0,
    *,
    max_samples: float = 1.0,
    c: float = 1.0,
    max_iter: int = 500,
) -> np.ndarray:
    """Data-OOB value of every training row (float64, in [0, 1]); see the module docstring."""
    # scikit-learn is an optional dependency (the "test" extra); imported only when this method runs.
    from sklearn.linear_model import LogisticRegression

    x = as_matrix(train_x, "train_x")
    y = np.asarray(train_y)
    n = len(x)
    if y.shape != (n,):
        raise InfscopeError(f"train_y has shape {y.shape} for {n} rows; pass one label per row")
    if isinstance(n_estimators, bool) or int(n_estimators) != n_estimators or n_estimators < 1:
        raise InfscopeError(f"n_estimators must be a positive integer, got {n_estimators!r}; pass e.g. 100")
    if not 0.0 < max_samples <= 1.0:
        raise InfscopeError(
            f"max_samples must lie in (0, 1], got {max_samples}; pass the bag size as a fraction"
        )
    size = max(1, round(max_samples * n))
    rng = np.random.default_rng(seed)
    correct = np.zeros(n)
    out_of_bag = np.zeros(n)
    for _ in range(int(n_estimators)):
        bag = rng.integers(0, n, size=size)
        left_out = np.bincount(bag, minlength=n) == 0
        if not left_out.any():
            continue
        labels = y[bag]
        if len(np.unique(labels)) < 2:
            predicted = np.full(int(left_out.sum()), labels[0])
        else:
            model = LogisticRegression(C=c, max_iter=max_iter).fit(x[bag], labels)
            predicted = model.predict(x[left_out])
        correct[left_out] += predicted == y[left_out]
        out_of_bag[left_out] += 1
    values = np.divide(correct, out_of_bag, out=np.full(n, np.nan), where=out_of_bag > 0)
    missing = np.isnan(values)
    if missing.all():
        raise InfscopeError("no row was ever out of bag; raise n_estimators or lower max_samples")
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} rows were never out of bag; they get the mean value. Raise n_estimators.",
            stacklevel=2,
        )
        values[missing] = values[~missing].mean()
    return values
