"""``infscope finetune``: LoRA fine-tuning of a base model on a dataset, one checkpoint per epoch.

A thin layer over :func:`infscope.models.finetune.finetune`: it loads rows, splits off a seeded
validation set if none is given, and prints the checkpoints with their losses (best marked).
Checkpoints go to ``RUN/finetune/checkpoints/epoch-N``; rerunning the same command resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from infscope.cli import app, console
from infscope.errors import InfscopeError


def split_validation(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of ``rows`` into (train, validation); at least one row on each side when possible."""
    if not 0.0 <= fraction < 1.0:
        raise InfscopeError(f"--val-fraction must be in [0, 1), got {fraction}; pass e.g. 0.1")
    n_val = int(round(fraction * len(rows)))
    if fraction > 0 and len(rows) >= 2:
        n_val = min(max(n_val, 1), len(rows) - 1)
    order = np.random.default_rng(seed).permutation(len(rows))
    val_pos = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(rows) if i not in val_pos]
    val = [r for i, r in enumerate(rows) if i in val_pos]
    return train, val


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
def finetune_command(
    data: str = typer.Argument(
        ..., help="Training data: a file, a saved datasets folder, a Hub name or builtin:NAME."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run directory; checkpoints go to RUN/finetune/checkpoints."
    ),
    model: str = typer.Option(
        "tiny-llama", "--model", "-m", help="Built-in name, local checkpoint dir or Hub name."
    ),
    val: str | None = typer.Option(None, "--val", help="Validation data (same forms as DATA)."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of DATA held out when --val is absent."
    ),
    epochs: int = typer.Option(3, "--epochs", help="Number of epochs (one checkpoint each)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate of AdamW."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per optimiser step."),
    schedule: str = typer.Option(
        "linear", "--schedule", help="LR schedule after warmup: linear, cosine or constant."
    ),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scale alpha/r)."),
    target_modules: str | None = typer.Option(
        None, "--target-modules", help="Comma-separated module names for LoRA [default: q/v projections]."
    ),
    lora_layers: str | None = typer.Option(
        None,
        "--lora-layers",
        help="Decoder layers that get LoRA: all, top:N or a list like 20-29 [default: all]. "
        "With top:N the frozen layers below run once per row and are cached.",
    ),
    max_length: int = typer.Option(256, "--max-length", help="Maximum tokens per row (longer rows are cut)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, LoRA init, batch order and dropout."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    full_text: bool = typer.Option(
        False, "--full-text", help="Train on prompt and response, not the response only."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run directory made with other arguments."
    ),
) -> None:
    """Fine-tune LoRA adapters on DATA and save a checkpoint (adapter + optimizer state) per epoch."""
    from infscope.data.loading import load_rows
    from infscope.models.finetune import FinetuneConfig, finetune
    from infscope.models.lora import LoraSpec
    from infscope.models.registry import load_model
    from infscope.runs import RunDir

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
    )
    loaded_data = load_rows(data)
    if val is not None:
        train_rows, val_rows = loaded_data.rows, load_rows(val, task=loaded_data.task).rows
    else:
        train_rows, val_rows = split_validation(loaded_data.rows, val_fraction, seed)
    task = "classification" if loaded_data.task == "classification" else "causal"
    label_names = loaded_data.label_names if task == "classification" else None
    num_labels = None
    if task == "classification":
        num_labels = (
            len(label_names) if label_names else int(max(int(r["label"]) for r in loaded_data.rows)) + 1
        )
    args = {
        "command": "finetune",
        "data": data,
        "data_fingerprint": loaded_data.fingerprint,
        "val": val,
        "val_fraction": val_fraction if val is None else None,
        "model": model,
        "config": config.to_dict(),
    }
    loaded = load_model(model, task=task, num_labels=num_labels, device=device, dtype=dtype, seed=seed)
    run = RunDir(out, args, overwrite=overwrite)
    with run.stage("finetune") as rec:
        console.print(
            f"fine-tuning {model} on {len(train_rows)} rows ({len(val_rows)} validation), "
            f"{epochs} epochs, LoRA r={rank}"
        )
        result = finetune(loaded, train_rows, val_rows, config, run.file("finetune"), label_names=label_names)
        rec.info.update(
            best=result.best.path, epochs=len(result.checkpoints), resumed_from=result.resumed_from
        )
    if result.resumed_from:
        console.print(f"resumed after epoch {result.resumed_from}")
    console.print(_checkpoint_table(result))
    console.print(f"best checkpoint: {result.best.path}")
