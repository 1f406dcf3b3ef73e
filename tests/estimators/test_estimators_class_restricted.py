"""Class-restricted influence against a direct per-row computation, and its fallback for classes without queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.estimators.class_restricted import class_restricted
from infscope.estimators.inputs import GradientInputs
from infscope.estimators.registry import get_method
from infscope.grads.base import InMemoryGradients


class _Inputs(GradientInputs):
    def __init__(self, train, query, train_rows, query_rows):
        super().__init__(train, query)
        self._rows, self._query_rows = train_rows, query_rows

    def rows(self):
        return self._rows

    def query_rows(self):
        return self._query_rows


def _case(seed=0, n=12, q=6, dims=(5, 3)):
    gen = torch.Generator().manual_seed(seed)
    train = InMemoryGradients(
        [f"t{i}" for i in range(n)],
        {f"b{k}": torch.randn(n, d, generator=gen, dtype=torch.float64) for k, d in enumerate(dims)},
    )
    query = InMemoryGradients(
        [f"q{i}" for i in range(q)],
        {f"b{k}": torch.randn(q, d, generator=gen, dtype=torch.float64) for k, d in enumerate(dims)},
    )
    train_rows = [{"id": f"t{i}", "label": i % 3} for i in range(n)]
    query_rows = [{"id": f"q{i}", "label": i % 2} for i in range(q)]  # class 2 has no query rows
    return train, query, train_rows, query_rows


def test_class_hessian_free_is_the_dot_product_with_the_own_class_query_mean():
    train, query, train_rows, query_rows = _case()
    scores = get_method("class_hessian_free").compute(_Inputs(train, query, train_rows, query_rows), {})
    G = torch.cat([train.load_block(b, torch.float64) for b in train.block_names], dim=1).numpy()
    V = torch.cat([query.load_block(b, torch.float64) for b in query.block_names], dim=1).numpy()
    q_class = np.array([r["label"] for r in query_rows])
    expected = []
    for i, row in enumerate(train_rows):
        mine = q_class == row["label"]
        v = V[mine].mean(axis=0) if mine.any() else V.mean(axis=0)
        expected.append(-G[i] @ v)
    np.testing.assert_allclose(scores.values, expected, rtol=1e-6)  # hessian_free computes in float32
    assert scores.meta["fallback_rows"] == 4  # the four rows of class 2


def test_class_restricted_matrix_mean_and_errors():
    matrix = np.arange(12, dtype=float).reshape(3, 4)
    values, fallback = class_restricted(
        matrix, np.array(["a", "b", "a", "c"], dtype=object), np.array(["a", "b", "a"], dtype=object)
    )
    np.testing.assert_allclose(values, [4.0, 5.0, 6.0, matrix[:, 3].mean()])
    assert fallback == 1
    train, query, train_rows, _ = _case()
    with pytest.raises(InfscopeError, match="needs a class"):
        get_method("class_datainf").compute(_Inputs(train, query, train_rows, [{"id": "q0"}] * 6), {})
