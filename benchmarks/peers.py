"""Peers side by side on a finished run: AUROC, agreement with ours, seconds and speed ratio.

Usage (make a run first, e.g. ``infscope demo --model tiny-llama --out RUN``)::

    python3 benchmarks/peers.py RUN [--peers kronfluence_ekfac,dattri_datainf] [--out RUN/peers]

Runs every requested peer (default: all, those not installed give an error row), prints the
table and writes ``peers.csv`` and ``peers.json`` (with each peer's meta) to ``--out``
(default ``RUN/peers``). Columns: method, AUROC / AP against the run's manifest, ``vs`` (our
method it is compared with), Spearman vs that method and vs our DataInf, ``rel_diff`` (max
relative difference, only where the peer computes the same quantity), seconds, ``ratio`` (peer
seconds / our scoring seconds for ``vs``, measured in this process), peak MB, error.
Our rows (``ours:<method>``) time scoring only; gradients were collected once by the pipeline
(``run.json`` stage ``gradients``), while peers compute their own gradients inside their time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch bars (read when tqdm is imported)

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from infscope.errors import InfscopeError  # noqa: E402
from infscope.peers.suite import PEERS_DIR, peer_names, run_peer_suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--peers", default="all", help="comma-separated peer names or 'all'")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN/peers)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    console = Console()
    torch.set_num_threads(args.threads)
    try:
        names = peer_names(args.peers)
        out = args.out or args.run_dir / PEERS_DIR
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("peers", total=None)
            table = run_peer_suite(
                args.run_dir,
                names,
                out_dir=out,
                log=lambda message: progress.update(task, description=message),
            )
    except InfscopeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 48):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    console.print(f"wrote {out / 'peers.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
