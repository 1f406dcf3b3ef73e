"""Per-example gradients and losses of a run's rows at one checkpoint, collected once and reused.

Everything lands where :class:`~infscope.runs.RunLayout` says: ``scoring/<checkpoint>[-<block_by>]/``
holds ``grads/train``, ``grads/<query>``, ``losses.parquet`` and ``gradients.json``. Stores resume
shard by shard; a store made with other blocks or another dtype is collected again. The stores that
fine-tuning captured (``scoring/inrun-epoch-N``, :mod:`infscope.grads.inrun`) are read as they are.

With LoRA on the top layers only, every pass at a checkpoint (base-model loss, train and query
gradients, shuffled-prompt query gradients, the K-FAC factors of :mod:`infscope.scoring.inputs`)
runs from one frozen-prefix cache, :func:`checkpoint_prefix`, so the frozen bottom layers run once
per row and checkpoint in a process, however many passes and ``score_run`` calls follow.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from infscope.data.formatting import prompt_response_view, with_response
from infscope.errors import InfscopeError
from infscope.grads.hooks import compute_gradients
from infscope.grads.store import INDEX_FILE, GradientStore, collect_to_store, dtype_name
from infscope.models.encode import encode_rows
from infscope.models.lora import load_adapter
from infscope.models.loss import per_example_loss
from infscope.models.prefix import PrefixStates, adapter_first_layer, frozen_prefix
from infscope.models.registry import load_spec
from infscope.runs import ModelSpec, RunLayout, atomic_path, atomic_write_json


def encode_for(spec: ModelSpec, rows: Sequence[dict], tokenizer: Any):
    """Encode ``rows`` exactly as fine-tuning did (task, max length, response masking, label order)."""
    labels = spec.label_names if spec.model_task == "classification" else None
    return encode_rows(
        list(rows),
        tokenizer,
        task=spec.model_task,
        max_length=spec.max_length,
        response_only=spec.response_only,
        label_names=labels,
    )


#: The frozen-prefix cache of the last checkpoint a pass ran at in this process, by :func:`_prefix_key`.
#: One entry only: a cache may hold up to 2 GiB of hidden states, and scoring visits checkpoints in turn.
_PREFIX: dict[tuple, PrefixStates] = {}


def _prefix_key(spec: ModelSpec, checkpoint: str | Path, depth: int) -> tuple:
    """What the cached states depend on: the base model (name, seed, device, dtype, head) and the depth.

    The checkpoint's path is part of the key too, so that one checkpoint's cache is never handed to
    another's passes (their frozen layers are the same, but the rule is simpler to trust).
    """
    head = len(spec.label_names or []) if spec.model_task == "classification" else 0
    where = str(Path(checkpoint).resolve())
    return (
        where,
        int(depth),
        spec.name,
        int(spec.seed),
        str(spec.device),
        str(spec.dtype),
        spec.model_task,
        head,
    )


def checkpoint_prefix(spec: ModelSpec, checkpoint: str | Path) -> PrefixStates | None:
    """The frozen-prefix cache all passes at ``checkpoint`` share in this process (``None``: LoRA everywhere).

    The hidden states entering the adapter's lowest layer depend only on the frozen base model and
    the row's tokens, so the base-model loss, the gradient passes and the K-FAC factor pass at one
    checkpoint can all read the states the first of them computed. The cache of the previous
    checkpoint is dropped when another checkpoint asks (memory stays bounded by one cache).
    """
    depth = adapter_first_layer(checkpoint)
    if not depth:
        return None
    key = _prefix_key(spec, checkpoint, depth)
    cache = _PREFIX.get(key)
    if cache is None:
        _PREFIX.clear()
        cache = _PREFIX[key] = PrefixStates(depth)
    return cache


def clear_prefix_cache() -> None:
    """Forget the shared frozen-prefix cache (its memory goes once no pass holds it)."""
    _PREFIX.clear()


def collect_gradients(
    spec: ModelSpec,
    layout: RunLayout,
    checkpoint: str,
    train: Sequence[dict],
    query: Sequence[dict],
    *,
    grad_dtype: str = "float32",
    query_name: str = "val",
    block_by: str = "matrix",
) -> dict[str, Any]:
    """Gradient stores of train and query rows at ``checkpoint`` plus per-row losses.

    The base model's loss is measured first (no adapter: the ``base_loss`` baseline), then the
    checkpoint's adapter is loaded and both stores are collected in batched hook passes; the
    training loss at the checkpoint (the ``loss`` baseline) comes from the same passes.
    """
    if not query:
        raise InfscopeError("the query set is empty; pass --query with at least one row")
    loaded = load_spec(spec)
    enc_train, enc_query = (
        encode_for(spec, train, loaded.tokenizer),
        encode_for(spec, query, loaded.tokenizer),
    )
    prefix = checkpoint_prefix(spec, checkpoint)  # shared by the base-model and adapter passes (and K-FAC)
    loaded.model.requires_grad_(False)  # the base model is only evaluated; the adapter brings its own weights
    with frozen_prefix(loaded.model, prefix):
        base_loss = per_example_loss(loaded.model, enc_train, batch_size=spec.batch_size)
    model = load_adapter(loaded, checkpoint)
    stores = {}
    with frozen_prefix(model, prefix):
        for name, enc in (("train", enc_train), (query_name, enc_query)):
            stores[name] = collect_to_store(
                model,
                enc,
                layout.grads(checkpoint, name, block_by),
                batch_size=spec.batch_size,
                dtype=grad_dtype,
                block_by=block_by,
                meta={"checkpoint": str(checkpoint)},
                progress_label=f"gradients {name}",
            )
        train_loss = stores["train"].losses()
        if train_loss is None:
            train_loss = per_example_loss(model, enc_train, batch_size=spec.batch_size)
    losses = pd.DataFrame({"id": enc_train.ids, "loss": np.asarray(train_loss), "base_loss": base_loss})
    with atomic_path(layout.losses(checkpoint, block_by)) as tmp:
        losses.to_parquet(tmp, index=False)
    store = stores["train"]
    info = {
        "checkpoint": str(checkpoint),
        "blocks": len(store.block_names),
        "params": int(sum(store.block_dim(b) for b in store.block_names)),
        "train_rows": len(store.ids),
        "query_rows": len(stores[query_name].ids),
        "truncated_rows": len(getattr(enc_train, "truncated", []) or []),
    }
    atomic_write_json(layout.gradient_info(checkpoint, block_by), info)
    return info


def checkpoint_gradients(
    spec: ModelSpec,
    layout: RunLayout,
    checkpoint: str,
    train: Sequence[dict],
    query: Sequence[dict],
    *,
    query_name: str = "val",
    grad_dtype: str = "float32",
    block_by: str = "matrix",
) -> tuple[GradientStore, GradientStore, pd.DataFrame]:
    """Train and query gradient stores and per-row losses at ``checkpoint``, collected unless complete.

    An in-run checkpoint (``RunLayout.inrun(epoch)``) is never collected: its captured stores are returned.
    """
    if is_inrun_path(checkpoint):
        return inrun_gradients(checkpoint, query_name=query_name, block_by=block_by)
    train_store = layout.grads(checkpoint, "train", block_by)
    query_store = layout.grads(checkpoint, query_name, block_by)
    if any(_store_differs(s, block_by, grad_dtype) for s in (train_store, query_store)):
        shutil.rmtree(layout.scoring(checkpoint, block_by))  # made with other blocks or another dtype
    if not (
        _complete(train_store) and _complete(query_store) and layout.losses(checkpoint, block_by).is_file()
    ):
        collect_gradients(
            spec,
            layout,
            checkpoint,
            train,
            query,
            grad_dtype=grad_dtype,
            query_name=query_name,
            block_by=block_by,
        )
    losses = pd.read_parquet(layout.losses(checkpoint, block_by))
    return GradientStore.open(train_store), GradientStore.open(query_store), losses


def _store_differs(path, block_by: str, grad_dtype: str) -> bool:
    """Whether a (possibly unfinished) store exists at ``path`` with other blocks or dtype (checked before loading a model)."""
    if not (path / INDEX_FILE).is_file():
        return False
    store = GradientStore.open(path)
    return store.meta.get("block_by", "matrix") != block_by or store.dtype != dtype_name(grad_dtype)


def _complete(path) -> bool:
    if not (path / INDEX_FILE).is_file():
        return False
    try:
        return bool(GradientStore.open(path).is_complete)
    except InfscopeError:
        return False


def query_gradients(
    spec: ModelSpec,
    layout: RunLayout,
    checkpoint: str,
    rows: Sequence[dict],
    name: str,
    *,
    grad_dtype: str = "float32",
    block_by: str = "matrix",
) -> GradientStore:
    """A gradient store of extra query rows at ``checkpoint`` (``scoring/<ckpt>/grads/<name>``), resumable."""
    path = layout.grads(checkpoint, name, block_by)
    if _store_differs(path, block_by, grad_dtype):
        shutil.rmtree(path)
    if not _complete(path):
        loaded = load_spec(spec)
        loaded.model.requires_grad_(False)
        encoded = encode_for(spec, rows, loaded.tokenizer)
        model = load_adapter(loaded, checkpoint)
        with frozen_prefix(model, checkpoint_prefix(spec, checkpoint)):
            collect_to_store(
                model,
                encoded,
                path,
                batch_size=spec.batch_size,
                dtype=grad_dtype,
                block_by=block_by,
                meta={"checkpoint": str(checkpoint)},
                progress_label=f"gradients {name}",
            )
    return GradientStore.open(path)


def shuffled_prompts(rows: Sequence[dict], seed: int) -> list[dict]:
    """Each row's response under another row's whole prompt (a seeded derangement), ids kept.

    The counterpart of the pairing measurement ``f = sum_v [L(A_v|Q_v) - L(A_v|Q_v')]``: the
    response stays, the instruction (and input, or earlier chat turns) comes from row ``v'``.
    """
    n = len(rows)
    if n < 2:
        raise InfscopeError("the pairing measurement needs at least 2 query rows; pass a larger --query set")
    rng = np.random.default_rng(seed)
    shift = 1 + int(rng.integers(n - 1))  # a cyclic shift of a random order: nobody keeps their prompt
    order = rng.permutation(n)
    partner = np.empty(n, dtype=int)
    partner[order] = order[(np.arange(n) + shift) % n]
    out = []
    for i, row in enumerate(rows):
        _, response = prompt_response_view(row)
        moved = with_response(rows[int(partner[i])], response)
        moved["id"] = row["id"]
        out.append(moved)
    return out


#: Folder-name prefix of the stores captured during fine-tuning (``RunLayout.inrun``).
INRUN_PREFIX = "inrun-epoch-"


def is_inrun_path(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` is a folder of gradients captured during fine-tuning, not an adapter."""
    return Path(checkpoint).name.startswith(INRUN_PREFIX)


def inrun_gradients(
    folder: str | Path, *, query_name: str = "val", block_by: str = "matrix"
) -> tuple[GradientStore, GradientStore, pd.DataFrame]:
    """The captured train and validation stores of one epoch and the training losses they recorded.

    The losses are each row's loss at the step it was trained in (train mode); there is no
    base-model loss. The query is the validation rows, whose gradients were taken before the epoch.
    """
    grads = Path(folder) / "grads"
    if query_name != "val":
        raise InfscopeError(
            "in-run stores hold the validation rows' gradients only; drop --query or score --checkpoint best"
        )
    train, val = grads / "train", grads / "val"
    if not _complete(train):
        raise InfscopeError(
            f"{train} is not a complete in-run store; fine-tune again with `infscope finetune --capture last`"
        )
    if not _complete(val):
        raise InfscopeError(
            f"{folder} has no captured validation gradients; fine-tune with validation rows and --capture last"
        )
    train_store, val_store = GradientStore.open(train), GradientStore.open(val)
    captured_by = train_store.meta.get("block_by", "matrix")
    if captured_by != block_by:
        raise InfscopeError(
            f"the in-run gradients were captured with blocks by {captured_by}; pass --block-by {captured_by}"
        )
    losses = train_store.losses()
    if losses is None:
        raise InfscopeError(f"{train} has no losses; fine-tune again with `infscope finetune --capture last`")
    frame = pd.DataFrame({"id": train_store.ids, "loss": np.asarray(losses, dtype=np.float64)})
    return train_store, val_store, frame


def mean_query_gradient(
    model: Any,
    spec: ModelSpec,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    measurement: str = "loss",
    seed: int = 0,
    batch_size: int = 8,
    block_by: str = "matrix",
) -> dict[str, torch.Tensor]:
    """The mean query gradient per block in float64, of the loss or of the pairing gap.

    ``measurement="pairing"`` subtracts the mean gradient of the same responses under other rows'
    prompts (:func:`shuffled_prompts` with ``seed``), as the stored path's ``+pairing`` query does;
    the mean of differences is the difference of means. The model must already be the checkpoint's.
    """
    if not rows:
        raise InfscopeError("the query set is empty; pass --query with at least one row")

    def mean(part: Sequence[dict]) -> dict[str, torch.Tensor]:
        grads = compute_gradients(
            model,
            encode_for(spec, part, tokenizer),
            batch_size=batch_size,
            block_by=block_by,
            progress=False,
            dtype=torch.float64,
        )
        return {name: grads.load_block(name, torch.float64).mean(dim=0) for name in grads.block_names}

    v = mean(rows)
    if measurement == "pairing":
        other = mean(shuffled_prompts(rows, seed))
        v = {name: v[name] - other[name] for name in v}
    return v
