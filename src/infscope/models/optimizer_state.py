"""Adam moments of a saved checkpoint, by parameter name and laid out like the gradient blocks.

Optimizer-aware estimators (LESS, TrackStar) need the AdamW first and second moments in force at
a checkpoint. infscope's fine-tuning and Hugging Face ``Trainer`` both save them as
``optimizer.pt``: a torch optimizer ``state_dict`` whose ``state`` is keyed by an integer index.
Indices number the parameters of ``param_groups`` in order (group 0's parameters first), so the
names come from the list the optimizer was built with:

- infscope (:mod:`infscope.models.finetune`): one group, the order of
  :func:`infscope.models.lora.trainable_parameters`;
- ``Trainer``: ``model.named_parameters()`` that require grad, split into a weight-decay group
  followed by a no-decay group (biases and norms). Pass a flat list when every trainable parameter
  sits in one group (true for LoRA A/B matrices), else one list per group.

:func:`block_moments` then concatenates the moments of a block's parameters in the gradient
store's flattening order (per module ``weight.flatten()`` then the bias; modules in parameter
order), so moment ``j`` of a block multiplies gradient column ``j`` of that block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from infscope.errors import InfscopeError

OPTIMIZER_FILE = "optimizer.pt"
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1e-3, "weight_decay": 0.0}


class AdamMoments(NamedTuple):
    """One parameter's Adam state: first moment, second moment (its shape) and the step count."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int


@dataclass(frozen=True)
class AdamHyper:
    """The Adam settings of a parameter's group (what the moments were accumulated with)."""

    beta1: float
    beta2: float
    eps: float
    lr: float
    weight_decay: float


@dataclass(frozen=True)
class BlockMoments:
    """Adam state of one gradient block: flat ``(d,)`` moments aligned with the block's columns."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def dim(self) -> int:
        return int(self.exp_avg.numel())


StateSource = str | os.PathLike | Mapping[str, Any]


def load_optimizer_state(source: StateSource) -> dict[str, Any]:
    """The optimizer ``state_dict`` from ``optimizer.pt``, a checkpoint directory holding it, or a dict."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / OPTIMIZER_FILE
        if not path.is_file():
            raise InfscopeError(
                f"no optimizer state at {path}; pass a checkpoint directory saved with its optimizer.pt"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged or foreign files
            raise InfscopeError(
                f"cannot read {path} ({type(exc).__name__}); pass a torch optimizer state_dict file"
            ) from None
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise InfscopeError(
            "optimizer file is not a torch optimizer state_dict (keys 'state' and 'param_groups'); "
            "pass the optimizer.pt of an infscope or Hugging Face Trainer checkpoint"
        )
    return dict(state)


def _grouped_names(param_names: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """``param_names`` as one list per group (a flat list of names is one group)."""
    names = list(param_names)
    if names and all(isinstance(n, str) for n in names):
        return [[str(n) for n in names]]
    if all(not isinstance(g, str) and isinstance(g, Sequence) for g in names):
        return [[str(n) for n in group] for group in names]
    raise InfscopeError(
        "param_names must be a list of parameter names or one list per optimizer param group; "
        "pass the names of the trainable parameters in optimizer order"
    )


def _index_names(state: Mapping[str, Any], param_names: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """Map every state index to ``(name, group)``; the counts must agree with the param groups."""
    groups = state["param_groups"]
    indices = [int(i) for g in groups for i in g["params"]]
    by_group = _grouped_names(param_names)
    flat = [n for group in by_group for n in group]
    if len(set(flat)) != len(flat):
        raise InfscopeError("param_names repeats a name; pass each trainable parameter once")
    if len(by_group) > 1:
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(g) for g in by_group]:
            raise InfscopeError(
                f"the optimizer has param groups of sizes {sizes} but param_names gives "
                f"{[len(g) for g in by_group]}; pass one list of names per group, in group order"
            )
    if len(indices) != len(flat):
        raise InfscopeError(
            f"the optimizer holds {len(indices)} parameters but {len(flat)} names were given; "
            "pass the trainable parameter names the optimizer was built with"
        )
    group_of = [gi for gi, g in enumerate(groups) for _ in g["params"]]
    return {index: (name, group_of[k]) for k, (index, name) in enumerate(zip(indices, flat, strict=True))}


def adam_moments(
    source: StateSource,
    param_names: Sequence[str] | Sequence[Sequence[str]],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, AdamMoments]:
    """``{param_name: (exp_avg, exp_avg_sq, step)}`` from an Adam/AdamW ``state_dict``, as float32 CPU tensors.

    ``param_names`` is the ordered list of trainable parameter names (or one list per param group),
    see the module docstring. Parameters without state (never stepped) are left out. ``shapes``
    (e.g. ``{n: p.shape}``) is checked against every moment, which catches a wrong name order.
    """
    state = load_optimizer_state(source)
    out: dict[str, AdamMoments] = {}
    for index, (name, _) in _index_names(state, param_names).items():
        entry = state["state"].get(index, state["state"].get(str(index)))
        if not entry:
            continue
        if "exp_avg" not in entry or "exp_avg_sq" not in entry:
            raise InfscopeError(
                f"the optimizer state of {name!r} has no Adam moments (keys {sorted(entry)}); "
                "LESS and TrackStar need a checkpoint trained with Adam or AdamW"
            )
        exp_avg = entry["exp_avg"].detach().to("cpu", torch.float32)
        exp_avg_sq = entry["exp_avg_sq"].detach().to("cpu", torch.float32)
        if shapes is not None and name in shapes and tuple(exp_avg.shape) != tuple(shapes[name]):
            raise InfscopeError(
                f"optimizer moment for {name!r} has shape {tuple(exp_avg.shape)}, the parameter "
                f"{tuple(shapes[name])}; pass the parameter names in the order the optimizer was built with"
            )
        step = entry.get("step", 0)
        out[name] = AdamMoments(exp_avg, exp_avg_sq, int(step.item() if torch.is_tensor(step) else step))
    return out


def adam_hyperparams(
    source: StateSource, param_names: Sequence[str] | Sequence[Sequence[str]]
) -> dict[str, AdamHyper]:
    """``{param_name: AdamHyper}`` from the param group of each parameter (AdamW defaults when absent)."""
    state = load_optimizer_state(source)
    out = {}
    for _, (name, group) in _index_names(state, param_names).items():
        settings = {**ADAMW_DEFAULTS, **state["param_groups"][group]}
        beta1, beta2 = (float(b) for b in settings["betas"])
        out[name] = AdamHyper(
            beta1, beta2, float(settings["eps"]), float(settings["lr"]), float(settings["weight_decay"])
        )
    return out


def _module_of(param_name: str) -> tuple[str, str]:
    module, _, leaf = param_name.rpartition(".")
    return module, leaf


def block_members(param_names: Sequence[str], block: str) -> list[str]:
    """Parameter names whose values make up ``block``, in the gradient store's flattening order.

    A block is a module name (``x.lora_A.default``), an adapted module (``x``) or a layer prefix;
    its parameters are those of modules equal to or under that name, module by module in parameter
    order, each module's ``weight`` before its ``bias``.
    """
    modules: dict[str, list[str]] = {}
    for name in param_names:
        module, _ = _module_of(name)
        if module == block or module.startswith(block + "."):
            modules.setdefault(module, []).append(name)
    rank = {"weight": 0, "bias": 1}
    return [
        n for names in modules.values() for n in sorted(names, key=lambda p: rank.get(_module_of(p)[1], 2))
    ]


def block_moments(
    moments: Mapping[str, AdamMoments],
    block_dims: Mapping[str, int],
    *,
    hyper: Mapping[str, AdamHyper] | AdamHyper | None = None,
) -> dict[str, BlockMoments]:
    """Per-block flat Adam moments aligned with gradient blocks of dimensions ``block_dims``.

    ``block_dims`` is ``{block: dim}`` of a :class:`~infscope.grads.base.GradientSet` (in its block
    order). The parameters of a block must all have state, the same step and the same Adam
    settings; their total size must equal the block dimension (projected gradients do not fit:
    collect them unprojected). ``hyper`` defaults to AdamW's defaults.
    """
    names = list(moments)
    out: dict[str, BlockMoments] = {}
    for block, dim in block_dims.items():
        members = block_members(names, block)
        if not members:
            example = names[0] if names else "none"
            raise InfscopeError(
                f"no optimizer state for gradient block {block!r} (parameters look like {example!r}); "
                "load the optimizer of the checkpoint the gradients were taken at"
            )
        size = sum(moments[m].exp_avg.numel() for m in members)
        if size != int(dim):
            raise InfscopeError(
                f"block {block!r} has {dim} gradient dims but its parameters hold {size} values; "
                "collect unprojected gradients on the same LoRA layers"
            )
        steps = {moments[m].step for m in members}
        settings = {_hyper_of(hyper, m) for m in members}
        if len(steps) > 1 or len(settings) > 1:
            raise InfscopeError(
                f"the parameters of block {block!r} have different Adam steps or settings; "
                "use block_by='matrix' so each block holds one parameter"
            )
        h = settings.pop()
        out[block] = BlockMoments(
            exp_avg=torch.cat([moments[m].exp_avg.reshape(-1) for m in members]),
            exp_avg_sq=torch.cat([moments[m].exp_avg_sq.reshape(-1) for m in members]),
            step=steps.pop(),
            beta1=h[0],
            beta2=h[1],
            eps=h[2],
        )
    return out


def _hyper_of(hyper: Mapping[str, AdamHyper] | AdamHyper | None, name: str) -> tuple[float, float, float]:
    if hyper is None:
        beta1, beta2 = ADAMW_DEFAULTS["betas"]
        return float(beta1), float(beta2), float(ADAMW_DEFAULTS["eps"])
    h = hyper if isinstance(hyper, AdamHyper) else hyper.get(name)
    if h is None:
        raise InfscopeError(
            f"no Adam settings for parameter {name!r}; pass adam_hyperparams of the same file"
        )
    return h.beta1, h.beta2, h.eps


def checkpoint_block_moments(
    source: StateSource,
    param_names: Sequence[str] | Sequence[Sequence[str]],
    grads: Any,
) -> dict[str, BlockMoments]:
    """One call: read a checkpoint's Adam state and lay it out like the blocks of ``grads`` (a GradientSet)."""
    state = load_optimizer_state(source)
    dims = {name: grads.block_dim(name) for name in grads.block_names}
    return block_moments(adam_moments(state, param_names), dims, hyper=adam_hyperparams(state, param_names))
