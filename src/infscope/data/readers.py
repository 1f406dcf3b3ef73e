"""Read raw records from local sources: JSON, JSONL, CSV, Parquet and saved ``datasets`` folders.

Readers only parse; naming columns, ids and labels is :mod:`infscope.data.normalize`'s job.
Every failure is an :class:`InfscopeError` that names the file (and, for JSONL and JSON, the
line) and says how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError
from infscope.runs.io import file_fingerprint, json_default, parse_jsonl

READ_FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


@dataclass
class RawData:
    """Records as read from a source, before normalisation."""

    records: list[dict[str, Any]]
    format: str
    fingerprint: str
    label_names: list[str] | None = None


def rows_fingerprint(records: list[dict[str, Any]]) -> str:
    """SHA-256 (first 16 hex digits) of the records' canonical JSON, for sources without one file."""
    digest = hashlib.sha256()
    for record in records:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, default=json_default)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def is_hf_disk_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / marker).exists() for marker in _HF_MARKERS)


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # keep "\r\n" inside CSV cells
            return handle.read()
    except UnicodeDecodeError as exc:
        raise InfscopeError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InfscopeError(
            f"cannot read {path} ({exc.strerror or exc}); check the path and permissions"
        ) from None


def _check_objects(records: list[Any], path: Path, what: str) -> list[dict[str, Any]]:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InfscopeError(
                f"{what} {index + 1} of {path} is a {type(record).__name__}, not an object; "
                'each row must be a JSON object like {"instruction": ..., "output": ...}'
            )
    return records


def read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or an object whose ``data`` key holds that list."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InfscopeError(
            f"malformed JSON in {path} at line {exc.lineno} column {exc.colno} ({exc.msg}); fix the file"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InfscopeError(
            f'{path} holds a JSON {type(data).__name__}; expected a list of row objects or {{"data": [...]}}'
        )
    return _check_objects(data, path, "item")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped; errors report the 1-based line number."""
    return parse_jsonl(_read_text(path), str(path))


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A CSV file with a header row; every cell is a string (empty cells are ``""``)."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), restval="")
        records = []
        for record in reader:
            if None in record:
                raise InfscopeError(
                    f"line {reader.line_num} of {path} has more cells than the header; quote cells that contain commas"
                )
            records.append(dict(record))
    except csv.Error as exc:
        raise InfscopeError(f"malformed CSV in {path} ({exc}); fix the file or convert it to JSONL") from None
    finally:
        csv.field_size_limit(old_limit)
    return records


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """A Parquet file, converted to Python values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InfscopeError(
            f"cannot read Parquet file {path} ({exc}); check that it is a valid Parquet file"
        ) from None


def class_label_names(dataset: Any, column: str = "label") -> list[str] | None:
    """Names of a ``datasets`` ClassLabel column, or ``None`` if the column has no names."""
    feature = getattr(dataset, "features", {}).get(column)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def dataset_to_records(dataset: Any, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a ``datasets.Dataset``, reading only the first ``limit`` when given."""
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset.to_list()


def pick_split(dataset: Any, split: str, source: str) -> Any:
    """The ``split`` of a DatasetDict (a plain Dataset is returned as is)."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):
        splits = list(dataset.keys())
        if split not in splits:
            raise InfscopeError(
                f"{source} has no split {split!r} (splits: {', '.join(splits)}); pass --split with one of them"
            )
        return dataset[split]
    return dataset


def read_hf_disk(path: Path, split: str, limit: int | None) -> RawData:
    """A folder saved with ``save_to_disk`` (a Dataset, or a DatasetDict from which ``split`` is taken)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise InfscopeError(
            f"cannot load the datasets folder {path} ({exc}); pass a folder written by save_to_disk"
        ) from None
    dataset = pick_split(loaded, split, str(path))
    records = dataset_to_records(dataset, limit)
    return RawData(records, "hf_disk", rows_fingerprint(records), class_label_names(dataset))


def read_file(path: Path) -> RawData:
    """Read a local data file, choosing the reader from the suffix."""
    kind = READ_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InfscopeError(
            f"cannot tell the format of {path} from its suffix {path.suffix or '(none)'!r}; "
            "use .json, .jsonl, .csv or .parquet"
        )
    reader = {"json": read_json, "jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}[kind]
    records = reader(path)
    return RawData(records, kind, file_fingerprint(path))
