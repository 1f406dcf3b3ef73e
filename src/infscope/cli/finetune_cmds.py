"""``infscope finetune``: LoRA fine-tuning of a base model on a dataset, one checkpoint per epoch.

A thin layer over :func:`infscope.models.finetune.finetune`: it loads rows, splits off a seeded
validation set if none is given, and prints the checkpoints with their losses (best marked).
Checkpoints go to ``RUN/finetune/checkpoints/epoch-N``; rerunning the same command resumes.

``torchrun --nproc-per-node N -m infscope.cli finetune ...`` trains data-parallel
(:mod:`infscope.models.ddp`): rank 0 alone reads the data, sets up the run directory and prints;
every rank gets its rows from rank 0 and trains its share of each global batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from infscope.cli import app, console
from infscope.cli.options import CanaryNoise, CanarySource, Device, Dtype, Threads, column_options
from infscope.data.training import find_manifest, load_training_data
from infscope.models import ddp
from infscope.models.config import FinetuneConfig, LoraSpec
from infscope.runs import ModelSpec, RunDir, RunLayout, RunRecord

FT = FinetuneConfig()
LORA = LoraSpec()


def _checkpoint_table(result: Any) -> Table:
    table = Table(title="checkpoints")
    for column in ("epoch", "step", "lr", "train loss", "val loss", "best", "path"):
        table.add_column(column, justify="right" if column not in ("best", "path") else "left")
    for c in result.checkpoints:
        table.add_row(
            str(c.epoch),
            str(c.step),
            f"{c.lr:.2e}",
            f"{c.train_loss:.4f}",
            "-" if c.val_loss is None else f"{c.val_loss:.4f}",
            "*" if c.path == result.best.path else "",
            c.path,
        )
    return table


@app.command("finetune")
@column_options
def finetune_command(
    data: str = typer.Argument(
        ..., help="Training data: a file, a saved datasets folder, a Hub name or builtin:NAME."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run directory; checkpoints go to RUN/finetune/checkpoints."
    ),
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        "-m",
        help="smollm2-135m (real, built in), minilm (classification), a local checkpoint dir, a Hub name; "
        "tiny-llama / tiny-bert are random test models.",
    ),
    val: str | None = typer.Option(None, "--val", help="Validation data (same forms as DATA)."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of DATA held out when --val is absent."
    ),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help="Known-bad rows of DATA for `infscope evaluate` (a noise manifest, id + is_noisy JSONL, or ids "
        "one a line) (default: DATA's .manifest.jsonl if present).",
    ),
    epochs: int = typer.Option(FT.epochs, "--epochs", help="Number of epochs (one checkpoint each)."),
    lr: float = typer.Option(FT.lr, "--lr", help="Peak learning rate of AdamW."),
    batch_size: int = typer.Option(FT.batch_size, "--batch-size", help="Rows per optimiser step."),
    schedule: str = typer.Option(
        FT.schedule, "--schedule", help="LR schedule after warmup: linear, cosine or constant."
    ),
    rank: int = typer.Option(LORA.r, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(LORA.alpha, "--alpha", help="LoRA alpha (scale alpha/r)."),
    target_modules: str | None = typer.Option(
        None, "--target-modules", help="Comma-separated module names for LoRA (default: q/v projections)."
    ),
    lora_layers: str | None = typer.Option(
        None,
        "--lora-layers",
        help="Decoder layers that get LoRA: all, top:N or a list like 20-29 (default: all). "
        "With top:N the frozen layers below run once per row and are cached.",
    ),
    max_length: int = typer.Option(
        FT.max_length, "--max-length", help="Maximum tokens per row (longer rows are cut)."
    ),
    seed: int = typer.Option(
        FT.seed, "--seed", help="Seed for the split, LoRA init, batch order and dropout."
    ),
    device: Device = "cpu",
    dtype: Dtype = "float32",
    full_text: bool = typer.Option(
        False, "--full-text", help="Train on prompt and response, not the response only."
    ),
    canaries: float = typer.Option(
        0.0,
        "--canaries",
        help="Share of extra canary rows: copies of your rows corrupted by infscope's noise, added before "
        "fine-tuning to calibrate detectors (`score --method fusion`); never shown in any output. 0 = none.",
    ),
    canary_noise: CanaryNoise = None,
    canary_source: CanarySource = "auto",
    capture: str | None = typer.Option(
        None,
        "--capture",
        help="Keep per-example gradients from the training steps of the last (or every) epoch in "
        "RUN/scoring/inrun-epoch-N, so influence needs no extra gradient pass: last or every.",
    ),
    threads: Threads = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run directory made with other arguments."
    ),
    columns: Any = None,
) -> None:
    """Fine-tune LoRA adapters on DATA and save a checkpoint (adapter + optimizer state) per epoch."""
    from infscope.data.writing import write_rows
    from infscope.grads.inrun import finetune_with_capture
    from infscope.models.registry import load_spec
    from infscope.noise.canaries import (
        add_canaries,
        check_canary_setting,
        default_canary_noise,
        without_canary_sources,
    )
    from infscope.runtime import set_threads

    set_threads(threads)
    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        schedule=schedule,
        seed=seed,
        max_length=max_length,
        response_only=not full_text,
        device=device,
        dtype=dtype,
        lora=LoraSpec(r=rank, alpha=alpha, target_modules=targets, layers=lora_layers),
        capture=capture,
    )
    ddp.refuse_capture(capture)
    ddp.init_from_env(device)  # under torchrun: join the group before rank 0 writes anything
    runs: list[RunDir] = []  # rank 0's run directory

    def prepare() -> tuple[ModelSpec, list[dict], list[dict], int]:
        """Read the data and set up the run directory (rank 0 only under torchrun)."""
        split = load_training_data(data, val, val_fraction, seed, columns)
        spec = ModelSpec(
            name=model,
            task=split.task,
            label_names=split.label_names,
            max_length=max_length,
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
            response_only=not full_text,
        )
        if canaries:  # checked before the run directory is made: a bad canary setting writes nothing
            check_canary_setting(canaries, canary_noise, canary_source, split.train, split.val, split.task)
        manifest_path = find_manifest(data, manifest)
        record = RunRecord(
            kind="finetune",
            model=spec,
            data=split.source,
            finetune=config.to_dict(),
            manifest=str(manifest_path) if manifest_path else None,
            args={
                "command": "finetune",
                "data": split.source.train,
                "data_fingerprint": split.source.fingerprint,
                "val": split.source.val,
                "val_fraction": split.source.val_fraction,
                "columns": split.source.columns or None,
                "model": model,
                "config": config.to_dict(),
                "canaries": canaries or None,
                "canary_noise": (canary_noise or default_canary_noise(split.task)) if canaries else None,
                "canary_source": canary_source if canaries else None,
            },
        )
        run = RunDir.create(out, record, overwrite=overwrite)
        if not run.done("data"):
            with run.stage("data") as rec:
                write_rows(split.train, run.layout.train)
                write_rows(split.val, run.layout.val)
                rec.info.update(train_rows=len(split.train), val_rows=len(split.val), task=split.task)
        train_rows = split.train
        if canaries:
            train_rows = add_canaries(
                run,
                split.train,
                fraction=canaries,
                noise=record.args["canary_noise"],
                seed=seed,
                task=split.task,
                label_names=split.label_names,
                val=split.val,
                source=canary_source,
            )
            run.save()
        runs.append(run)
        val_rows = without_canary_sources(split.val, run.record.canaries)
        return spec, list(train_rows), val_rows, len(train_rows) - len(split.train)

    spec, train_rows, val_rows, n_canaries = ddp.run_on_main(prepare)
    run = runs[0] if runs else None
    loaded = load_spec(spec)
    with run.stage("finetune") if run is not None else nullcontext() as rec:
        if run is not None:
            console.print(
                f"fine-tuning {model} on {len(train_rows)} rows ({len(val_rows)} validation"
                + (
                    f", {n_canaries} canaries copied from {run.record.canaries['source']} rows"
                    if canaries
                    else ""
                )
                + "), "
                f"{epochs} epochs, LoRA r={rank}"
                + (f", {ddp.world_size()} processes" if ddp.is_distributed() else "")
            )
        labels = spec.label_names if spec.task == "classification" else None
        layout = RunLayout(out)
        result = finetune_with_capture(
            loaded,
            train_rows,
            val_rows,
            config,
            layout.finetune,
            label_names=labels,
            store_dir=layout.inrun,
        )
        if rec is not None:
            rec.info.update(
                best=result.best.path, epochs=len(result.checkpoints), resumed_from=result.resumed_from
            )
    if run is None:  # the other ranks of a torchrun launch print nothing
        return
    if result.resumed_from:
        console.print(f"resumed after epoch {result.resumed_from}")
    console.print(_checkpoint_table(result))
    console.print(f"best checkpoint: {result.best.path}")
    console.print(f"next: infscope score {out}")
