"""``infscope data make`` and ``infscope data show``: built-in datasets and a look at any data source.

The column-mapping flags come from :func:`infscope.cli.options.column_options`, like every command
that reads data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from infscope.cli import app, console
from infscope.cli.options import column_options

data_app = typer.Typer(help="Make built-in datasets and inspect data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_CELL_WIDTH = 60


def test_path_for(out: Path) -> Path:
    """Where ``data make`` writes the test split: ``<stem>.test<suffix>`` beside ``out``."""
    return out.with_name(f"{out.stem}.test{out.suffix}")


@data_app.command("make")
def make_command(
    name: str = typer.Argument(
        ...,
        help="Built-in dataset: sentence_transform, math_no_reason, math_reason, sentence_transform_cls, "
        "instruction_mix; real text from apt's package lists: debian_sections, debian_describe.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Train file (.jsonl/.json/.csv/.parquet); test goes to <stem>.test<suffix>."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    classes: int = typer.Option(
        10,
        "--classes",
        help="Number of classes (1-10; instruction_mix 1-15; debian_* the most frequent sections).",
    ),
    per_class: int = typer.Option(100, "--per-class", help="Rows per class, train + test."),
    test_per_class: int = typer.Option(
        10, "--test-per-class", help="Rows per class held out for the test split."
    ),
    paraphrase: bool = typer.Option(
        False, "--paraphrase", help="Vary the instruction wording within each class."
    ),
) -> None:
    """Generate a built-in dataset and write its train and test splits."""
    from infscope.data.builtin import make_builtin
    from infscope.data.writing import format_from_path, write_rows

    format_from_path(out)
    split = make_builtin(
        name,
        seed=seed,
        n_classes=classes,
        per_class=per_class,
        n_test_per_class=test_per_class,
        paraphrase=paraphrase,
    )
    test_out = test_path_for(out)
    write_rows(split.train, out)
    write_rows(split.test, test_out)
    table = Table(title=f"built-in dataset {name}", show_header=False)
    table.add_row("task", split.task)
    table.add_row("seed", str(seed))
    table.add_row("classes", ", ".join(split.label_names))
    table.add_row("train", f"{len(split.train)} rows -> {out}")
    table.add_row("test", f"{len(split.test)} rows -> {test_out}")
    console.print(table)


def _cell(value: Any) -> str:
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def _counts(rows: list[dict[str, Any]], key: str, names: list[str] | None) -> str:
    counts = Counter(row.get(key) for row in rows)
    parts = []
    # numbers in numeric order (2 before 10), then any other values by text
    order = sorted(counts, key=lambda v: (0, v, "") if isinstance(v, int | float) else (1, 0, str(v)))
    for value, count in ((v, counts[v]) for v in order):
        label = names[value] if names and isinstance(value, int) and 0 <= value < len(names) else value
        parts.append(f"{label}: {count}")
    return ", ".join(parts)


@data_app.command("show")
@column_options
def show_command(
    source: str = typer.Argument(..., help="Data file, saved datasets folder, builtin:NAME or Hub name."),
    n: int = typer.Option(5, "--n", help="Rows to print."),
    task: str | None = typer.Option(
        None, "--task", help="instruction or classification (default: detected)."
    ),
    split: str = typer.Option(
        "train", "--split", help="Split of a datasets folder, Hub or built-in dataset."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Read only the first rows."),
    columns: Any = None,
) -> None:
    """Print the first rows of a dataset with its detected task, columns and counts."""
    from infscope.data.loading import load_rows

    loaded = load_rows(source, task=task, columns=columns, split=split, limit=limit)
    summary = Table(title=f"{loaded.source}", show_header=False)
    summary.add_row("format", loaded.format)
    summary.add_row("task", loaded.task)
    summary.add_row("rows", str(len(loaded.rows)))
    summary.add_row("columns", ", ".join(loaded.columns))
    summary.add_row("fingerprint", loaded.fingerprint)
    if loaded.task == "classification":
        summary.add_row("labels", _counts(loaded.rows, "label", loaded.label_names))
    if any("class" in row for row in loaded.rows):
        summary.add_row("classes", _counts(loaded.rows, "class", loaded.label_names))
    console.print(summary)
    rows = loaded.rows[: max(n, 0)]
    if rows:
        table = Table(title=f"first {len(rows)} rows")
        for column in loaded.columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row.get(column, "")) for column in loaded.columns))
        console.print(table)
