"""What every estimator reads: per-example gradients grouped in named blocks.

A *block* is one parameter group (by default one LoRA A or B matrix). Gradients of ``n`` examples
for a block of ``d`` parameters form an ``(n, d)`` matrix. Estimators only need the block names,
the example ids and a way to load one block at a time, so an on-disk
:class:`~infscope.grads.store.GradientStore` and the in-memory :class:`InMemoryGradients` are
interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from infscope.errors import InfscopeError


@runtime_checkable
class GradientSet(Protocol):
    """Per-example gradients of ``len(ids)`` examples, one ``(n, d_block)`` matrix per block."""

    @property
    def ids(self) -> list[str]: ...

    @property
    def block_names(self) -> list[str]: ...

    def block_dim(self, name: str) -> int: ...

    def load_block(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


class InMemoryGradients:
    """A :class:`GradientSet` held in memory (tests, small models, query gradients)."""

    def __init__(self, ids: Sequence[str], blocks: Mapping[str, torch.Tensor]) -> None:
        self._ids = [str(i) for i in ids]
        self._blocks = {name: tensor.detach() for name, tensor in blocks.items()}
        if not self._blocks:
            raise InfscopeError("no gradient blocks given; select at least one layer")
        for name, tensor in self._blocks.items():
            if tensor.ndim != 2 or tensor.shape[0] != len(self._ids):
                raise ValueError(
                    f"block {name!r} has shape {tuple(tensor.shape)}, expected ({len(self._ids)}, d)"
                )

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def block_names(self) -> list[str]:
        return list(self._blocks)

    def block_dim(self, name: str) -> int:
        return int(self._blocks[name].shape[1])

    def load_block(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._blocks[name].to(dtype)

    def __len__(self) -> int:
        return len(self._ids)

    def mean(self) -> InMemoryGradients:
        """One pseudo-example holding the average gradient (the DataInf validation vector)."""
        return InMemoryGradients(["mean"], {n: t.mean(dim=0, keepdim=True) for n, t in self._blocks.items()})

    def subset(self, rows: Sequence[int]) -> InMemoryGradients:
        """The gradients of the given row positions."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return InMemoryGradients(
            [self._ids[i] for i in index.tolist()],
            {n: t.index_select(0, index) for n, t in self._blocks.items()},
        )


def iter_blocks(grads: GradientSet, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, (n, d) tensor)`` for each block, loading one block at a time."""
    for name in grads.block_names:
        yield name, grads.load_block(name, dtype)


def to_memory(grads: GradientSet, dtype: torch.dtype = torch.float32) -> InMemoryGradients:
    """Load every block of ``grads`` into an :class:`InMemoryGradients`."""
    return InMemoryGradients(grads.ids, dict(iter_blocks(grads, dtype)))
