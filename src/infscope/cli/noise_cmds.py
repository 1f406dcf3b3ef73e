"""``infscope noise DATA``: write noisy copies of a dataset with ground-truth manifests.

``infscope noise demo`` runs a small example on a built-in dataset. The command is a thin
layer over :func:`infscope.noise.run.run_noise`; it only adds confirmation for large runs, a
progress bar and a summary table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infscope.cli import app, console
from infscope.cli.options import column_options

LARGE_RUN = 10_000
DEMO_ROWS = 500


def _parse_field_weights(spec: str | None) -> dict[str, float] | None:
    from infscope.noise.strategies import parse_weights

    if not spec:
        return None
    return parse_weights(spec)


def _summary_table(outputs: list) -> Table:
    table = Table(title="noise written", show_lines=False)
    for column in ("file", "ratio", "strategy", "target", "noisy", "failed", "families (actual)"):
        table.add_column(column, overflow="fold")
    for out in outputs:
        s = out.summary
        families = ", ".join(f"{f} {c['actual']}" for f, c in s["families"].items())
        table.add_row(
            out.data_path.name,
            f"{out.ratio:.3f}",
            out.strategy,
            str(s["target_noisy"]),
            str(s["actual_noisy"]),
            str(s["failures"]["count"]),
            families,
        )
    return table


def _run_with_progress(loaded, combos: int, **kwargs) -> list:
    from infscope.noise.run import run_noise

    total = len(loaded.rows) * combos
    if total <= LARGE_RUN:
        return run_noise(loaded, **kwargs)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:  # fmt: skip
        task_id = bar.add_task("noise", total=total)
        return run_noise(
            loaded, progress=lambda rows, name: bar.update(task_id, advance=rows, description=name), **kwargs
        )


def _demo(out: Path, seed: int) -> None:
    """500 rows of the built-in sentence_transform set, 20 % balanced and 20 % grammar_heavy."""
    from infscope.data.builtin import make_builtin
    from infscope.data.loading import LoadedData
    from infscope.data.readers import rows_fingerprint
    from infscope.noise.run import run_noise

    built = make_builtin(
        "sentence_transform", seed=seed, n_classes=10, per_class=DEMO_ROWS // 10 + 1, n_test_per_class=1
    )
    rows = built.train[:DEMO_ROWS]
    loaded = LoadedData(
        rows, built.task, "builtin:sentence_transform", "builtin", rows_fingerprint(rows), built.label_names
    )
    outputs = run_noise(
        loaded, ratios=[0.2], strategies=["balanced", "grammar_heavy"], seed=seed, out_dir=out
    )
    console.print(_summary_table(outputs))
    example = next(rec for rec in _first_noisy(outputs[0].manifest_path))
    console.print(f"[bold]example[/] {example['operator']} on {example['field']}:", highlight=False)
    console.print(f"  before: {example['original']!s:.120}", highlight=False, markup=False)
    console.print(f"  after:  {example['noisy']!s:.120}", highlight=False, markup=False)
    console.print(f"files in {out}; next: infscope analyze {out} --mode all", highlight=False)


def _first_noisy(manifest_path: Path):
    import json

    with open(manifest_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["is_noisy"]:
                yield record


@app.command("noise")
@column_options
def noise_command(
    data: str = typer.Argument(
        ..., help="Data file, saved datasets folder, builtin:NAME or Hub name; `demo` runs the demo."
    ),
    ratio: float | None = typer.Option(None, "--ratio", help="One noise ratio in (0, 1]."),
    ratios: str | None = typer.Option(
        None, "--ratios", help="Comma list of ratios, e.g. 0.05,0.1,0.2 (default: 0.2)."
    ),
    strategy: str = typer.Option(
        "balanced",
        "--strategy",
        help="balanced, grammar_heavy, semantic_heavy, label, all; comma list for several.",
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Custom family/operator weights, e.g. grammar=0.5,label=0.5 (replaces --strategy).",
    ),
    field_weights: str | None = typer.Option(
        None, "--field-weights", help="Which field to corrupt, e.g. output=0.8,instruction=0.2 (the default)."
    ),
    sampling: str = typer.Option(
        "uniform", "--sampling", help="uniform, length (instruction-length quartiles) or class."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice (per row: seed, id, operator)."),
    out: Path = typer.Option(Path("noise_out"), "--out", "-o", help="Output folder."),
    format: str | None = typer.Option(
        None, "--format", help="Output format jsonl|parquet|json|csv (default: as input)."
    ),
    task: str | None = typer.Option(
        None, "--task", help="instruction or classification (default: detected)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before large runs."),
    columns: Any = None,
) -> None:
    """Inject known noise into a fraction of rows; write dataset, manifest and metadata per combination."""
    from infscope.data.loading import load_rows
    from infscope.errors import InfscopeError
    from infscope.noise.run import parse_ratios
    from infscope.noise.strategies import split_strategies

    if data == "demo" and not Path(data).exists():
        _demo(out if out != Path("noise_out") else Path("noise_demo"), seed)
        return
    if ratio is not None and ratios is not None:
        raise InfscopeError("give either --ratio or --ratios, not both")
    ratio_list = parse_ratios(ratios if ratios is not None else (ratio if ratio is not None else 0.2))
    strategy_list = ["custom"] if weights else split_strategies(strategy)
    loaded = load_rows(data, task=task, columns=columns)
    combos = len(ratio_list) * len(strategy_list)
    if len(loaded.rows) * combos > LARGE_RUN and not yes and sys.stdin.isatty():
        typer.confirm(f"write {combos} noisy copies of {len(loaded.rows)} rows to {out}?", abort=True)
    outputs = _run_with_progress(
        loaded,
        combos,
        ratios=ratio_list,
        strategies=strategy_list,
        seed=seed,
        out_dir=out,
        format=format,
        sampling=sampling,
        weights=weights,
        field_weights=_parse_field_weights(field_weights),
    )
    console.print(_summary_table(outputs))
    console.print(f"clean original and {len(outputs)} noisy file(s) in {out}", highlight=False)
