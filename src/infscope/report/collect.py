"""Gather everything a report shows from a run directory into one JSON-serialisable dict.

The report never trusts ``evaluation.json``: every number is recomputed here from the ranked
tables in ``results/`` and the ground-truth manifest, with :mod:`infscope.evaluate.detection`
(so the report and ``infscope evaluate`` share one definition of AUROC, AP and P@k). Rendering
(:mod:`infscope.report.html`) only formats this dict, which keeps the numbers testable alone.

Per-family AUROC compares the noisy rows of one family against all clean rows (the definition of
:func:`infscope.evaluate.detection.group_reports`). ``P@k`` uses ``k`` = number of noisy rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.evaluate.detection import detection_report

RESULTS_DIR = "results"
MANIFEST_PATH = ("data", "manifest.jsonl")
TRAIN_PATH = ("data", "train.jsonl")
CLEAN_PATH = ("data", "train.clean.jsonl")
HIST_BINS = 20
INSTRUCTION_FIELDS = ("instruction", "input", "output")
CLASSIFICATION_FIELDS = ("text", "text_b", "label")
MAKE_RESULTS = "run `infscope demo --out RUN` (or `infscope score RUN`) first"


def _finite(value: Any) -> float | None:
    """A plain float, or ``None`` for missing / NaN / infinite values (JSON has no NaN)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, or an empty list when the file is absent (rows are optional context)."""
    if not path.exists():
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InfscopeError(
            f"cannot read {path} ({exc}); regenerate the run's data with `infscope demo`"
        ) from None


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of the run (empty dict if it is missing: the report still works without it)."""
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InfscopeError(f"cannot read {path} ({exc}); fix or delete the file and rerun") from None
    return record if isinstance(record, dict) else {}


def read_results(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every ``results/<method>.parquet`` table, keyed by method name (sorted)."""
    results_dir = run_dir / RESULTS_DIR
    paths = sorted(results_dir.glob("*.parquet")) if results_dir.is_dir() else []
    if not paths:
        raise InfscopeError(f"{run_dir} has no {RESULTS_DIR}/<method>.parquet tables; {MAKE_RESULTS}")
    tables: dict[str, pd.DataFrame] = {}
    for path in paths:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise InfscopeError(f"cannot read {path} ({exc}); rerun scoring to rewrite it") from None
        missing = [c for c in ("id", "score") if c not in frame.columns]
        if missing:
            raise InfscopeError(f"{path} lacks column(s) {', '.join(missing)}; {MAKE_RESULTS}")
        frame = frame.assign(id=frame["id"].astype(str))
        if frame["id"].duplicated().any():
            raise InfscopeError(f"{path} repeats ids; rerun scoring to rewrite it")
        tables[path.stem] = frame
    return tables


def read_run_manifest(run_dir: Path) -> pd.DataFrame:
    """The ground-truth manifest of the run, with a clear error naming the command that writes it."""
    from infscope.data.manifest import read_manifest

    path = run_dir.joinpath(*MANIFEST_PATH)
    if not path.exists():
        raise InfscopeError(
            f"{run_dir} has no {'/'.join(MANIFEST_PATH)}; run `infscope demo --out RUN` (or `infscope noise`) to make it"
        )
    return read_manifest(path)


def _align(frame: pd.DataFrame, ids: pd.Index, method: str) -> pd.DataFrame:
    """A method's table reindexed to manifest order; every manifest id needs exactly one score."""
    indexed = frame.set_index("id")
    missing = ids.difference(indexed.index)
    extra = indexed.index.difference(ids)
    if len(missing) or len(extra):
        sample = ", ".join(map(str, (missing if len(missing) else extra)[:3]))
        what = "has no score for" if len(missing) else "scores ids not in the manifest:"
        raise InfscopeError(
            f"results/{method}.parquet {what} {sample}; score the run's own training rows again"
        )
    aligned = indexed.reindex(ids)
    if "rank" not in aligned.columns:
        order = np.argsort(-aligned["score"].to_numpy(dtype=np.float64), kind="stable")
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(1, len(order) + 1)
        aligned["rank"] = ranks
    return aligned


def method_seconds(run_dir: Path, record: dict[str, Any], method: str) -> dict[str, float | None]:
    """Scoring time and peak memory of one method.

    Looked up, in order, in the metadata of ``scores/<method>.npz`` (what the pipeline's scorer
    records), then in ``run.json``: a stage named after the method (``score:<m>``, ``score_<m>``,
    ``<m>``) or ``stages.score.info.methods[<m>]``. Missing values are ``None``.
    """
    npz = run_dir / "scores" / f"{method}.npz"
    if npz.exists():
        try:
            with np.load(npz, allow_pickle=False) as data:
                meta = json.loads(str(data["meta_json"])) if "meta_json" in data.files else {}
            if meta.get("seconds") is not None:
                return {
                    "seconds": _finite(meta.get("seconds")),
                    "peak_rss_mb": _finite(meta.get("peak_rss_mb")),
                }
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass
    stages = record.get("stages", {}) if isinstance(record.get("stages"), dict) else {}
    for name in (f"score:{method}", f"score_{method}", method):
        if isinstance(stages.get(name), dict):
            stage = stages[name]
            return {
                "seconds": _finite(stage.get("seconds")),
                "peak_rss_mb": _finite(stage.get("peak_rss_mb")),
            }
    info = stages.get("score", {}).get("info", {}) if isinstance(stages.get("score"), dict) else {}
    entry = info.get("methods", {}).get(method) if isinstance(info.get("methods"), dict) else None
    if isinstance(entry, dict):
        return {"seconds": _finite(entry.get("seconds")), "peak_rss_mb": _finite(entry.get("peak_rss_mb"))}
    if isinstance(entry, (int, float)):
        return {"seconds": _finite(entry), "peak_rss_mb": None}
    return {"seconds": None, "peak_rss_mb": None}


def stage_table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Time and peak memory of every recorded pipeline stage, in the order ``run.json`` lists them."""
    stages = record.get("stages", {})
    if not isinstance(stages, dict):
        return []
    return [
        {
            "stage": str(name),
            "seconds": _finite(stage.get("seconds")),
            "peak_rss_mb": _finite(stage.get("peak_rss_mb")),
        }
        for name, stage in stages.items()
        if isinstance(stage, dict)
    ]


def score_histograms(scores: np.ndarray, is_noisy: np.ndarray, bins: int = HIST_BINS) -> dict[str, Any]:
    """Counts of clean and noisy rows in shared, equal-width score bins (edges over all rows)."""
    finite = np.isfinite(scores)
    values = scores[finite]
    noisy = is_noisy[finite]
    if values.size == 0:
        return {"edges": [], "clean": [], "noisy": []}
    edges = np.histogram_bin_edges(values, bins=bins)
    clean_counts, _ = np.histogram(values[~noisy], bins=edges)
    noisy_counts, _ = np.histogram(values[noisy], bins=edges)
    return {
        "edges": [float(e) for e in edges],
        "clean": [int(c) for c in clean_counts],
        "noisy": [int(c) for c in noisy_counts],
    }


def spearman_matrix(table: pd.DataFrame) -> list[list[float | None]]:
    """Spearman rank correlation between the columns of ``table`` (ties get average ranks).

    Pearson correlation of the average ranks, vectorised; a constant column correlates as ``None``.
    """
    ranks = table.rank(method="average").to_numpy(dtype=np.float64)
    centred = ranks - ranks.mean(axis=0, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (centred.T @ centred) / np.outer(norms, norms)
    return [[_finite(v) for v in row] for row in corr]


def _text(value: Any) -> str:
    """A manifest or row value as display text (``None`` and NaN become empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _task_fields(rows: list[dict[str, Any]]) -> tuple[str, tuple[str, ...]]:
    """The task (instruction or classification) and the row fields the report shows for it."""
    keys = set().union(*rows) if rows else set()
    if "instruction" in keys or "output" in keys or not keys:
        return "instruction", INSTRUCTION_FIELDS
    fields = tuple(f for f in CLASSIFICATION_FIELDS if f in keys)
    return "classification", fields or ("text", "label")


def flagged_rows(
    aligned: dict[str, pd.DataFrame],
    manifest: pd.DataFrame,
    rows: dict[str, dict[str, Any]],
    clean_rows: dict[str, dict[str, Any]],
    fields: tuple[str, ...],
    top_k: int,
) -> list[dict[str, Any]]:
    """The ``top_k`` highest-ranked rows of every method with their text and injected noise."""
    info = manifest.set_index("id")
    out: list[dict[str, Any]] = []
    for method, frame in aligned.items():
        top = frame.sort_values(["rank", "score"], ascending=[True, False], kind="stable").head(top_k)
        for row_id, entry in top.iterrows():
            noise = info.loc[row_id]
            row = rows.get(row_id, {})
            noisy = bool(noise["is_noisy"])
            field = _text(noise["field"]) if noisy else ""
            original_row = clean_rows.get(row_id, {})
            out.append(
                {
                    "method": method,
                    "id": str(row_id),
                    "rank": int(entry["rank"]),
                    "score": _finite(entry["score"]),
                    "is_noisy": noisy,
                    "family": _text(noise["family"]) if noisy else "",
                    "operator": _text(noise["operator"]) if noisy else "",
                    "field": field,
                    "fields": {name: _text(row.get(name)) for name in fields},
                    "noisy_text": _text(noise["noisy"]) if noisy else "",
                    "original_text": (
                        (_text(noise["original"]) or _text(original_row.get(field))) if noisy else ""
                    ),
                }
            )
    return out


def collect(run_dir: str | Path, *, top_k: int = 50, bins: int = HIST_BINS) -> dict[str, Any]:
    """Every number and row the report shows, as a JSON-serialisable dict.

    Keys: ``run`` (path, created, args, versions, task, fields, n_rows, n_noisy, families),
    ``methods`` (leaderboard order: AUROC descending), ``leaderboard`` (one dict per method:
    ``auroc, ap, p_at_k, k, curve_area, n_flagged, seconds, peak_rss_mb``), ``curves``
    (``{method: {"roc": {"fpr", "tpr"}, "detection": {"x", "y"}}}``), ``family_auroc``
    (``methods`` x ``families`` matrix ``values`` plus ``counts`` of noisy rows per family),
    ``distributions`` (``{method: {"edges", "clean", "noisy"}}``), ``stages`` (run.json stages),
    ``correlation`` (Spearman, ``methods`` x ``methods``), ``flagged`` (top ``top_k`` rows per
    method), ``top_k`` and ``warnings``.
    """
    if top_k < 1:
        raise InfscopeError(f"--top-k must be at least 1 (got {top_k}); pass e.g. --top-k 50")
    run_path = Path(run_dir)
    if not run_path.is_dir():
        raise InfscopeError(
            f"run directory {run_path} does not exist; pass the --out directory of `infscope demo`"
        )
    manifest = read_run_manifest(run_path)
    tables = read_results(run_path)
    record = read_run_record(run_path)
    if manifest.empty:
        raise InfscopeError(
            f"manifest of {run_path} has no rows; rerun `infscope demo` to regenerate the data"
        )
    ids = pd.Index(manifest["id"].astype(str))
    is_noisy = manifest["is_noisy"].to_numpy(dtype=bool)
    families = np.where(is_noisy, manifest["family"].map(_text).to_numpy(dtype=object), "")
    warnings: list[str] = []

    aligned: dict[str, pd.DataFrame] = {}
    reports: dict[str, dict[str, Any]] = {}
    for method, frame in tables.items():
        table = _align(frame, ids, method)
        values = table["score"].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            warnings.append(
                f"{method}: {int((~np.isfinite(values)).sum())} non-finite scores; method left out"
            )
            continue
        aligned[method] = table
        reports[method] = detection_report(values, is_noisy, groups=families)
    if not aligned:
        raise InfscopeError(f"no method in {run_path / RESULTS_DIR} has finite scores; rerun scoring")

    def order_key(method: str) -> tuple[float, str]:
        auroc = reports[method]["auroc"]
        return (-(auroc if auroc is not None else -1.0), method)

    methods = sorted(aligned, key=order_key)
    family_names = sorted({f for f in families if f})
    leaderboard = []
    for method in methods:
        rep = reports[method]
        flagged = aligned[method].get("is_flagged")
        leaderboard.append(
            {
                "method": method,
                "auroc": _finite(rep["auroc"]),
                "ap": _finite(rep["ap"]),
                "p_at_k": _finite(rep["p_at_n_noisy"]),
                "k": int(rep["n_noisy"]),
                "curve_area": _finite(rep["curve_area"]),
                "n_flagged": int(np.asarray(flagged, dtype=bool).sum()) if flagged is not None else None,
                **method_seconds(run_path, record, method),
            }
        )
    score_table = pd.DataFrame({m: aligned[m]["score"].to_numpy(dtype=np.float64) for m in methods})
    rows = {str(r.get("id")): r for r in _read_jsonl(run_path.joinpath(*TRAIN_PATH))}
    clean_rows = {str(r.get("id")): r for r in _read_jsonl(run_path.joinpath(*CLEAN_PATH))}
    if not rows:
        warnings.append(f"{'/'.join(TRAIN_PATH)} is missing: flagged rows show only the manifest's noise")
    task, fields = _task_fields(list(rows.values()))

    return {
        "run": {
            "path": str(run_path.resolve()),
            "name": run_path.resolve().name,
            "created": _text(record.get("created")),
            "args": record.get("args", {}),
            "versions": record.get("versions", {}),
            "task": task,
            "fields": list(fields),
            "n_rows": int(len(ids)),
            "n_noisy": int(is_noisy.sum()),
            "families": family_names,
        },
        "methods": methods,
        "leaderboard": leaderboard,
        "curves": {
            m: {
                "roc": reports[m]["roc"] or {"fpr": [], "tpr": []},
                "detection": reports[m]["curve"] or {"x": [], "y": []},
            }
            for m in methods
        },
        "family_auroc": {
            "methods": methods,
            "families": family_names,
            "values": [
                [_finite(reports[m].get("groups", {}).get(f, {}).get("auroc")) for f in family_names]
                for m in methods
            ],
            "counts": {f: int((families == f).sum()) for f in family_names},
        },
        "distributions": {
            m: score_histograms(score_table[m].to_numpy(), is_noisy, bins=bins) for m in methods
        },
        "stages": stage_table(record),
        "correlation": {"methods": methods, "values": spearman_matrix(score_table)},
        "flagged": flagged_rows(aligned, manifest, rows, clean_rows, fields, top_k),
        "top_k": int(top_k),
        "warnings": warnings,
    }
