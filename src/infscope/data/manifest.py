"""The noise manifest: one record per training row saying whether and how it was corrupted.

The manifest is the only source of truth for evaluation (never recover noise by diffing rows), so
its schema lives here in ``data`` where both ``noise`` (writer) and ``evaluate`` (reader) can use it
without importing each other. Files are JSONL, one object per row, keys in :data:`MANIFEST_FIELDS`
order followed by any extra keys in sorted order, so equal records give equal bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from infscope.errors import InfscopeError
from infscope.runs import atomic_write_text

MANIFEST_FIELDS: tuple[str, ...] = (
    "id",
    "is_noisy",
    "family",
    "operator",
    "field",
    "original",
    "noisy",
    "label_changed",
    "severity",
    "seed",
)
_BOOL_FIELDS = ("is_noisy", "label_changed")


def json_default(value: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-serialisable (used by every JSON writer in ``data``)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"value of type {type(value).__name__} is not JSON serialisable")


def _ordered(record: Mapping[str, Any]) -> dict[str, Any]:
    missing = [name for name in MANIFEST_FIELDS if name not in record]
    if missing:
        raise ValueError(f"manifest record {record.get('id')!r} lacks fields {missing}")
    out = {name: record[name] for name in MANIFEST_FIELDS}
    out.update({key: record[key] for key in sorted(record) if key not in out})
    out["id"] = str(out["id"])
    return out


def write_manifest(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write manifest ``records`` (every :data:`MANIFEST_FIELDS` key required) as JSONL, atomically."""
    lines = [
        json.dumps(_ordered(record), ensure_ascii=False, default=json_default) + "\n" for record in records
    ]
    return atomic_write_text(path, "".join(lines))


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InfscopeError(
            f"manifest {path} not found; pass the manifest.jsonl written by `infscope noise`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InfscopeError(f"cannot read manifest {path} ({exc}); check the path and permissions") from None
    from infscope.data.readers import parse_jsonl

    return parse_jsonl(text, f"manifest {path}", "fix or regenerate the manifest")


def _as_bool(series: pd.Series, name: str, path: Path) -> pd.Series:
    allowed = {True: True, False: False, "true": True, "false": False}  # 1 and 0 equal True and False
    try:
        values = [allowed[v.lower() if isinstance(v, str) else v] for v in series.tolist()]
    except (KeyError, TypeError):
        raise InfscopeError(
            f"column {name!r} of manifest {path} must hold true/false values; regenerate the manifest"
        ) from None
    return pd.Series(values, index=series.index, dtype=bool)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest JSONL into a DataFrame, checking its columns, id uniqueness and boolean flags.

    Columns come in :data:`MANIFEST_FIELDS` order, then extras; ``id`` is ``str``, ``is_noisy`` and
    ``label_changed`` are ``bool``. Problems raise :class:`InfscopeError` with the line or column.
    """
    path = Path(path)
    records = _parse_lines(path)
    if not records:
        return pd.DataFrame(
            {name: pd.Series(dtype=bool if name in _BOOL_FIELDS else object) for name in MANIFEST_FIELDS}
        )
    columns = list(MANIFEST_FIELDS) + sorted({key for rec in records for key in rec} - set(MANIFEST_FIELDS))
    frame = pd.DataFrame.from_records(records, columns=columns)
    absent = [name for name in MANIFEST_FIELDS if name not in set().union(*records)]
    if absent:
        raise InfscopeError(
            f"manifest {path} lacks column(s) {', '.join(absent)}; it must have {', '.join(MANIFEST_FIELDS)}"
        )
    for number, record in enumerate(records, start=1):
        lacking = [name for name in MANIFEST_FIELDS if name not in record]
        if lacking:
            raise InfscopeError(
                f"record {number} of manifest {path} lacks {', '.join(lacking)}; regenerate the manifest"
            )
    frame["id"] = frame["id"].astype(str)
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise InfscopeError(
            f"manifest {path} repeats id {duplicated.iloc[0]!r} ({len(duplicated)} duplicates); ids must be unique"
        )
    for name in _BOOL_FIELDS:
        frame[name] = _as_bool(frame[name], name, path)
    return frame
