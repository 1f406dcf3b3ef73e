"""Gather everything a report shows from a run directory into one JSON-serialisable dict.

The run is read the way every command reads it: :func:`infscope.scoring.run.open_run` gives the
record, the training rows and the manifest (which for ``infscope finetune`` runs may live outside
the run), and :class:`~infscope.runs.RunLayout` names the ranked tables and saved scores.

The report never trusts ``evaluation.json``: every number is recomputed here from the ranked
tables in ``results/`` and the ground-truth manifest, with :mod:`infscope.evaluate.detection`
(so the report and ``infscope evaluate`` share one definition of AUROC, AP and P@k). Rendering
(:mod:`infscope.report.html`) only formats this dict, which keeps the numbers testable alone.

The manifest is lined up with the training rows (:func:`infscope.data.manifest.manifest_for_ids`):
rows it does not list are clean, so a user's short list of known-bad ids is enough. A run without
any manifest is still reported (distributions, flagged rows, cost), with undefined detection metrics
and a warning. Per-family AUROC compares the noisy rows of one family against all clean rows (the
definition of :func:`infscope.evaluate.detection.group_reports`). ``P@k`` uses ``k`` = number of
noisy rows.

Methods that split a row's score into tokens (``tracin_we``) save ``token_marks`` in their Scores
meta: per flagged row, the tokens carrying its score and their character spans in the row's fields.
:func:`row_token_marks` turns them into display data (an intensity level per token, spans checked
against the text the report shows), so the page can highlight them without a tokenizer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.data.manifest import NOT_IN_TRAINING, manifest_for_ids, read_manifest
from infscope.errors import InfscopeError
from infscope.evaluate.detection import detection_report
from infscope.runs import RunLayout, RunRecord, read_jsonl
from infscope.scoring.run import OpenedRun, open_run

HIST_BINS = 20
#: Highlight intensities of a row's tokens: level ``L`` holds shares up to ``L / TOKEN_LEVELS`` of the top one.
TOKEN_LEVELS = 5
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


def read_results(layout: RunLayout) -> dict[str, pd.DataFrame]:
    """Every ``results/<method>.parquet`` table of the run, keyed by method name (sorted)."""
    results_dir = layout.results_dir
    paths = sorted(results_dir.glob("*.parquet")) if results_dir.is_dir() else []
    if not paths:
        raise InfscopeError(
            f"{layout.root} has no {results_dir.name}/<method>.parquet tables; {MAKE_RESULTS}"
        )
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


def run_manifest(
    run: OpenedRun, train_ids: list[str], given: str | os.PathLike | None = None
) -> tuple[pd.DataFrame, Path | None, list[str]]:
    """The run's manifest lined up with its training rows, where it came from, and warnings.

    ``given`` (a user's file) wins over the run's own (:attr:`OpenedRun.manifest`). A manifest the
    run recorded but that is gone is an error; a run that never had one gets an all-clean manifest
    and a warning, so its report still shows scores, flagged rows and cost.
    """
    warnings: list[str] = []
    path = Path(given) if given is not None else run.manifest
    if path is None:
        recorded = run.record.manifest
        if recorded:
            fix = (
                "rerun `infscope demo --out RUN` (or `infscope noise`) to make it"
                if run.record.kind in ("demo", "bench")
                else "put the file back there"
            )
            raise InfscopeError(f"{run.path} has no {recorded} (the manifest it recorded); {fix}")
        warnings.append(
            "no manifest of known-bad rows, so detection metrics are undefined; give one to "
            "`infscope finetune --manifest FILE` (a noise manifest, id + is_noisy JSONL, or ids one a line)"
        )
        return manifest_for_ids(None, train_ids), None, warnings
    manifest = read_manifest(path, train_ids=train_ids)
    dropped = manifest.attrs.get(NOT_IN_TRAINING, 0)
    if dropped:
        warnings.append(f"{dropped} manifest rows are not training rows (validation split?) and are left out")
    return manifest, path, warnings


def _align(frame: pd.DataFrame, ids: pd.Index, method: str) -> pd.DataFrame:
    """A method's table reindexed to training-row order; every training row needs exactly one score."""
    indexed = frame.set_index("id")
    missing = ids.difference(indexed.index)
    extra = indexed.index.difference(ids)
    if len(missing) or len(extra):
        sample = ", ".join(map(str, (missing if len(missing) else extra)[:3]))
        what = "has no score for" if len(missing) else "scores ids that are not training rows:"
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


def scores_meta(layout: RunLayout, method: str) -> dict[str, Any]:
    """The meta of ``scores/<method>.npz`` without reading its values; ``{}`` when missing or unreadable."""
    path = layout.scores(method)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta_json"]))
    except (OSError, KeyError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def method_seconds(layout: RunLayout, record: RunRecord, method: str) -> dict[str, float | None]:
    """Scoring time and peak memory of one method.

    Looked up in the metadata of ``scores/<method>.npz`` (what scoring records with each Scores),
    then in the ``score`` stage of ``run.json`` (``info.methods[<method>]``). Missing values are
    ``None``.
    """
    meta = scores_meta(layout, method)
    if meta.get("seconds") is not None:
        return {"seconds": _finite(meta.get("seconds")), "peak_rss_mb": _finite(meta.get("peak_rss_mb"))}
    methods = record.stages.get("score", {}).get("info", {}).get("methods", {})
    entry = methods.get(method) if isinstance(methods, dict) else None
    if isinstance(entry, dict):
        return {"seconds": _finite(entry.get("seconds")), "peak_rss_mb": _finite(entry.get("peak_rss_mb"))}
    return {"seconds": None, "peak_rss_mb": None}


def stage_table(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Time and peak memory of every finished stage (``data``, ``noise``, ``finetune``,
    ``gradients:<checkpoint>[-<block_by>]``, ``score``), in the order of ``stages``
    (:meth:`RunDir.stages <infscope.runs.RunDir.stages>` gives them in the order they finished)."""
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


def _task_fields(rows: list[dict[str, Any]], task: str) -> tuple[str, ...]:
    """The row fields the report shows for ``task`` (``instruction`` or ``classification``)."""
    if task != "classification":
        return INSTRUCTION_FIELDS
    keys = set().union(*rows) if rows else set()
    return tuple(f for f in CLASSIFICATION_FIELDS if f in keys) or ("text", "label")


def row_token_marks(entry: Any, texts: dict[str, str]) -> dict[str, Any]:
    """Display data for one row's saved ``token_marks`` entry (see :mod:`infscope.estimators.tracin_we`).

    Returns ``{"tokens": [{"token", "score", "level"}, ...], "marks": {field: [[start, end, level], ...]}}``:
    tokens most harmful first, each with an intensity ``level`` in ``1..TOKEN_LEVELS`` (its score as a
    share of the row's top token score, rounded up); spans sorted, inside ``texts[field]`` (the text
    the report shows) and not overlapping. Malformed entries give empty lists.
    """
    empty: dict[str, Any] = {"tokens": [], "marks": {}}
    if not isinstance(entry, dict):
        return empty
    tokens = []
    for item in entry.get("tokens") or []:
        if isinstance(item, (list, tuple)) and len(item) >= 2 and _finite(item[1]) is not None:
            tokens.append((_text(item[0]), float(item[1])))
    top = max((score for _, score in tokens), default=0.0)
    if top <= 0:
        return empty
    levels = [min(TOKEN_LEVELS, max(1, math.ceil(TOKEN_LEVELS * score / top - 1e-9))) for _, score in tokens]
    marks: dict[str, list[list[int]]] = {}
    spans = entry.get("spans")
    for field, found in (spans if isinstance(spans, dict) else {}).items():
        size = len(texts.get(field, ""))
        kept: list[list[int]] = []
        for span in sorted(s for s in found if isinstance(s, (list, tuple)) and len(s) == 3):
            start, end, k = (int(v) for v in span)
            if 0 <= start < end <= size and 0 <= k < len(tokens) and (not kept or start >= kept[-1][1]):
                kept.append([start, end, levels[k]])
        if kept:
            marks[field] = kept
    return {
        "tokens": [
            {"token": token, "score": score, "level": level}
            for (token, score), level in zip(tokens, levels, strict=True)
        ],
        "marks": marks,
    }


def flagged_rows(
    aligned: dict[str, pd.DataFrame],
    manifest: pd.DataFrame,
    rows: dict[str, dict[str, Any]],
    clean_rows: dict[str, dict[str, Any]],
    fields: tuple[str, ...],
    top_k: int,
    token_marks: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The ``top_k`` highest-ranked rows of every method with their text and injected noise.

    ``token_marks`` maps a method to its saved per-row token marks (``{id: entry}``); rows of that
    method then carry ``tokens`` and ``marks`` (:func:`row_token_marks`), others empty ones.
    """
    token_marks = token_marks or {}
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
            texts = {name: _text(row.get(name)) for name in fields}
            marked = row_token_marks(token_marks.get(method, {}).get(str(row_id)), texts)
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
                    "fields": texts,
                    "noisy_text": _text(noise["noisy"]) if noisy else "",
                    "original_text": (
                        (_text(noise["original"]) or _text(original_row.get(field))) if noisy else ""
                    ),
                    **marked,
                }
            )
    return out


def _open(run_dir: str | os.PathLike) -> OpenedRun:
    run_path = Path(run_dir)
    if not run_path.is_dir():
        raise InfscopeError(
            f"run directory {run_path} does not exist; pass the --out directory of `infscope demo` "
            "or `infscope finetune`"
        )
    return open_run(run_path)


def collect(
    run_dir: str | os.PathLike,
    *,
    top_k: int = 50,
    bins: int = HIST_BINS,
    manifest: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Every number and row the report shows, as a JSON-serialisable dict.

    ``manifest`` replaces the run's own manifest (any form :func:`read_manifest` accepts).
    Keys: ``run`` (path, name, kind, model, created, args, versions, task, fields, n_rows, n_noisy,
    families, checkpoint, manifest), ``methods`` (leaderboard order: AUROC descending),
    ``leaderboard`` (one dict per method: ``auroc, ap, p_at_k, k, curve_area, n_flagged, seconds,
    peak_rss_mb``), ``curves`` (``{method: {"roc": {"fpr", "tpr"}, "detection": {"x", "y"}}}``),
    ``family_auroc`` (``methods`` x ``families`` matrix ``values`` plus ``counts`` of noisy rows
    per family), ``distributions`` (``{method: {"edges", "clean", "noisy"}}``), ``stages`` (every
    finished stage of run.json), ``correlation`` (Spearman, ``methods`` x ``methods``), ``flagged``
    (top ``top_k`` rows per method; with ``tokens`` and ``marks`` for methods that saved token
    marks), ``top_k`` and ``warnings``.
    """
    if top_k < 1:
        raise InfscopeError(f"--top-k must be at least 1 (got {top_k}); pass e.g. --top-k 50")
    run = _open(run_dir)
    layout, record = run.layout, run.record
    tables = read_results(layout)
    train_ids = [str(r["id"]) for r in run.user_train]
    truth, manifest_path, warnings = run_manifest(run, train_ids, manifest)
    warnings = [*run.notes, *warnings]
    ids = pd.Index(truth["id"].astype(str))
    is_noisy = truth["is_noisy"].to_numpy(dtype=bool)
    families = np.where(is_noisy, truth["family"].map(_text).to_numpy(dtype=object), "")

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
        raise InfscopeError(f"no method in {layout.results_dir} has finite scores; rerun scoring")

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
                **method_seconds(layout, record, method),
            }
        )
    score_table = pd.DataFrame({m: aligned[m]["score"].to_numpy(dtype=np.float64) for m in methods})
    rows = {str(r.get("id")): r for r in run.train}
    clean_rows = {str(r.get("id")): r for r in read_jsonl(layout.train_clean, missing_ok=True)}
    fields = _task_fields(run.train, run.spec.task)
    root = run.path.resolve()
    marks = {m: scores_meta(layout, m).get("token_marks") for m in methods}
    marks = {m: v for m, v in marks.items() if isinstance(v, dict) and v}

    return {
        "run": {
            "path": str(root),
            "name": root.name,
            "kind": record.kind,
            "model": record.model.name,
            "created": _text(record.created),
            "args": record.args,
            "versions": record.versions,
            "task": run.spec.task,
            "fields": list(fields),
            "n_rows": int(len(ids)),
            "n_noisy": int(is_noisy.sum()),
            "families": family_names,
            "checkpoint": _text(run.dir.stage_info("score").get("checkpoint_tag")),
            "manifest": str(manifest_path) if manifest_path is not None else "",
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
        "stages": stage_table(run.dir.stages()),
        "correlation": {"methods": methods, "values": spearman_matrix(score_table)},
        "flagged": flagged_rows(aligned, truth, rows, clean_rows, fields, top_k, marks),
        "top_k": int(top_k),
        "warnings": warnings,
    }
