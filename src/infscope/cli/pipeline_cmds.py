"""``infscope demo``, ``infscope score`` and ``infscope evaluate``: thin layers over the pipeline.

``demo`` runs every stage on the embedded default (built-in data, 20 % noise, SmolLM2-135M with
LoRA). ``score`` scores the training rows of a fine-tuned run with chosen methods; ``evaluate``
measures how well the saved scores find the noise recorded in the manifest (one run, or several
seeds with mean and 95 % interval).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from infscope.cli import app, console
from infscope.cli.options import CanaryNoise, CanarySource, Device, Dtype, Threads, column_options
from infscope.data.manifest import read_manifest
from infscope.errors import InfscopeError
from infscope.pipeline_config import SCORE_CHECKPOINT_CHOICES, PipelineConfig
from infscope.runs import RunLayout

#: The demo's option defaults are PipelineConfig's field defaults (read without building a config,
#: which would check method names against the registry and import torch).
PC = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}


def _print_leaderboard(rows: list[dict], title: str) -> None:
    from infscope.evaluate.aggregate import (
        CANARY_METRIC,
        LEADERBOARD_METRICS,
        leaderboard,
        render_leaderboard,
    )

    if not rows:
        console.print("no noisy rows in the manifest: nothing to detect (attribution runs only)")
        return
    metrics = list(LEADERBOARD_METRICS)
    if any(r.get(CANARY_METRIC) is not None for r in rows):
        metrics.insert(2, CANARY_METRIC)
    render_leaderboard(leaderboard(rows, metrics=metrics), console, title=title)


def _print_families(evaluation: dict, column: str = "family") -> None:
    detection = evaluation.get("detection", {})
    if not detection:
        return
    groups = sorted({g for report in detection.values() for g in report.get("by", {}).get(column, {})})
    if not groups:
        return
    table = Table(title=f"AUROC per noise {column} (noisy rows of the {column} vs all clean rows)")
    table.add_column("method")
    for group in groups:
        table.add_column(str(group), justify="right")
    for method, report in detection.items():
        cells = []
        for group in groups:
            value = report.get("by", {}).get(column, {}).get(group, {}).get("auroc")
            n = report.get("by", {}).get(column, {}).get(group, {}).get("n_noisy")
            cells.append("-" if value is None else f"{value:.3f} (n={n})")
        table.add_row(method, *cells)
    console.print(table)


def _print_stages(stages: dict) -> None:
    table = Table(title="time and peak memory per stage")
    for column in ("stage", "seconds", "peak RSS (MB)"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, record in stages.items():
        table.add_row(name, f"{record['seconds']:.1f}", f"{record['peak_rss_mb']:.0f}")
    console.print(table)


@app.command("demo")
def demo_command(
    model: str = typer.Option(PC["model"], "--model", "-m", help="smollm2-135m (real) or tiny-llama (fast)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default: infscope-demo-MODEL)."
    ),
    dataset: str = typer.Option(PC["dataset"], "--dataset", help="Built-in dataset to generate."),
    classes: int = typer.Option(PC["classes"], "--classes", help="Classes of the built-in dataset."),
    train_per_class: int = typer.Option(
        PC["train_per_class"], "--train-per-class", help="Training rows per class."
    ),
    val_per_class: int = typer.Option(
        PC["val_per_class"], "--val-per-class", help="Validation (query) rows per class."
    ),
    ratio: float = typer.Option(PC["noise_ratio"], "--ratio", help="Share of training rows to corrupt."),
    strategy: str = typer.Option(
        PC["noise_strategy"], "--strategy", help="Noise strategy (balanced, grammar_heavy, ...)."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Noise weights over families/operators (default: the demo mix; 'none' uses --strategy).",
    ),
    epochs: int = typer.Option(PC["epochs"], "--epochs", help="Fine-tuning epochs (one checkpoint each)."),
    lr: float = typer.Option(PC["lr"], "--lr", help="Peak learning rate."),
    lora_layers: str | None = typer.Option(
        None, "--lora-layers", help="Decoder layers that get LoRA: all, top:N or a list like 20-29."
    ),
    methods: str = typer.Option("default", "--method", help="Comma-separated methods, 'default' or 'all'."),
    checkpoint: str = typer.Option(
        PC["checkpoint"],
        "--checkpoint",
        help="best (lowest validation loss), last, all, or canary (each method's best on canaries).",
    ),
    seed: int = typer.Option(PC["seed"], "--seed", help="Seed for data, noise, LoRA init and batch order."),
    device: Device = "cpu",
    dtype: Dtype = "float32",
    canaries: float | None = typer.Option(
        None,
        "--canaries",
        help="Share of canary rows (corrupted copies) to calibrate `fusion` and the checkpoint.",
    ),
    canary_noise: CanaryNoise = None,
    canary_source: CanarySource = PC["canary_source"],
    threads: Threads = None,
    report: bool = typer.Option(True, "--report/--no-report", help="Write RUN/report.html at the end."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run made with other arguments."),
) -> None:
    """Run the whole job on the embedded default: data, noise, LoRA fine-tuning, gradients, every method."""
    from infscope.pipeline import PipelineConfig, run_pipeline
    from infscope.runtime import set_threads

    set_threads(threads)
    cfg = PipelineConfig(
        dataset=dataset,
        classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        noise_ratio=ratio,
        noise_strategy=strategy,
        noise_weights=_demo_weights(weights, strategy),
        model=model,
        epochs=epochs,
        lr=lr,
        lora_layers=lora_layers,
        methods=tuple(methods.split(",")),
        canaries=canaries or None,
        canary_noise=canary_noise if canaries else None,
        canary_source=canary_source,
        checkpoint=checkpoint,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    out = out or Path(f"infscope-demo-{model}")
    result = run_pipeline(cfg, out, overwrite=overwrite, log=lambda m: console.print(f"[bold]>[/] {m}"))
    ev = result.evaluation
    ck = ev.get("checkpoint", {})
    console.print(
        f"scored checkpoint: epoch {ck.get('epoch')} (validation loss {ck.get('val_loss', float('nan')):.4f}, "
        f"rule: {ck.get('rule')}); {ev['n_noisy']} of {ev['n_train']} training rows are noisy"
    )
    _print_leaderboard(ev.get("leaderboard", []), "Which method finds the injected noise (higher is better)")
    _print_families(ev)
    _print_stages(result.stages)
    if report:
        from infscope.report import write_report

        console.print(f"report: {write_report(out)}")
    console.print(f"results: {out}/results/<method>.parquet (ranked rows), {out}/evaluation.json")


def _demo_weights(weights: str | None, strategy: str) -> str | None:
    """The demo mix unless the user chose weights, a strategy, or ``--weights none``."""
    from infscope.pipeline import DEMO_NOISE

    if weights is not None:
        return None if weights.lower() == "none" else weights
    return DEMO_NOISE if strategy == "balanced" else None


@app.command("score")
@column_options
def score_command(
    run: Path = typer.Argument(
        ...,
        help="A run directory (infscope finetune / demo), or adapters trained elsewhere: a peft adapter "
        "folder or a Trainer output folder with checkpoint-N subfolders (then pass --data).",
    ),
    method: str = typer.Option(
        "datainf,hessian_free,loss",
        "--method",
        help="Comma-separated methods, or 'all' (every method the run can feed).",
    ),
    query: str | None = typer.Option(
        None, "--query", help="Query rows (default: the run's validation rows)."
    ),
    checkpoint: str = typer.Option(
        "best",
        "--checkpoint",
        help=f"One of {', '.join(SCORE_CHECKPOINT_CHOICES)} or epoch-N. all: every checkpoint also saved as "
        "METHOD@epoch-N, ranked side by side by evaluate; canary: each method at the checkpoint that ranks "
        "the run's canaries highest; inrun (or inrun:EPOCH): the gradients captured during fine-tuning "
        "(`infscope finetune --capture last|every`), no gradient pass, tracin summed over the captured "
        "epochs; methods that need the model (pmi, xprompt, ...) are refused there.",
    ),
    option: list[str] = typer.Option(
        [],
        "--option",
        help="A method option as METHOD.KEY=VALUE, e.g. xprompt.k=5, xprompt.aggregate=min, "
        "lissa.max_iter=1000 (repeatable; `infscope methods` lists the methods).",
    ),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Score datainf, hessian_free, grad_cos, datainf_cos inside the gradient pass without keeping "
        "any gradient store (memory bounded by the batch; DataInf takes 3 passes). Saves and records the "
        "same tables as without it (canaries left out, --query and --measurement pairing honoured). Also "
        "under torchrun.",
    ),
    measurement: str = typer.Option(
        "loss",
        "--measurement",
        help="What the query gradient measures: loss (the validation loss) or pairing (own prompt versus "
        "another row's: does a training row teach the model to ignore its instructions?). Pairing scores "
        "are saved as METHOD+pairing, with or without --stream.",
    ),
    data: str | None = typer.Option(
        None, "--data", help="Training rows of external adapters (same forms as finetune's DATA)."
    ),
    val: str | None = typer.Option(
        None,
        "--val",
        help="Validation rows of external adapters (default: a --val-fraction split of --data).",
    ),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of --data held out when --val is absent."
    ),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Base model of external adapters (default: adapter_config.json's)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory for external adapters (default: infscope-score-NAME)."
    ),
    manifest: Path | None = typer.Option(
        None, "--manifest", help="Known-bad rows of --data, for `infscope evaluate`."
    ),
    max_length: int = typer.Option(256, "--max-length", help="Maximum tokens per row for external adapters."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per gradient pass."),
    grad_dtype: str = typer.Option(
        "float32", "--grad-dtype", help="Gradient store dtype: float32, float16, bfloat16."
    ),
    top: int = typer.Option(10, "--top", help="Rows to show in the harmful / helpful tables."),
    block_by: str = typer.Option(
        "matrix", "--block-by", help="Gradient blocks: matrix (each LoRA A/B), module or layer."
    ),
    show_blocks: bool = typer.Option(
        False, "--blocks", help="Print the block inventory (name, rows, dim, shapes)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split of external adapters."),
    device: Device = "cpu",
    dtype: Dtype = "float32",
    threads: Threads = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run made with other arguments."),
    columns: Any = None,
) -> None:
    """Score every training row of a fine-tuned run (higher = more harmful to the query loss)."""
    from infscope.runtime import set_threads
    from infscope.scoring import open_run, parse_methods, score_run

    parse_methods(method)  # unknown names fail before any model or data is loaded
    set_threads(threads)
    if not (run / "run.json").is_file():
        from infscope.scoring.external import ExternalRequest, start_external_run

        run = start_external_run(
            ExternalRequest(
                adapters=run,
                data=data,
                val=val,
                val_fraction=val_fraction,
                base_model=base_model,
                out=out,
                manifest=manifest,
                max_length=max_length,
                batch_size=batch_size or 8,
                seed=seed,
                device=device,
                dtype=dtype,
                columns=columns,
            ),
            overwrite=overwrite,
        )
        console.print(f"external adapters: run directory {run}")
    elif data is not None:
        raise InfscopeError(
            f"{run} is an infscope run with its own data; drop --data (it is for external adapters)"
        )
    opened = open_run(run)
    for note in opened.notes:
        console.print(f"[yellow]note:[/] {note}")
    if stream:
        from infscope.scoring.distributed import score_run_distributed

        streamed = score_run_distributed(
            opened,
            method,
            checkpoint=checkpoint,
            stream=True,
            batch_size=batch_size,
            block_by=block_by,
            query=query,
            measurement=measurement,
        )
        if streamed:  # rank 0 (or the only process) prints; canaries were dropped before saving
            _print_score_summary(run, streamed, top, show_blocks)
        return
    scored = score_run(
        opened,
        method,
        query=query,
        checkpoint=checkpoint,
        grad_dtype=grad_dtype,
        batch_size=batch_size,
        block_by=block_by,
        measurement=measurement,
        options=parse_method_options(option),
        on_method=lambda name, seconds: console.print(f"  {name}: {seconds:.2f} s"),
    )
    _print_score_summary(run, scored, top, show_blocks)


def parse_method_options(items: list[str]) -> dict[str, dict[str, object]]:
    """``["xprompt.k=5", "xprompt.aggregate=min"]`` -> ``{"xprompt": {"k": 5, "aggregate": "min"}}``."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not (sep and dot and method and name):
            raise InfscopeError(f"--option {item!r} is not METHOD.KEY=VALUE; pass e.g. --option xprompt.k=5")
        value: object = raw.strip()
        for convert in (int, float):
            try:
                value = convert(raw)
                break
            except ValueError:
                continue
        if raw.strip().lower() in ("true", "false"):
            value = raw.strip().lower() == "true"
        out.setdefault(method.strip(), {})[name.strip()] = value
    return out


def _print_score_summary(run: Path, scored: dict, top: int, show_blocks: bool) -> None:
    from infscope.grads.blocks import block_inventory, format_inventory
    from infscope.grads.store import GradientStore
    from infscope.runs import RunDir

    opened = RunDir.open(run)
    record = opened.record
    info = record.stages.get("score", {}).get("info", {})
    first = next(iter(scored.values()))
    store_path = opened.layout.grads(info.get("checkpoint", ""), "train", info.get("block_by", "matrix"))
    if info.get("streamed"):
        console.print("gradients: streamed in the scoring pass (no gradient store kept)")
    elif (store_path / "index.json").is_file():
        inventory = block_inventory(GradientStore.open(store_path))
        console.print(
            f"gradients: {len(inventory)} blocks, {sum(b.dim for b in inventory):,} parameters ({store_path})"
        )
        if show_blocks:
            console.print(format_inventory(inventory), highlight=False)
    _print_stages({k: v for k, v in record.stages.items() if k.startswith("gradients") or k == "score"})
    timing = Table(title="scores")
    for column in ("method", "seconds", "peak MB", "most harmful", "most helpful"):
        timing.add_column(column)
    for name, s in scored.items():
        timing.add_row(
            name,
            "-" if s.meta.get("seconds") is None else f"{s.meta['seconds']:.2f}",
            "-" if s.meta.get("peak_rss_mb") is None else f"{s.meta['peak_rss_mb']:.0f}",
            ", ".join(s.harmful(min(top, 3))),
            ", ".join(s.helpful(min(top, 3))),
        )
    console.print(timing)
    for name, s in scored.items():
        for message in s.meta.get("warnings", []):
            console.print(f"[yellow]warning ({name}):[/] {message}")
    frame = first.to_frame().sort_values("rank").head(top)
    table = Table(title=f"top {top} harmful rows by {first.method}")
    for column in ("rank", "id", "score"):
        table.add_column(column)
    for row in frame.itertuples():
        table.add_row(str(row.rank), str(row.id), f"{row.score:.4g}")
    console.print(table)
    console.print(f"ranked tables: {run}/results/<method>.parquet and .csv; next: infscope evaluate {run}")


@app.command("evaluate")
def evaluate_command(
    runs: list[Path] = typer.Argument(..., help="One run directory, or several (seeds) to average."),
    manifest: list[Path] = typer.Option(
        [],
        "--manifest",
        help="Known-bad rows: a noise manifest, id + is_noisy JSONL, or noisy ids one a line "
        "(default: the run's own); repeat once per run when evaluating several.",
    ),
    k: list[int] = typer.Option([], "--k", help="Extra cut-offs for precision/recall at k."),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation as JSON."),
) -> None:
    """Leaderboard of how well each saved score finds the injected noise (AUROC, AP, P@k, time, memory)."""
    from infscope.evaluate.jsonable import to_jsonable
    from infscope.runs import atomic_write_json
    from infscope.scoring import detection_evaluation, load_scores, open_run

    if manifest and len(manifest) not in (1, len(runs)):
        raise InfscopeError(
            f"got {len(manifest)} --manifest files for {len(runs)} runs; pass one for all or one per run"
        )
    rows, evaluations = [], {}
    for index, run in enumerate(runs):
        opened = open_run(run)
        path = manifest[index if len(manifest) > 1 else 0] if manifest else opened.manifest
        if path is None:
            raise InfscopeError(
                f"no noise manifest found for {run}; pass --manifest FILE (a manifest from `infscope noise`, "
                "or your own known-bad ids)"
            )
        truth = read_manifest(path, train_ids=[str(r["id"]) for r in opened.user_train])
        evaluation = detection_evaluation(load_scores(opened.layout), truth, ks=k)
        evaluation["manifest"] = str(path)
        atomic_write_json(
            opened.layout.evaluation, to_jsonable(_merge_existing(opened.layout.evaluation, evaluation))
        )
        evaluations[str(run)] = evaluation
        rows.extend({**r, "seed": index} for r in evaluation["leaderboard"])
    if as_json:
        typer.echo(
            json.dumps(to_jsonable(evaluations if len(runs) > 1 else evaluations[str(runs[0])]), indent=2)
        )
        return
    title = "Noise detection" + (f" over {len(runs)} runs (mean ± 95% CI)" if len(runs) > 1 else "")
    _print_leaderboard(rows, title)
    if len(runs) == 1:
        _print_families(evaluations[str(runs[0])])
    console.print(f"saved: {', '.join(str(RunLayout(r).evaluation) for r in runs)}")


def _merge_existing(path: Path, evaluation: dict) -> dict:
    """Keep parts of an earlier evaluation.json (checkpoint, attribution) that this command does not recompute."""
    if not path.is_file():
        return evaluation
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return evaluation
    return {**{k: v for k, v in old.items() if k in ("checkpoint", "attribution")}, **evaluation}
