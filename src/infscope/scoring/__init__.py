"""Score the training rows of a run: open it, provide each method what it needs, save ranked tables.

Used by ``infscope demo`` (the pipeline) and ``infscope score`` alike, so a run scores the same way
whichever command made it. Paths come from :class:`~infscope.runs.RunLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from infscope.data.loading import load_rows
from infscope.errors import InfscopeError
from infscope.estimators.fusion import drop_canaries, rank_ensemble
from infscope.estimators.inputs import ALL_CHECKPOINTS, CANARIES, LOSSES, QUERY_GRADS, TRAIN_GRADS
from infscope.estimators.registry import get_method
from infscope.estimators.scores import Scores
from infscope.noise.canaries import canary_mask
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
    measurement: str = "loss",
) -> dict[str, Scores]:
    """Score a fine-tuned run with ``methods`` and save ``scores/`` and ``results/``; returns ``{method: Scores}``.

    ``checkpoint``: ``best`` (lowest validation loss), ``last``, ``epoch-N`` / a folder name, ``all``
    (every checkpoint is also saved as ``<method>@<tag>``; the plain names hold the best one, so
    ``infscope evaluate`` ranks the epochs side by side) or ``canary`` (every checkpoint scored, and
    for each method the plain name holds the checkpoint whose canaries it ranks highest: no labels
    needed). Which checkpoint is scored often matters more than the method.

    Canary rows (``infscope finetune --canaries``) are scored with the user's rows, their AUROC is
    kept in each method's meta (``canary_auroc``), and they are dropped before anything is saved or
    returned. ``measurement="pairing"`` takes the query gradient of ``sum_v [L(A_v|Q_v) - L(A_v|Q_v')]``
    (own prompt versus another row's) instead of the validation loss, asking "does this training row
    teach the model to ignore its instructions?"; the methods that use query gradients are then
    saved as ``<method>+pairing``. Scoring a method again removes its earlier ``@<tag>`` scores. The run records which
    checkpoint, query and block grouping were scored (stage ``score``), for peers and the report.
    """
    run = run_dir if isinstance(run_dir, OpenedRun) else open_run(run_dir)
    if batch_size:
        run.spec.batch_size = int(batch_size)
    if checkpoint == "canary" and not run.canary_ids:
        raise InfscopeError(
            "--checkpoint canary needs canaries; fine-tune with --canaries 0.05 (or choose best, last, all)"
        )
    sweep = checkpoint in ("all", "canary")
    chosen = run.checkpoint("best" if sweep else checkpoint)
    query_rows, query_name = query_inputs(run, query)

    def inputs_at(ckpt: Checkpoint) -> RunInputs:
        return RunInputs(
            run,
            ckpt,
            query_rows,
            query_name=query_name,
            grad_dtype=grad_dtype,
            block_by=block_by,
            measurement=measurement,
        )

    main_inputs = inputs_at(chosen)
    names = parse_methods(methods, main_inputs)
    across = [m for m in names if ALL_CHECKPOINTS in get_method(m).needs]
    # methods that use other methods' scores (fusion) go last, so they reuse what was computed
    single = sorted((m for m in names if m not in across), key=lambda m: CANARIES in get_method(m).needs)
    if across:
        for ckpt in run.checkpoints:
            _gradient_stage(run, ckpt, block_by, inputs_at(ckpt).train_grads)
    with run.dir.stage("score") as rec:
        per_checkpoint: dict[str, dict[str, Scores]] = {}
        for ckpt in run.checkpoints if sweep and len(run.checkpoints) > 1 else [chosen]:
            inputs = main_inputs if ckpt.path == chosen.path else inputs_at(ckpt)
            if _needs_gradients(single):
                _gradient_stage(run, ckpt, block_by, inputs.train_grads)
            at = score_methods(
                single, inputs, options=options, on_method=on_method if inputs is main_inputs else None
            )
            for s in at.values():
                s.meta.setdefault("checkpoint", ckpt.path)
            per_checkpoint[ckpt.tag] = at
        scored = dict(per_checkpoint[chosen.tag])
        scored.update(score_methods(across, main_inputs, options=options, on_method=on_method))
        for s in scored.values():
            s.meta.update(query=query_name, block_by=block_by)
        if run.canary_ids:
            _canary_aurocs(
                [s for at in per_checkpoint.values() for s in at.values()] + list(scored.values()),
                run.canary_ids,
            )
        if checkpoint == "canary":
            scored.update(_best_on_canaries(per_checkpoint))
        if len(per_checkpoint) > 1:
            for tag, at in per_checkpoint.items():
                for name, s in at.items():
                    scored[f"{name}@{tag}"] = replace(s, method=f"{name}@{tag}", meta=dict(s.meta))
            for name in single:  # the checkpoint ensemble: mean percentile rank over every epoch
                members = [at[name] for at in per_checkpoint.values() if np.ndim(at[name].values) == 1]
                if len(members) == len(per_checkpoint):
                    scored[f"{name}@ensemble"] = rank_ensemble(members, f"{name}@ensemble")
                    if run.canary_ids:
                        _canary_aurocs([scored[f"{name}@ensemble"]], run.canary_ids)
        if run.canary_ids:
            scored = {name: drop_canaries(s, run.canary_ids) for name, s in scored.items()}
        if measurement != "loss":
            scored = _renamed_for_measurement(scored, measurement)
        remove_epoch_scores(
            run.layout, names if measurement == "loss" else [f"{m}+{measurement}" for m in names]
        )
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
            checkpoint_rule=checkpoint,
            query=query_name,
            block_by=block_by,
            grad_dtype=grad_dtype,
            measurement=measurement,
            methods=previous,
        )
    return scored


def _renamed_for_measurement(scored: dict[str, Scores], measurement: str) -> dict[str, Scores]:
    """``<method>+<measurement>`` for the methods whose scores depend on the query gradient."""
    out = {}
    for name, s in scored.items():
        base, _, tag = name.partition("@")
        uses_query = {QUERY_GRADS, ALL_CHECKPOINTS} & set(get_method(base).needs)
        if uses_query:
            name = f"{base}+{measurement}" + (f"@{tag}" if tag else "")
            s = replace(s, method=name, meta={**s.meta, "measurement": measurement})
        out[name] = s
    return out


def _needs_gradients(names: Sequence[str]) -> bool:
    return any({TRAIN_GRADS, QUERY_GRADS, LOSSES} & set(get_method(m).needs) for m in names)


def _canary_aurocs(scores: Sequence[Scores], canary_ids: Sequence[str]) -> None:
    """Record in each vector's meta how well it ranks the canaries above the other rows (AUROC)."""
    from infscope.evaluate.metrics import auroc

    for s in scores:
        if np.ndim(s.values) != 1 or "canary_auroc" in s.meta:
            continue
        mask = canary_mask(s.train_ids, canary_ids)
        s.meta["canary_auroc"] = auroc(s.vector(), mask) if 0 < mask.sum() < len(mask) else None


def _best_on_canaries(per_checkpoint: dict[str, dict[str, Scores]]) -> dict[str, Scores]:
    """For each method, the checkpoint whose scores rank the canaries highest (first on ties)."""
    chosen: dict[str, Scores] = {}
    for tag, at in per_checkpoint.items():
        for name, s in at.items():
            value = s.meta.get("canary_auroc")
            current = chosen.get(name)
            if current is None or (value is not None and value > (current.meta.get("canary_auroc") or -1)):
                chosen[name] = replace(s, meta={**s.meta, "checkpoint_rule": "canary", "checkpoint_tag": tag})
    return chosen


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
