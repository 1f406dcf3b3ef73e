"""Seeded per-block random projection: reproducible, skipped for small blocks, norm-preserving (JL)."""

from __future__ import annotations

import math

import pytest
import torch

from infscope.errors import InfscopeError
from infscope.grads import BlockProjector, InMemoryGradients, project_blocks, projection_matrix


def test_matrix_depends_only_on_seed_name_and_shape():
    a = projection_matrix(300, 64, seed=7, name="layers.0.q.lora_A")
    assert torch.equal(a, projection_matrix(300, 64, seed=7, name="layers.0.q.lora_A"))
    assert not torch.equal(a, projection_matrix(300, 64, seed=8, name="layers.0.q.lora_A"))
    assert not torch.equal(a, projection_matrix(300, 64, seed=7, name="layers.0.q.lora_B"))
    # Rademacher entries are exactly +-1/sqrt(k), balanced.
    assert set(torch.unique(a * math.sqrt(64)).tolist()) == {-1.0, 1.0}
    assert abs(float(a.sign().mean())) < 0.02
    g = projection_matrix(300, 64, seed=7, name="x", kind="gaussian")
    assert abs(float((g * 8).std()) - 1.0) < 0.02


def test_project_blocks_is_x_times_block_matrix_and_skips_small_blocks():
    gen = torch.Generator().manual_seed(0)
    grads = InMemoryGradients(
        ["a", "b", "c"],
        {"big": torch.randn(3, 500, generator=gen), "small": torch.randn(3, 20, generator=gen)},
    )
    out = project_blocks(grads, dim=32, seed=5)
    assert out.block_dim("big") == 32 and out.block_dim("small") == 20
    expect = grads.load_block("big", torch.float64) @ projection_matrix(500, 32, seed=5, name="big").double()
    assert torch.allclose(out.load_block("big", torch.float64), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.load_block("small"), grads.load_block("small"))
    # Same block alone, in another set and order: same projection.
    alone = project_blocks(
        InMemoryGradients(["a", "b", "c"], {"big": grads.load_block("big")}), dim=32, seed=5
    )
    assert torch.equal(alone.load_block("big"), out.load_block("big"))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_johnson_lindenstrauss_norms_and_inner_products(kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3000, generator=gen, dtype=torch.float64) * torch.linspace(
        0.1, 3, 3000, dtype=torch.float64
    )
    k = 1024
    y = BlockProjector(k, seed=3, kind=kind)("blk", x)
    ratio = y.norm(dim=1) ** 2 / x.norm(dim=1) ** 2
    # Each ratio has std sqrt(2/k) ~ 0.044: 5 sigma bounds for single values, tighter for the mean.
    assert float((ratio - 1).abs().max()) < 0.25
    assert abs(float(ratio.mean()) - 1) < 0.05
    gram_x, gram_y = x @ x.T, y @ y.T
    scale = x.norm(dim=1)[:, None] * x.norm(dim=1)[None, :]
    assert float(((gram_y - gram_x) / scale).abs().max()) < 0.25


def test_cache_and_bad_arguments():
    proj = BlockProjector(16, seed=0, cache_bytes=100 * 16 * 4)
    m1 = proj.matrix("a", 100)
    assert proj.matrix("a", 100) is m1  # cached
    proj.matrix("b", 100)  # evicts "a" (budget holds one matrix)
    assert proj.matrix("a", 100) is not m1 and torch.equal(proj.matrix("a", 100), m1)
    assert proj.info() == {"dim": 16, "seed": 0, "kind": "rademacher"}
    with pytest.raises(InfscopeError, match="kind"):
        BlockProjector(16, kind="sparse")
    with pytest.raises(InfscopeError, match="dim"):
        BlockProjector(0)
