"""Seeded random projection of gradients, one block at a time.

Each block of dimension ``d > k`` is multiplied by its own ``(d, k)`` matrix with i.i.d. entries
``N(0, 1) / sqrt(k)`` (``kind="gaussian"``) or ``+-1 / sqrt(k)`` (``kind="rademacher"``), so squared
norms and inner products are preserved in expectation (Johnson-Lindenstrauss). Blocks with
``d <= k`` are kept as they are: projecting them would only add noise.

The matrix of a block is drawn from a ``torch.Generator`` seeded by ``(seed, block name)``: the
same block gets the same matrix in every process, in any order, and matrices are created per
block (never for all blocks at once). It is always drawn in float32 on the CPU, then cast, so the
projection does not depend on the gradient dtype. :class:`BlockProjector` keeps recently used
matrices up to a memory budget, because drawing them dominates the cost when projecting on the fly.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.grads.base import GradientSet, InMemoryGradients

KINDS = ("rademacher", "gaussian")


def block_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from the user seed and the block name."""
    digest = hashlib.sha256(f"infscope-projection:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_matrix(d: int, k: int, *, seed: int, name: str, kind: str = "rademacher") -> torch.Tensor:
    """The ``(d, k)`` float32 projection matrix of block ``name`` (same arguments, same matrix)."""
    if kind not in KINDS:
        raise InfscopeError(f"unknown projection kind {kind!r}; use one of {', '.join(KINDS)}")
    if k < 1:
        raise InfscopeError(f"projection dim must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(block_seed(seed, name))
    if kind == "gaussian":
        mat = torch.randn(d, k, generator=gen)
    else:
        mat = torch.randint(0, 2, (d, k), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return mat.mul_(1.0 / math.sqrt(k))


class BlockProjector:
    """Projects ``(b, d)`` gradient blocks to ``dim`` columns; callable as ``projector(name, x)``."""

    def __init__(
        self, dim: int, seed: int = 0, kind: str = "rademacher", cache_bytes: int = 512 * 2**20
    ) -> None:
        if dim < 1:
            raise InfscopeError(f"projection dim must be >= 1, got {dim}")
        if kind not in KINDS:
            raise InfscopeError(f"unknown projection kind {kind!r}; use one of {', '.join(KINDS)}")
        self.dim, self.seed, self.kind, self.cache_bytes = int(dim), int(seed), kind, int(cache_bytes)
        self._cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._cached = 0

    def out_dim(self, d: int) -> int:
        """Dimension of a block of ``d`` columns after projection."""
        return d if d <= self.dim else self.dim

    def out_dims(self, dims: Mapping[str, int]) -> dict[str, int]:
        """Block dimensions after projection."""
        return {name: self.out_dim(d) for name, d in dims.items()}

    def matrix(self, name: str, d: int) -> torch.Tensor:
        """The block's matrix, from the cache when it fits the memory budget."""
        key = (name, d)
        mat = self._cache.get(key)
        if mat is not None:
            self._cache.move_to_end(key)
            return mat
        mat = projection_matrix(d, self.dim, seed=self.seed, name=name, kind=self.kind)
        size = mat.numel() * mat.element_size()
        if size <= self.cache_bytes:
            while self._cached + size > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.numel() * old.element_size()
            self._cache[key] = mat
            self._cached += size
        return mat

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d = int(x.shape[1])
        if d <= self.dim:
            return x
        return x @ self.matrix(name, d).to(device=x.device, dtype=x.dtype)

    def info(self) -> dict[str, Any]:
        """What to record with projected gradients so that queries are projected the same way."""
        return {"dim": self.dim, "seed": self.seed, "kind": self.kind}


def project_blocks(
    grads: GradientSet, dim: int, seed: int, *, kind: str = "rademacher", dtype: torch.dtype = torch.float32
) -> InMemoryGradients:
    """Project every block of ``grads`` with :class:`BlockProjector`, loading one block at a time.

    Extra attributes of an :class:`~infscope.grads.hooks.ExampleGradients` (losses, parameter
    shapes) are kept, and ``meta["projection"]`` records the settings.
    """
    projector = BlockProjector(dim, seed, kind, cache_bytes=0)
    blocks = {name: projector(name, grads.load_block(name, dtype)) for name in grads.block_names}
    losses = getattr(grads, "losses", None)
    if losses is None:
        return InMemoryGradients(grads.ids, blocks)
    from infscope.grads.hooks import ExampleGradients

    meta = {**getattr(grads, "meta", {}), "projection": projector.info()}
    return ExampleGradients(grads.ids, blocks, losses, getattr(grads, "param_shapes", {}), meta)
