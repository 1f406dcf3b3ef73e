"""A benchmark's tables as Markdown, for READMEs, papers and issue threads (``infscope bench show --markdown``).

Built from the saved ``aggregate`` and ``peers`` tables only, so the text is the same whether it is
printed at the end of a run or later from the benchmark directory. Cells are ``mean ± half-width
of the 95 % interval`` over seeds; ``-`` marks an undefined value (e.g. AUROC of a clean run).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from infscope.bench.results import SETTING_COLUMNS
from infscope.bench.summary import PEER_COLUMNS, peer_cells, peer_summary, setting_label


def _cell(mean: float, ci: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {ci:.2f}" if np.isfinite(ci) else "")


def _setting_title(setting: tuple, seeds: int) -> str:
    return f"**{setting_label(setting)}**, {seeds} seed{'s' if seeds != 1 else ''}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def methods_markdown(aggregate: pd.DataFrame) -> str:
    """Per setting: one row per method, detection (AUROC, AP, P@k) and attribution (AUC, recall) columns."""
    metrics = (
        ("auroc", "AUROC"),
        ("ap", "AP"),
        ("p_at_k", "P@k"),
        ("auc", "attr. AUC"),
        ("recall", "attr. recall"),
    )
    part = aggregate[aggregate["group"].isin(["all", "attribution"])]
    out: list[str] = []
    for setting, block in part.groupby(list(SETTING_COLUMNS), sort=False):
        stats = block.drop_duplicates(["method", "metric"]).set_index(["method", "metric"])
        shown = [(m, h) for m, h in metrics if m in stats.index.get_level_values("metric")]
        shown = [
            (m, h) for m, h in shown if np.isfinite(stats.xs(m, level="metric")["mean"].astype(float)).any()
        ]
        if not shown:
            continue
        key = shown[0][0]
        order = stats.xs(key, level="metric")["mean"].astype(float).sort_values(ascending=False).index
        rows = []
        for method in order:
            cells = []
            for metric, _ in shown:
                if (method, metric) in stats.index:
                    row = stats.loc[(method, metric)]
                    cells.append(_cell(float(row["mean"]), float(row["ci_half"])))
                else:
                    cells.append("-")
            rows.append([method, *cells])
        out += ["", _setting_title(setting, int(block["n_seeds"].max())), ""]
        out += _table(["method", *(h for _, h in shown)], rows)
    return "\n".join(out).strip() + "\n" if out else ""


def groups_markdown(aggregate: pd.DataFrame, level: str = "family", metric: str = "auroc") -> str:
    """Per setting with noise: ``metric`` per noise family (or operator), methods as rows."""
    part = aggregate[(aggregate["level"] == level) & (aggregate["metric"] == metric)]
    out: list[str] = []
    for setting, block in part.groupby(list(SETTING_COLUMNS), sort=False):
        groups = list(dict.fromkeys(block["group"]))
        rows = []
        for method, rows_of_method in block.groupby("method", sort=False):
            by_group = rows_of_method.set_index("group")
            cells = [
                _cell(float(by_group.loc[g, "mean"]), float(by_group.loc[g, "ci_half"]))
                if g in by_group.index
                else "-"
                for g in groups
            ]
            rows.append([method, *cells])
        out += [
            "",
            f"{_setting_title(setting, int(block['n_seeds'].max()))}: {metric.upper()} per noise {level}",
            "",
        ]
        out += _table(["method", *(g.split(":", 1)[1] for g in groups)], rows)
    return "\n".join(out).strip() + "\n" if out else ""


def peers_markdown(peers: pd.DataFrame | None) -> str:
    """Per setting: each peer and our compared method, means over seeds (see :func:`peer_summary`)."""
    wide = peer_summary(peers)
    out: list[str] = []
    for setting, block in wide.groupby(list(SETTING_COLUMNS), sort=False):
        rows = []
        for record in block.to_dict("records"):
            error = str(record["error"]).replace("|", "/")
            rows.append([str(record["method"]), str(record["vs"] or ""), *peer_cells(record), error])
        out += ["", f"Peers on {_setting_title(setting, int(block['runs'].max()))}", ""]
        out += _table(["method", "vs", *(h for _, h, _ in PEER_COLUMNS), "error"], rows)
    return "\n".join(out).strip() + "\n" if out else ""


def bench_markdown(aggregate: pd.DataFrame, peers: pd.DataFrame | None = None) -> str:
    """Every table of a benchmark: methods, AUROC per family and per operator, and peers."""
    parts = [
        methods_markdown(aggregate),
        groups_markdown(aggregate, "family"),
        groups_markdown(aggregate, "operator"),
        peers_markdown(peers),
    ]
    return "\n".join(p for p in parts if p)
