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
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch bars (read when tqdm is imported)

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from infscope.errors import InfscopeError  # noqa: E402
from infscope.peers import PEERS, PeerInputs, compare_peers, run_peer  # noqa: E402
from infscope.runs import atomic_write_json, atomic_write_text  # noqa: E402


def _gradient_seconds(run_dir: Path) -> float | None:
    """Seconds the pipeline spent collecting train/val gradients (run.json), if recorded."""
    try:
        stages = json.loads((run_dir / "run.json").read_text()).get("stages", {})
        return float(stages["gradients"]["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        names = (
            list(PEERS) if args.peers == "all" else [p.strip() for p in args.peers.split(",") if p.strip()]
        )
        unknown = [n for n in names if n not in PEERS]
        if unknown:
            raise InfscopeError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
        inputs = PeerInputs.from_run(args.run_dir)
        results = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("peers", total=len(names))
            for name in names:
                progress.update(task, description=f"peer {name}")
                results.append(run_peer(name, inputs))
                progress.advance(task)
        table = compare_peers(results, inputs)
    except InfscopeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    out = args.out or args.run_dir / "peers"
    grad_seconds = _gradient_seconds(args.run_dir)
    if grad_seconds is not None:  # our one-off cost that peers pay inside their own seconds
        table = pd.concat([pd.DataFrame([{"method": "ours:gradients", "seconds": grad_seconds}]), table])
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 48):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    atomic_write_text(out / "peers.csv", table.to_csv(index=False))
    atomic_write_json(
        out / "peers.json",
        {
            "run_dir": str(args.run_dir),
            "table": json.loads(table.to_json(orient="records")),
            "meta": {r.method: r.meta for r in results},
        },
    )
    console.print(f"wrote {out / 'peers.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
