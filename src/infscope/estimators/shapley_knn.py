"""Exact KNN-Shapley (Jia et al. 2019): the Shapley value of every training row for a K-nearest-neighbour
classifier, in closed form, vectorised over validation points.

Utility (one validation point ``(x, y)``): with the training rows of a subset ``S`` sorted by distance
to ``x``, ``U(S) = (1/K) * sum_{j <= min(K, |S|)} 1[y_{(j)} = y]`` and ``U(empty) = 0``; the utility of
a validation set is the mean over its points, and so is the Shapley value (Shapley is linear in U).

Closed form: sort all ``N`` training rows by distance, nearest first (``a_1 .. a_N``), write
``m_i = 1[y_{a_i} = y]``; then ``s_{a_N} = m_N / N`` and, for ``i < N``,

    s_{a_i} = s_{a_{i+1}} + (m_i - m_{i+1}) / K * min(K, i) / i.

Unrolled and summed by parts (:func:`sorted_coefficients`) this is one cumulative sum per validation
point. All validation points of a chunk are sorted at once (one ``argsort``), the recursion runs as
array-wide cumulative sums, and the values are scattered back to training rows with one weighted
``bincount``; the only Python loop is over chunks of validation rows.

Values are VALUES: higher = more valuable (use :func:`infscope.estimators.shapley.as_harm` for the
"higher = more harmful" convention). Exact ties in distance (duplicate rows) are broken
deterministically, but not by row order.
"""

from __future__ import annotations

import numpy as np

from infscope.errors import InfscopeError

_MAX_CHUNK_CELLS = 2_000_000  # validation rows per chunk are chosen so chunk * n_train stays below this


def as_matrix(values: object, name: str) -> np.ndarray:
    """A finite 2-D float64 array from a numpy array, CPU tensor or nested list; anything else is refused."""
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InfscopeError(f"{name} must be a numeric matrix (rows x features); convert it first") from None
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InfscopeError(
            f"{name} must be a non-empty 2-D matrix (rows x features), got shape {matrix.shape}"
        )
    if not bool(np.isfinite(matrix).all()):
        raise InfscopeError(f"{name} holds NaN or infinite values; drop or impute those rows first")
    return matrix


def encode_labels(train_y: object, val_y: object, n_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation labels as shared integer codes (any hashable label type works)."""
    train = np.asarray(train_y)
    val = np.asarray(val_y)
    if train.shape != (n_train,) or val.shape != (n_val,):
        raise InfscopeError(
            f"labels must be one per row: train_y has shape {train.shape} for {n_train} rows and val_y "
            f"shape {val.shape} for {n_val} rows; pass 1-D label vectors"
        )
    classes, codes = np.unique(np.concatenate([train, val]), return_inverse=True)
    del classes
    return codes[:n_train].astype(np.int64), codes[n_train:].astype(np.int64)


def squared_distances(query: np.ndarray, train: np.ndarray, train_sq: np.ndarray) -> np.ndarray:
    """``||q - t||^2`` for every query/train pair by one matrix product (float64, clamped at 0)."""
    dist = query @ train.T
    dist *= -2.0
    dist += (query * query).sum(1)[:, None]
    dist += train_sq[None, :]
    return np.maximum(dist, 0.0, out=dist)


def sorted_coefficients(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``c_i = min(K, i) / (K i)`` for ranks ``i = 1..N`` (with ``c_N = 1/N``) and ``e_i = c_i - c_{i-1}``.

    Summation by parts turns the recursion into ``s_i = m_i c_i + sum_{j > i} m_j e_j``, one cumulative
    sum of ``m * e`` per validation point (``e_1`` is unused and set to 0).
    """
    rank = np.arange(1, n + 1, dtype=np.float64)
    coef = np.minimum(rank, k) / (k * rank)
    coef[-1] = 1.0 / n
    step = np.zeros(n)
    step[1:] = coef[1:] - coef[:-1]
    return coef, step


def knn_shapley_sorted(matches: np.ndarray, k: int) -> np.ndarray:
    """Per-validation-point Shapley values in sorted order, from ``matches[v, i] = 1[y_{a_i} = y_v]``.

    ``matches`` is ``(n_val, N)`` (bool or 0/1) with columns ordered nearest first; returns float64 of
    the same shape: ``s_i = m_i c_i + sum_{j > i} m_j e_j`` (see :func:`sorted_coefficients`).
    """
    coef, step = sorted_coefficients(matches.shape[1], k)
    suffix = np.cumsum(matches * step, axis=1)
    suffix -= suffix[:, -1:]  # now -sum_{j > i} m_j e_j
    return matches * coef - suffix


def knn_shapley(
    train_x: object,
    train_y: object,
    val_x: object,
    val_y: object,
    k: int = 10,
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Exact KNN-Shapley value of each training row, averaged over the validation points.

    ``train_x`` (N x d) and ``val_x`` (M x d) are embeddings (Euclidean distance), labels any hashable
    type. ``chunk_size`` bounds how many validation rows are sorted at once (memory ~ chunk * N * 16 B);
    by default it keeps that product under 2 million. Returns a float64 vector of length N; the values
    sum to the mean validation utility ``U(all rows)``, as Shapley values must.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InfscopeError(f"k must be a positive integer, got {k!r}; pass e.g. k=10")
    train = as_matrix(train_x, "train_x")
    val = as_matrix(val_x, "val_x")
    if train.shape[1] != val.shape[1]:
        raise InfscopeError(
            f"train_x has {train.shape[1]} features but val_x has {val.shape[1]}; embed both with the same model"
        )
    n_train, n_val = train.shape[0], val.shape[0]
    train_codes, val_codes = encode_labels(train_y, val_y, n_train, n_val)
    if chunk_size is None:
        chunk_size = max(1, _MAX_CHUNK_CELLS // n_train)
    elif chunk_size < 1:
        raise InfscopeError(
            f"chunk_size must be at least 1, got {chunk_size}; leave it unset for the default"
        )

    train_np, val_np = train, val
    train_sq = (train_np * train_np).sum(1)
    totals = np.zeros(n_train)
    for start in range(0, n_val, chunk_size):
        query = val_np[start : start + chunk_size]
        # quicksort: 2-3x faster than a stable sort on 10^7 floats; exact distance ties are broken
        # deterministically but not by row order (only exact duplicates of a point can tie)
        order = np.argsort(squared_distances(query, train_np, train_sq), axis=1)
        matches = train_codes[order] == val_codes[start : start + chunk_size, None]
        totals += np.bincount(
            order.ravel(), weights=knn_shapley_sorted(matches, int(k)).ravel(), minlength=n_train
        )
    return totals / n_val
