"""Score the training rows of a run: open it, provide each method what it needs, save ranked tables.

Used by ``infscope demo`` (the pipeline) and ``infscope score`` alike, so a run scores the same way
whichever command made it. Paths come from :class:`~infscope.runs.RunLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from infscope.data.loading import load_rows
from infscope.estimators.inputs import ALL_CHECKPOINTS, LOSSES, QUERY_GRADS, TRAIN_GRADS
from infscope.estimators.registry import get_method
from infscope.estimators.scores import Scores
from infscope.scoring.inputs import RunInputs
from infscope.scoring.methods import parse_methods, runnable, score_methods
from infscope.scoring.run import Checkpoint, OpenedRun, open_run
from infscope.scoring.tables import detection_evaluation, load_scores, remove_epoch_scores, save_scores

__all__ = [
    "Checkpoint",
    "OpenedRun",
    "RunInputs",
    "detection_evaluation",
    "load_scores",
    "open_run",
    "parse_methods",
    "runnable",
    "save_scores",
    "score_methods",
    "score_run",
]


def query_inputs(run: OpenedRun, query: str | None) -> tuple[list[dict], str]:
    """The query rows (default: the run's validation rows) and the name their gradient store gets."""
    if query is None:
        return run.val, "val"
    loaded = load_rows(query, task=run.spec.task)
    return loaded.rows, "query-" + loaded.fingerprint


def score_run(
    run_dir: Any,
    methods: str | Sequence[str],
    *,
    query: str | None = None,
    checkpoint: str = "best",
    grad_dtype: str = "float32",
    batch_size: int | None = None,
    block_by: str = "matrix",
    options: dict[str, dict[str, Any]] | None = None,
    on_method: Any = None,
) -> dict[str, Scores]:
    """Score a fine-tuned run with ``methods`` and save ``scores/`` and ``results/``; returns ``{method: Scores}``.

    ``checkpoint="all"`` also scores every checkpoint as ``<method>@epoch-N`` (the plain names hold
    the best checkpoint), so ``infscope evaluate`` ranks the epochs side by side; which checkpoint
    is scored often matters more than the method. Scoring a method again removes its earlier
    ``@epoch-N`` scores, so no stale epoch is ranked beside new scores. The run records which
    checkpoint, query and block grouping were scored (stage ``score``), for peers and the report.
    """
    run = run_dir if isinstance(run_dir, OpenedRun) else open_run(run_dir)
    if batch_size:
        run.spec.batch_size = int(batch_size)
    every = checkpoint == "all"
    chosen = run.checkpoint("best" if every else checkpoint)
    query_rows, query_name = query_inputs(run, query)

    def inputs_at(ckpt: Checkpoint) -> RunInputs:
        return RunInputs(
            run, ckpt, query_rows, query_name=query_name, grad_dtype=grad_dtype, block_by=block_by
        )

    main_inputs = inputs_at(chosen)
    names = parse_methods(methods, main_inputs)
    needs = {need for name in names for need in get_method(name).needs}
    if needs & {TRAIN_GRADS, QUERY_GRADS, LOSSES}:
        _gradient_stage(run, chosen, block_by, main_inputs.train_grads)
    if ALL_CHECKPOINTS in needs:
        for ckpt in run.checkpoints:
            _gradient_stage(run, ckpt, block_by, inputs_at(ckpt).train_grads)
    with run.dir.stage("score") as rec:
        scored = score_methods(names, main_inputs, options=options, on_method=on_method)
        for s in scored.values():
            s.meta.setdefault("checkpoint", chosen.path)
            s.meta.update(query=query_name, block_by=block_by)
        if every and len(run.checkpoints) > 1:
            per_checkpoint = [m for m in names if ALL_CHECKPOINTS not in get_method(m).needs]
            for ckpt in run.checkpoints:
                if ckpt.path == chosen.path:
                    at = scored
                else:
                    inputs = inputs_at(ckpt)
                    _gradient_stage(run, ckpt, block_by, inputs.train_grads)
                    at = score_methods(per_checkpoint, inputs, options=options)
                for name in per_checkpoint:
                    s = at[name]
                    s.meta.setdefault("checkpoint", ckpt.path)
                    tagged = f"{name}@{ckpt.tag}"
                    scored[tagged] = replace(s, method=tagged, meta=dict(s.meta))
        remove_epoch_scores(run.layout, names)
        save_scores(run.layout, scored)
        previous = dict(run.dir.stage_info("score").get("methods", {}))
        previous.update(
            {
                m: {"seconds": s.meta.get("seconds"), "peak_rss_mb": s.meta.get("peak_rss_mb")}
                for m, s in scored.items()
            }
        )
        rec.info.update(
            checkpoint=chosen.path,
            checkpoint_tag=chosen.tag,
            query=query_name,
            block_by=block_by,
            grad_dtype=grad_dtype,
            methods=previous,
        )
    return scored


def gradient_stage_name(ckpt: Checkpoint, block_by: str) -> str:
    """The run stage that records a checkpoint's gradient pass (time and peak memory)."""
    return f"gradients:{ckpt.tag}" + ("" if block_by == "matrix" else f"-{block_by}")


def _gradient_stage(run: OpenedRun, ckpt: Checkpoint, block_by: str, collect) -> None:
    """Collect a checkpoint's gradients as a timed stage; stores already complete are only opened."""
    name = gradient_stage_name(ckpt, block_by)
    if run.layout.gradient_info(ckpt.path, block_by).is_file() and run.dir.done(name):
        collect()
        return
    with run.dir.stage(name) as rec:
        collect()
        rec.info.update(checkpoint=ckpt.path, block_by=block_by)
