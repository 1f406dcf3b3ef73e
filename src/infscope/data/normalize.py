"""Normalise raw records into infscope rows: canonical columns, task, stable ids, labels.

* Task: ``instruction`` when ``instruction`` and ``output`` exist, ``classification`` when
  ``text`` and ``label`` exist (or as given).
* Chat rows: a ``messages`` column (list of ``{"role", "content"}`` turns) makes every row a chat
  row of the instruction task. The turns are checked and kept (as plain dicts of strings), and the
  views ``instruction`` (last user turn) and ``output`` (last assistant turn) are added (see
  :mod:`infscope.data.formatting`); chat rows have no ``input``. Missing columns name the flag that maps them.
* Ids: the mapped/present ``id`` column as strings, else ``row-00000`` by position (zero padded
  to at least five digits). Empty or duplicate ids are errors.
* Text fields become strings; a missing ``input`` (or ``text_b`` where the source has that
  column) becomes ``""``.
* Labels: ints stay ints (integer-like strings and floats become ints); other strings become
  indices into ``label_names`` (sorted unique strings, unless names are given).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from infscope.data.columns import COLUMN_FLAGS, ColumnMap, apply_column_map, available_columns
from infscope.data.formatting import chat_views, check_messages
from infscope.errors import InfscopeError

TASKS = ("instruction", "classification")
REQUIRED: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "output"),
    "classification": ("text", "label"),
}
#: Text fields in output order, with whether they may be absent (absent ``input`` becomes ``""``;
#: ``text_b`` is kept only when the source has it).
TEXT_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "instruction": (("instruction", False), ("input", True), ("output", False)),
    "classification": (("text", False), ("text_b", True)),
}
_INT_RE = re.compile(r"^[+-]?\d+$")


def detect_task(columns: list[str], task: str | None, source: str) -> str:
    """Check ``task`` against ``columns`` or detect it; missing columns raise naming their flags."""
    present = set(columns)
    found = ", ".join(columns) or "none"
    if task is not None:
        if task not in TASKS:
            raise InfscopeError(f"unknown task {task!r}; use --task instruction or --task classification")
        missing = [name for name in REQUIRED[task] if name not in present]
        if missing:
            flags = " and ".join(f"{COLUMN_FLAGS[name]} NAME" for name in missing)
            raise InfscopeError(
                f"{source} lacks column(s) {', '.join(missing)} needed for the {task} task "
                f"(columns: {found}); map them with {flags}"
            )
        return task
    for name in TASKS:
        if all(col in present for col in REQUIRED[name]):
            return name
    raise InfscopeError(
        f"cannot detect the task of {source} (columns: {found}): need instruction+output "
        "(map with --instruction-col/--output-col), messages (map with --messages-col) "
        "or text+label (map with --text-col/--label-col)"
    )


def assign_ids(records: list[dict[str, Any]], source: str, id_given: bool) -> list[str]:
    """Stable string ids: the ``id`` column when present, else ``row-NNNNN`` by position."""
    if any("id" in record for record in records):
        ids = []
        for position, record in enumerate(records):
            value = record.get("id")
            if value is None or str(value).strip() == "":
                flag = "--id-col" if id_given else "--id-col (or drop the id column)"
                raise InfscopeError(
                    f"row {position + 1} of {source} has an empty id; fill it in or pick another {flag}"
                )
            ids.append(str(value))
    else:
        width = max(5, len(str(len(records) - 1)))
        ids = [f"row-{position:0{width}d}" for position in range(len(records))]
    counts = Counter(ids)
    repeated = [value for value, count in counts.items() if count > 1]
    if repeated:
        raise InfscopeError(
            f"{source} has duplicate ids ({len(repeated)} repeated, e.g. {repeated[0]!r}); ids must be unique, "
            "fix the id column or pass --id-col with a unique column"
        )
    return ids


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_RE.match(value.strip()):
        return int(value.strip())
    return None


def normalize_labels(
    values: list[Any], ids: list[str], source: str, label_names: list[str] | None
) -> tuple[list[int], list[str] | None]:
    """Integer labels plus their names (see the module docstring for the rules)."""
    for value, row_id in zip(values, ids, strict=True):
        if value is None or (isinstance(value, str) and value.strip() == ""):
            raise InfscopeError(f"row {row_id!r} of {source} has no label; fill it in or drop the row")
    as_ints = [_as_int(value) for value in values]
    if all(value is not None for value in as_ints):
        return as_ints, label_names  # type: ignore[return-value]
    strings = [str(value) for value in values]
    names = list(label_names) if label_names else sorted(set(strings))
    index = {name: position for position, name in enumerate(names)}
    unknown = sorted(set(strings) - set(index))
    if unknown:
        raise InfscopeError(
            f"{source} has label(s) {', '.join(map(repr, unknown[:3]))} not among the label names "
            f"{names}; fix the labels or the label names"
        )
    return [index[value] for value in strings], names


def _text_field(record: dict[str, Any], name: str, row_id: str, source: str, optional: bool) -> str:
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        raise InfscopeError(
            f"row {row_id!r} of {source} has no {name!r} value; fill it in or map another {COLUMN_FLAGS[name]}"
        )
    return value if isinstance(value, str) else str(value)


def chat_record(record: dict[str, Any], row_id: str, source: str) -> dict[str, Any]:
    """A chat record with checked ``messages`` and its ``instruction``/``output`` views, or an error.

    Columns ``instruction``/``output`` that the source already has must equal the views (a saved
    infscope chat file has them); a non-empty ``input`` is an error, an empty one is dropped.
    """
    if record.get("messages") is None:
        raise InfscopeError(f"row {row_id!r} of {source} has no messages; fill them in or drop the row")
    turns = check_messages(record["messages"], row_id, source)
    views = dict(zip(("instruction", "output"), chat_views(turns, row_id, source), strict=True))
    for name, view in views.items():
        if record.get(name) is not None and str(record[name]) != view:
            turn = "last user turn" if name == "instruction" else "last assistant turn"
            raise InfscopeError(
                f"row {row_id!r} of {source} has an {name!r} column that differs from its {turn}; "
                f"drop the {name!r} column or make them agree"
            )
    if str(record.get("input") or "") != "":
        raise InfscopeError(
            f"row {row_id!r} of {source} has both messages and a non-empty 'input'; "
            "put the context in the user turn and drop the input column"
        )
    rest = {key: value for key, value in record.items() if key not in ("messages", "input", *views)}
    return {**views, "messages": turns, **rest}


def normalize_records(
    records: list[dict[str, Any]],
    *,
    source: str,
    task: str | None = None,
    columns: ColumnMap | None = None,
    label_names: list[str] | None = None,
) -> tuple[list[dict[str, Any]], str, list[str] | None]:
    """Map columns, detect/check the task, assign ids and clean fields; returns (rows, task, label_names)."""
    if not records:
        raise InfscopeError(f"{source} has no rows; pass a non-empty dataset")
    records = apply_column_map(records, columns, source)
    id_given = columns is not None and columns.id is not None
    chat = "messages" in available_columns(records)
    if chat:
        if task == "classification":
            raise InfscopeError(
                f"{source} holds chat messages, which are instruction rows; use --task instruction"
            )
        ids = assign_ids(records, source, id_given)
        records = [chat_record(record, row_id, source) for record, row_id in zip(records, ids, strict=True)]
    task = detect_task(available_columns(records), task, source)
    if not chat:
        ids = assign_ids(records, source, id_given)
    present = set(available_columns(records))
    text_fields = [
        (name, optional)
        for name, optional in TEXT_FIELDS[task]
        if (name != "text_b" or name in present) and not (chat and name == "input")
    ]
    rows = []
    for record, row_id in zip(records, ids, strict=True):
        row = {"id": row_id}
        for name, optional in text_fields:
            row[name] = _text_field(record, name, row_id, source, optional)
        for key, value in record.items():
            if key not in row:
                row[key] = value
        rows.append(row)
    if task == "classification":
        labels, label_names = normalize_labels([row["label"] for row in rows], ids, source, label_names)
        for row, label in zip(rows, labels, strict=True):
            row["label"] = label
    _classes_to_int(rows)
    return rows, task, label_names


def _classes_to_int(rows: list[dict[str, Any]]) -> None:
    """Make the ``class`` column ints when every filled value is integer-like (blank CSV cells -> None)."""
    values = [row["class"] for row in rows if "class" in row and row["class"] not in (None, "")]
    if not values or any(_as_int(value) is None for value in values):
        return
    for row in rows:
        if "class" in row:
            row["class"] = None if row["class"] in (None, "") else _as_int(row["class"])
