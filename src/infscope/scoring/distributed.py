"""Score a run with its gradient pass split over the processes of a ``torchrun``.

:func:`score_run_distributed` is what ``python -m infscope.distributed_collect RUN`` runs on every
rank. Store mode (the default): the checkpoint's train and query gradient stores, the base-model
losses and the gradient record are made by all ranks together (each on its own rows,
:mod:`infscope.grads.sharded`), then rank 0 alone calls :func:`~infscope.scoring.score_run`, which
finds them complete and only scores, prints nothing else and saves as in one process. Stores already
complete (an earlier ``infscope score`` or torchrun, whatever its process count) are scored as they
are; unfinished ones are finished in their own shard layout (:func:`gradients_ready`). Stream mode
(``stream=True``): the aggregate methods (datainf, hessian_free, grad_cos, datainf_cos) are computed
inside the gradient pass without stores (:func:`~infscope.grads.sharded.stream_scores_sharded`) and
rank 0 saves them (:func:`score_streamed`: canaries dropped after their AUROC is kept, the
``score`` and ``gradients:<tag>`` stages recorded, as the stored path does). The other ranks only
compute. Outside torchrun both run as one process.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import torch

from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.grads.distributed import (
    barrier,
    broadcast_object,
    gather_rows,
    is_main,
    rank,
    shard_range,
    world_size,
)
from infscope.grads.sharded import collect_to_store_sharded, stream_scores_sharded
from infscope.grads.store import INDEX_FILE, GradientStore, dtype_name
from infscope.grads.streaming import check_methods
from infscope.models.ddp import init_from_env
from infscope.models.lora import load_adapter
from infscope.models.loss import per_example_loss
from infscope.models.prefix import frozen_prefix
from infscope.models.registry import load_spec
from infscope.runs import ModelSpec, RunLayout, atomic_path, atomic_write_json
from infscope.scoring import (
    canary_aurocs,
    finish_scores,
    gradient_stage_name,
    query_inputs,
    record_score_stage,
    score_run,
)
from infscope.scoring.gradients import checkpoint_prefix, encode_for, mean_query_gradient
from infscope.scoring.inputs import MEASUREMENTS
from infscope.scoring.run import OpenedRun, is_inrun_rule, open_run


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
    start, stop = shard_range(len(enc_train), rank(), world_size())
    prefix = checkpoint_prefix(spec, checkpoint)  # shared by the base-model and adapter passes (and K-FAC)
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
    run_dir: object,
    methods: list[str],
    *,
    checkpoint: str = "best",
    batch_size: int | None = None,
    query: str | None = None,
    block_by: str = "matrix",
    measurement: str = "loss",
) -> dict[str, Scores]:
    """Aggregate scores of every training row (canaries included) streamed in the gradient pass.

    The query vector (the mean query gradient at the checkpoint, of the loss or of the pairing gap:
    :func:`~infscope.scoring.gradients.mean_query_gradient`) is computed on every rank, so all ranks
    hold the same one without communication. Returns ``{method: Scores}`` on every rank; nothing is saved.
    """
    run = run_dir if isinstance(run_dir, OpenedRun) else open_run(run_dir)
    ckpt = run.checkpoint(checkpoint)
    query_rows, query_name = query_inputs(run, query)
    spec = run.spec
    size = int(batch_size or spec.batch_size)
    loaded = load_spec(spec)
    loaded.model.requires_grad_(False)
    enc_train = encode_for(spec, run.train, loaded.tokenizer)
    model = load_adapter(loaded, ckpt.path)
    with frozen_prefix(model, checkpoint_prefix(spec, ckpt.path)):
        v = mean_query_gradient(
            model,
            spec,
            loaded.tokenizer,
            query_rows,
            measurement=measurement,
            seed=spec.seed,
            batch_size=size,
            block_by=block_by,
        )
        streamed = stream_scores_sharded(
            model, enc_train, v, batch_size=size, methods=methods, block_by=block_by
        )
    return {
        m: Scores(
            streamed[m],
            streamed.ids,
            query_ids=[str(r["id"]) for r in query_rows],
            method=m,
            meta={
                "checkpoint": ckpt.path,
                "streamed": True,
                "passes": streamed.passes,
                "processes": world_size(),
                "damping": streamed.damping,
            },
        )
        for m in methods
    }


def score_streamed(
    run_dir: object,
    methods: list[str],
    *,
    checkpoint: str = "best",
    batch_size: int | None = None,
    query: str | None = None,
    block_by: str = "matrix",
    measurement: str = "loss",
) -> dict[str, Scores] | None:
    """Streamed scores saved and recorded as :func:`~infscope.scoring.score_run` saves stored ones.

    Every rank computes; rank 0 records the gradient pass (stage ``gradients:<tag>``, with
    ``streamed`` in its info) inside stage ``score``, keeps each method's canary AUROC in its meta,
    drops the canaries, saves ``<method>`` (``<method>+pairing`` for the pairing measurement) and
    returns the saved scores. Each method's seconds and peak memory are those of the shared pass.
    """
    names = list(check_methods(methods))
    run = run_dir if isinstance(run_dir, OpenedRun) else open_run(run_dir)
    if is_inrun_rule(checkpoint):
        raise InfscopeError(
            "in-run stores already hold the gradients; drop --stream to score --checkpoint inrun"
        )
    if measurement not in MEASUREMENTS:
        raise InfscopeError(f"unknown measurement {measurement!r}; use {' or '.join(MEASUREMENTS)}")
    if measurement == "pairing" and run.spec.task != "instruction":
        raise InfscopeError("the pairing measurement needs instruction data; use --measurement loss")
    ckpt = run.checkpoint(checkpoint)
    options = dict(
        checkpoint=checkpoint, batch_size=batch_size, query=query, block_by=block_by, measurement=measurement
    )
    if not is_main():
        streamed_scores(run, names, **options)
        barrier()
        return None
    with run.dir.stage("score") as rec:
        with run.dir.stage(gradient_stage_name(ckpt, block_by)) as grads:
            scored = streamed_scores(run, names, **options)
            grads.info.update(checkpoint=ckpt.path, block_by=block_by, streamed=True, processes=world_size())
        query_name = query_inputs(run, query)[1]
        for s in scored.values():
            s.meta.update(
                seconds=round(grads.seconds, 4),
                peak_rss_mb=round(grads.peak_rss_mb, 1),
                query=query_name,
                block_by=block_by,
            )
        if run.canary_ids:
            canary_aurocs(list(scored.values()), run.canary_ids)
        scored = finish_scores(run, scored, names, measurement)
        record_score_stage(
            rec,
            run,
            scored,
            checkpoint=ckpt.path,
            checkpoint_tag=ckpt.tag,
            checkpoint_rule=checkpoint,
            query=query_name,
            block_by=block_by,
            grad_dtype="float64 (streamed)",
            measurement=measurement,
            streamed=True,
            processes=world_size(),
        )
    barrier()
    return scored


def score_run_distributed(
    run_dir: object,
    methods: str,
    *,
    checkpoint: str = "best",
    stream: bool = False,
    batch_size: int | None = None,
    block_by: str = "matrix",
    grad_dtype: str = "float32",
    query: str | None = None,
    measurement: str = "loss",
) -> dict[str, Scores] | None:
    """Score ``run_dir`` with ``methods`` using every process of the torchrun; rank 0 saves and returns.

    Joins the process group from the environment (a no-op outside torchrun) with the backend of the
    run's device. Other ranks return ``None``. ``checkpoint`` is one checkpoint (best, last, epoch-N);
    ``all``/``canary`` sweeps run with one process. ``stream=True`` scores through
    :func:`score_streamed` (no gradient store); ``query`` and ``measurement`` are those of
    :func:`~infscope.scoring.score_run`. Gradients already complete at the checkpoint (from an earlier
    ``infscope score`` or torchrun, with any process count) are scored as they are; unfinished ones
    are finished (:func:`~infscope.grads.sharded.collect_to_store_sharded`).
    """
    run = run_dir if isinstance(run_dir, OpenedRun) else open_run(run_dir)
    init_from_env(device=run.spec.device)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if checkpoint in ("all", "canary"):
        raise InfscopeError("distributed scoring takes one checkpoint; use best, last or epoch-N")
    if stream:
        return score_streamed(
            run,
            names,
            checkpoint=checkpoint,
            batch_size=batch_size,
            query=query,
            block_by=block_by,
            measurement=measurement,
        )
    if batch_size:
        run.spec.batch_size = int(batch_size)
    options = dict(grad_dtype=grad_dtype, batch_size=batch_size, block_by=block_by, query=query)
    if is_inrun_rule(checkpoint):  # the gradients were captured in fine-tuning: nothing to collect
        return (
            score_run(run, names, checkpoint=checkpoint, measurement=measurement, **options)
            if is_main()
            else None
        )
    ckpt = run.checkpoint(checkpoint)
    stage = gradient_stage_name(ckpt, block_by)
    query_rows, query_name = query_inputs(run, query)
    ready = broadcast_object(
        gradients_ready(run.layout, ckpt.path, query_name, block_by, grad_dtype) if is_main() else None
    )
    if not ready and is_main():
        with run.dir.stage(stage) as rec:
            _collect(run, ckpt.path, block_by, grad_dtype, query_rows, query_name)
            rec.info.update(checkpoint=ckpt.path, block_by=block_by, processes=world_size())
    elif not ready:
        _collect(run, ckpt.path, block_by, grad_dtype, query_rows, query_name)
    if not is_main():
        return None
    return score_run(run, names, checkpoint=checkpoint, measurement=measurement, **options)


def gradients_ready(
    layout: RunLayout, checkpoint: str, query_name: str, block_by: str, grad_dtype: str
) -> bool:
    """Whether the checkpoint's train and query stores and losses are complete (rank 0 decides).

    As :func:`~infscope.scoring.gradients.checkpoint_gradients` does in one process: stores made with
    other blocks or another dtype are removed (the folder is collected again); shards whose files
    were deleted are flagged missing (:meth:`~infscope.grads.store.GradientStore.recheck`). How the
    stores were cut into shards does not matter.
    """
    paths = [layout.grads(checkpoint, name, block_by) for name in ("train", query_name)]
    stores = [GradientStore.open(p) if (p / INDEX_FILE).is_file() else None for p in paths]
    if any(
        s is not None and (s.meta.get("block_by", "matrix") != block_by or s.dtype != dtype_name(grad_dtype))
        for s in stores
    ):
        shutil.rmtree(layout.scoring(checkpoint, block_by))  # made with other blocks or another dtype
        return False
    complete = [s is not None and not s.recheck() and s.is_complete for s in stores]
    return all(complete) and layout.losses(checkpoint, block_by).is_file()


def _collect(
    run: OpenedRun, checkpoint: str, block_by: str, grad_dtype: str, query: list[dict], query_name: str
) -> None:
    collect_gradients_sharded(
        run.spec,
        run.layout,
        checkpoint,
        run.train,
        query,
        grad_dtype=grad_dtype,
        query_name=query_name,
        block_by=block_by,
    )
