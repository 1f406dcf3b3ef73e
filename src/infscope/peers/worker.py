"""Run one peer in a child process: ``python -m infscope.peers.worker RUN_DIR PEER RESULT_DIR``.

A peer that exhausts memory is killed by the operating system, and with it whatever process it
runs in. :func:`infscope.peers.suite.run_peer_suite` therefore runs each peer here, in its own
process, and reads back ``RESULT_DIR/result.json`` (method, seconds, peak MB, error, row ids,
meta) and ``RESULT_DIR/scores.npy``; a child that dies without writing them becomes an error row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from infscope.runs import atomic_path, atomic_write_json


def write_result(result, out_dir: Path) -> None:
    """Save a :class:`~infscope.peers.result.PeerResult` as ``scores.npy`` + ``result.json`` (atomic)."""
    if result.scores is not None:
        with atomic_path(out_dir / "scores.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.asarray(result.scores, dtype=np.float64))
    atomic_write_json(
        out_dir / "result.json",
        {
            "method": result.method,
            "seconds": result.seconds,
            "peak_mb": result.peak_mb,
            "error": result.error,
            "train_ids": list(result.train_ids),
            "meta": json.loads(json.dumps(result.meta, default=str)),
        },
    )


def read_result(out_dir: Path):
    """The :class:`~infscope.peers.result.PeerResult` a worker saved, or ``None`` if it saved none."""
    from infscope.peers.result import PeerResult

    try:
        saved = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    scores_file = out_dir / "scores.npy"
    scores = np.load(scores_file) if saved.get("error") is None and scores_file.is_file() else None
    return PeerResult(
        saved["method"],
        scores,
        float(saved["seconds"]),
        float(saved["peak_mb"]),
        saved.get("error"),
        list(saved.get("train_ids", [])),
        dict(saved.get("meta", {})),
    )


def main(argv: list[str]) -> int:
    from infscope.peers.registry import run_peer

    run_dir, name, out_dir = Path(argv[0]), argv[1], Path(argv[2])
    write_result(run_peer(name, run_dir), out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
