"""Render the collected run data as one self-contained HTML file, and write the report.

The page has the leaderboard, ROC and detection curves, AUROC per noise family, clean-vs-noisy
score distributions, time and memory per stage, the Spearman correlation between methods, and the
top-k flagged rows of each method with a word-level diff of the injected noise and, for token-level
methods (``tracin_we``), the tokens carrying each row's score marked in its text. Styles, script and
figures (inline SVG) are all inside the file: it opens offline and can be mailed as one attachment.

Every piece of text that comes from the run (row text, ids, method, family and stage names,
arguments) goes through :func:`html.escape`; JSON placed inside ``<script>`` goes through
:func:`json_for_script`, so a row holding ``</script><script>alert(1)</script>`` shows as text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError
from infscope.report import svg
from infscope.report.assets import CSS, JS
from infscope.report.collect import collect
from infscope.report.diff import word_diff_html
from infscope.runs import RunLayout, atomic_write_text

CLEAN_FAMILY = "clean"


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element.

    ``<``, ``>`` and ``&`` become ``\\u003c`` / ``\\u003e`` / ``\\u0026`` (so neither ``</script>`` nor
    ``<!--`` can appear), and the JavaScript line terminators U+2028/U+2029 are escaped too. The
    result still parses as the same JSON.
    """
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False)
    for raw, safe in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, safe)
    return text


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _num_cell(value: float | None, digits: int = 3) -> str:
    sort = "" if value is None else f' data-sort="{value!r}"'
    return f'<td class="num"{sort}>{_fmt(value, digits)}</td>'


def _table(headers: list[str], rows: list[str], *, table_id: str = "", sortable: bool = True) -> str:
    ident = f' id="{escape(table_id)}"' if table_id else ""
    cls = ' class="sortable"' if sortable else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table{ident}{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    extra = f'<p class="meta">{escape(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{extra}{body}</section>'


def render_leaderboard(data: dict[str, Any]) -> str:
    """The leaderboard table: one row per method, best AUROC first."""
    k = data["run"]["n_noisy"]
    rows = []
    for entry in data["leaderboard"]:
        rows.append(
            "<tr>"
            f"<td>{escape(entry['method'])}</td>"
            + _num_cell(entry["auroc"])
            + _num_cell(entry["ap"])
            + _num_cell(entry["p_at_k"])
            + _num_cell(entry["curve_area"])
            + _num_cell(entry["n_flagged"], 0)
            + _num_cell(entry["seconds"], 2)
            + _num_cell(entry["peak_rss_mb"], 1)
            + "</tr>"
        )
    headers = ["method", "AUROC", "AP", f"P@{k}", "detection area", "flagged", "seconds", "peak RSS MB"]
    note = f"{data['run']['n_rows']} rows, {k} noisy. P@k uses k = number of noisy rows; ties count as expected values."
    return _section("leaderboard", "Leaderboard", _table(headers, rows, table_id="leaderboard-table"), note)


def render_curves(data: dict[str, Any]) -> str:
    """ROC and detection curves, one line per method."""
    roc = {m: (c["roc"]["fpr"], c["roc"]["tpr"]) for m, c in data["curves"].items()}
    det = {m: (c["detection"]["x"], c["detection"]["y"]) for m, c in data["curves"].items()}
    charts = svg.line_chart(roc, title="ROC", xlabel="false-positive rate", ylabel="true-positive rate")
    charts += svg.line_chart(
        det, title="Detection curve", xlabel="share of rows inspected", ylabel="share of noise found"
    )
    note = "Detection curve: inspect rows from the highest score down; the dashed diagonal is a random order."
    return _section("curves", "ROC and detection curves", f'<div class="charts">{charts}</div>', note)


def render_family_heatmap(data: dict[str, Any]) -> str:
    """AUROC of each method for each noise family (that family's noisy rows vs all clean rows)."""
    fam = data["family_auroc"]
    if not fam["families"]:
        return _section("families", "AUROC per noise family", "<p>No noisy rows with a family.</p>")
    labels = [f"{f} ({fam['counts'][f]})" for f in fam["families"]]
    chart = svg.heatmap(fam["values"], fam["methods"], labels, title="AUROC per noise family", lo=0.0, hi=1.0)
    note = "Each cell: noisy rows of that family against all clean rows (count of noisy rows in brackets)."
    return _section("families", "AUROC per noise family", chart, note)


def render_distributions(data: dict[str, Any]) -> str:
    """Histograms of scores of clean and noisy rows, one small chart per method."""
    charts = "".join(
        svg.histogram(h["edges"], h["clean"], h["noisy"], title=m) for m, h in data["distributions"].items()
    )
    legend = (
        f'<p class="legend">bars:<span style="background:{svg.CLEAN_COLOR}"></span>clean'
        f'<span style="background:{svg.NOISY_COLOR}"></span>noisy</p>'
    )
    return _section(
        "distributions", "Score distributions: clean vs noisy", legend + f'<div class="charts">{charts}</div>'
    )


def render_stages(data: dict[str, Any]) -> str:
    """Time and peak memory per pipeline stage (from run.json)."""
    stages = data["stages"]
    if not stages:
        return _section("stages", "Time and memory per stage", "<p>run.json records no stages.</p>")
    rows = [
        f"<tr><td>{escape(s['stage'])}</td>{_num_cell(s['seconds'], 2)}{_num_cell(s['peak_rss_mb'], 1)}</tr>"
        for s in stages
    ]
    names = [s["stage"] for s in stages]
    charts = svg.bar_chart(names, [s["seconds"] for s in stages], title="seconds", unit="s")
    charts += svg.bar_chart(names, [s["peak_rss_mb"] for s in stages], title="peak RSS", unit="MB")
    body = _table(["stage", "seconds", "peak RSS MB"], rows, table_id="stages-table")
    return _section("stages", "Time and memory per stage", body + f'<div class="charts">{charts}</div>')


def render_correlation(data: dict[str, Any]) -> str:
    """Spearman rank correlation between the methods' scores."""
    corr = data["correlation"]
    chart = svg.heatmap(
        corr["values"], corr["methods"], corr["methods"], title="Spearman correlation", lo=-1.0, hi=1.0
    )
    return _section(
        "correlation", "Correlation between methods", chart, "Spearman rank correlation over all rows."
    )


def marked_html(text: str, spans: Sequence[Sequence[int]] = ()) -> str:
    """``text`` HTML-escaped, with each ``[start, end, level]`` span wrapped in ``<mark class="tok tok-LEVEL">``.

    Spans are sorted, inside ``text`` and disjoint (as :func:`infscope.report.collect.row_token_marks`
    gives them); every piece of text, marked or not, is escaped on its own.
    """
    parts, pos = [], 0
    for start, end, level in spans:
        parts.append(escape(text[pos:start]))
        parts.append(f'<mark class="tok tok-{int(level)}">{escape(text[start:end])}</mark>')
        pos = end
    parts.append(escape(text[pos:]))
    return "".join(parts)


def _text_cell(text: str, spans: Sequence[Sequence[int]] = ()) -> str:
    return f'<td><div class="cell-text">{marked_html(text, spans)}</div></td>'


def _token_label(token: str) -> str:
    """A token as shown in the list: its text without surrounding blanks, or its repr if only blanks."""
    return token.strip() or repr(token)


def tokens_cell(tokens: list[dict[str, Any]]) -> str:
    """The tokens carrying a row's score, most harmful first, in their highlight colour with their score."""
    items = "".join(
        f'<li><span class="tok tok-{int(t["level"])}">{escape(_token_label(t["token"]))}</span> '
        f'<span class="meta">{_fmt(t["score"], 4)}</span></li>'
        for t in tokens
    )
    return f'<td><ul class="tokens">{items}</ul></td>' if items else "<td></td>"


def _flagged_row(row: dict[str, Any], fields: list[str], with_tokens: bool = False) -> str:
    family = row["family"] if row["is_noisy"] else CLEAN_FAMILY
    if row["is_noisy"]:
        noise = f'<span class="noisy-badge">{escape(row["family"])}</span> / {escape(row["operator"])}'
        diff = word_diff_html(row["original_text"], row["noisy_text"])
        diff_cell = f'<td><div class="cell-text"><b>{escape(row["field"])}</b>: {diff}</div></td>'
    else:
        noise = '<span class="clean-badge">clean</span>'
        diff_cell = "<td></td>"
    cells = [
        f"<td>{escape(row['method'])}</td>",
        f'<td class="num" data-sort="{row["rank"]}">{row["rank"]}</td>',
        _num_cell(row["score"], 4),
        f"<td>{escape(row['id'])}</td>",
        f'<td data-sort="{escape(family)}">{noise}</td>',
        *(_text_cell(row["fields"].get(name, ""), row.get("marks", {}).get(name, ())) for name in fields),
        diff_cell,
    ]
    if with_tokens:
        cells.append(tokens_cell(row.get("tokens", [])))
    return (
        f'<tr data-method="{escape(row["method"])}" data-family="{escape(family)}">'
        + "".join(cells)
        + "</tr>"
    )


def render_flagged(data: dict[str, Any]) -> str:
    """The top-k rows of each method, filterable by method and family, with the noise diff."""
    fields = data["run"]["fields"]
    methods = data["methods"]
    families = data["run"]["families"]
    method_opts = '<option value="all">all methods</option>' + "".join(
        f'<option value="{escape(m)}">{escape(m)}</option>' for m in methods
    )
    family_opts = (
        '<option value="all">all rows</option>'
        + f'<option value="{CLEAN_FAMILY}">clean rows</option>'
        + "".join(f'<option value="{escape(f)}">{escape(f)}</option>' for f in families)
    )
    controls = (
        '<div class="controls">'
        f'<label>method <select id="filter-method">{method_opts}</select></label>'
        f'<label>noise family <select id="filter-family">{family_opts}</select></label>'
        '<span id="flagged-count" class="meta"></span></div>'
    )
    headers = ["method", "rank", "score", "id", "noise", *fields, "injected noise (original → noisy)"]
    with_tokens = any(row.get("tokens") for row in data["flagged"])
    if with_tokens:
        headers.append("tokens carrying the score")
    rows = [_flagged_row(row, fields, with_tokens) for row in data["flagged"]]
    note = (
        f"The {data['top_k']} highest-ranked rows of each method. Filter with the boxes or the URL, "
        "e.g. #method=loss&family=grammar; click a header to sort."
    )
    if with_tokens:
        note += (
            " For methods with token scores (tracin_we), the tokens that raise a row's score are "
            "highlighted in its text, darker for a larger share of the row's top token."
        )
    return _section(
        "flagged", "Flagged rows", controls + _table(headers, rows, table_id="flagged-table"), note
    )


def render_html(data: dict[str, Any], png_files: list[str] | None = None) -> str:
    """The whole report page for the dict made by :func:`infscope.report.collect.collect`."""
    run = data["run"]
    title = f"infscope report: {run['name']}"
    warnings = "".join(f'<p class="warning">{escape(w)}</p>' for w in data["warnings"])
    args = escape(json.dumps(run["args"], indent=2, sort_keys=True, ensure_ascii=False, default=str))
    versions = escape(", ".join(f"{k} {v}" for k, v in sorted(run["versions"].items())))
    scored = f"scored at {escape(run['checkpoint'])} · " if run.get("checkpoint") else ""
    truth = f"manifest {escape(run['manifest'])}" if run.get("manifest") else "no manifest"
    header = (
        f"<h1>{escape(title)}</h1>"
        f'<p class="meta">{escape(run["task"])} run · {run["n_rows"]} training rows · {run["n_noisy"]} noisy · '
        f"{len(data['methods'])} methods · created {escape(run['created'] or 'unknown')}</p>"
        f'<p class="meta">{scored}{truth}</p>'
        f'<p class="meta">{versions}</p>'
        f"<details><summary>run arguments</summary><pre>{args}</pre></details>{warnings}"
    )
    footer = ""
    if png_files:
        names = ", ".join(escape(name) for name in png_files)
        footer = f'<p class="meta">PNG figures written beside this file: {names}</p>'
    summary = {
        key: data[key] for key in ("run", "methods", "leaderboard", "family_auroc", "correlation", "stages")
    }
    body = "".join(
        (
            header,
            render_leaderboard(data),
            render_curves(data),
            render_family_heatmap(data),
            render_distributions(data),
            render_stages(data),
            render_correlation(data),
            render_flagged(data),
            footer,
        )
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}"
        f'<script type="application/json" id="infscope-data">{json_for_script(summary)}</script>'
        f"<script>{JS}</script></body></html>\n"
    )


def default_output(run_dir: str | os.PathLike) -> Path:
    """Where the report goes by default: ``RUN/report.html``."""
    return RunLayout(run_dir).report


def png_dir_for(out: Path) -> Path:
    """The folder for the PNG figures beside a report: ``report.html`` -> ``report_files/``."""
    return out.with_name(f"{out.stem}_files")


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    top_k: int = 50,
    *,
    png: bool | None = None,
    manifest: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report of a run (default ``RUN/report.html``) and return its path.

    PNG versions of the figures go to ``<out stem>_files/`` when ``png`` is true, or by default
    (``None``) when matplotlib is installed. ``manifest`` replaces the run's own list of known-bad
    rows (see :func:`infscope.report.collect.collect`). Every file is written atomically.
    """
    from infscope.report.png import matplotlib_available, write_pngs

    target = Path(out) if out is not None else default_output(run_dir)
    if target.suffix.lower() not in (".html", ".htm"):
        raise InfscopeError(f"report path {target} should end in .html; pass e.g. --out report.html")
    if target.is_dir():
        raise InfscopeError(
            f"report path {target} is a directory; pass a file name such as {target / 'report.html'}"
        )
    data = collect(run_dir, top_k=top_k, manifest=manifest)
    want_png = matplotlib_available() if png is None else png
    png_files = [p.name for p in write_pngs(data, png_dir_for(target))] if want_png else []
    if png_files:
        png_files = [f"{png_dir_for(target).name}/{name}" for name in png_files]
    try:
        return atomic_write_text(target, render_html(data, png_files))
    except OSError as exc:
        raise InfscopeError(f"cannot write {target} ({exc.strerror or exc}); pass a writable --out") from None
