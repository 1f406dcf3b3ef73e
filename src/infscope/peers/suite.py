"""Several peers on one finished run, compared with ours, saved in ``RUN/peers/`` and resumed from there.

Shared by ``infscope bench`` (a spec's ``peers:`` key) and ``benchmarks/peers.py``. The table has
one row per peer and per our compared method (see :func:`infscope.peers.agreement.compare_peers`),
plus ``ours:gradients``: the one-off gradient pass our estimators share, which each peer pays
inside its own seconds. A saved table is reused when it was made for (at least) the same peers;
each peer's result is also kept as it finishes, so a suite stopped halfway reruns only the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from infscope.errors import InfscopeError
from infscope.peers.worker import read_result, write_result
from infscope.runs import RunDir, RunLayout, atomic_write_json, atomic_write_text
from infscope.runs.layout import BLOCK_BY_DEFAULT
from infscope.scoring import gradient_stage_name
from infscope.scoring.run import Checkpoint

# Names as RunLayout spells them, for callers that build paths under another --out directory.
PEERS_DIR = RunLayout("").peers.name
#: Under the peers directory: one folder per finished peer, so an interrupted suite resumes peer by peer.
PARTS_DIR = RunLayout("").peer_part("-").parent.name


def peer_names(value: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a list, checked against the known peers."""
    from infscope.peers.registry import PEERS

    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in items if str(n).strip()]
    if names == ["all"]:
        return list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise InfscopeError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)} or all")
    if not names:
        raise InfscopeError("no peers named; pass peer names or all")
    return list(dict.fromkeys(names))


def gradient_seconds(run_dir: str | Path) -> float | None:
    """Seconds the run spent on the gradient pass that peers compare against, if recorded.

    That is the stage ``gradients:<checkpoint>[-<block_by>]`` of the checkpoint and block grouping
    ``infscope score`` recorded (runs of older versions: the stage ``gradients``).
    """
    try:
        run = RunDir.open(run_dir)
    except InfscopeError:
        return None
    info = run.stage_info("score")
    names = ["gradients"]
    if info.get("checkpoint"):
        scored = Checkpoint(path=str(info["checkpoint"]), epoch=None, step=None, lr=None)
        names.insert(0, gradient_stage_name(scored, str(info.get("block_by") or BLOCK_BY_DEFAULT)))
    for name in names:
        seconds = run.record.stages.get(name, {}).get("seconds")
        if seconds is not None:
            return float(seconds)
    return None


def load_peer_table(run_dir: str | Path, names: Sequence[str]) -> pd.DataFrame | None:
    """The saved table of ``run_dir`` if it covers every peer in ``names``, else ``None``.

    A table made for more peers is returned whole: its extra rows were paid for already. A peer
    that was "not installed" then does not count, so installing it and rerunning fills its row.
    """
    path = RunLayout(run_dir).peers / "peers.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not set(names) <= set(saved.get("peers") or []):
        return None
    table = pd.DataFrame(saved.get("table", []))
    errors = table.set_index("method")["error"] if {"method", "error"} <= set(table.columns) else pd.Series()
    if any(str(errors.get(n) or "").startswith("not installed") for n in names):
        return None
    return table


def _finished_part(part: Path):
    """The result a suite saved for one peer in ``part`` if that peer succeeded (failures are retried)."""
    result = read_result(part)
    return result if result is not None and result.error is None else None


def run_isolated(run_dir: str | Path, name: str, *, timeout: float | None = None):
    """Run peer ``name`` on ``run_dir`` in a child process; a child that dies becomes an error row.

    The operating system kills a process that exhausts memory; in a child, that takes the peer
    down and not the benchmark. Torch threads follow this process's setting.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import time

    import torch

    from infscope.peers.result import PeerResult

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"infscope-peer-{name}-") as tmp:
        command = [sys.executable, "-m", "infscope.peers.worker", str(run_dir), name, tmp]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, check=False, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return PeerResult(
                name, None, time.perf_counter() - start, 0.0, f"peer stopped after the {timeout:g} s timeout"
            )
        result = read_result(Path(tmp))
    if result is not None:
        return result
    killed = " (killed: most likely out of memory)" if done.returncode in (-9, 137) else ""
    last = (done.stderr or "").strip().splitlines()[-1:] or [""]
    error = f"peer process exited with code {done.returncode}{killed}" + (
        f": {last[0][:200]}" if last[0] else ""
    )
    return PeerResult(name, None, time.perf_counter() - start, 0.0, error)


def run_peer_suite(
    run_dir: str | Path,
    names: Sequence[str],
    *,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = True,
    isolate: bool = True,
    timeout: float | None = None,
) -> pd.DataFrame:
    """Run ``names`` on the finished run ``run_dir``, compare with ours, save and return the table.

    Peers that fail (missing package, out of memory, an error inside) get a row with the error
    instead of raising; with ``isolate`` (default) each peer runs in its own process
    (:func:`run_isolated`), so even one the system kills for memory leaves a row. Written
    atomically to ``out_dir`` (default ``RUN/peers``) as ``peers.csv`` and ``peers.json``
    (table, peer names and each peer's meta). ``timeout`` (seconds per isolated peer) turns a peer
    that hangs into an error row.
    """
    from infscope.peers.agreement import compare_peers
    from infscope.peers.inputs import PeerInputs
    from infscope.peers.registry import run_peer

    names = list(names)
    layout = RunLayout(run_dir)
    out = Path(out_dir) if out_dir is not None else layout.peers
    if resume and out_dir is None:
        saved = load_peer_table(run_dir, names)
        if saved is not None:
            return saved
    inputs = None if isolate else PeerInputs.from_run(run_dir)  # children load their own copy
    results = []
    for name in names:
        part = out / layout.peer_part(name).relative_to(layout.peers)
        result = _finished_part(part) if resume else None
        if result is None:
            if log is not None:
                log(f"peer {name}")
            result = run_isolated(run_dir, name, timeout=timeout) if isolate else run_peer(name, inputs)
            write_result(result, part)  # an interrupted suite keeps the peers it finished
        results.append(result)
    table = compare_peers(results, inputs or PeerInputs.from_run(run_dir))
    seconds = gradient_seconds(run_dir)
    if seconds is not None:
        table = pd.concat([pd.DataFrame([{"method": "ours:gradients", "seconds": seconds}]), table])
    table = table.reset_index(drop=True)
    atomic_write_text(out / "peers.csv", table.to_csv(index=False))
    meta: dict[str, Any] = {r.method: r.meta for r in results}
    atomic_write_json(
        out / "peers.json",
        {
            "run_dir": str(run_dir),
            "peers": names,
            "table": json.loads(table.to_json(orient="records")),
            "meta": meta,
        },
    )
    return table
