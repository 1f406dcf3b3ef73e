"""Column mapping: which source column feeds which canonical field.

Canonical fields are ``instruction, input, output`` (instruction task), ``messages`` (chat rows,
also the instruction task), ``text, text_b, label`` (classification) and ``id``. Every field has a
CLI flag (``--output-col`` ...) and error messages name that flag, so a user who sees "missing
column" knows how to fix it. The CLI helper :func:`column_map_from_options` lives here so that
every command (data, noise, ...) shares it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from infscope.errors import InfscopeError

#: The CLI flag that maps each canonical field.
COLUMN_FLAGS: dict[str, str] = {
    "instruction": "--instruction-col",
    "input": "--input-col",
    "output": "--output-col",
    "text": "--text-col",
    "text_b": "--text-b-col",
    "label": "--label-col",
    "id": "--id-col",
    "messages": "--messages-col",
}


@dataclass(frozen=True)
class ColumnMap:
    """Source column name for each canonical field; ``None`` keeps the canonical name."""

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    text: str | None = None
    text_b: str | None = None
    label: str | None = None
    id: str | None = None
    messages: str | None = None

    def mapping(self) -> dict[str, str]:
        """``{canonical: source}`` for the fields that are mapped to another column."""
        return {
            name: source for name, source in asdict(self).items() if source is not None and source != name
        }

    def merged(self, other: ColumnMap | None) -> ColumnMap:
        """This map with the fields set in ``other`` taking precedence."""
        if other is None:
            return self
        values = {f.name: getattr(other, f.name) or getattr(self, f.name) for f in fields(self)}
        return ColumnMap(**values)


def column_map_from_options(
    instruction_col: str | None = None,
    input_col: str | None = None,
    output_col: str | None = None,
    text_col: str | None = None,
    text_b_col: str | None = None,
    label_col: str | None = None,
    id_col: str | None = None,
    messages_col: str | None = None,
) -> ColumnMap | None:
    """Build a :class:`ColumnMap` from CLI flags; ``None`` when no flag was given."""
    options = {
        "instruction": instruction_col,
        "input": input_col,
        "output": output_col,
        "text": text_col,
        "text_b": text_b_col,
        "label": label_col,
        "id": id_col,
        "messages": messages_col,
    }
    if all(value is None for value in options.values()):
        return None
    return ColumnMap(**options)


def apply_column_map(
    records: list[dict[str, Any]], columns: ColumnMap | None, source: str
) -> list[dict[str, Any]]:
    """Rename mapped source columns to their canonical names (the mapped column wins a clash).

    A mapped column absent from every record is an error naming the flag and the columns found.
    """
    if columns is None or not columns.mapping():
        return records
    present = available_columns(records)
    mapping = columns.mapping()
    for name, src in mapping.items():
        if src not in present:
            raise InfscopeError(
                f"column {src!r} given by {COLUMN_FLAGS[name]} is not in {source} "
                f"(columns: {', '.join(present) or 'none'}); pass an existing column name"
            )
    renamed = {src: name for name, src in mapping.items()}
    replaced = set(mapping) - set(renamed)
    out = []
    for record in records:
        new = {key: value for key, value in record.items() if key not in replaced}
        new = {renamed.get(key, key): value for key, value in new.items()}
        out.append(new)
    return out


def available_columns(records: list[Mapping[str, Any]]) -> list[str]:
    """Union of the records' keys in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)
