"""Class-detection attribution metric against a plain per-query loop with sklearn's AUC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from infscope.errors import InfscopeError
from infscope.evaluate.attribution import class_detection
from infscope.evaluate.jsonable import to_jsonable


def _problem(seed: int, q: int = 12, n: int = 90, classes: int = 4, ties: bool = False):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, classes, n)
    query = rng.integers(0, classes, q)
    # harmful scores: rows of the query's class are more helpful (lower score) on average
    matrix = rng.normal(size=(q, n)) - 1.0 * (query[:, None] == train[None, :])
    if ties:
        matrix = np.round(matrix)
    return matrix, train, query


def _loop_reference(matrix, train, query):
    aucs, recalls = [], []
    for i in range(matrix.shape[0]):
        helpful = -matrix[i]
        same = train == query[i]
        aucs.append(roc_auc_score(same, helpful))
        s = int(same.sum())
        top = np.argsort(-helpful, kind="stable")[:s]
        recalls.append(same[top].mean())
    return np.array(aucs), np.array(recalls)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_query_loop_without_ties(seed):
    matrix, train, query = _problem(seed)
    got = class_detection(matrix, train, query)
    aucs, recalls = _loop_reference(matrix, train, query)
    np.testing.assert_allclose(got["per_query_auc"], aucs, atol=1e-12)
    np.testing.assert_allclose(got["per_query_recall"], recalls, atol=1e-12)
    assert got["auc"] == pytest.approx(aucs.mean(), abs=1e-12)
    assert got["recall"] == pytest.approx(recalls.mean(), abs=1e-12)
    assert got["auc"] > 0.7 and got["n_undefined"] == 0 and got["undefined"] is None


def test_ties_auc_matches_sklearn_and_recall_shares_cutoff_ties():
    matrix, train, query = _problem(3, ties=True)
    got = class_detection(matrix, train, query)
    aucs, _ = _loop_reference(matrix, train, query)
    np.testing.assert_allclose(got["per_query_auc"], aucs, atol=1e-12)
    for i in range(matrix.shape[0]):  # plain loop for the expected recall under random tie-breaking
        helpful = -matrix[i]
        same = train == query[i]
        s = int(same.sum())
        cut = np.sort(helpful)[::-1][s - 1]
        above, tied = helpful > cut, helpful == cut
        expected = (same[above].sum() + (s - above.sum()) * same[tied].mean()) / s
        assert got["per_query_recall"][i] == pytest.approx(expected, abs=1e-12)


def test_shuffled_training_rows_give_identical_results():
    matrix, train, query = _problem(4, ties=True)
    perm = np.random.default_rng(0).permutation(matrix.shape[1])
    a = class_detection(matrix, train, query)
    b = class_detection(matrix[:, perm], train[perm], query)
    np.testing.assert_allclose(a["per_query_auc"], b["per_query_auc"], atol=1e-15)
    np.testing.assert_allclose(a["per_query_recall"], b["per_query_recall"], atol=1e-15)
    qperm = np.random.default_rng(1).permutation(matrix.shape[0])
    c = class_detection(matrix[qperm], train, query[qperm])
    assert c["auc"] == pytest.approx(a["auc"], abs=1e-12) and c["recall"] == pytest.approx(
        a["recall"], abs=1e-12
    )


def test_sign_convention_helpful_is_negative_score():
    train = np.array(["a", "a", "b", "b"])
    query = np.array(["a"])
    harmful_for_other_class = np.array([[-1.0, -2.0, 3.0, 4.0]])  # class a rows are the most helpful
    got = class_detection(harmful_for_other_class, train, query)
    assert got["auc"] == 1.0 and got["recall"] == 1.0
    flipped = class_detection(-harmful_for_other_class, train, query)
    assert flipped["auc"] == 0.0 and flipped["recall"] == 0.0


def test_query_class_without_training_rows_is_left_out():
    matrix = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    got = class_detection(matrix, np.array([0, 0, 1]), np.array([0, 5]))
    assert np.isnan(got["per_query_auc"][1]) and np.isnan(got["per_query_recall"][1])
    assert got["auc"] == 1.0 and got["recall"] == 1.0
    assert got["n_undefined"] == 1 and "1 of 2" in got["undefined"]
    none_defined = class_detection(matrix, np.array([0, 0, 1]), np.array([7, 8]))
    assert none_defined["auc"] is None and none_defined["recall"] is None
    encoded = to_jsonable(got)
    assert encoded["per_query_auc"] == [1.0, None]


def test_bad_shapes_raise():
    with pytest.raises(InfscopeError, match="matrix"):
        class_detection(np.zeros(3), np.zeros(3), np.zeros(1))
    with pytest.raises(InfscopeError, match="train_classes"):
        class_detection(np.zeros((2, 3)), np.zeros(4), np.zeros(2))
    with pytest.raises(InfscopeError, match="NaN"):
        class_detection(np.full((1, 2), np.nan), np.zeros(2), np.zeros(1))
