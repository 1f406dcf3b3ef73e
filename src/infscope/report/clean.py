"""The report of a cleaning directory (``infscope clean --out DIR``): one self-contained HTML page.

It renders ``DIR/clean_report.json`` (written by :func:`infscope.actions.loop.clean_report`): the
test metric round by round as a line with the baselines (no cleaning, the same action on random
rows, the oracle acting on the injected noise) as horizontal reference lines and the kept round
marked, the round-by-round table, and the changed rows with a word-level diff of before and after.

Like the run report (:mod:`infscope.report.html`), every piece of text from disk (row text, ids,
reasons, method and baseline names, paths) is escaped, the chart is inline SVG, and the page needs
no network and no files beside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from infscope.actions.layout import CleanLayout
from infscope.errors import InfscopeError
from infscope.report import svg
from infscope.report.assets import CSS, JS
from infscope.report.diff import word_diff_html
from infscope.report.html import _num_cell, _section, _table, json_for_script
from infscope.runs import atomic_write_text, read_json

#: Changed rows listed on the page at most (the audit log holds them all).
MAX_CHANGES = 200
REPORT_NAME = "clean_report.html"
BASELINE_LABELS = {"noisy": "no cleaning", "random": "random rows", "oracle": "oracle (injected noise)"}
BASELINE_COLORS = {"noisy": "#7f7f7f", "random": "#ff7f0e", "oracle": "#2ca02c"}
KEPT_COLOR = "#d62728"
CLEAN_CSS = """
tr.kept-row td { background: #fff8e1; font-weight: 600; }
.kept-badge { color: #b00020; font-weight: 600; }
"""


# ---------------------------------------------------------------- reading


def is_clean_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a cleaning directory: it holds ``clean_report.json`` or a ``clean`` run record."""
    layout = CleanLayout(path)
    if layout.report.is_file():
        return True
    if not layout.record.is_file():
        return False
    try:
        return read_json(layout.record).get("kind") == "clean"
    except (InfscopeError, AttributeError):
        return False


def read_clean_report(clean_dir: str | os.PathLike) -> dict[str, Any]:
    """The section a finished ``infscope clean`` wrote, checked to be one (one-line error if not)."""
    layout = CleanLayout(clean_dir)
    if not layout.report.is_file():
        raise InfscopeError(
            f"{clean_dir} has no clean_report.json, so its cleaning loop has not finished; rerun "
            "`infscope clean` with the same arguments and --out to resume it"
        )
    data = read_json(layout.report)
    if not isinstance(data, dict) or data.get("kind") != "clean":
        raise InfscopeError(
            f"{layout.report} is not a clean report; rerun `infscope clean` with --overwrite to rewrite it"
        )
    missing = [k for k in ("metric", "rounds", "best_round", "baselines", "changes") if k not in data]
    if missing:
        raise InfscopeError(
            f"{layout.report} lacks {', '.join(missing)}; rerun `infscope clean` with --overwrite to rewrite it"
        )
    return data


def label_names_of(clean_dir: str | os.PathLike) -> list[Any] | None:
    """The class names the loop's run record lists (classification), so relabels show names."""
    record = CleanLayout(clean_dir).record
    if not record.is_file():
        return None
    try:
        names = (read_json(record).get("model") or {}).get("label_names")
    except (InfscopeError, AttributeError):
        return None
    return list(names) if isinstance(names, list) and names else None


# ---------------------------------------------------------------- the chart


def _span(values: Sequence[float]) -> tuple[float, float]:
    """The y range of the chart: every value inside, with a margin; a flat line gets a small band."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = 0.05 * max(1.0, abs(lo))
        return lo - pad, hi + pad
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values inside ``[lo, hi]`` (multiples of 1, 2, 2.5 or 5 times a power of ten),
    as close to ``count`` of them as those steps allow."""
    magnitude = 10.0 ** math.floor(math.log10(hi - lo))
    best: list[float] = []
    for step in (m * magnitude * f for f in (0.01, 0.1, 1.0) for m in (1.0, 2.0, 2.5, 5.0)):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        ticks = [round(k * step, 12) for k in range(first, last + 1)]
        if not best or abs(len(ticks) - count) < abs(len(best) - count):
            best = ticks
    return best


def _spread(ys: Sequence[float], gap: float) -> list[float]:
    """Label positions near ``ys`` (same order) at least ``gap`` apart, so close lines' labels stay legible."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for prev, cur in zip(order, order[1:], strict=False):
        out[cur] = max(out[cur], out[prev] + gap)
    return out


def gain_chart(
    rounds: Sequence[int],
    values: Sequence[float | None],
    baselines: Mapping[str, float],
    *,
    metric: str,
    kept: int,
    cumulative: Sequence[int] | None = None,
    width: int = 600,
    height: int = 330,
) -> str:
    """The test ``metric`` per round as a polyline, each baseline as a dashed horizontal line, the
    kept round circled. Coordinates are affine in round and value; undefined values are left out."""
    left, top, right, bottom = 58, 30, 190, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    known = [float(v) for v in values if v is not None] + [float(v) for v in baselines.values()]
    lo, hi = _span(known or [0.0])
    n = len(rounds)

    def x_of(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y_of(value: float) -> float:
        return top + plot_h - (value - lo) / (hi - lo) * plot_h

    num = svg._num
    title = f"test {metric} per cleaning round"
    parts = [
        svg._open(width, height, title),
        svg._text(left, 16, title, anchor="start", extra=' font-weight="bold"'),
    ]
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for value in _ticks(lo, hi):
        y = y_of(value)
        parts.append(f'<line x1="{left - 4}" y1="{num(y)}" x2="{left}" y2="{num(y)}" stroke="#999"/>')
        parts.append(svg._text(left - 6, y + 4, f"{value:g}", anchor="end"))
    for i, r in enumerate(rounds):
        x = x_of(i)
        parts.append(
            f'<line x1="{num(x)}" y1="{top + plot_h}" x2="{num(x)}" y2="{top + plot_h + 4}" stroke="#999"/>'
        )
        parts.append(svg._text(x, top + plot_h + 15, str(r)))
        if cumulative is not None:
            parts.append(svg._text(x, top + plot_h + 28, f"{cumulative[i]} rows", extra=' fill="#777"'))
    parts.append(svg._text(left + plot_w / 2, top + plot_h + 44, "round (rows changed so far)"))
    label_ys = _spread([y_of(float(v)) for v in baselines.values()], gap=13.0)
    for j, (name, value) in enumerate(baselines.items()):
        y = y_of(float(value))
        col = BASELINE_COLORS.get(name, svg.color(j + 4))
        parts.append(
            f'<line class="baseline" data-baseline="{escape(name)}" data-value="{float(value)!r}" '
            f'x1="{left}" y1="{num(y)}" x2="{left + plot_w}" y2="{num(y)}" stroke="{col}" '
            'stroke-width="1.4" stroke-dasharray="5 4"/>'
        )
        label = f"{BASELINE_LABELS.get(name, name)} {float(value):.3g}"
        parts.append(
            svg._text(left + plot_w + 6, label_ys[j] + 4, label, anchor="start", extra=f' fill="{col}"')
        )
    points = [
        (x_of(i), y_of(float(v)), r, float(v))
        for i, (r, v) in enumerate(zip(rounds, values, strict=True))
        if v is not None
    ]
    if points:
        coords = " ".join(f"{num(x)},{num(y)}" for x, y, _, _ in points)
        parts.append(
            f'<polyline class="gain-curve" data-metric="{escape(metric)}" points="{coords}" fill="none" '
            f'stroke="{svg.PALETTE[0]}" stroke-width="2"/>'
        )
    for x, y, r, v in points:
        parts.append(
            f'<circle class="round-point" data-round="{int(r)}" data-value="{v!r}" cx="{num(x)}" cy="{num(y)}" '
            f'r="3.5" fill="{svg.PALETTE[0]}"><title>round {int(r)}: {v:.4g}</title></circle>'
        )
        if int(r) == int(kept):
            parts.append(
                f'<circle class="kept-round" data-round="{int(r)}" cx="{num(x)}" cy="{num(y)}" r="8" '
                f'fill="none" stroke="{KEPT_COLOR}" stroke-width="2"/>'
            )
            parts.append(svg._text(x, y - 12, "kept", extra=f' fill="{KEPT_COLOR}" font-weight="bold"'))
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- tables


def _label(value: Any, label_names: Sequence[Any] | None) -> str:
    known = label_names is not None and isinstance(value, int) and not isinstance(value, bool)
    if known and 0 <= value < len(label_names):
        return str(label_names[value])
    return str(value)


def value_text(value: Any, action: str = "", label_names: Sequence[Any] | None = None) -> str:
    """A change's before or after value as plain text: a row as ``field: value`` lines (id left
    out, chat turns as ``role: content``), a class index as its name, a weight to 4 digits."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        lines = []
        for key, item in value.items():
            if key == "id":
                continue
            if key == "messages" and isinstance(item, list):
                lines += [
                    f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, Mapping) else str(m)
                    for m in item
                ]
            elif key == "label" and label_names is not None:
                lines.append(f"label: {_label(item, label_names)}")
            else:
                text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False, default=str)
                lines.append(f"{key}: {text}")
        return "\n".join(lines)
    if action == "relabel":
        return _label(value, label_names)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def change_diff_html(change: Mapping[str, Any], label_names: Sequence[Any] | None = None) -> str:
    """Escaped HTML of one change: before turned into after as a word diff (a drop deletes the whole
    row); a ``review`` record shows the row unchanged with a note."""
    action = str(change.get("action", ""))
    before = value_text(change.get("before"), action, label_names)
    if action == "review":
        return f'<span class="meta">unchanged, left for review</span>\n{escape(before)}'
    return word_diff_html(before, value_text(change.get("after"), action, label_names))


def _metric_columns(data: Mapping[str, Any]) -> list[str]:
    metric = str(data["metric"])
    return [metric] if metric == "loss" else [metric, "loss"]


def render_rounds(data: Mapping[str, Any]) -> str:
    """Round by round: rows trained on, rows changed, the test metric(s), gain, and the kept round."""
    metrics = _metric_columns(data)
    val_key = f"val_{data['metric']}"
    has_val = any(row.get(val_key) is not None for row in data["rounds"])
    by = data.get("selected_by") or f"test {data['metric']}"
    best = int(data["best_round"])
    rows = []
    for row in data["rounds"]:
        kept = int(row["round"]) == best
        cells = (
            f'<td class="num" data-sort="{int(row["round"])}">{int(row["round"])}</td>'
            + _num_cell(row.get("rows"), 0)
            + _num_cell(row.get("changed"), 0)
            + _num_cell(row.get("review"), 0)
            + _num_cell(row.get("cumulative"), 0)
            + "".join(_num_cell(row.get(m), 4) for m in metrics)
            + (_num_cell(row.get(val_key), 4) if has_val else "")
            + _num_cell(row.get("gain"), 4)
            + ('<td><span class="kept-badge">kept</span></td>' if kept else "<td></td>")
        )
        rows.append(
            f'<tr class="{"kept-row" if kept else "round-row"}" data-round="{int(row["round"])}">{cells}</tr>'
        )
    headers = ["round", "rows", "changed", "review", "changed so far", *(f"test {m}" for m in metrics)]
    headers += [f"validation {data['metric']}"] if has_val else []
    headers += ["gain", "kept"]
    note = (
        f"Gain: change of the {by} over the round before, signed so that positive is better; "
        f"the kept round is the best by the {by}."
    )
    return _section("rounds", "Rounds", _table(headers, rows, table_id="rounds-table"), note)


def render_baselines(data: Mapping[str, Any]) -> str:
    """Each baseline's rows changed and test metric(s), and its difference from no cleaning."""
    metric, higher = str(data["metric"]), bool(data.get("higher_is_better", True))
    metrics = _metric_columns(data)
    baselines = data["baselines"]
    reference = (baselines.get("noisy") or {}).get(metric)
    best = next((r for r in data["rounds"] if int(r["round"]) == int(data["best_round"])), None)
    entries = [(f"kept round {int(data['best_round'])}", "kept", best or {}, _changed_so_far(best))]
    order = [n for n in BASELINE_LABELS if n in baselines] + [
        n for n in baselines if n not in BASELINE_LABELS
    ]
    entries += [(BASELINE_LABELS.get(n, n), n, baselines[n], baselines[n].get("rows_changed")) for n in order]
    rows = []
    for label, name, values, changed in entries:
        value = values.get(metric)
        gain = None
        if value is not None and reference is not None:
            gain = (value - reference) if higher else (reference - value)
        rows.append(
            f'<tr data-baseline="{escape(str(name))}"><td>{escape(label)}</td>'
            + _num_cell(changed, 0)
            + "".join(_num_cell(values.get(m), 4) for m in metrics)
            + _num_cell(gain, 4)
            + "</tr>"
        )
    headers = ["training data", "rows changed", *(f"test {m}" for m in metrics), "gain over no cleaning"]
    return _table(headers, rows, table_id="baselines-table", sortable=False)


def _changed_so_far(row: Mapping[str, Any] | None) -> int | None:
    return None if row is None else row.get("cumulative")


def render_changes(
    data: Mapping[str, Any], label_names: Sequence[Any] | None = None, max_changes: int = MAX_CHANGES
) -> str:
    """The changes of the kept rounds (at most ``max_changes``): round, id, action, score, reason, diff."""
    changes = list(data["changes"])
    shown = changes[: max(0, int(max_changes))]
    total = int(data.get("n_changes", len(changes)))
    rows = []
    for change in shown:
        action = str(change.get("action", ""))
        score = change.get("score")
        rows.append(
            f'<tr data-action="{escape(action)}">'
            f'<td class="num" data-sort="{int(change.get("round", 0))}">{int(change.get("round", 0))}</td>'
            f"<td>{escape(str(change.get('id', '')))}</td>"
            f"<td>{escape(action)}</td>"
            + _num_cell(float(score) if score is not None else None, 4)
            + f'<td><div class="cell-text">{escape(str(change.get("reason", "")))}</div></td>'
            + f'<td><div class="cell-text">{change_diff_html(change, label_names)}</div></td>'
            + "</tr>"
        )
    if not rows:
        body = "<p>No row was changed in the kept rounds.</p>"
    else:
        headers = ["round", "id", "action", "score", "reason", "before → after"]
        body = _table(headers, rows, table_id="changes-table")
    audit = data.get("audit") or "audit.jsonl"
    note = f"{len(shown)} of {total} changes shown; the audit log {audit} lists every one."
    if len(shown) == total:
        note = f"All {total} changes of the kept rounds (also in the audit log {audit})."
    note += " Scores: higher = more harmful. Removed words are struck out, added words in green."
    return _section("changes", "Changed rows", body, note)


# ---------------------------------------------------------------- the page


def _warnings(data: Mapping[str, Any]) -> list[str]:
    out = []
    if int(data["best_round"]) == 0:
        out.append("No cleaning round improved the test metric: the kept data is the input as given.")
    if "oracle" not in data["baselines"]:
        out.append("No noise manifest was found, so there is no oracle baseline.")
    if len(data["rounds"]) > 1 and data.get("select", "test") == "test":
        out.append(
            "The kept round was chosen by its test metric (--select test), so its number is slightly "
            "optimistic; the baselines had no such choice. --select val chooses by the validation rows."
        )
    return out


def render_clean_html(
    data: Mapping[str, Any],
    *,
    name: str = "",
    label_names: Sequence[Any] | None = None,
    max_changes: int = MAX_CHANGES,
) -> str:
    """The whole page for a ``clean_report.json`` dict (see :func:`infscope.actions.loop.clean_report`)."""
    metric = str(data["metric"])
    higher = bool(data.get("higher_is_better", True))
    title = f"infscope cleaning report: {name}" if name else "infscope cleaning report"
    rounds = data["rounds"]
    note = f" ({data['metric_note']})" if data.get("metric_note") else ""
    header = (
        f"<h1>{escape(title)}</h1>"
        f'<p class="meta">method {escape(str(data.get("method", "")))} · action '
        f"{escape(str(data.get('action', '')))} · budget {escape(str(data.get('budget', '')))} per round · "
        f"{len(rounds)} rounds trained</p>"
        f'<p class="meta">test metric {escape(metric)}{escape(note)}, '
        f"{'higher' if higher else 'lower'} is better · kept round {int(data['best_round'])} "
        f"(chosen by the {escape(str(data.get('selected_by') or 'test ' + metric))}) · "
        f"stopped: {escape(str(data.get('stopped', '')))}</p>"
        f'<p class="meta">cleaned data {escape(str(data.get("cleaned", "")))} · audit log '
        f"{escape(str(data.get('audit', '')))}</p>"
        + "".join(f'<p class="warning">{escape(w)}</p>' for w in _warnings(data))
    )
    baselines = {
        n: float(b[metric])
        for n, b in data["baselines"].items()
        if isinstance(b, Mapping) and b.get(metric) is not None
    }
    chart = gain_chart(
        [int(r["round"]) for r in rounds],
        [r.get(metric) for r in rounds],
        baselines,
        metric=metric,
        kept=int(data["best_round"]),
        cumulative=[int(r.get("cumulative") or 0) for r in rounds],
    )
    gain = _section(
        "gain",
        "Gain curve against the baselines",
        f'<div class="charts">{chart}</div>' + render_baselines(data),
        "Dashed lines: the same fine-tuning on the input as given (no cleaning), with the action on as "
        "many random rows as the kept rounds changed, and on exactly the rows the noise manifest marks.",
    )
    summary = {
        k: data.get(k) for k in ("method", "action", "metric", "higher_is_better", "best_round", "curve")
    }
    summary["baselines"] = data["baselines"]
    body = header + gain + render_rounds(data) + render_changes(data, label_names, max_changes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}{CLEAN_CSS}</style></head><body>{body}"
        f'<script type="application/json" id="infscope-data">{json_for_script(summary)}</script>'
        f"<script>{JS}</script></body></html>\n"
    )


def write_clean_report(
    clean_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, max_changes: int = MAX_CHANGES
) -> Path:
    """Write the page of a finished cleaning directory (default ``DIR/clean_report.html``); return its path."""
    target = Path(out) if out is not None else Path(clean_dir) / REPORT_NAME
    if target.suffix.lower() not in (".html", ".htm"):
        raise InfscopeError(f"report path {target} should end in .html; pass e.g. --out clean_report.html")
    if target.is_dir():
        raise InfscopeError(
            f"report path {target} is a directory; pass a file name such as {target / REPORT_NAME}"
        )
    data = read_clean_report(clean_dir)
    page = render_clean_html(
        data,
        name=Path(clean_dir).resolve().name,
        label_names=label_names_of(clean_dir),
        max_changes=max_changes,
    )
    try:
        return atomic_write_text(target, page)
    except OSError as exc:
        raise InfscopeError(f"cannot write {target} ({exc.strerror or exc}); pass a writable --out") from None
