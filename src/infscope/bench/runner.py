"""Run every combination of a spec through the pipeline, skipping finished runs, and collect tables.

Each combination runs in ``OUT/<dataset>/<noise>/<model>/seed-<s>/`` via
:func:`infscope.pipeline.run_pipeline`. A run counts as finished when its ``run.json`` was made
with the same arguments, records the ``score`` stage and ``evaluation.json`` exists; such runs are
read back instead of rerun, so an interrupted benchmark resumes with the same command (the
pipeline itself resumes the stages of a half-finished run). After every run the results and
aggregate tables are rewritten, so ``infscope bench show`` works while a benchmark is running.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infscope.bench.config import BenchSpec, Combination, expand_spec
from infscope.bench.results import (
    AGGREGATE_NAME,
    PEERS_NAME,
    RESULTS_NAME,
    aggregate_results,
    peer_rows,
    results_frame,
    run_rows,
    write_table,
)
from infscope.runs import RUN_FILE, atomic_write_json, ensure_writable_dir, same_args

BENCH_FILE = "bench.json"
EVALUATION_FILE = "evaluation.json"


@dataclass
class BenchResult:
    """What a benchmark produced: its directory, tables, and which runs ran or were skipped."""

    out_dir: Path
    results: pd.DataFrame
    aggregate: pd.DataFrame
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peers: pd.DataFrame | None = None


def _normalised(args: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(args, sort_keys=True, default=str))


def finished_run(run_dir: Path, combo: Combination) -> tuple[dict, dict] | None:
    """``(evaluation, stages)`` of a run finished with this combination's arguments, else None."""
    run_file, evaluation_file = run_dir / RUN_FILE, run_dir / EVALUATION_FILE
    if not (run_file.is_file() and evaluation_file.is_file()):
        return None
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
        evaluation = json.loads(evaluation_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not same_args(
        record.get("args") or {}, _normalised(combo.config.as_args())
    ) or "score" not in record.get("stages", {}):
        return None
    return evaluation, record["stages"]


def plan(combos: Sequence[Combination], out_dir: str | Path) -> list[tuple[Combination, bool]]:
    """Each combination with whether it already finished in ``out_dir`` (for dry runs)."""
    root = Path(out_dir)
    return [(combo, finished_run(root / combo.relpath, combo) is not None) for combo in combos]


def _write_manifest(spec: BenchSpec, combos: Sequence[Combination], out_dir: Path) -> None:
    atomic_write_json(
        out_dir / BENCH_FILE,
        {
            "spec": spec.name,
            "source": spec.source,
            "description": spec.description,
            "definition": spec.raw,
            "runs": [{"dir": c.relpath.as_posix(), "args": c.config.as_args()} for c in combos],
        },
    )


def _write_tables(rows: list[dict], out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    results = results_frame(rows)
    aggregate = aggregate_results(results)
    write_table(results, out_dir, RESULTS_NAME)
    write_table(aggregate, out_dir, AGGREGATE_NAME)
    return results, aggregate


def run_bench(
    spec: BenchSpec,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    runner: Callable[..., Any] | None = None,
) -> BenchResult:
    """Run (or resume) every combination of ``spec`` into ``out_dir`` and write the tables.

    ``seeds`` replaces the spec's seeds. ``overwrite`` lets a run directory made with other
    arguments be replaced (otherwise that is an error naming the directory). ``runner`` defaults
    to :func:`infscope.pipeline.run_pipeline` (looked up at call time).
    """
    combos = expand_spec(spec, seeds=seeds)
    root = ensure_writable_dir(out_dir)
    _write_manifest(spec, combos, root)
    if runner is None:
        import functools

        from infscope import pipeline

        runner = functools.partial(pipeline.run_pipeline, kind="bench")
    result = BenchResult(root, results_frame([]), aggregate_results(results_frame([])))
    rows: list[dict] = []
    peers: list[dict] = []
    start = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.fields[run]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("", total=len(combos), run="")
        for combo in combos:
            name = combo.relpath.as_posix()
            progress.update(task, run=name, description="")
            run_dir = root / combo.relpath
            done = finished_run(run_dir, combo)
            if done is None:
                outcome = runner(
                    combo.config,
                    run_dir,
                    overwrite=overwrite,
                    log=lambda message: progress.update(task, description=message),
                )
                evaluation, stages = outcome.evaluation, outcome.stages
                result.ran.append(name)
            else:
                evaluation, stages = done
                result.skipped.append(name)
            rows.extend(run_rows(combo.key(), evaluation, stages))
            if combo.peers:
                from infscope.peers.suite import run_peer_suite

                table = run_peer_suite(
                    run_dir, combo.peers, log=lambda message: progress.update(task, description=message)
                )
                peers.extend(peer_rows(combo.key(), table))
                result.peers = pd.DataFrame(peers)
                write_table(result.peers, root, PEERS_NAME)
            result.results, result.aggregate = _write_tables(rows, root)
            progress.advance(task)
        progress.update(task, run="done", description="")
    if not peers:  # no grid asks for peers: a table left by an earlier spec would be shown as this one's
        for suffix in (".parquet", ".csv"):
            (root / f"{PEERS_NAME}{suffix}").unlink(missing_ok=True)
    result.seconds = time.perf_counter() - start
    return result
