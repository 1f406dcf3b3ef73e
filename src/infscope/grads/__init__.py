"""Per-example gradients: hooks on linear layers, blocks, random projection and an on-disk store."""

from infscope.grads.base import GradientSet, InMemoryGradients, iter_blocks, to_memory
from infscope.grads.blocks import BlockInfo, BlockLayout, block_inventory, format_inventory
from infscope.grads.hooks import (
    ExampleGradients,
    PerExampleGradients,
    compute_gradients,
    lora_linear_names,
    model_fingerprint,
)
from infscope.grads.losses import causal_lm_loss, classification_loss, default_loss
from infscope.grads.projection import BlockProjector, project_blocks, projection_matrix
from infscope.grads.store import GradientStore, collect_to_store

__all__ = [
    "BlockInfo",
    "BlockLayout",
    "BlockProjector",
    "ExampleGradients",
    "GradientSet",
    "GradientStore",
    "InMemoryGradients",
    "PerExampleGradients",
    "block_inventory",
    "causal_lm_loss",
    "classification_loss",
    "collect_to_store",
    "compute_gradients",
    "default_loss",
    "format_inventory",
    "iter_blocks",
    "lora_linear_names",
    "model_fingerprint",
    "project_blocks",
    "projection_matrix",
    "to_memory",
]
