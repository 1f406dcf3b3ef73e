"""``infscope bench list|run|show``: benchmark specs over datasets x noise x models x methods x seeds."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.table import Table

from infscope.cli import app, console

bench_app = typer.Typer(
    help="Run benchmark specs (datasets x noise x models x methods x seeds) and summarise them.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("list")
def list_command() -> None:
    """Show the built-in specs with their description and number of runs."""
    from infscope.bench.config import load_spec
    from infscope.bench.specs import BUILTIN_SPECS

    table = Table("spec", "runs", "description")
    for name in BUILTIN_SPECS:
        spec = load_spec(name)
        runs = sum(grid.size for grid in spec.grids)
        table.add_row(name, str(runs), spec.description)
    console.print(table)


@bench_app.command("run")
def run_command(
    spec: str = typer.Argument(..., help="A built-in spec name (see `infscope bench list`) or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Benchmark directory; each run goes to a subfolder."),
    seeds: str | None = typer.Option(None, "--seeds", help="Replace the spec's seeds, e.g. 0,1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the runs (and which are done)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace run directories that were made with other arguments."
    ),
) -> None:
    """Run every combination of a spec (finished runs are skipped), then print the summary."""
    from infscope.bench.config import expand_spec, load_spec, parse_seeds

    bench_spec = load_spec(spec)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    if dry_run:
        from infscope.bench.runner import plan

        combos = expand_spec(bench_spec, seeds=seed_list)
        table = Table(title=f"spec {bench_spec.name}")
        table.add_column("#", justify="right")
        table.add_column("run directory", overflow="fold")
        table.add_column("methods", overflow="fold")
        table.add_column("attribution")
        table.add_column("status")
        planned = plan(combos, out)
        for index, (combo, done) in enumerate(planned, start=1):
            table.add_row(
                str(index),
                combo.relpath.as_posix(),
                ",".join(combo.config.methods),
                "yes" if combo.config.attribution else "no",
                "done" if done else "to run",
            )
        console.print(table)
        remaining = sum(not done for _, done in planned)
        scored = sum(len(c.config.methods) for c in combos)
        console.print(
            f"{len(combos)} runs ({remaining} to run, {len(combos) - remaining} done), "
            f"{scored} method scorings in {out}",
            highlight=False,
        )
        return
    from infscope.bench.runner import run_bench
    from infscope.bench.summary import render_peers, render_summary

    result = run_bench(bench_spec, out, seeds=seed_list, overwrite=overwrite, console=console)
    render_summary(result.aggregate, console, title=f"{bench_spec.name}: mean ± 95% CI over seeds")
    render_peers(result.peers, console)
    console.print(
        f"{len(result.ran)} runs done, {len(result.skipped)} skipped (already finished) in "
        f"{result.seconds:.0f} s; tables: {out / 'results.parquet'}, {out / 'aggregate.parquet'} (+ .csv)",
        highlight=False,
        soft_wrap=True,
    )


@bench_app.command("show")
def show_command(
    out: Path = typer.Argument(..., help="Benchmark directory made by `infscope bench run`."),
    markdown: bool = typer.Option(
        False, "--markdown", help="Print every table as Markdown (methods, per family and operator, peers)."
    ),
) -> None:
    """Re-print the summary of a benchmark directory from its results table."""
    from infscope.bench.results import PEERS_NAME, aggregate_results, read_results
    from infscope.bench.runner import BENCH_FILE
    from infscope.bench.summary import render_peers, render_summary

    results = read_results(out)
    name = out.name
    with contextlib.suppress(OSError, ValueError):
        name = json.loads((out / BENCH_FILE).read_text(encoding="utf-8")).get("spec", name)
    import pandas as pd

    peers_file = out / f"{PEERS_NAME}.parquet"
    peers = pd.read_parquet(peers_file) if peers_file.is_file() else None
    if markdown:
        from infscope.bench.markdown import bench_markdown

        print(bench_markdown(aggregate_results(results), peers))
        return
    render_summary(aggregate_results(results), console, title=f"{name}: mean ± 95% CI over seeds")
    if peers is not None:
        render_peers(peers, console)
