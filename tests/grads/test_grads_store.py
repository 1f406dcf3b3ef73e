"""GradientStore: dtype round trips, shards, resume after interruption, mismatch and disk-space errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_peft_llama, token_rows
from infscope.errors import InfscopeError
from infscope.grads import (
    BlockProjector,
    GradientSet,
    GradientStore,
    block_inventory,
    collect_to_store,
    compute_gradients,
    project_blocks,
)
from infscope.grads import store as store_module
from infscope.grads.losses import default_loss

VOCAB = 40


# Relative rounding error of each format: 0, 2**-11 (float16 after row scaling), 2**-8 (bfloat16).
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 0.0), ("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_round_trip_each_dtype(tmp_path, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    blocks = {
        "a.lora_A": torch.randn(10, 6, generator=gen),
        "a.lora_B": torch.randn(10, 9, generator=gen) * 1e-3,
    }
    blocks["a.lora_A"][3] *= 1e-7  # underflows raw float16
    blocks["a.lora_A"][4] *= 1e6  # overflows raw float16
    ids = [f"id{i}" for i in range(10)]
    store = GradientStore.create(
        tmp_path / "s", ids, {k: v.shape[1] for k, v in blocks.items()}, dtype, {"note": "x"}, shard_rows=4
    )
    assert store.n_shards == 3 and store.missing_shards() == [0, 1, 2]
    for shard in range(3):
        lo, hi = store.shard_range(shard)
        store.write_shard(shard, {k: v[lo:hi] for k, v in blocks.items()}, losses=torch.arange(lo, hi) * 0.5)
    reopened = GradientStore.open(tmp_path / "s")
    assert isinstance(reopened, GradientSet)
    assert reopened.ids == ids and reopened.block_names == list(blocks) and reopened.dtype == dtype
    assert reopened.meta == {"note": "x"}
    for name, original in blocks.items():
        loaded = reopened.load_block(name)
        assert loaded.dtype == torch.float32 and loaded.shape == original.shape
        if dtype != "float16":  # exactly the dtype's own rounding
            assert torch.equal(loaded, original.to(getattr(torch, dtype)).float())
        assert float(((loaded - original).abs() / original.abs().clamp_min(1e-30)).max()) <= tol
    np.testing.assert_array_equal(reopened.losses(), np.arange(10) * 0.5)
    files = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir() if "scale" not in p.name)
    assert files[:3] == ["b0000-s00000.npy", "b0000-s00001.npy", "b0000-s00002.npy"]  # block-contiguous
    assert np.load(tmp_path / "s" / "shards" / "b0001-s00002.npy").shape == (2, 9)


def test_incomplete_store_and_bad_shards_raise(tmp_path):
    store = GradientStore.create(tmp_path / "s", ["a", "b", "c"], {"w": 2}, shard_rows=2)
    store.write_shard(0, {"w": torch.ones(2, 2)})
    with pytest.raises(InfscopeError, match="incomplete"):
        store.load_block("w")
    with pytest.raises(InfscopeError, match="shape"):
        store.write_shard(1, {"w": torch.ones(2, 2)})
    with pytest.raises(InfscopeError, match="blocks do not match"):
        store.write_shard(1, {"v": torch.ones(1, 2)})
    with pytest.raises(InfscopeError, match="no gradient store"):
        GradientStore.open(tmp_path / "missing")


def test_reopen_with_other_ids_or_blocks_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "s"
    GradientStore.create(path, ["a", "b"], {"w": 3}, shard_rows=2).write_shard(0, {"w": torch.ones(2, 3)})
    same = GradientStore.create(path, ["a", "b"], {"w": 3}, shard_rows=2)
    assert same.is_complete  # identical arguments reopen the store (resume)
    with pytest.raises(InfscopeError, match="other ids") as info:
        GradientStore.create(path, ["a", "c"], {"w": 3}, shard_rows=2)
    assert "overwrite" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InfscopeError, match="other blocks"):
        GradientStore.create(path, ["a", "b"], {"w": 4}, shard_rows=2)
    fresh = GradientStore.create(path, ["a", "c"], {"w": 3}, shard_rows=2, overwrite=True)
    assert fresh.missing_shards() == [0]
    assert json.loads((path / "index.json").read_text())["ids"] == ["a", "c"]


def test_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_free_bytes", lambda path: 1000)
    with pytest.raises(InfscopeError, match="GiB"):
        GradientStore.create(tmp_path / "s", [str(i) for i in range(100)], {"w": 10})  # needs 4000 bytes
    assert not (tmp_path / "s" / "index.json").exists()
    GradientStore.create(tmp_path / "t", [str(i) for i in range(10)], {"w": 10}, dtype="float16")  # 200 bytes


def test_collect_matches_compute_and_resumes_identically(tmp_path):
    model = tiny_peft_llama(VOCAB)
    data = token_rows(10, VOCAB, seed=5, cycle=5, prefix="row")
    memory = compute_gradients(model, data, batch_size=2, progress=False)
    full = collect_to_store(model, data, tmp_path / "full", batch_size=2, shard_rows=4, progress=False)
    assert full.ids == memory.ids and full.block_names == memory.block_names
    for name in memory.block_names:
        assert torch.allclose(full.load_block(name), memory.load_block(name), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(full.losses(), memory.losses, rtol=1e-6)
    assert full.meta["fingerprint"] and full.meta["block_by"] == "matrix"
    assert block_inventory(full)[0].params == ((2, 16),)

    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 (two batches) written, shard 1 half done
            raise RuntimeError("simulated crash")
        return default_loss(model, batch)

    with pytest.raises(RuntimeError, match="simulated"):
        collect_to_store(
            model, data, tmp_path / "resumed", batch_size=2, shard_rows=4, loss_fn=crashing, progress=False
        )
    assert GradientStore.open(tmp_path / "resumed").missing_shards() == [1, 2]
    calls["n"] = 100  # no more crashes; count the batches the resumed run computes
    resumed = collect_to_store(
        model, data, tmp_path / "resumed", batch_size=2, shard_rows=4, loss_fn=crashing, progress=False
    )
    assert calls["n"] - 100 == 3  # shard 1 (2 batches) + shard 2 (1 batch); shard 0 skipped
    for name in full.block_names:
        assert torch.equal(resumed.load_block(name), full.load_block(name))
    np.testing.assert_array_equal(resumed.losses(), full.losses())


def test_changed_adapter_is_refused_and_projection_on_the_fly(tmp_path):
    model = tiny_peft_llama(VOCAB)
    data = token_rows(6, VOCAB, seed=5, cycle=5, prefix="row")
    collect_to_store(model, data, tmp_path / "s", batch_size=3, shard_rows=3, progress=False)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
    with torch.no_grad():
        dict(model.named_modules())[name].weight.add_(0.1)
    with pytest.raises(InfscopeError, match="other meta"):
        collect_to_store(model, data, tmp_path / "s", batch_size=3, shard_rows=3, progress=False)
    projector = BlockProjector(20, seed=3)
    projected = collect_to_store(
        model,
        data,
        tmp_path / "s",
        batch_size=3,
        shard_rows=3,
        projection=projector,
        overwrite=True,
        progress=False,
    )
    assert projected.meta["projection"] == {"dim": 20, "seed": 3, "kind": "rademacher"}
    # q A/B and v A are 32-dim (projected to 20); v B is 8 x 2 = 16-dim (kept as is).
    assert [projected.block_dim(b) for b in projected.block_names][:4] == [20, 20, 20, 16]
    expect = project_blocks(compute_gradients(model, data, batch_size=3, progress=False), 20, seed=3)
    for block in projected.block_names:
        assert torch.allclose(projected.load_block(block), expect.load_block(block), rtol=1e-5, atol=1e-7)
