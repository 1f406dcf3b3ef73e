"""dattri (Deng et al., 2024) as a peer: its TracIn, DataInf and TRAK attributors on the LoRA parameters.

dattri differentiates a functional loss ``f(params, data)`` with ``torch.func`` (``vmap`` over
rows). Only the parameters of the LoRA modules our gradient store tracks require gradients, so
dattri's parameter vector is exactly our gradient space. Batches are ``(input_ids, labels)``
tuples: causal rows are right-padded and need no attention mask (see
:func:`infscope.peers.batching.collate_tuple`); classification rows go one per batch.

Sign: dattri returns ``g_train^T M g_test`` (``M`` = identity for TracIn, DataInf's inverse for
DataInf), positive for helpful examples; ours is its negation. dattri's DataInf uses one damping
for every layer, so :func:`dattri_datainf_scores` passes one float (by default the median of our
per-block rule) and records it, letting the comparison run our DataInf with the same damping.
TRAK multiplies by ``1 - p`` of the training row (``p`` its "correct probability"), a factor >= 0, so
its sign follows the same rule.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from infscope.peers.inputs import PeerInputs


def _prepare(inputs: PeerInputs):
    """Model with only the tracked LoRA parameters trainable, its dattri task, both loaders, its device."""
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
    return task, train_loader, val_loader, str(next(model.parameters()).device)


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
    task, train_loader, val_loader, device = _prepare(inputs)
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
    task, train_loader, val_loader, device = _prepare(inputs)
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.ones(1),
        normalized_grad=False,
        projector_kwargs={"proj_dim": proj_dim, "proj_seed": seed, "device": device},
    )
    matrix = attributor.attribute(train_loader, val_loader)
    return _to_ours(matrix), {"proj_dim": proj_dim, "proj_seed": seed, "checkpoints": 1}


def _correct_probability(loss_func):
    """``p = exp(-loss)`` of one row, for TRAK's ``1 - p`` reweighting of each training row.

    With our losses this is, per row: classification, the softmax probability of the true label
    (cross-entropy is ``-log p``); causal LM, ``exp`` of minus the mean token cross-entropy over
    the response, i.e. the geometric mean of the target tokens' probabilities.
    """

    def probability(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.exp(-loss_func(params, data))

    return probability


def trak_regularization(inputs: PeerInputs, proj_dim: int, scale: float = 0.1) -> float:
    """``scale * trace(K) / proj_dim`` for TRAK's kernel ``K = X^T X`` of projected training gradients.

    dattri divides every gradient by ``sqrt(P)`` (``P`` trainable parameters) and the projection
    keeps squared norms in expectation, so ``trace(K) ~ sum_i ||g_i||^2 / P``, computed here from
    our gradient store. This is DataInf's damping rule (``scale`` times the mean eigenvalue) applied
    to ``K``; without it ``K`` is singular whenever ``n_train < proj_dim``.
    """
    names = inputs.tracked_modules
    total = sum(float(inputs.train_grads.load_block(b).double().pow(2).sum()) for b in names)
    n_params = sum(inputs.train_grads.block_dim(b) for b in names)
    return scale * total / n_params / proj_dim


def dattri_trak_scores(
    inputs: PeerInputs,
    *,
    proj_dim: int = 512,
    seed: int = 0,
    regularization: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri's ``TRAKAttributor`` at the scored checkpoint (one model, no ensemble), averaged over queries.

    For training row ``i`` and query ``q`` dattri returns
    ``(1 - p_i) * phi_q^T (X^T X + lambda I)^{-1} phi_i``: ``phi`` are loss gradients (dattri does not
    use the margin gradients of the TRAK paper) divided by ``sqrt(P)`` and projected to ``proj_dim``
    by a seeded Gaussian matrix on the model's device (dattri's basic projector; its CUDA ``fast_jl``
    kernel is not used), and ``X`` stacks the training rows' ``phi``. TRAK needs a "correct probability"
    ``p`` per training row; we use ``exp(-loss)`` of the row under our loss: for the causal LM loss
    (mean token cross-entropy over the response) that is the geometric mean of the response
    tokens' probabilities, for classification exactly the probability of the true label.
    ``lambda`` defaults to :func:`trak_regularization`; with few training rows and a small
    ``lambda`` TRAK is a least-squares fit of the query gradient by training gradients, so it
    ranks far from plain gradient dot products, while a large ``lambda`` turns it into TracIn
    weighted by ``1 - p_i``.
    """
    from dattri.algorithm.trak import TRAKAttributor

    lam = trak_regularization(inputs, proj_dim) if regularization is None else float(regularization)
    task, train_loader, val_loader, device = _prepare(inputs)
    probability = _correct_probability(task.get_loss_func(flatten=False))
    # every key given: dattri updates its module-level default projector kwargs in place
    projector = {
        "proj_dim": proj_dim,
        "proj_max_batch_size": 32,
        "proj_seed": seed,
        "proj_type": "normal",
        "device": device,
    }
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=probability,
        projector_kwargs=projector,
        device=device,
        regularization=lam,
    )
    attributor.cache(train_loader)
    matrix = attributor.attribute(val_loader)
    meta = {
        "proj_dim": proj_dim,
        "proj_seed": seed,
        "projector": f"normal ({device})",
        "regularization": lam,
        "regularization_rule": "0.1 * trace(X^T X) / proj_dim" if regularization is None else "given",
        "checkpoints": 1,
        "probability": "exp(-loss) of the row: geometric-mean response-token probability (causal), "
        "probability of the true label (classification)",
    }
    return _to_ours(matrix), meta
