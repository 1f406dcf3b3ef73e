"""Small inline SVG charts for the HTML report: lines, heatmaps, histograms and bars.

Inline SVG keeps the report one self-contained file that needs no plotting library, no network
and no JavaScript to show its figures. Every label is escaped here, since method, family and
stage names come from files on disk. Coordinates are rounded to two decimals to keep files small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
CLEAN_COLOR = "#4c78a8"
NOISY_COLOR = "#e45756"
FONT = 'font-family="sans-serif" font-size="11"'


def color(index: int) -> str:
    """The colour of the ``index``-th method (cycles through :data:`PALETTE`)."""
    return PALETTE[index % len(PALETTE)]


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _open(width: int, height: int, label: str) -> str:
    return (
        f'<svg class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
    )


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}" {FONT}{extra}>{escape(text)}</text>'


def _legend(names: Sequence[str], colors: Sequence[str], x: float, y: float) -> list[str]:
    parts = []
    for i, (name, col) in enumerate(zip(names, colors, strict=True)):
        yy = y + 15 * i
        parts.append(f'<rect x="{_num(x)}" y="{_num(yy - 8)}" width="10" height="10" fill="{col}"/>')
        parts.append(_text(x + 14, yy + 1, name, anchor="start"))
    return parts


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool = True,
    width: int = 460,
    height: int = 340,
) -> str:
    """Curves on the unit square, one per named series, with a legend and an optional diagonal."""
    left, top, plot = 50, 28, min(width - 170, height - 78)
    parts = [_open(width, height, title), _text(left + plot / 2, 16, title, extra=' font-weight="bold"')]
    parts.append(f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = left + tick * plot, top + plot - tick * plot
        parts.append(
            f'<line x1="{_num(x)}" y1="{top + plot}" x2="{_num(x)}" y2="{top + plot + 4}" stroke="#999"/>'
        )
        parts.append(_text(x, top + plot + 15, f"{tick:g}"))
        parts.append(f'<line x1="{left - 4}" y1="{_num(y)}" x2="{left}" y2="{_num(y)}" stroke="#999"/>')
        parts.append(_text(left - 6, y + 4, f"{tick:g}", anchor="end"))
    parts.append(_text(left + plot / 2, top + plot + 32, xlabel))
    parts.append(
        f'<text x="14" y="{_num(top + plot / 2)}" text-anchor="middle" {FONT} '
        f'transform="rotate(-90 14 {_num(top + plot / 2)})">{escape(ylabel)}</text>'
    )
    if diagonal:
        parts.append(
            f'<line x1="{left}" y1="{top + plot}" x2="{left + plot}" y2="{top}" stroke="#bbb" stroke-dasharray="4 3"/>'
        )
    names = list(series)
    for i, name in enumerate(names):
        xs, ys = series[name]
        points = " ".join(
            f"{_num(left + float(x) * plot)},{_num(top + plot - float(y) * plot)}"
            for x, y in zip(xs, ys, strict=True)
        )
        parts.append(
            f'<polyline class="curve" data-method="{escape(name)}" points="{points}" fill="none" '
            f'stroke="{color(i)}" stroke-width="1.8"/>'
        )
    parts += _legend(names, [color(i) for i in range(len(names))], left + plot + 16, top + 10)
    parts.append("</svg>")
    return "".join(parts)


def _heat_color(value: float | None, lo: float, hi: float) -> str:
    """White (lo) to dark blue (hi); grey for undefined cells."""
    if value is None:
        return "#eeeeee"
    t = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * t) for c in (8, 69, 148))
    return f"rgb({r},{g},{b})"


def heatmap(
    values: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    lo: float,
    hi: float,
    cell: int = 46,
) -> str:
    """A labelled matrix of coloured cells with the value printed in each (``-`` if undefined)."""
    label_w = 8 + 7 * max((len(s) for s in row_labels), default=4)
    head_h = 30 + 6 * max((len(s) for s in col_labels), default=4)
    width = label_w + cell * len(col_labels) + head_h  # room for the slanted column labels
    height = head_h + cell * len(row_labels) + 10
    parts = [_open(width, height, title), _text(6, 16, title, anchor="start", extra=' font-weight="bold"')]
    for j, name in enumerate(col_labels):
        x = label_w + cell * j + cell / 2
        parts.append(
            f'<text x="{_num(x)}" y="{head_h - 6}" text-anchor="start" {FONT} '
            f'transform="rotate(-45 {_num(x)} {head_h - 6})">{escape(name)}</text>'
        )
    for i, name in enumerate(row_labels):
        y = head_h + cell * i
        parts.append(_text(label_w - 6, y + cell / 2 + 4, name, anchor="end"))
        for j in range(len(col_labels)):
            value = values[i][j]
            x = label_w + cell * j
            fill = _heat_color(value, lo, hi)
            dark = value is not None and hi > lo and (value - lo) / (hi - lo) > 0.55
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#fff"/>'
            )
            label = "-" if value is None else f"{value:.2f}"
            parts.append(_text(x + cell / 2, y + cell / 2 + 4, label, extra=' fill="#fff"' if dark else ""))
    parts.append("</svg>")
    return "".join(parts)


def histogram(
    edges: Sequence[float],
    clean: Sequence[int],
    noisy: Sequence[int],
    *,
    title: str,
    width: int = 300,
    height: int = 170,
) -> str:
    """Clean and noisy counts per score bin as two overlaid, semi-transparent bar series."""
    left, top, right, bottom = 34, 22, 8, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [_open(width, height, title), _text(left, 14, title, anchor="start", extra=' font-weight="bold"')]
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>'
    )
    bins = len(clean)
    peak = max([1, *clean, *noisy])
    parts.append(_text(left - 4, top + 8, str(peak), anchor="end"))
    parts.append(_text(left - 4, top + plot_h, "0", anchor="end"))
    if bins:
        bar_w = plot_w / bins
        for series, col, cls in ((clean, CLEAN_COLOR, "clean"), (noisy, NOISY_COLOR, "noisy")):
            for k, count in enumerate(series):
                if count:
                    h = plot_h * count / peak
                    parts.append(
                        f'<rect class="bar-{cls}" x="{_num(left + k * bar_w)}" y="{_num(top + plot_h - h)}" '
                        f'width="{_num(bar_w)}" height="{_num(h)}" fill="{col}" fill-opacity="0.55"/>'
                    )
        parts.append(_text(left, top + plot_h + 14, f"{edges[0]:.3g}", anchor="start"))
        parts.append(_text(left + plot_w, top + plot_h + 14, f"{edges[-1]:.3g}", anchor="end"))
    parts.append(_text(left + plot_w / 2, top + plot_h + 26, "score (higher = more harmful)"))
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    labels: Sequence[str], values: Sequence[float | None], *, title: str, unit: str, width: int = 460
) -> str:
    """Horizontal bars, one per label, with the value written at the end of each bar."""
    label_w = 10 + 7 * max((len(s) for s in labels), default=4)
    row_h, top = 20, 26
    height = top + row_h * len(labels) + 10
    plot_w = width - label_w - 80
    peak = max([v for v in values if v is not None] + [1e-12])
    parts = [_open(width, height, title), _text(6, 16, title, anchor="start", extra=' font-weight="bold"')]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + row_h * i
        parts.append(_text(label_w - 6, y + 13, label, anchor="end"))
        if value is None:
            parts.append(_text(label_w + 4, y + 13, "n/a", anchor="start"))
            continue
        w = plot_w * value / peak
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{_num(w)}" height="{row_h - 6}" fill="{PALETTE[0]}"/>'
        )
        parts.append(_text(label_w + w + 4, y + 13, f"{value:.3g} {unit}", anchor="start"))
    parts.append("</svg>")
    return "".join(parts)
