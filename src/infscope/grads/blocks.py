"""How per-module gradients are grouped into named blocks, and the block inventory.

A hooked ``nn.Linear`` gives one flat gradient per example: ``vec(W)`` (row-major, the layout of
``weight.flatten()``) followed by the bias if the layer has one. A *block* is the unit estimators
work on. ``block_by`` chooses the grouping:

- ``"matrix"``: one block per hooked module (one LoRA A or B matrix), named by the module name;
- ``"module"``: the A and B matrices of one adapted module concatenated (``...q_proj``);
- ``"layer"``: every hooked module of one transformer layer concatenated (``...layers.0``).

Modules that match no LoRA or layer pattern (a classifier head, a plain linear model) stay
blocks of their own. Blocks keep the order in which the model registers its modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from infscope.errors import InfscopeError

BLOCK_BY = ("matrix", "module", "layer")
_LORA_SUFFIX = re.compile(r"\.lora_[AB]\.[^.]+$")
_LAYER_PREFIX = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)(?:\.|$)")


def block_key(module_name: str, block_by: str) -> str:
    """Name of the block that the gradient of ``module_name`` belongs to under ``block_by``."""
    if block_by == "matrix":
        return module_name
    if block_by == "module":
        return _LORA_SUFFIX.sub("", module_name)
    if block_by == "layer":
        match = _LAYER_PREFIX.match(module_name)
        return match.group(1) if match else _LORA_SUFFIX.sub("", module_name)
    raise InfscopeError(f"unknown block_by {block_by!r}; use one of {', '.join(BLOCK_BY)}")


@dataclass(frozen=True)
class BlockLayout:
    """Which module gradients (in order) make up each block, and each block's dimension."""

    members: dict[str, list[str]]
    module_dims: dict[str, int]

    @classmethod
    def build(cls, module_dims: Mapping[str, int], block_by: str = "matrix") -> BlockLayout:
        """Group modules (in the given order) into blocks by :func:`block_key`."""
        members: dict[str, list[str]] = {}
        for name in module_dims:
            members.setdefault(block_key(name, block_by), []).append(name)
        return cls(members=members, module_dims=dict(module_dims))

    @property
    def dims(self) -> dict[str, int]:
        """Block name -> number of parameters in the block."""
        return {b: sum(self.module_dims[m] for m in mods) for b, mods in self.members.items()}

    def assemble(self, per_module: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Concatenate ``(b, d_module)`` gradients into ``(b, d_block)`` blocks."""
        out = {}
        for block, mods in self.members.items():
            parts = [per_module[m] for m in mods]
            out[block] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out


@dataclass(frozen=True)
class BlockInfo:
    """One row of the block inventory: the block, its ``(n, d)`` shape and its parameter shapes."""

    name: str
    shape: tuple[int, int]
    dim: int
    params: tuple[tuple[int, ...], ...] = ()


def block_inventory(grads: object) -> list[BlockInfo]:
    """Inventory of a :class:`~infscope.grads.base.GradientSet`: name, ``(n, d)`` and parameter shapes.

    Parameter shapes are known when the set came from :func:`~infscope.grads.hooks.compute_gradients`
    or a :class:`~infscope.grads.store.GradientStore` (attribute ``param_shapes``); else empty.
    """
    n = len(grads.ids)  # type: ignore[attr-defined]
    shapes: Mapping[str, Sequence[Sequence[int]]] = getattr(grads, "param_shapes", None) or {}
    return [
        BlockInfo(
            name=name,
            shape=(n, grads.block_dim(name)),  # type: ignore[attr-defined]
            dim=grads.block_dim(name),  # type: ignore[attr-defined]
            params=tuple(tuple(int(s) for s in shape) for shape in shapes.get(name, ())),
        )
        for name in grads.block_names  # type: ignore[attr-defined]
    ]


def format_inventory(rows: Sequence[BlockInfo]) -> str:
    """Plain-text table of an inventory, with a total line (for logs and the CLI)."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'block':<{width}}  {'rows':>7}  {'dim':>9}  params"]
    for r in rows:
        params = " + ".join("x".join(map(str, p)) for p in r.params)
        lines.append(f"{r.name:<{width}}  {r.shape[0]:>7}  {r.dim:>9}  {params}")
    lines.append(f"{f'total ({len(rows)} blocks)':<{width}}  {'':>7}  {sum(r.dim for r in rows):>9}")
    return "\n".join(lines)
