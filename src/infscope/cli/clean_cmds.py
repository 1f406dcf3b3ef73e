"""``infscope clean``: act on the most harmful rows, retrain, and keep the rounds that help.

A thin layer over :func:`infscope.actions.loop.run_clean` (and :func:`infscope.actions.audit.undo`
for ``--undo LOG``). It prints the round-by-round table with the baselines and where the cleaned
data, audit log and report went, and writes the HTML page ``OUT/clean_report.html``
(:func:`infscope.report.clean.write_clean_report`; called here since actions may not import report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from infscope.cli import app, console
from infscope.cli.options import CanaryNoise, CanarySource, Device, Dtype, Threads, column_options
from infscope.errors import InfscopeError


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if value < 0 else f"{value:.4f}"
    return str(value)


def _round_table(result: Any) -> Table:
    by_default = f"test {result.metric}"
    table = Table(
        title=f"cleaning rounds (test {result.metric}, {'higher' if result.higher_is_better else 'lower'} "
        f"is better; kept and gain by the {(result.report or {}).get('selected_by', by_default)})"
    )
    columns = ["round", "rows", "changed", "cumulative", result.metric]
    if result.metric != "loss":
        columns.append("loss")
    columns += [f"val_{result.metric}", "gain"]
    if any(row.get("canary_auroc") is not None for row in result.table):
        columns.append("canary_auroc")
    columns.append("kept")
    for column in columns:
        table.add_column(column, justify="left" if column == "kept" else "right")
    for row in result.table:
        table.add_row(
            *[("*" if row.get("kept") else "") if c == "kept" else _fmt(row.get(c)) for c in columns]
        )
    for name, base in result.baselines.items():
        cells = {"round": name, "changed": base.get("rows_changed"), **base}
        table.add_row(
            *[
                "" if c in ("kept", "gain", "rows", "cumulative", "canary_auroc") else _fmt(cells.get(c))
                for c in columns
            ]
        )
    return table


@app.command("clean")
@column_options
def clean_command(
    data: str | None = typer.Argument(
        None, help="Training data file (JSONL/JSON/CSV/Parquet); with --undo, the cleaned file to check."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Cleaning directory; with --undo, the restored file."),
    method: str = typer.Option(
        "loss", "--method", help="Scoring method that ranks rows (see `infscope score`)."
    ),
    action: str = typer.Option(
        "drop", "--action", help="drop, reweight, relabel (classification) or repair (instruction)."
    ),
    rounds: int = typer.Option(2, "--rounds", help="Cleaning rounds after the no-cleaning round 0."),
    val: str | None = typer.Option(
        None, "--val", help="Validation rows (pick the checkpoint, query the scores)."
    ),
    test: str | None = typer.Option(None, "--test", help="Held-out test rows the gain is measured on."),
    k: str = typer.Option(
        "10%", "--k", help="Rows per round: 10 (rows), 0.1 or 10% (share), score:0.5 (threshold)."
    ),
    strength: float = typer.Option(1.0, "--strength", help="reweight: a in keep probability 1/(1+exp(a*z))."),
    margin: float = typer.Option(0.5, "--margin", help="relabel: minimum loss drop (nats) to move a row."),
    expert: str | None = typer.Option(
        None, "--expert", help="repair: local:MODEL or openai:http://HOST:PORT/v1#MODEL."
    ),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help="Injected-noise manifest for the oracle baseline (default: DATA's .manifest.jsonl).",
    ),
    model: str = typer.Option(
        "smollm2-135m", "--model", "-m", help="Base model (tiny-llama / tiny-bert for tests)."
    ),
    epochs: int = typer.Option(2, "--epochs", help="Fine-tuning epochs per round."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per optimiser step."),
    max_length: int = typer.Option(128, "--max-length", help="Maximum tokens per row."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    seed: int = typer.Option(0, "--seed", help="Seed of every round's fine-tuning (same base, same seed)."),
    min_gain: float = typer.Option(1e-3, "--min-gain", help="Stop when a round gains less than this."),
    select: str = typer.Option(
        "val",
        "--select",
        help="Keep rounds (and stop) by the validation metric (val, honest) or the test metric (test, optimistic).",
    ),
    select_metric: str | None = typer.Option(
        None,
        "--select-metric",
        help="Metric that keeps rounds: accuracy / exact_match (default) or loss (finer on small val sets).",
    ),
    keep_going: bool = typer.Option(False, "--keep-going", help="Run every round even without gain."),
    generate: bool = typer.Option(
        True, "--generate/--no-generate", help="Exact match by greedy generation for numeric answers."
    ),
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines", help="Train the random and oracle baselines."
    ),
    canaries: float = typer.Option(
        0.0,
        "--canaries",
        help="Add this fraction of seeded corrupted rows to every round so --method fusion calibrates "
        "on them (never acted on, never in outputs).",
    ),
    canary_noise: CanaryNoise = None,
    canary_source: CanarySource = "auto",
    device: Device = "cpu",
    dtype: Dtype = "float32",
    undo: Path | None = typer.Option(
        None, "--undo", help="Restore the input of a clean run from its audit log."
    ),
    threads: Threads = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a cleaning directory made with other arguments."
    ),
    columns: Any = None,
) -> None:
    """Clean DATA: score, act on the most harmful rows, retrain, measure the test gain, keep the best round."""
    if undo is not None:
        from infscope.actions.audit import undo as undo_log

        restored = undo_log(undo, out, data)
        console.print(f"restored the input of {undo} to {restored}")
        return
    if data is None or val is None or test is None:
        missing = ", ".join(n for n, v in (("DATA", data), ("--val", val), ("--test", test)) if v is None)
        raise InfscopeError(f"clean needs {missing}; pass DATA --val VAL --test TEST (or --undo LOG)")
    from infscope.actions.loop import CleanConfig, run_clean
    from infscope.runtime import set_threads

    set_threads(threads)
    cfg = CleanConfig(
        data=data,
        val=val,
        test=test,
        method=method,
        action=action,
        rounds=rounds,
        k=k,
        strength=strength,
        margin=margin,
        expert=expert,
        manifest=str(manifest) if manifest else None,
        model=model,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        rank=rank,
        seed=seed,
        device=device,
        dtype=dtype,
        min_gain=min_gain,
        early_stop=not keep_going,
        generate=generate,
        baselines=baselines,
        select=select,
        select_metric=select_metric,
        canaries=canaries,
        canary_noise=canary_noise,
        canary_source=canary_source,
    )
    result = run_clean(
        cfg, out, columns=columns, overwrite=overwrite, log=lambda m: console.print(f"[bold]>[/] {m}")
    )
    console.print(_round_table(result))
    by = (result.report or {}).get("selected_by", f"test {result.metric}")
    console.print(f"kept round {result.best_round} by the {by} ({result.stopped})")
    console.print(f"cleaned data: {result.cleaned}")
    console.print(
        f"audit log: {result.audit} (undo: infscope clean {result.cleaned} --undo {result.audit} --out FILE)"
    )
    from infscope.report.clean import write_clean_report

    console.print(f"report: {write_clean_report(out)}", highlight=False, soft_wrap=True)
