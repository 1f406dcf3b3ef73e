"""Inspect noise runs: what files exist, what each contains, and whether they are ready for use.

Every function returns a plain dict (JSON-serialisable) so that the CLI can render it as rich
tables or as JSON. Noise is read only from manifests (and their ``.meta.json``), never
recovered by diffing, except in :func:`compare`, whose job is to diff two files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.data.loading import load_rows
from infscope.data.manifest import read_manifest
from infscope.errors import InfscopeError
from infscope.noise.run import FILE_FORMATS, NOISY_NAME_RE

DATA_SUFFIXES = tuple(FILE_FORMATS.values())
MANIFEST_SUFFIX = ".manifest.jsonl"
META_SUFFIX = ".meta.json"
Z95 = 1.959963984540054


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (MANIFEST_SUFFIX, META_SUFFIX, *DATA_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def discover(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Dataset files named by ``paths`` (folders are scanned; manifests and metadata are skipped)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.iterdir())
                if p.is_file()
                and p.name.endswith(DATA_SUFFIXES)
                and not p.name.startswith(".")
                and not p.name.endswith((MANIFEST_SUFFIX, META_SUFFIX))
            )
        elif path.is_file():
            found.append(path)
        else:
            raise InfscopeError(f"path {item} does not exist; pass noise output files or their folder")
    if not found:
        raise InfscopeError(
            f"no dataset files found in {', '.join(map(str, paths))}; run `infscope noise` first"
        )
    return list(dict.fromkeys(found))


def _read_meta(path: Path) -> dict[str, Any] | None:
    meta_path = path.with_name(_stem(path) + META_SUFFIX)
    if not meta_path.exists():
        return None
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InfscopeError(
            f"cannot read metadata {meta_path} ({exc}); regenerate it with `infscope noise`"
        ) from None


def count_rows(path: Path) -> int:
    """Rows of a dataset file (JSONL lines and Parquet metadata are read without loading rows)."""
    name = path.name
    if name.endswith((".jsonl", ".ndjson")):
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    if name.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    return len(load_rows(path).rows)


def file_info(path: str | os.PathLike) -> dict[str, Any]:
    """One inventory line: type (original/noisy), rows, ratio, strategy, seed, size, companions."""
    path = Path(path)
    stem = _stem(path)
    meta = _read_meta(path)
    match = NOISY_NAME_RE.match(stem)
    manifest = path.with_name(stem + MANIFEST_SUFFIX)
    noisy = bool(match) or (meta or {}).get("kind") == "noisy"
    info: dict[str, Any] = {
        "path": str(path),
        "name": path.name,
        "type": "noisy" if noisy else "original",
        "dataset": (meta or {}).get("dataset") or (match.group("dataset") if match else stem.split(".")[0]),
        "rows": (meta or {}).get("rows") if meta else None,
        "ratio": None,
        "strategy": None,
        "seed": None,
        "sampling": None,
        "size_bytes": path.stat().st_size,
        "manifest": str(manifest) if manifest.exists() else None,
        "meta": str(path.with_name(stem + META_SUFFIX)) if meta else None,
    }
    if noisy:
        info["ratio"] = float(meta["ratio"]) if meta else float(match.group("ratio"))
        info["strategy"] = meta["strategy"] if meta else match.group("strategy")
        info["seed"] = meta["seed"] if meta else int(match.group("seed"))
        info["sampling"] = (
            meta.get("sampling") if meta else (match.group("mode").partition("-")[2] or "uniform")
        )
    if info["rows"] is None:
        info["rows"] = count_rows(path)
    return info


def inventory(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Mode 1: every dataset file with its type, rows, ratio, strategy and size."""
    files = [file_info(p) for p in discover(paths)]
    return {
        "files": files,
        "originals": sum(f["type"] == "original" for f in files),
        "noisy": sum(f["type"] == "noisy" for f in files),
        "total_bytes": sum(f["size_bytes"] for f in files),
    }


def _manifest_path(path: Path) -> Path:
    if path.name.endswith(MANIFEST_SUFFIX):
        return path
    manifest = path.with_name(_stem(path) + MANIFEST_SUFFIX)
    if not manifest.exists():
        raise InfscopeError(
            f"{path} has no manifest ({manifest.name}); analyze noisy files written by `infscope noise`"
        )
    return manifest


def _length_change(frame: pd.DataFrame) -> pd.Series:
    """``len(noisy) - len(original)`` for noisy text edits (label edits have no length)."""
    text = frame[
        frame["original"].map(lambda v: isinstance(v, str)) & frame["noisy"].map(lambda v: isinstance(v, str))
    ]
    return text["noisy"].str.len() - text["original"].str.len()


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(series.value_counts().items())}


def detail(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Mode 2: one noisy file from its manifest: targeted vs changed, per family/operator, lengths.

    With ``verify`` the data file is read and every noisy record is checked against it
    (``mismatches`` counts rows whose field does not hold the manifest's ``noisy`` value).
    """
    path = Path(path)
    manifest_path = _manifest_path(path)
    frame = read_manifest(manifest_path)
    meta = _read_meta(manifest_path)
    noisy = frame[frame["is_noisy"]]
    changed = int((noisy["original"] != noisy["noisy"]).sum())
    lengths = _length_change(noisy)
    summary = (meta or {}).get("summary", {})
    out: dict[str, Any] = {
        "path": str(path),
        "manifest": str(manifest_path),
        "rows": len(frame),
        "targeted": summary.get("target_noisy", int(len(noisy))),
        "noisy": int(len(noisy)),
        "changed": changed,
        "failures": summary.get("failures", {}).get("count", 0),
        "ratio": len(noisy) / len(frame) if len(frame) else 0.0,
        "families": _counts(noisy["family"]),
        "operators": _counts(noisy["operator"]),
        "fields": _counts(noisy["field"]),
        "label_changed": int(noisy["label_changed"].sum()),
        "mean_length_change": float(lengths.mean()) if len(lengths) else 0.0,
        "mean_severity": float(noisy["severity"].astype(float).mean()) if len(noisy) else 0.0,
    }
    data_path = path if not path.name.endswith(MANIFEST_SUFFIX) else _data_for(manifest_path, meta)
    if verify and data_path is not None and data_path.exists():
        rows = {row["id"]: row for row in load_rows(data_path).rows}
        mismatches = sum(
            1
            for rec in noisy.itertuples(index=False)
            if rows.get(str(rec.id), {}).get(rec.field) != rec.noisy
        )
        out["verified_against"] = str(data_path)
        out["mismatches"] = int(mismatches + sum(1 for i in frame["id"] if i not in rows))
    return out


def _data_for(manifest_path: Path, meta: dict[str, Any] | None) -> Path | None:
    if meta and meta.get("data_file"):
        return manifest_path.with_name(meta["data_file"])
    stem = _stem(manifest_path)
    for suffix in DATA_SUFFIXES:
        candidate = manifest_path.with_name(stem + suffix)
        if candidate.exists():
            return candidate
    return None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_estimate(path: str | os.PathLike, *, sample: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mode 3: estimate noise ratio, family shares and length change from a random sample.

    Only the sampled manifest lines are parsed, so this stays fast on very large files. The
    noise ratio and family shares get Wilson 95 % intervals; the mean length change a normal one.
    """
    if sample < 1:
        raise InfscopeError(f"--sample must be at least 1, got {sample}")
    manifest_path = _manifest_path(Path(path))
    with open(manifest_path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    n = len(lines)
    if n == 0:
        raise InfscopeError(f"manifest {manifest_path} is empty; regenerate it with `infscope noise`")
    m = min(sample, n)
    picks = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    try:
        records = [json.loads(lines[i]) for i in picks]
    except json.JSONDecodeError as exc:
        raise InfscopeError(
            f"malformed line in manifest {manifest_path} ({exc.msg}); regenerate it"
        ) from None
    noisy = [r for r in records if r.get("is_noisy")]
    lo, hi = wilson_interval(len(noisy), m)
    families = {}
    for family in sorted({str(r.get("family")) for r in noisy}):
        count = sum(1 for r in noisy if str(r.get("family")) == family)
        f_lo, f_hi = wilson_interval(count, m)
        families[family] = {"count": count, "estimate": count / m, "ci95": [f_lo, f_hi]}
    deltas = np.asarray(
        [
            len(r["noisy"]) - len(r["original"])
            for r in noisy
            if isinstance(r.get("noisy"), str) and isinstance(r.get("original"), str)
        ],
        dtype=np.float64,
    )
    mean = float(deltas.mean()) if deltas.size else 0.0
    half = float(Z95 * deltas.std(ddof=1) / math.sqrt(deltas.size)) if deltas.size > 1 else 0.0
    return {
        "path": str(path),
        "rows": n,
        "sampled": m,
        "seed": seed,
        "noisy_in_sample": len(noisy),
        "ratio_estimate": len(noisy) / m,
        "ratio_ci95": [lo, hi],
        "families": families,
        "mean_length_change": mean,
        "mean_length_change_ci95": [mean - half, mean + half],
    }


def _mean_lengths(rows: list[dict[str, Any]]) -> dict[str, float]:
    fields = [k for k in ("instruction", "input", "output", "text", "text_b") if rows and k in rows[0]]
    return {k: float(np.mean([len(str(r.get(k, ""))) for r in rows])) for k in fields}


def compare(path_a: str | os.PathLike, path_b: str | os.PathLike, *, examples: int = 3) -> dict[str, Any]:
    """Mode 4: two files side by side: rows, mean field lengths, rows that differ (by id), examples."""
    rows_a = load_rows(path_a).rows
    rows_b = load_rows(path_b).rows
    by_a = {r["id"]: r for r in rows_a}
    by_b = {r["id"]: r for r in rows_b}
    shared = sorted(set(by_a) & set(by_b))
    fields = [
        k for k in ("instruction", "input", "output", "text", "text_b", "label") if rows_a and k in rows_a[0]
    ]
    per_field = {k: 0 for k in fields}
    differing = []
    for row_id in shared:
        diff = [k for k in fields if by_a[row_id].get(k) != by_b[row_id].get(k)]
        for k in diff:
            per_field[k] += 1
        if diff:
            differing.append((row_id, diff))
    shown = [
        {"id": row_id, "field": diff[0], "a": by_a[row_id].get(diff[0]), "b": by_b[row_id].get(diff[0])}
        for row_id, diff in differing[:examples]
    ]
    return {
        "a": {"path": str(path_a), "rows": len(rows_a), "mean_lengths": _mean_lengths(rows_a)},
        "b": {"path": str(path_b), "rows": len(rows_b), "mean_lengths": _mean_lengths(rows_b)},
        "shared_ids": len(shared),
        "only_in_a": len(set(by_a) - set(by_b)),
        "only_in_b": len(set(by_b) - set(by_a)),
        "rows_differ": len(differing),
        "fields_differ": per_field,
        "examples": shown,
    }


def strategy_effect(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Mode 5: per ratio, one line per strategy: family shares, severity, length change, label changes."""
    table: dict[str, list[dict[str, Any]]] = {}
    for info in inventory(paths)["files"]:
        if info["type"] != "noisy" or info["manifest"] is None:
            continue
        d = detail(info["path"], verify=False)
        total = max(1, d["noisy"])
        table.setdefault(f"{info['ratio']:.3f}", []).append(
            {
                "strategy": info["strategy"],
                "file": info["name"],
                "noisy": d["noisy"],
                "family_share": {f: c / total for f, c in d["families"].items()},
                "mean_severity": d["mean_severity"],
                "mean_length_change": d["mean_length_change"],
                "label_changed": d["label_changed"],
                "failures": d["failures"],
            }
        )
    for lines in table.values():
        lines.sort(key=lambda line: (line["strategy"], line["file"]))
    return {"ratios": dict(sorted(table.items()))}


def readiness(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Whether the files support an influence experiment: clean original, noisy files, >= 2 ratios."""
    files = inventory(paths)["files"]
    originals = [f for f in files if f["type"] == "original"]
    noisy = [f for f in files if f["type"] == "noisy"]
    ratios = sorted({f["ratio"] for f in noisy})
    missing = []
    if not originals:
        missing.append("clean original (NAME.clean.EXT, written by `infscope noise`)")
    if not noisy:
        missing.append("noisy files (run `infscope noise DATA --ratios 0.1,0.2`)")
    if len(ratios) < 2:
        missing.append(f"at least 2 noise ratios (have {len(ratios)}); add e.g. --ratios 0.1,0.2")
    missing.extend(f"manifest for {f['name']}" for f in noisy if f["manifest"] is None)
    return {
        "ready": not missing,
        "clean_present": bool(originals),
        "noisy_files": len(noisy),
        "ratios": ratios,
        "missing": missing,
    }


def analyze_all(paths: Sequence[str | os.PathLike], *, sample: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mode 6: inventory, details (sampled estimates for files above ``sample`` rows), a clean-vs-noisy
    comparison, the strategy table and the readiness check."""
    inv = inventory(paths)
    noisy = [f for f in inv["files"] if f["type"] == "noisy" and f["manifest"]]
    originals = [f for f in inv["files"] if f["type"] == "original"]
    details = [detail(f["path"], verify=f["rows"] <= sample) for f in noisy]
    estimates = [sample_estimate(f["path"], sample=sample, seed=seed) for f in noisy if f["rows"] > sample]
    comparison = compare(originals[0]["path"], noisy[0]["path"]) if originals and noisy else None
    return {
        "inventory": inv,
        "details": details,
        "estimates": estimates,
        "compare": comparison,
        "strategy": strategy_effect(paths),
        "readiness": readiness(paths),
    }
