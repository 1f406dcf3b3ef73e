"""Score a run with its gradient pass split over the processes of a ``torchrun``.

:func:`score_run_distributed` is what ``python -m infscope.distributed_collect RUN`` runs on every
rank. Store mode (the default): the checkpoint's train and query gradient stores, the base-model
losses and the gradient record are made by all ranks together (each on its own rows,
:mod:`infscope.grads.sharded`), then rank 0 alone calls :func:`~infscope.scoring.score_run`, which
finds them complete and only scores, prints nothing else and saves as in one process. Stream mode
(``stream=True``): the aggregate methods (datainf, hessian_free, grad_cos, datainf_cos) are computed
inside the gradient pass without stores (:func:`~infscope.grads.sharded.stream_scores_sharded`) and
rank 0 saves them. The other ranks only compute. Outside torchrun both run as one process.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.grads.distributed import barrier, gather_rows, init_from_env, is_main, rank, world_size
from infscope.grads.hooks import compute_gradients
from infscope.grads.sharded import collect_to_store_sharded, rank_rows, shard_rows_for, stream_scores_sharded
from infscope.grads.streaming import check_methods
from infscope.models.lora import load_adapter
from infscope.models.loss import per_example_loss
from infscope.models.prefix import PrefixStates, adapter_first_layer, frozen_prefix
from infscope.models.registry import load_spec
from infscope.runs import ModelSpec, RunLayout, atomic_path, atomic_write_json
from infscope.scoring import gradient_stage_name, score_run
from infscope.scoring.gradients import encode_for
from infscope.scoring.run import open_run


def collect_gradients_sharded(
    spec: ModelSpec,
    layout: RunLayout,
    checkpoint: str,
    train: list[dict],
    query: list[dict],
    *,
    grad_dtype: str = "float32",
    query_name: str = "val",
    block_by: str = "matrix",
) -> None:
    """:func:`~infscope.scoring.gradients.collect_gradients` with rows split over the ranks.

    Writes the same artifacts (train and query stores, ``losses.parquet`` with ``loss`` and
    ``base_loss``, ``gradients.json``); rank 0 writes the files shared by all ranks.
    """
    if not query:
        raise InfscopeError("the query set is empty; pass --query with at least one row")
    loaded = load_spec(spec)
    enc_train = encode_for(spec, train, loaded.tokenizer)
    enc_query = encode_for(spec, query, loaded.tokenizer)
    shard_rows = shard_rows_for(len(enc_train), world_size())
    start, stop = rank_rows(len(enc_train), shard_rows, rank(), world_size())
    depth = adapter_first_layer(checkpoint)
    prefix = PrefixStates(depth) if depth else None
    loaded.model.requires_grad_(False)
    mine = enc_train.subset(range(start, stop))
    with frozen_prefix(loaded.model, prefix):
        base_part = per_example_loss(loaded.model, mine, batch_size=spec.batch_size) if stop > start else []
    base_loss = gather_rows(torch.as_tensor(np.asarray(base_part, dtype=np.float64)))
    model = load_adapter(loaded, checkpoint)
    stores = {}
    with frozen_prefix(model, prefix):
        for name, enc in (("train", enc_train), (query_name, enc_query)):
            stores[name] = collect_to_store_sharded(
                model,
                enc,
                layout.grads(checkpoint, name, block_by),
                shard_rows=shard_rows if name == "train" else None,
                batch_size=spec.batch_size,
                dtype=grad_dtype,
                block_by=block_by,
                meta={"checkpoint": str(checkpoint)},
                progress_label=f"gradients {name}" if is_main() else None,
            )
    if is_main():
        store = stores["train"]
        losses = pd.DataFrame({"id": enc_train.ids, "loss": store.losses(), "base_loss": base_loss.numpy()})
        with atomic_path(layout.losses(checkpoint, block_by)) as tmp:
            losses.to_parquet(tmp, index=False)
        info = {
            "checkpoint": str(checkpoint),
            "blocks": len(store.block_names),
            "params": int(sum(store.block_dim(b) for b in store.block_names)),
            "train_rows": len(store.ids),
            "query_rows": len(stores[query_name].ids),
            "truncated_rows": len(getattr(enc_train, "truncated", []) or []),
            "processes": world_size(),
        }
        atomic_write_json(layout.gradient_info(checkpoint, block_by), info)
    barrier()


def streamed_scores(
    run_dir: object, methods: list[str], *, checkpoint: str = "best", batch_size: int | None = None
) -> dict[str, Scores]:
    """Aggregate scores of every training row streamed in the gradient pass, split over the ranks.

    The query vector (mean validation gradient at the checkpoint) is computed on every rank, so all
    ranks hold the same one without communication. Returns ``{method: Scores}`` on every rank.
    """
    run = open_run(run_dir)
    ckpt = run.checkpoint(checkpoint)
    spec = run.spec
    size = int(batch_size or spec.batch_size)
    loaded = load_spec(spec)
    loaded.model.requires_grad_(False)
    enc_train = encode_for(spec, run.train, loaded.tokenizer)
    enc_query = encode_for(spec, run.val, loaded.tokenizer)
    model = load_adapter(loaded, ckpt.path)
    depth = adapter_first_layer(ckpt.path)
    with frozen_prefix(model, PrefixStates(depth) if depth else None):
        query = compute_gradients(model, enc_query, batch_size=size, progress=False, dtype=torch.float64)
        v = {name: query.load_block(name, torch.float64).mean(dim=0) for name in query.block_names}
        streamed = stream_scores_sharded(model, enc_train, v, batch_size=size, methods=methods)
    return {
        m: Scores(
            streamed[m],
            streamed.ids,
            query_ids=list(enc_query.ids),
            method=m,
            meta={
                "checkpoint": ckpt.path,
                "streamed": True,
                "processes": world_size(),
                "damping": streamed.damping,
            },
        )
        for m in methods
    }


def score_run_distributed(
    run_dir: object,
    methods: str,
    *,
    checkpoint: str = "best",
    stream: bool = False,
    batch_size: int | None = None,
    block_by: str = "matrix",
    grad_dtype: str = "float32",
) -> dict[str, Scores] | None:
    """Score ``run_dir`` with ``methods`` using every process of the torchrun; rank 0 saves and returns.

    Joins the process group from the environment (a no-op outside torchrun). Other ranks return
    ``None``. ``checkpoint`` is one checkpoint (best, last, epoch-N); ``all``/``canary`` sweeps run
    with one process.
    """
    init_from_env()
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if checkpoint in ("all", "canary"):
        raise InfscopeError("distributed scoring takes one checkpoint; use best, last or epoch-N")
    if stream:
        check_methods(names)
        scored = streamed_scores(run_dir, names, checkpoint=checkpoint, batch_size=batch_size)
        if is_main():
            from infscope.estimators.fusion import drop_canaries
            from infscope.scoring.tables import save_scores

            opened = open_run(run_dir)
            if opened.canary_ids:  # canaries are scored with the rows but never saved or returned
                scored = {name: drop_canaries(s, opened.canary_ids) for name, s in scored.items()}
            save_scores(opened.layout, scored)
        barrier()
        return scored if is_main() else None
    run = open_run(run_dir)
    if batch_size:
        run.spec.batch_size = int(batch_size)
    ckpt = run.checkpoint(checkpoint)
    stage = gradient_stage_name(ckpt, block_by)
    if is_main():
        with run.dir.stage(stage) as rec:
            _collect(run, ckpt.path, block_by, grad_dtype)
            rec.info.update(checkpoint=ckpt.path, block_by=block_by, processes=world_size())
    else:
        _collect(run, ckpt.path, block_by, grad_dtype)
    if not is_main():
        return None
    return score_run(
        run, names, checkpoint=checkpoint, grad_dtype=grad_dtype, batch_size=batch_size, block_by=block_by
    )


def _collect(run, checkpoint: str, block_by: str, grad_dtype: str) -> None:
    collect_gradients_sharded(
        run.spec, run.layout, checkpoint, run.train, run.val, grad_dtype=grad_dtype, block_by=block_by
    )
