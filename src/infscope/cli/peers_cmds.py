"""``infscope peers RUN``: other libraries (kronfluence, dattri, cleanlab, a plain reference loop) on a run.

A thin layer over :func:`infscope.peers.suite.run_peer_suite`: every requested peer scores the same
rows with the same adapter, next to our methods (AUROC, AP, Spearman, max relative difference,
seconds, speed ratio, peak memory). Peers that are not installed or fail get an error row. Finished
peers are kept under ``RUN/peers/parts``, so an interrupted suite reruns only the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from infscope.cli import app, console
from infscope.cli.options import Threads


@app.command("peers")
def peers_command(
    run: Path = typer.Argument(..., help="A scored run directory (infscope demo, or finetune + score)."),
    peers: str = typer.Option(
        "all", "--peers", help="Comma-separated peer names, or 'all' (not installed ones give an error row)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/peers)."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds per peer before it becomes an error row."
    ),
    threads: Threads = None,
) -> None:
    """Run other attribution libraries on the same run, side by side with ours."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch bars (read when tqdm is imported)
    import pandas as pd

    from infscope.peers.suite import peer_names, run_peer_suite
    from infscope.runs import RunLayout
    from infscope.runtime import set_threads

    set_threads(threads)
    names = peer_names(peers)
    table = run_peer_suite(
        run, names, out_dir=out, timeout=timeout, log=lambda message: console.print(f"[bold]>[/] {message}")
    )
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 48):
        console.print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), highlight=False)
    console.print(f"wrote {(out or RunLayout(run).peers) / 'peers.csv'}")
