"""Results over several seeds: mean, standard deviation and a t confidence interval; the leaderboard.

Per-seed results come in long form (one row per ``method, metric, group, seed`` with a ``value``)
or wide form (one row per ``method, seed`` with one column per metric, e.g. ``auroc, ap, p_at_k``).
:func:`aggregate_seeds` reduces them to one row per ``method, metric, group``; undefined values
(``None``/NaN) are dropped, so ``n_seeds`` counts the seeds where the metric was defined.
The interval is ``mean +- t_{(1+c)/2, n-1} * std / sqrt(n)`` with the sample std (``ddof=1``);
with one seed the std and interval are NaN (shown as a bare mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from infscope.errors import InfscopeError
from infscope.evaluate.stats import t_critical

KEYS = ("method", "metric", "group")
LEADERBOARD_METRICS = ("auroc", "ap", "p_at_k", "seconds", "peak_mb")
#: Shown only when some row has it: the AUROC of the run's canaries (label-free, see ``--canaries``).
CANARY_METRIC = "canary_auroc"
_LABELS = {
    "auroc": "AUROC",
    "ap": "AP",
    "p_at_k": "P@k",
    "seconds": "Seconds",
    "peak_mb": "Peak MB",
    CANARY_METRIC: "Canary",
}
_DIGITS = {"seconds": 1, "peak_mb": 0}
_NO_CI = ("seconds", "peak_mb")  # costs: the mean is enough in a table


def _as_frame(records: pd.DataFrame | Iterable[Mapping[str, Any] | pd.DataFrame]) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        return records.copy()
    items = list(records)
    if not items:
        return pd.DataFrame()
    if all(isinstance(item, pd.DataFrame) for item in items):
        return pd.concat(items, ignore_index=True)
    if any(isinstance(item, pd.DataFrame) for item in items):
        raise InfscopeError("pass per-seed results as all dicts or all DataFrames, not a mix")
    return pd.DataFrame([dict(item) for item in items])


def to_long(records: pd.DataFrame | Iterable[Mapping[str, Any] | pd.DataFrame]) -> pd.DataFrame:
    """Per-seed results as a long frame with columns ``method, metric, group, seed, value``.

    Wide input (no ``metric``/``value`` columns) is melted over its numeric columns. A missing
    ``group`` becomes ``""``; a missing ``seed`` numbers the repeats of each key 0, 1, 2, ...
    """
    frame = _as_frame(records)
    if frame.empty:
        return pd.DataFrame(columns=[*KEYS, "seed", "value"])
    if "method" not in frame.columns:
        raise InfscopeError("per-seed results need a 'method' column naming the scoring method")
    if not {"metric", "value"} <= set(frame.columns):
        id_vars = [c for c in ("method", "seed", "group") if c in frame.columns]
        value_vars = [
            c
            for c in frame.columns
            if c not in id_vars and pd.api.types.is_numeric_dtype(frame[c].infer_objects())
        ]
        if not value_vars:
            raise InfscopeError("per-seed results have no numeric metric columns; pass metric/value columns")
        frame = frame.melt(id_vars=id_vars, value_vars=value_vars, var_name="metric", value_name="value")
    if "group" not in frame.columns:
        frame["group"] = ""
    frame["group"] = frame["group"].where(frame["group"].notna(), "").astype(str)
    if "seed" not in frame.columns:
        frame["seed"] = frame.groupby(list(KEYS), sort=False).cumcount()
    frame = frame[[*KEYS, "seed", "value"]].copy()
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype(np.float64)
    duplicated = frame.duplicated([*KEYS, "seed"])
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise InfscopeError(
            f"seed {first['seed']} appears twice for {first['method']}/{first['metric']}; give each run its own seed"
        )
    return frame


def aggregate_seeds(
    records: pd.DataFrame | Iterable[Mapping[str, Any] | pd.DataFrame], *, confidence: float = 0.95
) -> pd.DataFrame:
    """Mean, std, ``confidence`` interval and seed count per ``method, metric, group``.

    Columns: ``method, metric, group, mean, std, ci_half, ci_low, ci_high, n_seeds`` (NaN where a
    quantity is undefined: no defined value, or one seed for std and interval).
    """
    long = to_long(records)
    long = long[np.isfinite(long["value"])]
    columns = [*KEYS, "mean", "std", "ci_half", "ci_low", "ci_high", "n_seeds"]
    if long.empty:
        return pd.DataFrame(columns=columns)
    grouped = long.groupby(list(KEYS), sort=True)["value"]
    result = grouped.agg(mean="mean", std="std", n_seeds="count").reset_index()
    critical = result["n_seeds"].map(lambda n: t_critical(confidence, int(n)) if n >= 2 else np.nan)
    result["ci_half"] = critical * result["std"] / np.sqrt(result["n_seeds"])
    result["ci_low"] = result["mean"] - result["ci_half"]
    result["ci_high"] = result["mean"] + result["ci_half"]
    result["n_seeds"] = result["n_seeds"].astype(int)
    return result[columns]


def leaderboard(
    rows: Iterable[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = LEADERBOARD_METRICS,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One row per method, sorted by mean AUROC (best first; methods without AUROC last).

    ``rows`` are dicts with ``method`` and any of ``metrics`` (``auroc, ap, p_at_k, seconds,
    peak_mb``), optionally ``seed``; several rows of one method are seeds and get averaged.
    Columns: ``method, n_seeds`` and, per metric, ``<metric>`` (mean), ``<metric>_std`` and
    ``<metric>_ci`` (half-width of the interval).
    """
    frame = _as_frame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["method", "n_seeds", *metrics])
    if "method" not in frame.columns:
        raise InfscopeError("leaderboard rows need a 'method' key naming the scoring method")
    for metric in metrics:
        if metric not in frame.columns:
            frame[metric] = np.nan
        try:
            frame[metric] = pd.to_numeric(frame[metric]).astype(np.float64)
        except (TypeError, ValueError):
            raise InfscopeError(
                f"leaderboard column {metric!r} holds non-numbers; pass numbers or None"
            ) from None
    wide = frame[["method", *(["seed"] if "seed" in frame.columns else []), *metrics]]
    stats = aggregate_seeds(wide, confidence=confidence)
    board = pd.DataFrame({"method": pd.unique(frame["method"].astype(str))})
    board["n_seeds"] = board["method"].map(frame["method"].astype(str).value_counts()).astype(int)
    for metric in metrics:
        part = stats[stats["metric"] == metric].set_index("method")
        board[metric] = board["method"].map(part["mean"]).astype(np.float64)
        board[f"{metric}_std"] = board["method"].map(part["std"]).astype(np.float64)
        board[f"{metric}_ci"] = board["method"].map(part["ci_half"]).astype(np.float64)
    sort_by = "auroc" if "auroc" in metrics else metrics[0]
    board = board.sort_values([sort_by, "method"], ascending=[False, True], na_position="last", kind="stable")
    return board.reset_index(drop=True)


def _cell(value: float, ci: float, digits: int) -> str:
    if not np.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    if np.isfinite(ci):
        text += f" ± {ci:.{digits}f}"
    return text


def render_leaderboard(
    board: pd.DataFrame, console: Console | None = None, *, title: str = "Noise detection leaderboard"
) -> Table:
    """Print ``board`` (from :func:`leaderboard`) as a rich table; mean ± CI when several seeds."""
    metrics = [m for m in board.columns if f"{m}_ci" in board.columns]
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right")
    # the method names must stay readable at 80 columns: metrics wrap before the names do
    longest = int(board["method"].astype(str).str.len().max()) if len(board) else 6
    table.add_column("Method", min_width=min(longest, 24), overflow="fold")
    for metric in metrics:
        table.add_column(_LABELS.get(metric, metric), justify="right")
    # one seed count for every method goes in the title; a column only when they differ
    seeds = sorted(set(board["n_seeds"].astype(int))) if "n_seeds" in board.columns and len(board) else [1]
    show_seeds = len(seeds) > 1
    if not show_seeds and seeds[0] > 1:
        table.title = f"{title} ({seeds[0]} seeds)"
    if show_seeds:
        table.add_column("Seeds", justify="right")
    for position, row in enumerate(board.itertuples(index=False), start=1):
        record = row._asdict()
        cells = [str(position), str(record["method"])]
        for metric in metrics:
            ci = np.nan if metric in _NO_CI else record[f"{metric}_ci"]
            cells.append(_cell(record[metric], ci, _DIGITS.get(metric, 3)))
        if show_seeds:
            cells.append(str(record["n_seeds"]))
        table.add_row(*cells)
    (console or Console()).print(table)
    return table
