"""Every applicable scoring method on existing runs: AUROC, AP, seconds and peak memory, one table per setting.

For each run folder, each method is scored alone (``score_run(run, [name], checkpoint=...)``, one
method per call), so its seconds and peak resident memory are its own: the method's share as
``score_methods`` records it in the Scores meta (loading stored gradients, the model, K-FAC factors
or fold models counts in the method, since every call starts from a fresh ``RunInputs``), plus the
whole call's wall time and peak (opening the run, saving the tables). The gradient pass at the
scored checkpoint was taken before (fine-tuning benchmark) and is shown once per setting from the
run's ``gradients:<tag>`` stage. AUROC and AP are against the run's manifest; rows the manifest
does not list (canaries) are dropped. A crash, a refusal or a timeout becomes an error row.

Results are cached per run in ``RUN/method_table.json`` (one record per method and checkpoint), so a
rerun computes only what is missing (``--retry-errors`` retries the error rows). Runs named
``seed-N`` under one folder form one setting: the table shows mean +- sd over the seeds. Scoring
writes the plain-name scores into the run; the ``<method>@<tag>`` scores that an earlier
``--checkpoint all`` left there (which ``score_run`` would delete) are put back afterwards.

    python3 benchmarks/method_table.py /work/bench-runs/detectors/sections_flip/seed-{0,1,2}
    python3 benchmarks/method_table.py RUN --methods loss,datainf,ekfac,kfac,mirrored --budget-minutes 50
    python3 benchmarks/method_table.py A/seed-0 B/seed-0 --methods-for B=loss,datainf,ekfac   # all on A
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.estimators.registry import METHODS, get_method
from infscope.evaluate.metrics import auroc, average_precision
from infscope.runs import PeakMemory, atomic_write_json, atomic_write_text, read_json
from infscope.scoring import RunInputs, open_run, parse_methods, runnable, score_run
from infscope.scoring.run import OpenedRun

CACHE_NAME = "method_table.json"
#: The methods issue 12 added, marked in the tables.
ISSUE_12 = frozenset(
    ("ekfac", "kfac", "mirrored", "tracin_we", "repsim", "knn_shapley", "data_oob")
    + ("tmc_shapley", "beta_shapley", "banzhaf")
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="fine-tuned run folders (seed-N folders form a setting)"
    )
    parser.add_argument(
        "--methods", default="all", help="comma-separated names, or 'all' (every method the run can score)"
    )
    parser.add_argument(
        "--methods-for",
        action="append",
        default=[],
        metavar="SETTING=LIST",
        help="methods for the runs of one setting instead of --methods (repeatable)",
    )
    parser.add_argument("--skip", default="", help="comma-separated methods to leave out")
    parser.add_argument("--checkpoint", default="best", help="checkpoint rule passed to score_run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/method_table.md"))
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a method becomes an error"
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=None, help="start no new method after this many minutes"
    )
    parser.add_argument(
        "--retry-errors", action="store_true", help="score again the methods cached as errors"
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- one method on one run


class MethodTimeout(Exception):
    """Raised by the alarm when a method runs past ``--timeout``."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise MethodTimeout


def current_rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def manifest_truth(run: OpenedRun) -> pd.Series:
    """``is_noisy`` per row id from the run's manifest (the only ground truth)."""
    if run.manifest is None or not Path(run.manifest).is_file():
        raise InfscopeError(
            f"{run.layout.root} has no noise manifest; pass a run made by the noise benchmark"
        )
    frame = pd.read_json(run.manifest, lines=True)
    return frame.set_index(frame["id"].astype(str))["is_noisy"].astype(bool)


def detection(ids: list[str], values: np.ndarray, truth: pd.Series) -> dict[str, Any]:
    """AUROC and AP of one score vector on the rows the manifest lists (others, e.g. canaries, dropped)."""
    keep = np.asarray([i in truth.index for i in ids])
    vector = np.asarray(values, dtype=np.float64)[keep]
    positives = truth.loc[[i for i, k in zip(ids, keep, strict=True) if k]].to_numpy()
    finite = np.isfinite(vector)
    vector = np.where(finite, vector, np.nanmin(vector[finite]) if finite.any() else 0.0)
    return {
        "auroc": auroc(vector, positives),
        "ap": average_precision(vector, positives),
        "n": int(keep.sum()),
        "n_noisy": int(positives.sum()),
        "n_dropped": int((~keep).sum()),
        "n_nonfinite": int((~finite).sum()),
    }


def _epoch_files(run: OpenedRun, name: str) -> dict[Path, bytes]:
    """The ``<name>@<tag>`` scores and tables in the run, kept to be restored after scoring."""
    layout = run.layout
    paths = [*layout.scores_dir.glob(f"{name}@*.npz"), *layout.results_dir.glob(f"{name}@*")]
    return {p: p.read_bytes() for p in paths if p.is_file()}


def _restore(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        if not path.exists():
            tmp = path.with_name(path.name + ".restore")
            tmp.write_bytes(data)
            tmp.replace(path)


def score_one(run_dir: Path, name: str, checkpoint: str, timeout: float) -> dict[str, Any]:
    """Score ``name`` alone on ``run_dir``; returns the cached record (metrics and cost, or the error)."""
    record: dict[str, Any] = {"method": name, "checkpoint_rule": checkpoint}
    run = open_run(run_dir)
    kept = _epoch_files(run, name)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    record["rss_before_mb"] = round(current_rss_mb(), 1)
    start = time.perf_counter()
    try:
        with PeakMemory() as mem:
            scores = score_run(run, [name], checkpoint=checkpoint)[name]
        signal.setitimer(signal.ITIMER_REAL, 0)
        record.update(
            call_seconds=round(time.perf_counter() - start, 3),
            call_peak_rss_mb=round(mem.peak_rss / 2**20, 1),
            seconds=scores.meta.get("seconds"),
            peak_rss_mb=scores.meta.get("peak_rss_mb"),
            checkpoint=Path(str(scores.meta.get("checkpoint", ""))).name,
            warnings=scores.meta.get("warning_count", 0),
        )
        record.update(detection(list(scores.train_ids), scores.vector(), manifest_truth(run)))
    except (Exception, MethodTimeout) as exc:  # a crash is a row of the table, not the end of the benchmark
        signal.setitimer(signal.ITIMER_REAL, 0)
        kind = "timeout" if isinstance(exc, MethodTimeout) else type(exc).__name__
        message = (
            f"after {timeout:.0f} s" if isinstance(exc, MethodTimeout) else str(exc).splitlines()[0][:300]
        )
        record.update(error=f"{kind}: {message}", call_seconds=round(time.perf_counter() - start, 3))
        if not isinstance(exc, (InfscopeError, MethodTimeout)):
            record["traceback"] = traceback.format_exc(limit=6)[-2000:]
    finally:
        signal.signal(signal.SIGALRM, previous)
        _restore(kept)
    return record


# --------------------------------------------------------------------------- a run: which methods, cache


def chosen_methods(
    run: OpenedRun, spec: str, skip: set[str], checkpoint: str
) -> tuple[list[str], dict[str, str]]:
    """The methods to score on ``run`` and, for named ones it cannot score, why (an error row each)."""
    inputs = RunInputs(run, run.checkpoint(checkpoint), run.val, query_name="val")
    names = parse_methods(spec, inputs)
    refused: dict[str, str] = {}
    for name in names:
        if not runnable(name, inputs):
            method = get_method(name)
            if inputs.task not in method.tasks:
                refused[name] = (
                    f"not applicable: scores {'/'.join(method.tasks)} data, the run is {inputs.task}"
                )
            else:
                missing = [n for n in method.needs if not inputs.available(n)]
                refused[name] = f"not applicable: the run has no {', '.join(missing)}"
    return [n for n in names if n not in skip and n not in refused], refused


def load_cache(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / CACHE_NAME
    return dict(read_json(path).get("methods", {})) if path.is_file() else {}


def save_cache(run_dir: Path, methods: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(run_dir / CACHE_NAME, {"schema": 1, "methods": methods})


def cache_key(name: str, checkpoint: str) -> str:
    return name if checkpoint == "best" else f"{name}@{checkpoint}"


@dataclass
class Budget:
    """Wall-clock budget: after ``minutes`` no new method starts (None: no limit)."""

    minutes: float | None
    start: float = field(default_factory=time.monotonic)

    def spent(self) -> bool:
        return self.minutes is not None and time.monotonic() - self.start > 60 * self.minutes


def measure_run(run_dir: Path, args: argparse.Namespace, budget: Budget) -> dict[str, dict[str, Any]]:
    """Score every chosen method missing from the run's cache; returns the records of the chosen methods."""
    run = open_run(run_dir)
    skip = {m.strip() for m in args.skip.split(",") if m.strip()}
    spec = dict(item.split("=", 1) for item in args.methods_for).get(setting_of(run_dir), args.methods)
    names, refused = chosen_methods(run, spec, skip, args.checkpoint)
    cache = load_cache(run_dir)
    out: dict[str, dict[str, Any]] = {n: {"method": n, "error": why} for n, why in refused.items()}
    for name in names:
        key = cache_key(name, args.checkpoint)
        cached = cache.get(key)
        if cached is not None and not (args.retry_errors and "error" in cached):
            out[name] = cached
            continue
        if budget.spent():
            out[name] = {"method": name, "error": "not run: time budget spent"}
            continue
        print(f"  {run_dir.parent.name}/{run_dir.name}: {name} ...", end=" ", flush=True)
        record = score_one(run_dir, name, args.checkpoint, args.timeout)
        print(record.get("error") or f"AUROC {record['auroc']:.3f}, {record['seconds']} s", flush=True)
        cache = load_cache(run_dir)  # re-read: keep what another invocation wrote meanwhile
        cache[key] = record
        save_cache(run_dir, cache)
        out[name] = record
    return out


# --------------------------------------------------------------------------- tables


def setting_of(run_dir: Path) -> str:
    """Runs named ``seed-N`` belong to their parent folder's setting; any other run is its own."""
    return run_dir.parent.name if run_dir.name.startswith("seed-") else run_dir.name


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _number(values: list[float], fmt: str) -> str:
    return format(float(np.mean(values)), fmt) if values else "-"


def summarise(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One table line for a method over the seeds of a setting."""
    ok = [r for r in records if "error" not in r and r.get("auroc") is not None]

    def values(key: str) -> list[float]:
        return [float(r[key]) for r in ok if r.get(key) is not None]

    errors = sorted({r["error"] for r in records if "error" in r})
    growth = [
        float(r["peak_rss_mb"]) - float(r["rss_before_mb"])
        for r in ok
        if r.get("peak_rss_mb") is not None and r.get("rss_before_mb") is not None
    ]
    return {
        "method": f"**{name}**" if name in ISSUE_12 else name,
        "family": get_method(name).family if name in METHODS else "",
        "AUROC": _mean_sd(values("auroc")),
        "AP": _mean_sd(values("ap")),
        "seconds": _number(values("seconds"), ".2f"),
        "call s": _number(values("call_seconds"), ".1f"),
        "peak MB": format(max(values("peak_rss_mb")), ".0f") if values("peak_rss_mb") else "-",
        "+MB": format(max(growth), ".0f") if growth else "-",
        "seeds": f"{len(ok)}/{len(records)}",
        "per seed AUROC": " / ".join(f"{r['auroc']:.3f}" if r in ok else "err" for r in records),
        "_sort": float(np.mean(values("auroc"))) if ok else -1.0,
        "_errors": errors,
    }


def markdown_table(lines: list[dict[str, Any]]) -> str:
    columns = [c for c in lines[0] if not c.startswith("_")]
    head = "| " + " | ".join(columns) + " |"
    rule = (
        "|" + "|".join("---" if c in ("method", "family", "per seed AUROC") else "--:" for c in columns) + "|"
    )
    body = ["| " + " | ".join(str(line[c]) for c in columns) + " |" for line in lines]
    return "\n".join([head, rule, *body])


def setting_section(setting: str, runs: list[Path], results: dict[Path, dict[str, dict[str, Any]]]) -> str:
    """The Markdown section of one setting: what was run, the table sorted by AUROC, the errors."""
    opened = [open_run(r) for r in runs]
    first = opened[0]
    truth = manifest_truth(first)
    operators = Counter(pd.read_json(first.manifest, lines=True).query("is_noisy")["operator"])
    best_tags = sorted({o.best.tag for o in opened})
    grad_seconds = [
        float(o.dir.record.stages.get(f"gradients:{o.best.tag}", {}).get("seconds", np.nan)) for o in opened
    ]
    all_grad_seconds = [
        sum(
            float(v.get("seconds", 0.0)) for k, v in o.dir.record.stages.items() if k.startswith("gradients:")
        )
        for o in opened
    ]
    n_grad_stages = sum(k.startswith("gradients:") for k in first.dir.record.stages)
    names = sorted({n for r in runs for n in results[r]})
    lines = [summarise([results[r].get(n, {"error": "not chosen"}) for r in runs], n) for n in names]
    lines.sort(key=lambda line: (-line["_sort"], line["method"]))
    spec = first.spec
    out = [
        f"## {setting}: {spec.name}, {first.dir.record.args.get('dataset', '?')} ({spec.task}), "
        f"{len(runs)} seed{'s' if len(runs) > 1 else ''}",
        "",
        f"Runs: {', '.join(f'`{r}`' for r in runs)}. {len(truth)} training rows, {int(truth.sum())} noisy "
        f"({', '.join(f'{k} {v}' for k, v in operators.items())}); {len(first.val)} validation rows are the "
        f"query. Scored checkpoint: best validation loss ({', '.join(best_tags)}). The gradient pass at it "
        f"(stored before, loaded by the gradient methods): {np.nanmean(grad_seconds):.1f} s per seed "
        f"({np.mean(all_grad_seconds):.1f} s over the {n_grad_stages} checkpoint(s) with stored gradients).",
        "",
        markdown_table(lines),
    ]
    errors = [(line["method"], e) for line in lines for e in line["_errors"]]
    if errors:
        out += ["", "Errors and methods not run:", ""]
        out += [f"- {m}: {e}" for m, e in errors]
    return "\n".join(out)


def write_markdown(path: Path, command: str, settings: dict[str, list[Path]], results: dict) -> None:
    header = [
        "# Method table: every applicable method on fine-tuned runs",
        "",
        f"Produced by `{command}` (CPU, 2 shared cores).",
        "",
        "AUROC/AP: detecting the manifest's noisy rows (higher score = more harmful); mean ± sd over seeds. "
        "`seconds`: the method's own time in one `score_run` call (loading stored gradients, the model, "
        "factors or fold models included); `call s`: the whole call; `peak MB`: the process's peak resident "
        "memory while the method ran (max over seeds; it includes the benchmark's own Python process with "
        "torch, 0.35-0.9 GB before a method starts, as methods run one after another in one process); "
        "`+MB`: that peak minus the process's memory just before the call (max over seeds), the method's own "
        "share. Bold: the methods of issue 12.",
        "",
        "What `seconds` leaves out, because the run already holds it: the gradient pass (stated per setting; "
        "`tracin`, `less`, `trackstar` read the gradients of every checkpoint); the losses and training "
        "dynamics recorded in fine-tuning (`loss`, `cartography`, `aum`, `forgetting`, `el2n`); the K=5 fold "
        "fine-tunes of `oof_loss`, `cleanlab`, `oof_fusion` when the run already holds the fold models "
        "(only loading them and their forward passes count). `ekfac` and `kfac` share the K-FAC factors "
        "cached in the run: `ekfac` is scored first and pays the factor pass, `kfac` reuses it.",
    ]
    sections = [setting_section(s, runs, results) for s, runs in settings.items()]
    atomic_write_text(path, "\n\n".join(["\n".join(header), *sections]) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = Budget(args.budget_minutes)
    runs = [r.resolve() for r in args.runs]
    settings: dict[str, list[Path]] = {}
    for run in runs:
        settings.setdefault(setting_of(run), []).append(run)
    results = {}
    for run in runs:
        print(f"{run}", flush=True)
        results[run] = measure_run(run, args, budget)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = ("OMP_NUM_THREADS=" + threads + " " if threads else "") + shlex.join(
        ["python3", "benchmarks/method_table.py", *(argv if argv is not None else sys.argv[1:])]
    )
    write_markdown(args.out, command, settings, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
