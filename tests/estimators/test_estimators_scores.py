"""Scores container, tables and baselines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.estimators import Scores, results_table, write_table
from infscope.estimators.baselines import (
    BASELINES,
    base_loss_scores,
    grad_norm_scores,
    loss_scores,
    random_scores,
)
from infscope.grads.base import InMemoryGradients


def _scores() -> Scores:
    return Scores(np.array([0.5, -2.0, 3.0, 0.0, 1.5]), ["a", "b", "c", "d", "e"], None, "test", {"x": 1})


def test_harmful_helpful_and_ranks() -> None:
    s = _scores()
    assert s.harmful() == ["c", "e", "a", "d", "b"]
    assert s.harmful(2) == ["c", "e"]
    assert s.helpful(2) == ["b", "d"]
    frame = s.to_frame()
    assert list(frame.columns) == ["id", "score", "rank", "is_flagged"]
    assert frame["id"].tolist() == ["a", "b", "c", "d", "e"]
    assert frame["rank"].tolist() == [3, 5, 1, 4, 2]
    assert frame["is_flagged"].tolist() == [False, False, True, False, False]  # 10% of 5 -> 1
    assert s.to_frame(k=2)["is_flagged"].tolist() == [False, False, True, False, True]
    assert s.meta["sign"].startswith("higher = more harmful")


def test_flag_fraction_default_and_ties_keep_order() -> None:
    s = Scores(np.zeros(25), [str(i) for i in range(25)])
    frame = s.to_frame()
    assert int(frame["is_flagged"].sum()) == math.ceil(0.1 * 25)
    assert frame["rank"].tolist() == list(range(1, 26))
    assert int(s.to_frame(fraction=0.2)["is_flagged"].sum()) == 5


def test_nan_scores_rank_last() -> None:
    s = Scores(np.array([np.nan, 1.0, -1.0]), ["x", "y", "z"])
    assert s.harmful() == ["y", "z", "x"] and s.helpful() == ["z", "y", "x"]


def test_matrix_vector_is_mean_over_queries() -> None:
    values = np.array([[1.0, 2.0, 3.0], [3.0, -2.0, 1.0]])
    s = Scores(values, ["a", "b", "c"], ["q1", "q2"], "m")
    assert s.vector().tolist() == [2.0, 0.0, 2.0]
    assert s.harmful() == ["a", "c", "b"]
    with pytest.raises(ValueError, match="query ids"):
        Scores(values, ["a", "b", "c"], None)
    with pytest.raises(ValueError, match="train ids"):
        Scores(values, ["a", "b"], ["q1", "q2"])


@pytest.mark.parametrize("matrix", [False, True])
def test_save_load_round_trip(tmp_path, matrix: bool) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 4)) if matrix else rng.normal(size=4)
    meta = {"damping": {"blk": 0.25}, "np": np.float32(1.5), "list": [1, 2]}
    s = Scores(values, ["α", "b", "c", "d"], ["q0", "q1", "q2"] if matrix else ["q0"], "datainf", meta)
    path = s.save(tmp_path / "out" / "scores")
    assert path.name == "scores.npz" and path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    back = Scores.load(tmp_path / "out" / "scores")
    np.testing.assert_array_equal(back.values, values)
    assert back.train_ids == ["α", "b", "c", "d"] and back.method == "datainf"
    assert back.query_ids == s.query_ids
    assert back.meta["damping"] == {"blk": 0.25} and back.meta["np"] == 1.5


def test_load_bad_file_is_infscope_error(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InfscopeError, match="cannot read scores"):
        Scores.load(bad)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_table_writers_round_trip(tmp_path, suffix: str) -> None:
    s = _scores()
    path = s.write_table(tmp_path / f"t{suffix}", k=2)
    if suffix == ".parquet":
        back = pd.read_parquet(path)
    elif suffix == ".csv":
        back = pd.read_csv(path, dtype={"id": str})
    else:
        back = pd.read_json(path, lines=True, dtype={"id": str})
    pd.testing.assert_frame_equal(back, s.to_frame(k=2), check_dtype=False)
    with pytest.raises(InfscopeError, match="unknown table format"):
        write_table(s.to_frame(), tmp_path / "t.xlsx")


def test_results_table_aligns_ids() -> None:
    a = _scores()
    b = Scores(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), ["e", "d", "c", "b", "a"], None, "other")
    table = results_table([a, b])
    assert table["id"].tolist() == ["a", "b", "c", "d", "e"]
    assert table["score_other"].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert table["rank_other"].tolist() == [1, 2, 3, 4, 5]
    assert table["rank_test"].tolist() == [3, 5, 1, 4, 2]
    with pytest.raises(InfscopeError, match="duplicate"):
        results_table([a, a])


def test_baselines() -> None:
    ids = ["a", "b", "c"]
    loss = loss_scores([0.1, 2.0, 0.5], ids)
    assert loss.method == "loss" and loss.harmful(1) == ["b"]
    assert base_loss_scores(np.array([1.0, 0.0, 3.0]), ids).harmful() == ["c", "a", "b"]
    gen = torch.Generator().manual_seed(0)
    blocks = {"x": torch.randn(3, 4, generator=gen), "y": torch.randn(3, 7, generator=gen)}
    norms = grad_norm_scores(InMemoryGradients(ids, blocks)).values
    full = torch.cat([blocks["x"], blocks["y"]], dim=1).double().numpy()
    np.testing.assert_allclose(norms, np.linalg.norm(full, axis=1), rtol=1e-12)
    r1, r2 = random_scores(ids * 10, seed=1).values, random_scores(ids * 10, seed=2).values
    np.testing.assert_array_equal(r1, random_scores(ids * 10, seed=1).values)
    assert not np.array_equal(r1, r2) and ((r1 >= 0) & (r1 < 1)).all()
    assert set(BASELINES) == {"loss", "base_loss", "grad_norm", "random"}
    with pytest.raises(InfscopeError, match="NaN"):
        loss_scores([0.1, float("nan"), 0.2], ids)
    with pytest.raises(InfscopeError, match="one value per example"):
        loss_scores([0.1, 0.2], ids)
