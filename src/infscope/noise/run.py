"""Noise runs on disk: one noisy dataset + manifest + metadata per (ratio, strategy) combination.

:func:`run_noise` loads a source once, writes the clean original once (``NAME.clean.EXT``), then
for every combination ``NAME.noisy.STRATEGY.rR.RRR.sSEED.EXT`` with ``.manifest.jsonl`` and
``.meta.json`` beside it. Names are collision-free (custom weights, field weights and stratified
sampling add tokens), every write is atomic, and the user's input file is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscope.data.loading import LoadedData, load_rows
from infscope.data.manifest import write_manifest
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError
from infscope.noise.inject import check_noise_args, inject_noise, label_noise_applies
from infscope.noise.strategies import CUSTOM, resolve_weights, split_strategies
from infscope.runs import atomic_write_json, ensure_writable_dir, package_versions

FILE_FORMATS = {"json": ".json", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
NOISY_NAME_RE = re.compile(
    r"^(?P<dataset>.+)\.(?P<mode>noisy(?:-[a-z]+)?)\.(?P<strategy>[^.]+)\.r(?P<ratio>\d\.\d{3})\.s(?P<seed>-?\d+)$"
)
ProgressFn = Callable[[int, str], None]


@dataclass
class NoiseOutput:
    """The files of one combination and its summary (target vs actual counts)."""

    ratio: float
    strategy: str
    data_path: Path
    manifest_path: Path
    meta_path: Path
    summary: dict[str, Any]
    seconds: float


def dataset_name(source: str) -> str:
    """A short file-name-safe name for a source: ``data/alpaca.jsonl`` -> ``alpaca``."""
    text = source[len("builtin:") :] if source.startswith("builtin:") else source
    path = Path(text)
    name = path.name if path.exists() and path.is_dir() else path.name.split(".")[0] if path.suffix else text
    name = name or path.stem or "dataset"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "dataset"


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def strategy_token(
    strategy: str, weights: Mapping[str, float], field_weights: Mapping[str, float] | None
) -> str:
    """``balanced``; ``custom-1a2b3c4d`` for custom weights; ``-f<hash>`` when field weights are set."""
    token = f"{CUSTOM}-{_short_hash(weights)}" if strategy == CUSTOM else strategy
    if field_weights:
        token += f"-f{_short_hash(dict(field_weights))[:6]}"
    return token


def noisy_stem(dataset: str, strategy: str, ratio: float, seed: int, sampling: str = "uniform") -> str:
    """Base name of a combination, e.g. ``alpaca.noisy.balanced.r0.200.s42``."""
    mode = "noisy" if sampling == "uniform" else f"noisy-{sampling}"
    return f"{dataset}.{mode}.{strategy}.r{ratio:.3f}.s{seed}"


def parse_ratios(ratios: float | str | Sequence[float]) -> list[float]:
    """Ratios from a float, ``"0.05,0.1"`` or a list; each must lie in (0, 1]."""
    if isinstance(ratios, (int, float)):
        items: list[Any] = [ratios]
    elif isinstance(ratios, str):
        items = [r for r in ratios.split(",") if r.strip()]
    else:
        items = list(ratios)
    out = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise InfscopeError(f"ratio {item!r} is not a number; write e.g. --ratios 0.05,0.1,0.2") from None
        if not 0.0 < value <= 1.0:
            raise InfscopeError(f"noise ratio must be in (0, 1], got {item}; e.g. --ratio 0.2")
        out.append(value)
    if not out:
        raise InfscopeError("no noise ratio given; pass --ratio 0.2 or --ratios 0.05,0.1,0.2")
    return list(dict.fromkeys(out))


def _output_format(loaded: LoadedData, format: str | None) -> str:
    if format is not None:
        if format not in FILE_FORMATS:
            raise InfscopeError(f"unknown output format '{format}'; use {', '.join(FILE_FORMATS)}")
        return format
    return loaded.format if loaded.format in FILE_FORMATS else "jsonl"


def _guard_input(paths: Sequence[Path], source: str) -> None:
    src = Path(source).expanduser()
    if not src.exists():
        return
    src = src.resolve()
    for path in paths:
        if path.resolve() == src:
            raise InfscopeError(f"output {path} would overwrite the input {source}; pass another --out")


def run_noise(
    source: str | os.PathLike | LoadedData,
    *,
    ratios: float | str | Sequence[float],
    strategies: str | Sequence[str] = ("balanced",),
    seed: int = 0,
    out_dir: str | os.PathLike,
    format: str | None = None,
    sampling: str = "uniform",
    weights: str | Mapping[str, float] | None = None,
    columns: Any = None,
    task: str | None = None,
    field_weights: Mapping[str, float] | None = None,
    label_names: Sequence[Any] | None = None,
    progress: ProgressFn | None = None,
) -> list[NoiseOutput]:
    """Write the clean original once, then dataset + manifest + metadata for each ratio x strategy.

    ``source`` is anything :func:`infscope.data.loading.load_rows` accepts, or an already loaded
    :class:`LoadedData`. ``weights`` replace ``strategies`` by one ``custom`` strategy. Everything
    is validated before the first file is written.
    """
    ratio_list = parse_ratios(ratios)
    strategy_list = [CUSTOM] if weights else split_strategies(strategies)
    start_all = time.perf_counter()
    loaded = source if isinstance(source, LoadedData) else load_rows(source, task=task, columns=columns)
    rows = loaded.rows
    if not rows:
        raise InfscopeError(f"the dataset {loaded.source} is empty; pass a file with at least one row")
    label_names = label_names if label_names is not None else loaded.label_names
    fmt = _output_format(loaded, format)
    ext = FILE_FORMATS[fmt]
    name = dataset_name(loaded.source)
    label_ok = label_noise_applies(rows, loaded.task)

    combos = []
    for strategy in strategy_list:
        resolved_name, units = resolve_weights(strategy, weights, label_applicable=label_ok)
        token = strategy_token(resolved_name, units, field_weights)
        for ratio in ratio_list:
            check_noise_args(
                rows,
                task=loaded.task,
                ratio=ratio,
                strategy=strategy,
                weights=weights,
                sampling=sampling,
                field_weights=field_weights,
            )
            stem = noisy_stem(name, token, ratio, seed, sampling)
            combos.append((ratio, strategy, resolved_name, stem))
    stems = [c[3] for c in combos]
    if len(set(stems)) != len(stems):
        raise InfscopeError(
            "two ratios give the same file name (3 decimals); use ratios that differ at 3 decimals"
        )
    out = ensure_writable_dir(out_dir)
    clean_path = out / f"{name}.clean{ext}"
    planned = [clean_path] + [
        out / f"{stem}{suffix}" for stem in stems for suffix in (ext, ".manifest.jsonl", ".meta.json")
    ]
    _guard_input(planned, loaded.source)

    write_rows(rows, clean_path, format=fmt)
    common = {
        "dataset": name,
        "source": loaded.source,
        "source_format": loaded.format,
        "source_fingerprint": loaded.fingerprint,
        "task": loaded.task,
        "rows": len(rows),
        "seed": seed,
        "sampling": sampling,
        "format": fmt,
        "clean_file": clean_path.name,
        "versions": package_versions(),
    }
    outputs = []
    for ratio, strategy, resolved_name, stem in combos:
        started = time.perf_counter()
        result = inject_noise(
            rows,
            task=loaded.task,
            ratio=ratio,
            strategy=strategy,
            weights=weights,
            seed=seed,
            sampling=sampling,
            field_weights=field_weights,
            label_names=label_names,
        )
        data_path = write_rows(result.rows, out / f"{stem}{ext}", format=fmt)
        manifest_path = write_manifest(result.manifest, out / f"{stem}.manifest.jsonl")
        seconds = time.perf_counter() - started
        meta = {
            **common,
            "kind": "noisy",
            "ratio": ratio,
            "strategy": resolved_name,
            "weights": result.summary["weights"],
            "arguments": {
                "ratios": ratio_list,
                "strategies": strategy_list,
                "weights": weights if isinstance(weights, (str, type(None))) else dict(weights),
                "seed": seed,
                "sampling": sampling,
                "format": format,
                "task": task,
                "field_weights": dict(field_weights) if field_weights else None,
            },
            "data_file": data_path.name,
            "manifest_file": manifest_path.name,
            "summary": result.summary,
            "seconds": round(seconds, 3),
        }
        meta_path = atomic_write_json(out / f"{stem}.meta.json", meta)
        outputs.append(
            NoiseOutput(ratio, resolved_name, data_path, manifest_path, meta_path, result.summary, seconds)
        )
        if progress is not None:
            progress(len(rows), stem)
    if progress is not None:
        progress(0, f"done in {time.perf_counter() - start_all:.1f}s")
    return outputs
