"""Mirrored influence (Forward-INF): move the adapter along the query loss, watch each training loss move.

The Mirrored Influence Hypothesis (Ko et al., CVPR 2024) reads influence the other way round: instead
of asking how training on ``z`` changes the query loss, take a few optimizer steps on the *query*
rows and measure how each training row's loss changes. For one SGD step of size ``eta`` on the
mean query loss (gradient ``v``) the change is, to first order,

    L_z(theta - eta v) - L_z(theta) ~ -eta v . g_z = eta * hessian_free(z),

so with descent the loss change itself is the score (higher = more harmful): rows that agree with
the queries fit better (their loss falls, the score is negative), rows that conflict with them fit
worse (their loss rises). With ``direction="ascent"`` the step goes up the query loss and the
change is negated, so both directions share the sign convention.

Only the LoRA ``A``/``B`` matrices move (the same parameters the gradient methods use). Their values
are copied before the steps and written back afterwards, so the model handed in is unchanged.
Cost: ``steps`` forward+backward passes over the queries and two forward passes over the training
rows; no per-example gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators import baselines
from infscope.estimators.inputs import MODEL, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.scores import Scores
from infscope.grads.hooks import eval_with_grad, lora_linear_names
from infscope.grads.losses import default_loss
from infscope.models.encode import Encoded, batches, encode_rows
from infscope.models.loss import model_device, per_example_loss
from infscope.models.pair_losses import length_sorted

OPTIMIZERS = ("sgd", "adam")
DIRECTIONS = ("descent", "ascent")


def lora_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the active adapter's LoRA ``A``/``B`` matrices, in module order."""
    modules = dict(model.named_modules())
    names = lora_linear_names(model)
    if not names:
        raise InfscopeError(
            "the model has no LoRA layers; load the run's adapter (inputs.model('checkpoint'))"
        )
    return [modules[name].weight for name in names]


def sorted_losses(model: torch.nn.Module, encoded: Encoded, batch_size: int) -> np.ndarray:
    """Per-row loss in row order, computed in length-sorted batches (less padding)."""
    order = length_sorted(encoded)
    out = np.empty(len(encoded), dtype=np.float64)
    out[order] = per_example_loss(model, encoded.subset(order), batch_size)
    return out


def _check(steps: Any, lr: Any, optimizer: str, direction: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InfscopeError(f"mirrored: steps must be a positive integer, got {steps!r}; pass e.g. steps=1")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InfscopeError(f"mirrored: lr must be a positive number, got {lr!r}; pass e.g. lr=1e-3")
    if optimizer not in OPTIMIZERS:
        raise InfscopeError(f"mirrored: unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if direction not in DIRECTIONS:
        raise InfscopeError(f"mirrored: unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")


def query_steps(
    model: torch.nn.Module,
    query: Encoded,
    params: Sequence[torch.nn.Parameter],
    *,
    steps: int,
    lr: float,
    optimizer: str,
    direction: str,
    batch_size: int,
) -> list[float]:
    """Take ``steps`` full-batch optimizer steps on the mean query loss over ``params`` (in place).

    Returns the mean query loss seen before each step. Gradients of the query batches are summed
    (each batch's loss sum divided by the number of queries), so a step uses the exact mean-loss
    gradient whatever the batch size. Dropout is off (eval mode).
    """
    maximize = direction == "ascent"
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, maximize=maximize)
    else:
        opt = torch.optim.Adam(params, lr=lr, maximize=maximize)
    dev = model_device(model)
    order = length_sorted(query)
    sorted_query = query.subset(order)
    seen = []
    with eval_with_grad(model):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for batch in batches(sorted_query, batch_size):
                moved = {k: v.to(dev) for k, v in batch.items()}
                loss = default_loss(model, moved).sum() / len(query)
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise InfscopeError(
                    "mirrored: the query loss is NaN or infinite; lower lr or check the queries"
                )
            seen.append(total)
            opt.step()
    return seen


def mirrored_values(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    query_rows: Sequence[Mapping[str, Any]],
    *,
    task: str = "causal",
    steps: int = 1,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    direction: str = "descent",
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    label_names: Sequence[Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mirrored scores of ``rows`` (float64, row order) and a meta dict (query loss along the steps).

    ``score = sign * (L_z(after) - L_z(before))`` with ``sign = +1`` for descent and ``-1`` for
    ascent. The LoRA weights are restored (values and ``requires_grad``) even if a step fails.
    """
    _check(steps, lr, optimizer, direction)
    if not query_rows:
        raise InfscopeError("mirrored: no query rows; pass validation rows (--query) to step on")
    encode = {
        "task": task,
        "max_length": max_length,
        "response_only": response_only,
        "label_names": label_names,
    }
    train = encode_rows(list(rows), tokenizer, **encode)
    query = encode_rows(list(query_rows), tokenizer, **encode)
    params = lora_weights(model)
    saved = [(p.detach().clone(), p.requires_grad) for p in params]
    before = sorted_losses(model, train, batch_size)
    try:
        for p in params:
            p.requires_grad_(True)
        seen = query_steps(
            model,
            query,
            params,
            steps=int(steps),
            lr=float(lr),
            optimizer=optimizer,
            direction=direction,
            batch_size=batch_size,
        )
        query_after = float(sorted_losses(model, query, batch_size).mean())
        after = sorted_losses(model, train, batch_size)
    finally:
        with torch.no_grad():
            for p, (value, flag) in zip(params, saved, strict=True):
                p.copy_(value)
                p.grad = None
                p.requires_grad_(flag)
    sign = 1.0 if direction == "descent" else -1.0
    meta = {
        "steps": int(steps),
        "lr": float(lr),
        "optimizer": optimizer,
        "direction": direction,
        "query_loss": [*seen, query_after],
        "mean_train_loss_change": float((after - before).mean()),
    }
    return sign * (after - before), meta


def _compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    """The ``mirrored`` method: steps on the run's query rows at the scored checkpoint."""
    check_options("mirrored", lambda steps=1, lr=1e-3, optimizer="sgd", direction="descent": None, options)
    loaded = inputs.model("checkpoint")
    encode = inputs.encode_options()
    values, meta = mirrored_values(
        loaded.model,
        loaded.tokenizer,
        inputs.rows(),
        inputs.query_rows(),
        task=encode["task"],
        max_length=encode["max_length"],
        batch_size=encode["batch_size"],
        response_only=encode["response_only"],
        label_names=encode["label_names"],
        **options,
    )
    meta.update(family="forward", baseline=False, n_query=len(inputs.query_rows()))
    return baselines.from_values(values, inputs.train_ids, "mirrored", meta)


REGISTER = [
    Method(
        "mirrored",
        (MODEL,),
        _compute,
        "Forward-INF: each row's loss change after K optimizer steps on the queries (Ko et al. 2024)",
        family="forward",
        options={"steps": 1, "lr": 1e-3, "optimizer": "sgd", "direction": "descent"},
    )
]
