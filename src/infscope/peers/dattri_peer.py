"""dattri (Deng et al., 2024) as a peer: its TracIn and DataInf attributors on the LoRA parameters.

dattri differentiates a functional loss ``f(params, data)`` with ``torch.func`` (``vmap`` over
rows). Only the parameters of the LoRA modules our gradient store tracks require gradients, so
dattri's parameter vector is exactly our gradient space. Batches are ``(input_ids, labels)``
tuples: causal rows are right-padded and need no attention mask (see
:func:`infscope.peers.batching.collate_tuple`); classification rows go one per batch.

Sign: dattri returns ``g_train^T M g_test`` (``M`` = identity for TracIn, DataInf's inverse for
DataInf), positive for helpful examples; ours is its negation. dattri's DataInf uses one damping
for every layer, so :func:`dattri_datainf_scores` passes one float (by default the median of our
per-block rule) and records it, letting the comparison run our DataInf with the same damping.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from infscope.peers.inputs import PeerInputs


def _prepare(inputs: PeerInputs):
    """Model with only the tracked LoRA parameters trainable, its dattri task, and both loaders."""
    from dattri.task import AttributionTask
    from torch.func import functional_call

    from infscope.grads.losses import default_loss
    from infscope.peers.batching import row_loader

    load = inputs.require_model()
    # vmap has no batching rule for CPU SDPA attention: eager is the same math and much faster
    eager = "attn_implementation" in inspect.signature(load).parameters
    model = load(attn_implementation="eager") if eager else load()
    tracked = set(inputs.tracked_modules)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[0] in tracked)

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, labels = data
        if ids.ndim == 1:  # TracIn vmaps over rows without a batch dimension
            ids, labels = ids.unsqueeze(0), labels.unsqueeze(0)

        def forward(**kwargs: torch.Tensor):
            return functional_call(model, params, args=(), kwargs=kwargs)

        return default_loss(forward, {"input_ids": ids, "labels": labels}).sum()

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    bs = 1 if inputs.task == "classification" else inputs.batch_size
    train_loader = row_loader(inputs.encode(inputs.ordered_train_rows()), bs)
    val_loader = row_loader(inputs.encode(inputs.val_rows), bs)
    return task, train_loader, val_loader


def _to_ours(matrix: torch.Tensor) -> np.ndarray:
    """dattri's ``(n_train, n_query)`` helpful-positive matrix -> our per-train vector."""
    return -matrix.detach().double().mean(dim=1).numpy()


def single_damping(inputs: PeerInputs, scale: float = 0.1) -> float:
    """Median over blocks of DataInf's per-block rule ``scale * mean ||g||^2 / d``."""
    from infscope.estimators.primitives import datainf_damping

    values = [datainf_damping(inputs.train_grads.load_block(b), scale) for b in inputs.tracked_modules]
    return float(np.median(values))


def dattri_datainf_scores(
    inputs: PeerInputs, *, damping: float | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri's ``IFAttributorDataInf`` (all training rows for the Fisher), averaged over queries."""
    from dattri.algorithm.influence_function import IFAttributorDataInf

    lam = single_damping(inputs) if damping is None else float(damping)
    task, train_loader, val_loader = _prepare(inputs)
    attributor = IFAttributorDataInf(task=task, regularization=lam)
    attributor.cache(train_loader)
    matrix = attributor.attribute(train_loader, val_loader)
    return _to_ours(matrix), {"damping": lam, "damping_rule": "one value for every block"}


def dattri_tracin_scores(
    inputs: PeerInputs, *, proj_dim: int = 512, seed: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri's ``TracInAttributor`` at the scored checkpoint (weight 1), gradients projected to ``proj_dim``.

    dattri always projects TracIn gradients (seeded random projection); with ``proj_dim`` at
    least the LoRA dimension the dot products are preserved only in expectation.
    """
    from dattri.algorithm.tracin import TracInAttributor

    seed = inputs.seed if seed is None else seed
    task, train_loader, val_loader = _prepare(inputs)
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.ones(1),
        normalized_grad=False,
        projector_kwargs={"proj_dim": proj_dim, "proj_seed": seed, "device": "cpu"},
    )
    matrix = attributor.attribute(train_loader, val_loader)
    return _to_ours(matrix), {"proj_dim": proj_dim, "proj_seed": seed, "checkpoints": 1}
