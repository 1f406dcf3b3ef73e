"""The benchmark summary: per setting, one rich table row per method, mean ± 95% CI over seeds.

Built from the aggregate table only (``group`` ``all`` for detection, ``attribution`` for class
attribution), so ``infscope bench show`` prints the same table from the saved Parquet file.
Columns that no row fills (e.g. attribution in a pure detection benchmark) are left out; the
caption of each table gives the per-run stage costs (fine-tune, gradients, score).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from infscope.bench.results import SETTING_COLUMNS

# (metric, header, digits, show the interval)
SUMMARY_METRICS = (
    ("auroc", "AUROC", 3, True),
    ("ap", "AP", 3, True),
    ("p_at_k", "P@k", 3, True),
    ("curve_area", "Curve area", 3, True),
    ("auc", "Attr AUC", 3, True),
    ("recall", "Attr recall", 3, True),
    ("method_seconds", "Score s", 2, False),
)


def setting_label(setting: tuple) -> str:
    """``dataset / noise (ratio r) / model`` for one (dataset, noise, ratio, model) setting."""
    dataset, noise, ratio, model = setting
    return f"{dataset} / {noise} (ratio {ratio:g}) / {model}"


def summary_frame(aggregate: pd.DataFrame) -> pd.DataFrame:
    """Wide summary: one row per setting and method, ``<metric>`` (mean), ``<metric>_ci``, ``n_seeds``.

    Rows keep the settings' order of appearance; within a setting, methods are sorted by AUROC
    (then attribution AUC), best first.
    """
    keys = [*SETTING_COLUMNS, "method"]
    wanted = [m for m, *_ in SUMMARY_METRICS]
    part = aggregate[aggregate["group"].isin(["all", "attribution"]) & aggregate["metric"].isin(wanted)]
    if part.empty:
        return pd.DataFrame(columns=[*keys, "n_seeds"])
    # a cost metric appears under both groups for the same method; the first (detection) is kept
    part = part.drop_duplicates([*keys, "metric"])
    means = part.pivot(index=keys, columns="metric", values="mean")
    cis = part.pivot(index=keys, columns="metric", values="ci_half").add_suffix("_ci")
    seeds = part.groupby(keys, sort=False)["n_seeds"].max().rename("n_seeds")
    wide = means.join(cis).join(seeds).reset_index()
    order = part[list(SETTING_COLUMNS)].drop_duplicates().reset_index(drop=True)
    order["_setting"] = np.arange(len(order))
    wide = wide.merge(order, on=list(SETTING_COLUMNS), how="left")
    sort_cols = ["_setting"] + [m for m in ("auroc", "auc") if m in wide.columns] + ["method"]
    ascending = [True] + [False] * (len(sort_cols) - 2) + [True]
    wide = wide.sort_values(sort_cols, ascending=ascending, na_position="last", kind="stable")
    return wide.drop(columns="_setting").reset_index(drop=True)


def _cell(value: float, ci: float, digits: int, with_ci: bool) -> str:
    if not np.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    if with_ci and np.isfinite(ci):
        text += f" ± {ci:.{digits}f}"
    return text


def _setting_caption(aggregate: pd.DataFrame, setting: tuple) -> str:
    """Per-run costs of one setting (the same for every method): mean stage seconds and peak memory."""
    part = aggregate[
        (aggregate[list(SETTING_COLUMNS)] == pd.Series(setting, index=list(SETTING_COLUMNS))).all(axis=1)
    ]
    means = part.drop_duplicates("metric").set_index("metric")["mean"]
    pieces = [
        f"{stage} {means[f'{stage}_seconds']:.1f} s / {means.get(f'{stage}_peak_mb', np.nan):.0f} MB"
        for stage in ("finetune", "gradients", "score")
        if np.isfinite(means.get(f"{stage}_seconds", np.nan))
    ]
    return "per run: " + ", ".join(pieces) if pieces else ""


def render_summary(
    aggregate: pd.DataFrame, console: Console | None = None, *, title: str = "Benchmark summary"
) -> list[Table]:
    """Print one rich table per setting (dataset / noise / model), methods best first; return them."""
    console = console or Console()
    wide = summary_frame(aggregate)
    console.print(f"[bold]{title}[/]")
    if wide.empty:
        console.print("no results yet")
        return []
    shown = [
        spec
        for spec in SUMMARY_METRICS
        if spec[0] in wide.columns and np.isfinite(wide[spec[0]].to_numpy(dtype=float)).any()
    ]
    tables = []
    for setting, part in wide.groupby(list(SETTING_COLUMNS), sort=False):
        table = Table(
            title=setting_label(setting),
            caption=_setting_caption(aggregate, setting),
        )
        table.add_column("Method", no_wrap=True, min_width=12)
        for _, header, _, _ in shown:
            table.add_column(header, justify="right")
        table.add_column("Seeds", justify="right")
        for record in part.to_dict("records"):
            cells = [
                _cell(float(record[m]), float(record.get(f"{m}_ci", np.nan)), digits, with_ci)
                for m, _, digits, with_ci in shown
            ]
            table.add_row(str(record["method"]), *cells, str(int(record["n_seeds"])))
        console.print(table)
        tables.append(table)
    return tables


#: (column, header, format spec) of the peers table, averaged over seeds
PEER_COLUMNS = (
    ("auroc", "AUROC", ".3f"),
    ("spearman", "Spearman vs ours", ".3f"),
    ("rel_diff", "Max rel. diff", ".1e"),
    ("seconds", "Seconds", ".1f"),
    ("time_ratio", "Time ratio", ".1f"),
    ("peak_mb", "Peak MB", ".0f"),
)


def peer_cells(record: dict) -> list[str]:
    """The :data:`PEER_COLUMNS` values of one :func:`peer_summary` row as text (``-`` when undefined)."""
    return [f"{record[c]:{spec}}" if np.isfinite(record[c]) else "-" for c, _, spec in PEER_COLUMNS]


def peer_summary(peers: pd.DataFrame) -> pd.DataFrame:
    """Per setting and method (peers and ``ours:*``): seed means, compared method, runs and first error."""
    keys = [*SETTING_COLUMNS, "method"]
    if peers is None or peers.empty:
        return pd.DataFrame(columns=[*keys, "vs", *(c for c, *_ in PEER_COLUMNS), "runs", "error"])
    frame = peers.copy()
    for column, *_ in PEER_COLUMNS:
        frame[column] = pd.to_numeric(frame.get(column), errors="coerce")
    for column in ("vs", "error"):
        frame[column] = frame[column].where(frame[column].notna(), "") if column in frame else ""
    failed = frame["error"].astype(str) != ""
    frame.loc[failed, ["seconds", "peak_mb", "time_ratio"]] = np.nan  # a killed peer's wall time is no cost
    grouped = frame.groupby(keys, sort=False)
    out = grouped[[c for c, *_ in PEER_COLUMNS]].mean()
    out["vs"] = grouped["vs"].first()
    out["runs"] = grouped.size()
    out["error"] = grouped["error"].agg(lambda s: next((str(e) for e in s if str(e)), ""))
    return out.reset_index()


def render_peers(peers: pd.DataFrame | None, console: Console | None = None) -> list[Table]:
    """Print the peers side by side per setting (means over seeds); ``Time ratio`` = peer s / our s."""
    console = console or Console()
    wide = peer_summary(peers)
    tables = []
    for setting, part in wide.groupby(list(SETTING_COLUMNS), sort=False):
        table = Table(
            title=f"peers on {setting_label(setting)}",
            caption="means over seeds; time ratio = peer seconds / our seconds for the compared method "
            "(peers compute their own gradients; ours:gradients is our one-off pass)",
        )
        table.add_column("Method", no_wrap=True)
        table.add_column("vs")
        for _, header, _ in PEER_COLUMNS:
            table.add_column(header, justify="right")
        table.add_column("Runs", justify="right")
        table.add_column("Error", overflow="fold")
        for record in part.to_dict("records"):
            table.add_row(
                str(record["method"]),
                str(record["vs"] or ""),
                *peer_cells(record),
                str(record["runs"]),
                record["error"],
            )
        console.print(table)
        tables.append(table)
    return tables
