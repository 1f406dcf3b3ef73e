"""The gradient passes and DDP fine-tuning share one copy of the process-group helpers.

:mod:`infscope.grads.distributed` re-exports :mod:`infscope.models.ddp`'s helpers (same objects), and
its backend choice (explicit backend > the model's device > CUDA present) maps onto ddp's device rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.grads import distributed as gd
from infscope.models import ddp

SHARED = (
    "TIMEOUT",
    "barrier",
    "collective_device",
    "is_distributed",
    "is_main",
    "rank",
    "shard_range",
    "world_size",
)


def test_helpers_are_the_ddp_objects():
    for name in SHARED:
        assert getattr(gd, name) is getattr(ddp, name), name


def test_backend_choice(monkeypatch):
    assert gd.pass_device("nccl") == torch.device("cuda")
    assert gd.pass_device("gloo", device="cuda") == torch.device("cpu")  # an explicit backend wins
    assert gd.pass_device(device="cuda:1") == torch.device("cuda", 1)
    assert gd.pass_device(device="cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gd.pass_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gd.pass_device() == torch.device("cpu")
    with pytest.raises(InfscopeError, match="unknown backend 'mpi'"):
        gd.pass_device("mpi")


def test_init_passes_the_chosen_device_to_ddp(monkeypatch):
    seen = []
    monkeypatch.setattr(ddp, "init_from_env", lambda device=None: seen.append(device) or False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gd.init_from_env() is False
    assert gd.init_from_env("nccl") is False
    assert gd.init_from_env(device="cuda:0") is False
    assert seen == [torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 0)]


@pytest.mark.parametrize("size", [None, "1"])
def test_world_of_one_initialises_nothing(monkeypatch, size):
    if size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", size)
    assert gd.init_from_env() is False
    assert not torch.distributed.is_initialized()
    assert (gd.rank(), gd.world_size(), gd.is_main()) == (0, 1, True)
    assert gd.collective_device() == torch.device("cpu")


def test_bad_world_size_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InfscopeError, match="WORLD_SIZE='two'"):
        gd.init_from_env()


def test_shard_batch_slices_are_the_shard_ranges():
    # hand-computed: 7 rows over 3 ranks -> 3, 2, 2 rows; factors world * 1/7
    rows = np.arange(10, 17)
    expected = [(0, 3), (3, 5), (5, 7)]
    for r in range(3):
        assert gd.shard_range(7, r, 3) == expected[r]
        shard = ddp.shard_batch(rows, None, r, 3)
        start, stop = expected[r]
        assert list(shard.rows) == list(rows[start:stop]) and not shard.dummy
        torch.testing.assert_close(shard.factors, torch.full((stop - start,), 3 / 7, dtype=torch.float64))
    with pytest.raises(InfscopeError, match="rank 3 is not in a world of 3"):
        ddp.shard_batch(rows, None, 3, 3)
    with pytest.raises(InfscopeError, match="empty batch"):
        ddp.shard_batch(rows[:0], None, 0, 2)
