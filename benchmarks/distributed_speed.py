"""Rows/s of gradients + streamed scores with 1 and 2 processes (torchrun, gloo), side by side.

Makes a tiny-llama run (or takes ``--run``), then times ``python -m infscope.distributed_collect RUN
--stream`` as one plain process and under ``torchrun --nproc-per-node 2``, interleaved ``--repeats``
times; wall time includes start-up and model loading in each process, as a user sees it. Also
checks that both give the same scores.

    python3 benchmarks/distributed_speed.py --rows-per-class 40 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from infscope.estimators.scores import Scores
from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.runs import RunLayout

METHODS = "datainf,hessian_free"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(run: Path, processes: int, threads: int) -> float:
    """Wall seconds of one streamed scoring of ``run`` with ``processes`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    entry = ["-m", "infscope.distributed_collect", str(run), "--stream", "--method", METHODS]
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_port()),
            *entry,
        ]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="an existing run (default: make a tiny one)")
    parser.add_argument("--rows-per-class", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "distributed_speed.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dist-speed-"))
    run = args.run
    if run is None:
        run = work / "base"
        config = PipelineConfig(
            model="tiny-llama",
            classes=3,
            train_per_class=args.rows_per_class,
            val_per_class=2,
            epochs=1,
            max_length=64,
            methods=("loss",),
        )
        run_pipeline(config, run)
    copies = {p: work / f"p{p}" for p in (1, 2)}
    for path in copies.values():
        shutil.copytree(run, path)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for p, path in copies.items():
            times[p].append(timed(path, p, args.threads))
    n = len(Scores.load(RunLayout(copies[1]).scores("datainf")).train_ids)
    diff = max(
        float(
            np.max(
                np.abs(
                    Scores.load(RunLayout(copies[2]).scores(m)).values
                    - Scores.load(RunLayout(copies[1]).scores(m)).values
                )
                / np.abs(Scores.load(RunLayout(copies[1]).scores(m)).values).max()
            )
        )
        for m in METHODS.split(",")
    )
    result = {
        "rows": n,
        "threads_per_process": args.threads,
        "seconds": {str(p): statistics.median(t) for p, t in times.items()},
        "rows_per_s": {str(p): n / statistics.median(t) for p, t in times.items()},
        "speedup_2_over_1": statistics.median(times[1]) / statistics.median(times[2]),
        "max_rel_score_diff": diff,
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
