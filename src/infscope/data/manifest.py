"""The noise manifest: which training rows are known to be bad, and (when known) how they were corrupted.

The manifest is the only source of truth for evaluation (never recover noise by diffing rows), so
its schema lives here in ``data`` where both ``noise`` (writer) and ``evaluate`` (reader) can use it
without importing each other.

Manifest formats
----------------

``infscope noise`` and ``infscope demo`` write one JSON object per row with every field of
:data:`MANIFEST_FIELDS`, keys in that order followed by any extra keys in sorted order, so equal
records give equal bytes (:func:`write_manifest` insists on every field).

Reading (:func:`read_manifest`, ``--manifest`` of ``infscope finetune`` / ``evaluate``) also accepts
a user's own list of known-bad rows, in any of three forms:

* **JSONL**, one object per line: ``{"id": "r17", "is_noisy": true}``. Only ``id`` is required;
  ``is_noisy`` (``true``/``false``, ``1``/``0``) defaults to true when no line has it (a list of bad
  rows), but must then be on every line if any line has it.
* **JSON array** of the same objects: ``[{"id": "r17", "is_noisy": true}, ...]``.
* **Plain text**, one noisy id per line (blank lines are skipped)::

      r17
      r42

The other fields are optional: ``family``, ``operator``, ``field``, ``original`` and ``noisy``
default to empty, ``label_changed`` to false, ``severity`` to 0 for clean rows (empty for noisy
ones), ``seed`` to empty. Per-family and per-operator tables appear only for rows that name a
family or operator. Training rows the manifest does not list count as clean, and listed ids that
are not training rows (for example rows that went to the validation split) are left out:
:func:`manifest_for_ids` lines a manifest up with the training ids this way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.runs.io import atomic_write_text, json_default, parse_jsonl

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
#: Optional fields that are plain "unknown" when absent (``severity`` is handled on its own).
_EMPTY_FIELDS = ("family", "operator", "field", "original", "noisy", "seed")
#: ``DataFrame.attrs`` key of :func:`manifest_for_ids`: listed ids that are not training rows.
NOT_IN_TRAINING = "not_in_training"


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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InfscopeError(
            f"manifest {path} not found; pass the manifest.jsonl written by `infscope noise` "
            "or a file of known-bad ids"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InfscopeError(f"cannot read manifest {path} ({exc}); check the path and permissions") from None


def _parse_records(text: str, path: Path) -> list[dict[str, Any]]:
    """Records of any accepted form: JSONL objects, a JSON array of objects, or ids one a line."""
    start = text.lstrip()[:1]
    if start == "{":
        return parse_jsonl(text, f"manifest {path}", "fix or regenerate the manifest")
    if start == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InfscopeError(
                f"manifest {path} starts like a JSON array but is not valid JSON ({exc.msg}, line "
                f"{exc.lineno}); fix it or give one id per line"
            ) from None
        bad = next((i for i, r in enumerate(records, start=1) if not isinstance(r, dict)), None)
        if bad is not None:
            raise InfscopeError(
                f"item {bad} of manifest {path} is not an object; give objects like "
                '{"id": "r1", "is_noisy": true}'
            )
        return records
    ids = [line.strip() for line in text.split("\n") if line.strip()]
    return [{"id": row_id, "is_noisy": True} for row_id in ids]


def _as_bool(series: pd.Series, name: str, path: Path) -> pd.Series:
    allowed = {True: True, False: False, "true": True, "false": False}  # 1 and 0 equal True and False
    try:
        values = [allowed[v.lower() if isinstance(v, str) else v] for v in series.tolist()]
    except (KeyError, TypeError):
        raise InfscopeError(
            f"column {name!r} of manifest {path} must hold true/false values; fix or regenerate the manifest"
        ) from None
    return pd.Series(values, index=series.index, dtype=bool)


def empty_manifest() -> pd.DataFrame:
    """A manifest with no rows (every column of :data:`MANIFEST_FIELDS`, the usual dtypes)."""
    return pd.DataFrame(
        {name: pd.Series(dtype=bool if name in _BOOL_FIELDS else object) for name in MANIFEST_FIELDS}
    )


def _check_required(records: list[dict[str, Any]], path: Path) -> None:
    """Every record has an ``id``; ``is_noisy`` is on every record or on none."""
    for field in ("id", "is_noisy"):
        has = np.array([field in record for record in records])
        if field == "is_noisy" and not has.any():
            continue
        if not has.all():
            number = int(np.flatnonzero(~has)[0]) + 1
            raise InfscopeError(
                f"record {number} of manifest {path} lacks {field!r}; give every record an id "
                "and, if any has is_noisy, every one"
            )


def read_manifest(path: str | os.PathLike, *, train_ids: Sequence[Any] | None = None) -> pd.DataFrame:
    """Read a manifest in any accepted form (see the module docstring) into a DataFrame.

    Columns come in :data:`MANIFEST_FIELDS` order, then extras; ``id`` is ``str``, ``is_noisy`` and
    ``label_changed`` are ``bool``; absent optional fields are filled (empty, false, severity 0 for
    clean rows). Ids must be unique. With ``train_ids`` the result is lined up with them by
    :func:`manifest_for_ids` (unlisted rows clean, other ids left out). Problems raise
    :class:`InfscopeError` naming the line, record or column.
    """
    path = Path(path)
    records = _parse_records(_read_text(path), path)
    if not records:
        frame = empty_manifest()
        return frame if train_ids is None else manifest_for_ids(frame, train_ids)
    _check_required(records, path)
    columns = list(MANIFEST_FIELDS) + sorted({key for rec in records for key in rec} - set(MANIFEST_FIELDS))
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["id"] = frame["id"].astype(str)
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise InfscopeError(
            f"manifest {path} repeats id {duplicated.iloc[0]!r} ({len(duplicated)} duplicates); ids must be unique"
        )
    given = set().union(*records)
    frame["is_noisy"] = _as_bool(frame["is_noisy"], "is_noisy", path) if "is_noisy" in given else True
    changed = frame["label_changed"].astype(object)
    frame["label_changed"] = _as_bool(changed.where(changed.notna(), False), "label_changed", path)
    frame = _fill_optional(frame)
    return frame if train_ids is None else manifest_for_ids(frame, train_ids)


def _fill_optional(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing text fields become ``None``; a clean row without a severity gets 0.0 (noisy: NaN)."""
    for name in _EMPTY_FIELDS:
        column = frame[name].astype(object)
        frame[name] = column.where(column.notna(), None)
    severity = frame["severity"]
    frame["severity"] = severity.mask(severity.isna() & ~frame["is_noisy"], 0.0)
    return frame


def manifest_for_ids(frame: pd.DataFrame | None, train_ids: Sequence[Any]) -> pd.DataFrame:
    """``frame`` with exactly one row per training id, in ``train_ids`` order.

    Training rows the manifest does not list are clean (``is_noisy`` false, ``label_changed``
    false, severity 0, other fields empty), so a short list of known-bad ids is a whole manifest.
    Listed ids that are not training rows (rows of the validation split, say) are left out; their
    number is kept in ``result.attrs["not_in_training"]``. A non-empty manifest sharing no id with
    the training rows is refused: it belongs to other data. ``frame=None`` means every row is clean.
    """
    ids = pd.Index(pd.Series(list(train_ids), dtype=object).astype(str), name="id")
    if ids.has_duplicates:
        raise InfscopeError(f"training ids repeat ({ids[ids.duplicated()][0]!r}); give each row a unique id")
    frame = empty_manifest() if frame is None else frame
    for name in ("id", "is_noisy"):
        if name not in frame.columns:
            raise InfscopeError(
                f"manifest lacks column {name!r}; read it with infscope.data.manifest.read_manifest"
            )
    listed = pd.Index(frame["id"].astype(str))
    known = listed.isin(ids)
    if len(listed) and not known.any():
        raise InfscopeError(
            f"none of the {len(listed)} manifest ids is a training row id (first: {listed[0]!r}); "
            "pass the manifest of the data this run was tuned on"
        )
    indexed = frame.assign(id=listed).set_index("id")
    out = indexed.reindex(ids)
    added = ~ids.isin(listed)
    fills: dict[str, Any] = {"is_noisy": False, "label_changed": False, "severity": 0.0}
    for name in out.columns:
        if name in fills:
            out[name] = out[name].mask(added, fills[name])
        else:
            out[name] = out[name].astype(object).where(~added, None)
    out = out.reset_index()
    for name in _BOOL_FIELDS:
        if name in out.columns:
            out[name] = out[name].astype(bool)
    for name in MANIFEST_FIELDS:
        if name not in out.columns:
            out[name] = fills.get(name)
    extras = [c for c in out.columns if c not in MANIFEST_FIELDS]
    out = out[[*MANIFEST_FIELDS, *extras]]
    out.attrs[NOT_IN_TRAINING] = int((~known).sum())
    return out
