"""Fine-tuning time with 1 and 2 processes (torchrun, gloo, DDP) on tiny-llama, side by side.

Writes a synthetic instruction dataset, then times ``python -m infscope.cli finetune`` as one plain
process and ``torchrun --nproc-per-node 2 -m infscope.cli finetune`` on the same data and settings,
interleaved ``--repeats`` times. Two times per launch: the wall time (start-up and model loading in
each process included, as a user sees it) and the ``finetune`` stage time rank 0 records in
``run.json`` (the training loop alone). Also checks that both give the same adapter.

    python3 benchmarks/ddp_finetune_speed.py --rows 160 --repeats 2
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

import torch
from safetensors.torch import load_file

WORDS = ["red", "blue", "green", "small", "large", "old", "new", "warm", "cold", "dark"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_data(path: Path, n: int) -> None:
    """``n`` short instruction rows whose answers are two words chosen by the row number."""
    with path.open("w") as handle:
        for i in range(n):
            answer = f"{WORDS[i % 10]} and {WORDS[(i * 7 + 3) % 10]}"
            row = {
                "id": f"r{i}",
                "instruction": f"Describe item {i} in two words.",
                "input": "",
                "output": answer,
            }
            handle.write(json.dumps(row) + "\n")


def timed(data: Path, out: Path, processes: int, args: argparse.Namespace) -> tuple[float, float]:
    """Wall seconds of one fine-tune with ``processes`` processes, and its recorded finetune-stage seconds."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("WORLD_SIZE", None)
    entry = ["-m", "infscope.cli", "finetune", str(data), "--out", str(out), "--model", "tiny-llama"]
    entry += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", "64"]
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_port()), *entry]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    stage = json.loads((out / "run.json").read_text())["stages"]["finetune"]["seconds"]
    return wall, float(stage)


def adapter_diff(one: Path, two: Path) -> float:
    """Largest ``||a - b|| / ||a||`` over the final adapters' matrices."""
    tag = f"checkpoints/epoch-{json.loads((one / 'finetune' / 'checkpoints.json').read_text())['best']['epoch']}"
    a = load_file(str(one / "finetune" / tag / "adapter_model.safetensors"))
    b = load_file(str(two / "finetune" / tag / "adapter_model.safetensors"))
    return max(float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(a[k])) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=160, help="training rows (10%% go to validation)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="global rows per optimiser step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ddp_finetune_speed.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddp-speed-"))
    data = work / "train.jsonl"
    write_data(data, args.rows)
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for p in times:
            times[p].append(timed(data, work / f"p{p}", p, args))
    wall = {p: statistics.median(t[0] for t in ts) for p, ts in times.items()}
    stage = {p: statistics.median(t[1] for t in ts) for p, ts in times.items()}
    result = {
        "rows": args.rows,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads_per_process": args.threads,
        "wall_seconds": {str(p): round(s, 2) for p, s in wall.items()},
        "finetune_stage_seconds": {str(p): round(s, 2) for p, s in stage.items()},
        "wall_speedup_2_over_1": round(wall[1] / wall[2], 3),
        "stage_speedup_2_over_1": round(stage[1] / stage[2], 3),
        "max_rel_adapter_diff": adapter_diff(work / "p1", work / "p2"),
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
