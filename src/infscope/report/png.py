"""The report's figures as PNG files (matplotlib, Agg backend) for papers and slides.

matplotlib is optional: the HTML report draws its own inline SVG and does not need it.
:func:`matplotlib_available` tells whether PNGs can be made; :func:`write_pngs` writes one file
per figure atomically and returns their paths.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from infscope.errors import InfscopeError
from infscope.report.svg import CLEAN_COLOR, NOISY_COLOR, color
from infscope.runs import atomic_path, ensure_writable_dir

PNG_NAMES = (
    "roc.png",
    "detection.png",
    "family_auroc.png",
    "distributions.png",
    "stages.png",
    "correlation.png",
)


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (it is needed only for the PNG files)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically and close it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _curves(data: dict[str, Any], kind: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    xkey, ykey = ("fpr", "tpr") if kind == "roc" else ("x", "y")
    for i, method in enumerate(data["methods"]):
        curve = data["curves"][method][kind]
        ax.plot(curve[xkey], curve[ykey], color=color(i), label=method, linewidth=1.6)
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--", linewidth=1)
    if kind == "roc":
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    else:
        ax.set(xlabel="share of rows inspected", ylabel="share of noise found", title="Detection curve")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _matrix(
    values: list[list[float | None]],
    rows: list[str],
    cols: list[str],
    title: str,
    path: Path,
    vmin: float,
    vmax: float,
) -> Path:
    plt = _pyplot()
    matrix = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)
    matrix = matrix.reshape(len(rows), len(cols))
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * max(len(cols), 1), 1.0 + 0.5 * max(len(rows), 1)))
    image = ax.imshow(matrix, cmap="Blues", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(matrix):
        label = "-" if np.isnan(value) else f"{value:.2f}"
        dark = not np.isnan(value) and (value - vmin) / (vmax - vmin) > 0.6
        ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _distributions(data: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    methods = data["methods"]
    cols = min(3, len(methods))
    nrows = -(-len(methods) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.4 * nrows), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        hist = data["distributions"][method]
        if hist["edges"]:
            edges = np.asarray(hist["edges"])
            ax.stairs(hist["clean"], edges, fill=True, alpha=0.55, color=CLEAN_COLOR, label="clean")
            ax.stairs(hist["noisy"], edges, fill=True, alpha=0.55, color=NOISY_COLOR, label="noisy")
        ax.set_title(method, fontsize=9)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _stages(data: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    stages = data["stages"]
    names = [s["stage"] for s in stages]
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.6 + 0.35 * max(len(names), 1)))
    for ax, key, label in ((axes[0], "seconds", "seconds"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        ax.barh(names, [s[key] or 0.0 for s in stages], color=color(0))
        ax.invert_yaxis()
        ax.set_xlabel(label)
    fig.tight_layout()
    return _save(fig, path)


def write_pngs(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every figure of the collected ``data`` as a PNG into ``out_dir``; returns the paths."""
    if not matplotlib_available():
        raise InfscopeError("PNG plots need matplotlib; `pip install matplotlib` or pass --no-png")
    ensure_writable_dir(out_dir)
    paths = [_curves(data, "roc", out_dir / "roc.png"), _curves(data, "detection", out_dir / "detection.png")]
    fam = data["family_auroc"]
    if fam["families"]:
        paths.append(
            _matrix(
                fam["values"],
                fam["methods"],
                fam["families"],
                "AUROC per noise family",
                out_dir / "family_auroc.png",
                0.0,
                1.0,
            )
        )
    paths.append(_distributions(data, out_dir / "distributions.png"))
    if data["stages"]:
        paths.append(_stages(data, out_dir / "stages.png"))
    corr = data["correlation"]
    paths.append(
        _matrix(
            corr["values"],
            corr["methods"],
            corr["methods"],
            "Spearman correlation",
            out_dir / "correlation.png",
            -1.0,
            1.0,
        )
    )
    return paths
