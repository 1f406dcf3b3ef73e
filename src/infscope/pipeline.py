"""The stages wired over a run directory: data -> noise -> fine-tune -> gradients -> scores -> evaluation.

Each stage reads what the stage before it wrote into the run directory and records its time and
peak memory in ``run.json``. A stage that already finished is skipped, so rerunning the same
command after an interruption resumes where it stopped. ``infscope demo``, ``infscope score`` and
``infscope evaluate`` are thin layers over the functions here.

Paths come from :class:`~infscope.runs.RunLayout`; the run record from :class:`~infscope.runs.RunRecord`.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_CHOICES",
    "DEFAULT_METHODS",
    "DEMO_NOISE",
    "PipelineConfig",
    "PipelineResult",
    "finetune_config",
    "model_spec",
    "run_pipeline",
]

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from infscope.pipeline_config import CHECKPOINT_CHOICES, DEFAULT_METHODS, DEMO_NOISE, PipelineConfig
from infscope.runs import DataSource, ModelSpec, RunDir, RunRecord, atomic_write_json, read_jsonl


@dataclass
class PipelineResult:
    """What a finished run produced: where it lives, the leaderboard, evaluation and per-stage cost."""

    run_dir: Path
    leaderboard: pd.DataFrame
    evaluation: dict[str, Any]
    stages: dict[str, dict[str, Any]]


# ---------------------------------------------------------------- stages


def stage_data(run: RunDir, cfg: PipelineConfig) -> tuple[list[dict], list[dict], list | None]:
    """Generate the built-in dataset (train + clean validation split) into ``data/``."""
    from infscope.data.writing import write_rows

    train_path, val_path = run.layout.train_clean, run.layout.val
    if not run.done("data"):
        from infscope.data.builtin import make_builtin

        with run.stage("data") as rec:
            split = make_builtin(
                cfg.dataset,
                seed=cfg.seed,
                n_classes=cfg.classes,
                per_class=cfg.train_per_class + cfg.val_per_class,
                n_test_per_class=cfg.val_per_class,
                paraphrase=cfg.paraphrase,
            )
            write_rows(split.train, train_path)
            write_rows(split.test, val_path)
            rec.info.update(
                train_rows=len(split.train),
                val_rows=len(split.test),
                task=split.task,
                label_names=list(split.label_names) if split.label_names else None,
            )
    info = run.stage_info("data")
    return read_jsonl(train_path), read_jsonl(val_path), info.get("label_names")


def stage_noise(
    run: RunDir, cfg: PipelineConfig, train: list[dict], label_names
) -> tuple[list[dict], pd.DataFrame]:
    """Corrupt ``noise_ratio`` of the training rows and write the ground-truth manifest."""
    from infscope.data.manifest import read_manifest, write_manifest
    from infscope.data.writing import write_rows

    noisy_path, manifest_path = run.layout.train, run.layout.manifest
    if not run.done("noise"):
        with run.stage("noise") as rec:
            if cfg.noise_ratio > 0:
                from infscope.noise.inject import inject_noise

                result = inject_noise(
                    train,
                    task=run.record.model.task,
                    ratio=cfg.noise_ratio,
                    strategy=cfg.noise_strategy,
                    weights=cfg.noise_weights,
                    seed=cfg.seed,
                    label_names=label_names,
                )
                rows, manifest = result.rows, result.manifest
            else:
                rows = train
                manifest = [_clean_record(str(r["id"]), cfg.seed) for r in train]
            write_rows(rows, noisy_path)
            write_manifest(manifest, manifest_path)
            rec.info.update(noisy_rows=int(sum(bool(m["is_noisy"]) for m in manifest)))
    return read_jsonl(noisy_path), read_manifest(manifest_path)


def _clean_record(row_id: str, seed: int) -> dict[str, Any]:
    from infscope.data.manifest import MANIFEST_FIELDS

    record: dict[str, Any] = dict.fromkeys(MANIFEST_FIELDS)
    record.update(id=row_id, is_noisy=False, label_changed=False, severity=0.0, seed=seed)
    return record


def model_spec(cfg: PipelineConfig, task: str = "instruction", label_names=None) -> ModelSpec:
    """The model a run of ``cfg`` fine-tunes and scores (``task`` and classes come from the generated data)."""
    return ModelSpec(
        name=cfg.model,
        task=task,
        label_names=list(label_names) if label_names and task == "classification" else None,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        dtype=cfg.dtype,
    )


def finetune_config(cfg: PipelineConfig):
    """The :class:`~infscope.models.config.FinetuneConfig` of a run of ``cfg`` (also used to retrain it)."""
    from infscope.models.config import lora_finetune_config

    return lora_finetune_config(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_length=cfg.max_length,
        device=cfg.device,
        dtype=cfg.dtype,
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=cfg.target_modules,
        lora_layers=cfg.lora_layers,
    )


def pipeline_record(cfg: PipelineConfig, kind: str = "demo") -> RunRecord:
    """The run record of a pipeline run (task and label names are filled in once the data exists)."""
    return RunRecord(
        kind=kind,
        model=model_spec(cfg),
        data=DataSource(
            builtin={
                "name": cfg.dataset,
                "classes": cfg.classes,
                "train_per_class": cfg.train_per_class,
                "val_per_class": cfg.val_per_class,
                "paraphrase": cfg.paraphrase,
            },
            split_seed=cfg.seed,
        ),
        finetune=finetune_config(cfg).to_dict(),
        manifest="data/manifest.jsonl",
        args=cfg.as_args(),
    )


def stage_finetune(run: RunDir, cfg: PipelineConfig, train, val) -> dict[str, Any]:
    """LoRA fine-tuning with a checkpoint per epoch; records which checkpoint will be scored."""
    from infscope.models.finetune import finetune
    from infscope.models.registry import load_spec

    if not run.done("finetune"):
        with run.stage("finetune") as rec:
            spec = run.record.model
            loaded = load_spec(spec)
            labels = spec.label_names if spec.task == "classification" else None
            result = finetune(
                loaded, train, val, finetune_config(cfg), run.layout.finetune, label_names=labels
            )
            chosen = result.checkpoints[-1] if cfg.checkpoint == "last" else result.best
            rec.info.update(
                checkpoint=str(chosen.path),
                epoch=chosen.epoch,
                val_loss=chosen.val_loss,
                rule=cfg.checkpoint,
                checkpoints=[
                    {
                        "epoch": c.epoch,
                        "step": c.step,
                        "lr": c.lr,
                        "val_loss": c.val_loss,
                        "train_loss": c.train_loss,
                    }
                    for c in result.checkpoints
                ],
            )
    return run.stage_info("finetune")


def stage_score(run: RunDir, cfg: PipelineConfig) -> dict[str, Any]:
    """Gradients at the chosen checkpoint, then every configured method, as ``infscope score`` does."""
    from infscope.estimators.scores import Scores
    from infscope.scoring import score_run
    from infscope.scoring.tables import MATRIX_SUFFIX, load_scores, save_scores

    methods = methods_for_task(cfg.methods, run.record.model.task)
    if not run.done("score"):
        scored = score_run(run.path, methods, checkpoint=cfg.checkpoint, grad_dtype=cfg.grad_dtype)
        if cfg.attribution:
            from infscope.estimators.registry import get_method
            from infscope.scoring import RunInputs, open_run, score_methods
            from infscope.scoring.methods import parse_methods

            opened = open_run(run.path)
            rule = cfg.checkpoint if cfg.checkpoint in ("best", "last") else "best"
            inputs = RunInputs(opened, opened.checkpoint(rule), opened.val, aggregate=False)
            matrices = score_methods(
                [m for m in parse_methods(methods, inputs) if get_method(m).per_query], inputs
            )
            save_scores(run.layout, matrices, suffix=MATRIX_SUFFIX)
        return {m: s for m, s in scored.items() if "@" not in m}
    if "all" in methods:
        return {m: s for m, s in load_scores(run.layout).items() if "@" not in m}
    return {m: Scores.load(run.layout.scores(m)) for m in methods}


def methods_for_task(methods: tuple[str, ...], task: str) -> list[str]:
    """``methods`` without the *default* methods of the other task (xprompt on labels, text_oof on
    instructions); a method the user named that does not fit still reaches scoring and its error."""
    from infscope.estimators.registry import get_method

    return [m for m in methods if m == "all" or m not in DEFAULT_METHODS or task in get_method(m).tasks]


def stage_evaluate(
    run: RunDir, cfg: PipelineConfig, scores: dict, manifest: pd.DataFrame, train, val
) -> dict:
    """Detection metrics per method (overall, per family and operator) and attribution metrics."""
    from infscope.evaluate.jsonable import to_jsonable
    from infscope.scoring import detection_evaluation

    evaluation: dict[str, Any] = {
        "checkpoint": {k: v for k, v in run.stage_info("finetune").items() if k != "checkpoints"},
        **detection_evaluation(scores, manifest),
    }
    if cfg.attribution:
        evaluation["attribution"] = attribution_metrics(run, cfg, train, val)
    atomic_write_json(run.layout.evaluation, to_jsonable(evaluation))
    return evaluation


def attribution_metrics(run: RunDir, cfg: PipelineConfig, train, val) -> dict[str, Any]:
    """Class-detection AUC and recall of the per-query score matrices (the DataInf paper's metric)."""
    from infscope.estimators.scores import Scores
    from infscope.evaluate.attribution import class_detection
    from infscope.scoring.tables import MATRIX_SUFFIX

    train_class = {str(r["id"]): r.get("class") for r in train}
    val_class = {str(r["id"]): r.get("class") for r in val}
    out = {}
    for method in cfg.methods:
        path = run.layout.scores(method + MATRIX_SUFFIX)
        if not path.exists():
            continue
        s = Scores.load(path)
        result = class_detection(
            s.values, [train_class[i] for i in s.train_ids], [val_class[i] for i in s.query_ids]
        )
        out[method] = {"auc": result["auc"], "recall": result["recall"]}
    return out


def leaderboard_frame(evaluation: dict[str, Any]) -> pd.DataFrame:
    """The leaderboard of one run (or several seeds' rows) as a DataFrame sorted by AUROC."""
    from infscope.evaluate.aggregate import leaderboard

    return leaderboard(evaluation.get("leaderboard", []))


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    kind: str = "demo",
) -> PipelineResult:
    """Run every stage (skipping those already done) and return the leaderboard and evaluation."""
    say = log or (lambda message: None)
    run = RunDir.create(out_dir, pipeline_record(cfg, kind), overwrite=overwrite)
    say(f"data: built-in {cfg.dataset}")
    clean, val, label_names = stage_data(run, cfg)
    task = run.stage_info("data").get("task") or "instruction"
    if (
        run.record.model.task != task
        or run.record.model.label_names != model_spec(cfg, task, label_names).label_names
    ):
        run.record.model = model_spec(cfg, task, label_names)
        run.save()
    say(f"noise: {cfg.noise_ratio:.0%} {cfg.noise_weights or cfg.noise_strategy}")
    train, manifest = stage_noise(run, cfg, clean, label_names)
    if cfg.canaries:
        from infscope.noise.canaries import add_canaries, default_canary_noise, without_canary_sources

        noise = cfg.canary_noise or default_canary_noise(run.record.model.task)
        say(f"canaries: {cfg.canaries:.0%} of the training rows, {noise}")
        train = add_canaries(
            run,
            train,
            fraction=cfg.canaries,
            noise=noise,
            seed=cfg.seed,
            task=run.record.model.task,
            label_names=label_names,
            val=val,
            source=cfg.canary_source,
        )
        run.save()
        say(f"canaries copy {run.record.canaries['source']} rows")
        val = without_canary_sources(val, run.record.canaries)
    say(f"finetune: {cfg.model}, LoRA r={cfg.rank}, {cfg.epochs} epochs on {len(train)} rows")
    ft = stage_finetune(run, cfg, train, val)
    where = {"best": f"epoch {ft['epoch']} (best validation loss)", "last": "the last epoch"}
    say(f"score: {', '.join(cfg.methods)} at {where.get(cfg.checkpoint, cfg.checkpoint + ' checkpoints')}")
    scores = stage_score(run, cfg)
    run = RunDir.open(out_dir)
    evaluation = stage_evaluate(run, cfg, scores, manifest, train, val)
    return PipelineResult(Path(out_dir), leaderboard_frame(evaluation), evaluation, run.stages())
