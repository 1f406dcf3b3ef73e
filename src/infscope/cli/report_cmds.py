"""``infscope report RUN``: write the HTML report (and PNG figures) of a finished run."""

from __future__ import annotations

from pathlib import Path

import typer

from infscope.cli import app, console


@app.command("report")
def report_command(
    run: Path = typer.Argument(..., help="Run directory made by `infscope demo`, or `infscope finetune` + `score`."),
    manifest: Path | None = typer.Option(
        None, "--manifest", help="Known-bad rows (noise manifest, id + is_noisy JSONL, or ids one a line) (default: the run's)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default: RUN/report.html)."
    ),
    top_k: int = typer.Option(50, "--top-k", help="Flagged rows shown per method."),
    png: bool | None = typer.Option(
        None,
        "--png/--no-png",
        help="Also write PNG figures to <out>_files/ (default: if matplotlib is installed).",
    ),
) -> None:
    """Write one self-contained HTML report of a run: leaderboard, curves, per-family AUROC, flagged rows."""
    from infscope.report.html import write_report

    path = write_report(run, out, top_k=top_k, png=png, manifest=manifest)
    console.print(str(path), highlight=False, soft_wrap=True)
