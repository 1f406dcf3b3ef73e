"""``infscope plan``: gradient size, store size, peak memory and time per stage, before running anything."""

from __future__ import annotations

import typer

from infscope.cli import app, console
from infscope.errors import InfscopeError


@app.command("plan")
def plan_command(
    model: str = typer.Option(..., "--model", help="Built-in name, local directory, or a Hub name to size."),
    rows: int = typer.Option(..., "--rows", help="Number of training rows to collect and score."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    targets: str = typer.Option("q_proj,v_proj", "--targets", help="Comma-separated LoRA target modules."),
    project: int | None = typer.Option(None, "--project", help="Project each gradient block to D columns."),
    lora_layers: str | None = typer.Option(None, "--lora-layers", help="all, top:N or a list such as 20-29."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per row (the encoding's --max-length)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per batch in fine-tuning and gradients."),
    shard_rows: int = typer.Option(256, "--shard-rows", help="Rows per gradient store shard."),
    epochs: int = typer.Option(1, "--epochs", help="Fine-tuning epochs."),
    hidden: int | None = typer.Option(None, "--hidden", help="Hidden size (for a model not on disk)."),
    layers: int | None = typer.Option(None, "--layers", help="Decoder layers (for a model not on disk)."),
    intermediate: int | None = typer.Option(None, "--intermediate", help="MLP width (model not on disk)."),
    vocab: int | None = typer.Option(None, "--vocab", help="Vocabulary size (model not on disk)."),
    heads: int | None = typer.Option(None, "--heads", help="Attention heads (default hidden / 128)."),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="Key/value heads (default: --heads)."),
    probe_model: str | None = typer.Option(
        None, "--probe-model", help="Measure this machine on this (small) model and scale times by FLOPs."
    ),
    no_probe: bool = typer.Option(False, "--no-probe", help="Sizes only: do not load or time any model."),
    probe_rows: int = typer.Option(32, "--probe-rows", help="Rows timed by the probe."),
    gpus: str = typer.Option("1,8,64", "--gpus", help="GPU counts for the extrapolated times."),
    weight_dtype: str = typer.Option(
        "float32",
        "--weight-dtype",
        help="Dtype of the base weights for memory: float32, bfloat16 or float16.",
    ),
    gpu_tflops: float = typer.Option(
        125.0, "--gpu-tflops", help="ASSUMED effective TFLOP/s per GPU (A100 bf16 at ~40 % of peak)."
    ),
) -> None:
    """Print per-row gradient size, store size per dtype and projection, memory and time per stage."""
    from infscope.grads.plan import Architecture, build_plan, format_plan, parse_gpus

    arch = None
    given = {"--hidden": hidden, "--layers": layers, "--intermediate": intermediate, "--vocab": vocab}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise InfscopeError(
                f"{', '.join(missing)} missing; give all of --hidden/--layers/--intermediate/--vocab"
            )
        n_heads = heads or max(1, hidden // 128)
        arch = Architecture(model, hidden, layers, intermediate, vocab, n_heads, kv_heads or n_heads)
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "bf16": 2, "fp16": 2, "fp32": 4}
    if weight_dtype not in sizes:
        raise InfscopeError(f"unknown --weight-dtype {weight_dtype!r}; use float32, bfloat16 or float16")
    plan = build_plan(
        model,
        rows,
        rank=rank,
        targets=targets.split(","),
        project=project,
        lora_layers=lora_layers,
        seq_len=seq_len,
        batch_size=batch_size,
        shard_rows=shard_rows,
        epochs=epochs,
        arch=arch,
        probe_model=probe_model,
        run_probe=not no_probe,
        probe_rows=probe_rows,
        gpus=parse_gpus(gpus),
        gpu_tflops=gpu_tflops,
        weight_bytes=sizes[weight_dtype],
    )
    console.print(format_plan(plan), highlight=False, soft_wrap=True)
