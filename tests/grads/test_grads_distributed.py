"""Gradients and scores under ``torchrun --nproc-per-node 2`` (CPU, gloo) equal the one-process run.

A tiny-llama run is made once; one copy is scored in this process (``score_run``), others by two
torchrun processes (store mode and stream mode). Scores, merged gradient stores and losses must
match the one-process values (rtol 1e-5: only the order of summation differs).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import distributed_collect, unscored_tiny_llama_run
from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.grads.distributed import all_reduce_sum, gather_rows, init_from_env, shard_range, world_size
from infscope.grads.sharded import rank_rows, shard_rows_for
from infscope.grads.store import GradientStore
from infscope.runs import RunLayout
from infscope.scoring import open_run, score_run

METHODS = "datainf,hessian_free"


def test_shard_range_covers_rows_in_order_and_balances():
    for n in (0, 1, 5, 24, 25):
        for world in (1, 2, 3, 4):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    assert shard_range(10, 0, 3) == (0, 4) and shard_range(10, 2, 3) == (7, 10)
    with pytest.raises(InfscopeError):
        shard_range(10, 3, 3)


def test_rank_rows_are_whole_shards():
    assert shard_rows_for(24, 2) == 12 and shard_rows_for(10_000, 2) == 256
    assert [rank_rows(25, 10, r, 2) for r in range(2)] == [(0, 20), (20, 25)]
    assert [rank_rows(5, 10, r, 2) for r in range(2)] == [(0, 5), (5, 5)]


def test_world_of_one_helpers_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is False and world_size() == 1
    x = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    assert torch.equal(all_reduce_sum(x), x) and torch.equal(gather_rows(x), x)


def _torchrun(run: str, *args: str) -> subprocess.CompletedProcess:
    done = distributed_collect(Path(run), *args, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = unscored_tiny_llama_run(root / "base")
    copies = {}
    for name in ("one", "two", "stream"):
        copies[name] = root / name
        shutil.copytree(base, copies[name])
    score_run(copies["one"], METHODS)
    return copies


def _scores(run: Path, method: str) -> Scores:
    return Scores.load(RunLayout(run).scores(method))


def test_two_processes_give_the_one_process_scores_stores_and_losses(runs):
    done = _torchrun(str(runs["two"]), "--method", METHODS)
    assert done.stdout.count("rows scored") == 2  # rank 0 prints, rank 1 only computes
    for method in METHODS.split(","):
        one, two = _scores(runs["one"], method), _scores(runs["two"], method)
        assert two.train_ids == one.train_ids
        np.testing.assert_allclose(two.values, one.values, rtol=1e-5, atol=1e-12)
    ckpt = open_run(runs["one"]).best.path
    tag = Path(ckpt).name
    for split in ("train", "val"):
        one = GradientStore.open(RunLayout(runs["one"]).grads(tag, split))
        two = GradientStore.open(RunLayout(runs["two"]).grads(tag, split))
        assert two.is_complete and two.ids == one.ids and two.n_shards == 2
        for block in one.block_names:
            np.testing.assert_allclose(two.load_block(block), one.load_block(block), rtol=1e-5, atol=1e-9)
    parts = list((RunLayout(runs["two"]).grads(tag, "train")).parent.glob("*.rank-*"))
    assert parts == []  # rank parts were merged and removed
    one_loss = pd.read_parquet(RunLayout(runs["one"]).losses(tag))
    two_loss = pd.read_parquet(RunLayout(runs["two"]).losses(tag))
    assert list(two_loss["id"]) == list(one_loss["id"])
    np.testing.assert_allclose(two_loss[["loss", "base_loss"]], one_loss[["loss", "base_loss"]], rtol=1e-5)


def test_two_processes_stream_the_one_process_scores(runs):
    _torchrun(str(runs["stream"]), "--method", METHODS, "--stream")
    for method in METHODS.split(","):
        one, two = _scores(runs["one"], method), _scores(runs["stream"], method)
        assert two.train_ids == one.train_ids and two.meta["processes"] == 2
        np.testing.assert_allclose(two.values, one.values, rtol=1e-5, atol=1e-12)
