"""Score the training rows of a run: open it, provide each method what it needs, save ranked tables.

Used by ``infscope demo`` (the pipeline) and ``infscope score`` alike, so a run scores the same way
whichever command made it. Paths come from :class:`~infscope.runs.RunLayout`. The streamed path
(:mod:`infscope.scoring.distributed`) saves and records its scores through the same helpers
(:func:`finish_scores`, :func:`record_score_stage`), so a streamed run reads like a stored one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from infscope.data.loading import load_rows
from infscope.errors import InfscopeError
from infscope.estimators.fusion import drop_canaries, rank_ensemble
from infscope.estimators.inputs import (
    ALL_CHECKPOINTS,
    CANARIES,
    EMBEDDINGS,
    KFAC_FACTORS,
    LOSSES,
    MODEL,
    OPTIMIZER_STATE,
    QUERY_GRADS,
    TRAIN_GRADS,
)
from infscope.estimators.registry import get_method
from infscope.estimators.scores import Scores
from infscope.grads.store import GradientStore
from infscope.models.loss import per_example_loss
from infscope.models.registry import load_spec
from infscope.noise.canaries import canary_mask
from infscope.runs import StageRecord
from infscope.scoring.gradients import encode_for
from infscope.scoring.inputs import RunInputs, per_instance
from infscope.scoring.methods import parse_methods, runnable, score_methods
from infscope.scoring.run import Checkpoint, OpenedRun, is_inrun_rule, open_run
from infscope.scoring.tables import detection_evaluation, load_scores, remove_epoch_scores, save_scores

__all__ = [
    "Checkpoint",
    "InRunInputs",
    "OpenedRun",
    "RunInputs",
    "canary_aurocs",
    "detection_evaluation",
    "finish_scores",
    "load_scores",
    "open_run",
    "parse_methods",
    "record_score_stage",
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


#: What in-run stores cannot provide: each of these needs the model (or optimiser) at a saved checkpoint.
INRUN_MISSING = (MODEL, OPTIMIZER_STATE, EMBEDDINGS, KFAC_FACTORS)


class InRunInputs(RunInputs):
    """:class:`RunInputs` read from the gradients fine-tuning captured (``--checkpoint inrun``).

    The run must be an :meth:`~infscope.scoring.run.OpenedRun.inrun_view`: its checkpoints are the
    captured epochs, so gradients, query gradients and losses come from ``RunLayout.inrun(epoch)``
    (see :func:`~infscope.scoring.gradients.inrun_gradients`) and TracIn sums over the captured
    epochs. Nothing that needs the tuned model at a checkpoint is available. ``base_loss`` (the base
    model's loss, which no checkpoint changes) takes one forward pass of the base model.
    """

    def available(self, need: str) -> bool:
        return need not in INRUN_MISSING and super().available(need)

    @per_instance
    def losses(self) -> pd.DataFrame:
        frame = super().losses().copy()
        spec = self.run.spec
        loaded = load_spec(spec)
        loaded.model.requires_grad_(False)
        base = per_example_loss(
            loaded.model, encode_for(spec, self.run.train, loaded.tokenizer), spec.batch_size
        )
        frame["base_loss"] = pd.Series(base, index=self.train_ids).loc[frame["id"]].to_numpy()
        return frame

    def model(self, which: str = "checkpoint"):
        raise InfscopeError(_INRUN_FIX.format(what="a model forward"))

    def kfac_factors(self, fisher: str = "empirical"):
        raise InfscopeError(_INRUN_FIX.format(what="K-FAC factors"))

    def embeddings(self):
        raise InfscopeError(_INRUN_FIX.format(what="embeddings"))


_INRUN_FIX = (
    "{what} needs the model at a saved checkpoint, which in-run stores do not hold; "
    "score it with --checkpoint best (or last, epoch-N)"
)


def _check_inrun(run: OpenedRun, names: Sequence[str], query: str | None, measurement: str) -> None:
    """Refuse what in-run stores cannot score, before anything is computed."""
    if query is not None:
        raise InfscopeError(
            "in-run stores hold the validation rows' gradients only; drop --query or score --checkpoint best"
        )
    if measurement != "loss":
        raise InfscopeError(_INRUN_FIX.format(what=f"the {measurement} measurement"))
    for name in names:
        missing = [n for n in get_method(name).needs if n in INRUN_MISSING]
        if missing:
            raise InfscopeError(_INRUN_FIX.format(what=f"method {name} ({', '.join(missing)})"))
    captured = GradientStore.open(run.layout.grads(run.best.path, "train")).ids
    if sorted(captured) != sorted(str(r["id"]) for r in run.train):
        raise InfscopeError(
            f"the in-run gradients in {run.best.path} cover other rows than the run's; "
            "fine-tune again with `infscope finetune --capture last`"
        )


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
    needed). Which checkpoint is scored often matters more than the method. ``inrun`` (or
    ``inrun:EPOCH``) scores from the gradients fine-tuning captured (``finetune --capture``) with
    no gradient pass: the last (or that) captured epoch, TracIn summed over the captured epochs
    (:class:`InRunInputs`); methods that need the model at a checkpoint are refused.

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
    inrun = is_inrun_rule(checkpoint)
    if inrun:
        run = run.inrun_view(checkpoint)
    chosen = run.checkpoint("best" if sweep or inrun else checkpoint)
    query_rows, query_name = query_inputs(run, query)

    def inputs_at(ckpt: Checkpoint) -> RunInputs:
        return (InRunInputs if inrun else RunInputs)(
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
    if inrun:
        _check_inrun(run, names, query, measurement)
    across = [m for m in names if ALL_CHECKPOINTS in get_method(m).needs]
    # methods that use other methods' scores (fusion) go last, so they reuse what was computed
    single = sorted((m for m in names if m not in across), key=lambda m: CANARIES in get_method(m).needs)
    if across and not inrun:  # in-run gradients were taken during fine-tuning: no gradient pass to time
        for ckpt in run.checkpoints:
            _gradient_stage(run, ckpt, block_by, inputs_at(ckpt).train_grads)
    with run.dir.stage("score") as rec:
        per_checkpoint: dict[str, dict[str, Scores]] = {}
        for ckpt in run.checkpoints if sweep and len(run.checkpoints) > 1 else [chosen]:
            inputs = main_inputs if ckpt.path == chosen.path else inputs_at(ckpt)
            if _needs_gradients(single) and not inrun:
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
            canary_aurocs(
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
                        canary_aurocs([scored[f"{name}@ensemble"]], run.canary_ids)
        scored = finish_scores(run, scored, names, measurement)
        record_score_stage(
            rec,
            run,
            scored,
            checkpoint=chosen.path,
            checkpoint_tag=chosen.tag,
            checkpoint_rule=checkpoint,
            query=query_name,
            block_by=block_by,
            grad_dtype="float32 (captured)" if inrun else grad_dtype,
            measurement=measurement,
        )
    return scored


def finish_scores(
    run: OpenedRun, scored: dict[str, Scores], names: Sequence[str], measurement: str = "loss"
) -> dict[str, Scores]:
    """Drop the canaries, name the measurement (``<method>+pairing``), save; returns what was saved.

    Canary AUROCs must already be in the metas (:func:`_canary_aurocs`): after this no canary
    row is left. Earlier ``@<tag>`` scores of ``names`` are removed first.
    """
    if run.canary_ids:
        scored = {name: drop_canaries(s, run.canary_ids) for name, s in scored.items()}
    if measurement != "loss":
        scored = _renamed_for_measurement(scored, measurement)
    remove_epoch_scores(run.layout, names if measurement == "loss" else [f"{m}+{measurement}" for m in names])
    save_scores(run.layout, scored)
    return scored


def record_score_stage(rec: StageRecord, run: OpenedRun, scored: dict[str, Scores], **info: Any) -> None:
    """Fill the ``score`` stage record: ``info`` plus each method's seconds and peak memory, kept across calls."""
    previous = dict(run.dir.stage_info("score").get("methods", {}))
    previous.update(
        {
            m: {"seconds": s.meta.get("seconds"), "peak_rss_mb": s.meta.get("peak_rss_mb")}
            for m, s in scored.items()
        }
    )
    rec.info.update(**info, methods=previous)


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


def canary_aurocs(scores: Sequence[Scores], canary_ids: Sequence[str]) -> None:
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
