"""The benchmark's tables: one row per (run, method, group), and the same aggregated over seeds.

``results`` rows come straight from each run's ``evaluation.json`` and ``run.json``: ``group`` is
``all`` (every training row), ``family:<name>`` or ``operator:<name>`` (that group's noisy rows
against all clean rows, as in :mod:`infscope.evaluate.detection`), or ``attribution`` (class
detection AUC / recall of the per-query score matrix). Costs are repeated on each row of a run:
``method_seconds`` / ``method_peak_mb`` of the scoring method, and seconds / peak RSS of the
``finetune``, ``gradients`` and ``score`` stages.

``aggregate`` reduces seeds with :func:`infscope.evaluate.aggregate.aggregate_seeds` (mean, sample
std, 95% t interval) per run setting (``dataset, noise, ratio, model``), method, group and metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.runs import atomic_path

KEY_COLUMNS = ("dataset", "noise", "strategy", "weights", "ratio", "model", "seed", "run")
SETTING_COLUMNS = ("dataset", "noise", "ratio", "model")
DETECTION_METRICS = ("auroc", "ap", "p_at_k", "curve_area", "n", "n_noisy")
ATTRIBUTION_METRICS = ("auc", "recall")
STAGES = ("finetune", "gradients", "score")
COST_COLUMNS = ("method_seconds", "method_peak_mb") + tuple(
    f"{stage}_{what}" for stage in STAGES for what in ("seconds", "peak_mb")
)
RESULT_COLUMNS = (
    *KEY_COLUMNS,
    "method",
    "level",
    "group",
    *DETECTION_METRICS,
    *ATTRIBUTION_METRICS,
    *COST_COLUMNS,
)
METRIC_COLUMNS = (*DETECTION_METRICS, *ATTRIBUTION_METRICS, *COST_COLUMNS)
AGGREGATE_COLUMNS = (
    *SETTING_COLUMNS,
    "method",
    "level",
    "group",
    "metric",
    "mean",
    "std",
    "ci_half",
    "ci_low",
    "ci_high",
    "n_seeds",
)
RESULTS_NAME, AGGREGATE_NAME, PEERS_NAME = "results", "aggregate", "peers"


def _stage_costs(stages: Mapping[str, Any]) -> dict[str, float | None]:
    """Seconds and peak MB per stage; the gradient passes of every checkpoint (``gradients:<tag>``) add up."""
    out: dict[str, float | None] = {}
    for stage in STAGES:
        records = [r for name, r in stages.items() if name == stage or name.startswith(f"{stage}:")]
        seconds = [r.get("seconds") for r in records if r.get("seconds") is not None]
        peaks = [r.get("peak_rss_mb") for r in records if r.get("peak_rss_mb") is not None]
        out[f"{stage}_seconds"] = sum(seconds) if seconds else None
        out[f"{stage}_peak_mb"] = max(peaks) if peaks else None
    return out


def _metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    from infscope.evaluate.detection import summary_row

    return summary_row(report)


def run_rows(
    key: Mapping[str, Any], evaluation: Mapping[str, Any], stages: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Rows of one finished run: per method, ``all`` + each family and operator, + attribution.

    ``key`` holds the run's identifying columns (:meth:`Combination.key`), ``evaluation`` is its
    ``evaluation.json`` and ``stages`` the ``stages`` of its ``run.json``.
    """
    costs = _stage_costs(stages)
    score_info = (stages.get("score") or {}).get("info", {})
    board = {row["method"]: row for row in evaluation.get("leaderboard", [])}

    def method_costs(method: str) -> dict[str, Any]:
        row = board.get(method, {})
        recorded = score_info.get("methods", {}).get(method, {})
        seconds = row.get("seconds", recorded.get("seconds"))
        peak = row.get("peak_mb", recorded.get("peak_rss_mb"))
        return {"method_seconds": seconds, "method_peak_mb": peak, **costs}

    rows: list[dict[str, Any]] = []
    for method, report in evaluation.get("detection", {}).items():
        base = {**key, "method": method, **method_costs(method)}
        rows.append({**base, "level": "all", "group": "all", **_metrics(report)})
        for level, groups in (report.get("by") or {}).items():
            for name, group_report in groups.items():
                rows.append({**base, "level": level, "group": f"{level}:{name}", **_metrics(group_report)})
    for method, result in (evaluation.get("attribution") or {}).items():
        rows.append(
            {
                **key,
                "method": method,
                **method_costs(method),
                "level": "attribution",
                "group": "attribution",
                "auc": result.get("auc"),
                "recall": result.get("recall"),
            }
        )
    return rows


def peer_rows(key: Mapping[str, Any], table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of one run's peer table (:func:`infscope.peers.suite.run_peer_suite`) with the run's key.

    The peer table's ``ratio`` (peer seconds / our seconds) becomes ``time_ratio``: ``ratio`` is the noise ratio here.
    """
    return [
        {**key, **table_row} for table_row in table.rename(columns={"ratio": "time_ratio"}).to_dict("records")
    ]


def results_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with the fixed column order and float metric columns (NaN = undefined)."""
    frame = pd.DataFrame(list(rows), columns=list(RESULT_COLUMNS))
    for column in METRIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
    frame["ratio"] = frame["ratio"].astype(np.float64)
    frame["seed"] = frame["seed"].astype(np.int64)
    for column in ("dataset", "noise", "strategy", "weights", "model", "run", "method", "level", "group"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame


def aggregate_results(results: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Mean, std and ``confidence`` interval over seeds per setting, method, group and metric."""
    from infscope.evaluate.aggregate import aggregate_seeds

    if results.empty:
        return pd.DataFrame(columns=list(AGGREGATE_COLUMNS))
    missing = [c for c in (*SETTING_COLUMNS, "method", "group", "seed") if c not in results.columns]
    if missing:
        raise InfscopeError(f"results table lacks column(s) {', '.join(missing)}; rerun `infscope bench run`")
    metrics = [c for c in METRIC_COLUMNS if c in results.columns]
    parts = []
    for setting, part in results.groupby(list(SETTING_COLUMNS), sort=False, dropna=False):
        stats = aggregate_seeds(part[["method", "group", "seed", *metrics]], confidence=confidence)
        if stats.empty:
            continue
        stats.insert(0, "model", setting[3])
        stats.insert(0, "ratio", setting[2])
        stats.insert(0, "noise", setting[1])
        stats.insert(0, "dataset", setting[0])
        parts.append(stats)
    if not parts:
        return pd.DataFrame(columns=list(AGGREGATE_COLUMNS))
    frame = pd.concat(parts, ignore_index=True)
    frame["level"] = frame["group"].str.split(":", n=1).str[0]
    return frame[list(AGGREGATE_COLUMNS)].reset_index(drop=True)


def write_table(frame: pd.DataFrame, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``frame`` as ``<name>.parquet`` and ``<name>.csv`` in ``out_dir``, each atomically."""
    directory = Path(out_dir)
    parquet, csv = directory / f"{name}.parquet", directory / f"{name}.csv"
    with atomic_path(parquet) as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_path(csv) as tmp:
        frame.to_csv(tmp, index=False)
    return parquet, csv


def read_results(out_dir: str | Path) -> pd.DataFrame:
    """The results table of a benchmark directory (made by ``infscope bench run``)."""
    path = Path(out_dir) / f"{RESULTS_NAME}.parquet"
    if not path.is_file():
        raise InfscopeError(
            f"no {path.name} in {out_dir}; pass a directory made by `infscope bench run SPEC --out DIR`"
        )
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InfscopeError(f"cannot read {path}: {exc}; rerun `infscope bench run` to rebuild it") from None
