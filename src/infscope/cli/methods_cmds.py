"""``infscope methods``: the method table (name, family, what it needs, which data it fits, summary)."""

from __future__ import annotations

import typer
from rich.table import Table

from infscope.cli import app, console


@app.command("methods")
def methods_command(
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown."),
) -> None:
    """List every scoring method `infscope score --method` accepts, with what it needs."""
    from infscope.defaults import DEFAULT_METHODS
    from infscope.estimators.registry import METHODS

    rows = [
        (
            m.name + (" *" if m.name in DEFAULT_METHODS else ""),
            m.family,
            ", ".join(m.needs) or "-",
            ", ".join(m.tasks),
            m.summary,
        )
        for m in METHODS.values()
    ]
    header = ("method", "family", "needs", "data", "what it scores")
    if markdown:
        typer.echo("| " + " | ".join(header) + " |")
        typer.echo("|" + "---|" * len(header))
        for row in rows:
            typer.echo("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        return
    table = Table(title="scoring methods (* = in --method default); higher score = more harmful")
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
