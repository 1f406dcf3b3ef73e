"""The cleaned data in the input's own format: the input's records with the kept changes applied.

The input is read twice, raw (:func:`infscope.data.readers.read_file`, the records as the file has
them) and normalised (:func:`infscope.data.loading.load_rows`, ids and canonical fields); both keep
row order, so record ``i`` is row ``i``. Changes are applied to the raw records, so columns the
loader maps or ignores keep their names and values: a drop removes the record, a relabel writes the
new label the way the file writes labels (an int, an int as text, or the label's name), a repair
writes the response column (or the last assistant turn of ``messages``), and reweight adds a
``weight`` column. Canary rows (ids starting ``canary-``) are left out. The file is written with
:func:`infscope.data.writing.write_rows` (atomic) in the input's format.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscope.actions.changes import Change, is_canary
from infscope.data.columns import ColumnMap
from infscope.data.formatting import is_chat_row, with_response
from infscope.data.loading import LoadedData, load_rows
from infscope.data.readers import READ_FORMATS, read_file
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError

WEIGHT_COLUMN = "weight"


@dataclass
class InputFile:
    """A local data file: its raw records, its normalised rows, format and column mapping."""

    path: Path
    format: str
    raw: list[dict[str, Any]]
    loaded: LoadedData
    columns: ColumnMap

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.loaded.rows

    def column(self, field: str) -> str:
        """The file's column for canonical ``field`` (mapped by the column flags, else its own name)."""
        return getattr(self.columns, field) or field


def read_input(path: str | os.PathLike, columns: ColumnMap | None = None) -> InputFile:
    """Read a data file for cleaning; only local JSON/JSONL/CSV/Parquet files can be written back."""
    source = Path(os.fspath(path)).expanduser()
    if not source.is_file():
        raise InfscopeError(
            f"{path} is not a data file; `infscope clean` writes the cleaned rows in the input's format, "
            "so pass a local JSON/JSONL/CSV/Parquet file (write a built-in to a file with `infscope data make`)"
        )
    kind = READ_FORMATS.get(source.suffix.lower())
    if kind is None:
        raise InfscopeError(
            f"cannot clean {source}: unknown suffix {source.suffix!r}; use .json, .jsonl, .csv or .parquet"
        )
    loaded = load_rows(source, columns=columns)
    raw = read_file(source).records
    return InputFile(source.resolve(), kind, raw, loaded, columns or ColumnMap())


def _label_value(original: Any, new: int, label_names: Sequence[Any] | None) -> Any:
    """``new`` written like ``original``: an int, an integer string, or a label name."""
    if isinstance(original, (bool, int, float)):
        return new
    text = str(original).strip()
    if text.lstrip("+-").isdigit():
        return str(new)
    if not label_names:
        raise InfscopeError(
            "the input writes labels as names but none are known; relabel a file with int labels"
        )
    return label_names[new]


def cleaned_records(
    data: InputFile, changes: Iterable[Change], weights: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """The input's raw records with ``changes`` applied, canaries left out (see the module docstring)."""
    by_id: dict[str, list[Change]] = {}
    for change in changes:
        by_id.setdefault(change.id, []).append(change)
    label_col, output_col, messages_col = data.column("label"), data.column("output"), data.column("messages")
    out = []
    for record, row in zip(data.raw, data.rows, strict=True):
        row_id = str(row["id"])
        if is_canary(row_id):
            continue
        record, current = dict(record), dict(row)
        dropped = False
        for change in by_id.get(row_id, []):
            if change.action == "drop":
                dropped = True
            elif change.action == "relabel":
                record[label_col] = _label_value(
                    record.get(label_col), int(change.after), data.loaded.label_names
                )
            elif change.action == "repair":
                current = with_response(current, str(change.after))
                if is_chat_row(current) and messages_col in record:
                    record[messages_col] = current["messages"]
                if output_col in record or not is_chat_row(current):
                    record[output_col] = current["output"]
        if dropped:
            continue
        if weights is not None:
            record[WEIGHT_COLUMN] = float(weights.get(row_id, 1.0))
        out.append(record)
    return out


def write_cleaned(data: InputFile, records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``records`` to ``path`` in the input's format (atomically)."""
    return write_rows(records, path, format=data.format)
