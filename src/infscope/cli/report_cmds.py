"""``infscope report RUN``: write the HTML report (and PNG figures) of a finished run.

On a cleaning directory (``infscope clean --out DIR``) it writes that loop's page instead
(:func:`infscope.report.clean.write_clean_report`): gain curve, baselines and changed rows.
"""

from __future__ import annotations

from pathlib import Path

import typer

from infscope.cli import app, console


@app.command("report")
def report_command(
    run: Path = typer.Argument(
        ...,
        help="Run directory (`infscope demo`, or `finetune` + `score`) or cleaning directory (`infscope clean`).",
    ),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help="Known-bad rows (noise manifest, id + is_noisy JSONL, or ids one a line) (default: the run's).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="HTML file to write (default: RUN/report.html; DIR/clean_report.html for a cleaning directory).",
    ),
    top_k: int = typer.Option(50, "--top-k", help="Flagged rows shown per method."),
    png: bool | None = typer.Option(
        None,
        "--png/--no-png",
        help="Also write PNG figures to <out>_files/ (default: if matplotlib is installed).",
    ),
) -> None:
    """Write one self-contained HTML report of a run (leaderboard, curves, flagged rows) or of a cleaning loop."""
    from infscope.report.clean import is_clean_dir, write_clean_report
    from infscope.report.html import write_report

    if is_clean_dir(run):
        if manifest is not None or png:
            console.print(
                f"note: {run} is a cleaning directory; --manifest and --png apply to scored runs "
                "and are ignored (the oracle baseline used the manifest given to `infscope clean`)",
                highlight=False,
                soft_wrap=True,
            )
        path = write_clean_report(run, out)
    else:
        path = write_report(run, out, top_k=top_k, png=png, manifest=manifest)
    console.print(str(path), highlight=False, soft_wrap=True)
