"""Write rows to JSON, JSONL, CSV or Parquet, atomically and with deterministic bytes.

Columns are the union of the rows' keys in first-seen order, so equal rows always give equal
files. JSON keeps non-ASCII text as is (``ensure_ascii=False``). CSV has no types: nested values
are written as JSON strings and ``None`` as an empty cell; the loader turns integer-like labels
back into ints.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError
from infscope.runs import atomic_path, atomic_write_text
from infscope.runs.io import json_default

WRITE_FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def format_from_path(path: str | os.PathLike, format: str | None = None) -> str:
    """The file format named by ``format`` or, if ``None``, by the path's suffix."""
    if format is not None:
        name = format.lower().lstrip(".")
        if name not in set(WRITE_FORMATS.values()):
            raise InfscopeError(f"unknown data format {format!r}; use json, jsonl, csv or parquet")
        return name
    suffix = Path(path).suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise InfscopeError(
            f"cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; "
            "use .json, .jsonl, .csv or .parquet"
        )
    return WRITE_FORMATS[suffix]


def row_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of the rows' keys in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=json_default)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return str(value)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = row_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if columns:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(col)) for col in columns])
    return buffer.getvalue()


def _write_parquet(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = row_columns(rows)
    try:
        table = pa.table({col: [row.get(col) for row in rows] for col in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InfscopeError(
            f"cannot write {path} as Parquet: a column mixes value types ({exc}); write .jsonl instead"
        ) from None
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, format: str | None = None) -> Path:
    """Write ``rows`` to ``path`` atomically; the format comes from ``format`` or the suffix."""
    kind = format_from_path(path, format)
    rows = list(rows)
    if kind == "json":
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=2, default=json_default) + "\n")
    elif kind == "jsonl":
        atomic_write_text(
            path, "".join(json.dumps(row, ensure_ascii=False, default=json_default) + "\n" for row in rows)
        )
    elif kind == "csv":
        atomic_write_text(path, _csv_text(rows))
    else:
        _write_parquet(rows, path)
    return Path(path)
