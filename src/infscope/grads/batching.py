"""Turn encoded rows (or ready batches) into padded tensor batches for the gradient engine.

The gradient code accepts what earlier stages produce without depending on their classes:

- *columns*: a mapping ``{name: tensor (n, ...) | list of per-row sequences | list of scalars}``,
  an object with such attributes (e.g. ``models.encode.Encoded``) or a ``datasets.Dataset``;
- *rows*: a list of dicts, one per example;
- *batches*: an iterator (or list) of ``dict[str, Tensor]`` that are already padded, used as-is.

Columns and rows are addressable by position, so they can be cut at shard boundaries and skipped
on resume. Per-row sequences are right-padded per batch (``labels`` with -100, ``attention_mask``
with 0, ``input_ids`` with the pad id, anything else with 0) and columns that are padding in every
row of a batch are trimmed, so short batches cost less. An ``ids``/``id`` column gives row ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError

PAD_VALUES = {"labels": -100, "attention_mask": 0}
_ID_KEYS = ("ids", "id")


def _is_batch(item: Any) -> bool:
    if not isinstance(item, Mapping):
        return False
    for key in ("input_ids", "inputs"):
        value = item.get(key)
        if isinstance(value, torch.Tensor):
            return value.ndim >= 2
    return False


def _columns_of(data: Any) -> dict[str, Any] | None:
    """The columns of ``data`` if it is addressable by row, else ``None`` (an iterable of batches)."""
    if isinstance(data, Mapping):
        return dict(data)
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # datasets.Dataset
        return {name: data[name] for name in data.column_names}
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        columns = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
        if "attention_mask" not in columns and hasattr(data, "attention_mask"):  # a property of Encoded
            columns["attention_mask"] = data.attention_mask
        return columns
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping) and not _is_batch(data[0]):
        return {key: [row[key] for row in data] for key in data[0]}
    if hasattr(data, "input_ids") or hasattr(data, "inputs"):
        return {k: v for k, v in vars(data).items() if not k.startswith("_")}
    return None


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value))


class RowSource:
    """Encoded examples addressable by position; :meth:`batch` pads a slice of rows."""

    def __init__(self, columns: Mapping[str, Any], ids: Sequence[str] | None = None, pad_id: int = 0) -> None:
        columns = dict(columns)
        id_column = next((columns.pop(k) for k in _ID_KEYS if k in columns), None)
        self.pad_id = int(columns.pop("pad_token_id", pad_id) or 0)
        self.columns = {k: v for k, v in columns.items() if self._usable(v)}
        ragged = self.columns.get("input_ids")
        if "attention_mask" not in self.columns and isinstance(ragged, Sequence):  # unpadded rows: all real
            self.columns["attention_mask"] = [[1] * len(seq) for seq in ragged]
        lengths = {k: len(v) for k, v in self.columns.items()}
        if not lengths:
            raise InfscopeError("encoded data has no tensor columns; pass input_ids/labels or inputs/labels")
        if len(set(lengths.values())) != 1:
            raise InfscopeError(f"encoded columns have different lengths {lengths}; re-encode the rows")
        self.n = next(iter(lengths.values()))
        chosen = ids if ids is not None else id_column
        self.ids = [str(i) for i in chosen] if chosen is not None else [str(i) for i in range(self.n)]
        if len(self.ids) != self.n:
            raise InfscopeError(f"got {len(self.ids)} ids for {self.n} rows; pass one id per row")

    @staticmethod
    def _usable(value: Any) -> bool:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return True
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0:
            first = value[0]
            return isinstance(first, (int, float, np.number, torch.Tensor, np.ndarray, list, tuple))
        return False

    def _column(self, key: str, value: Any, start: int, stop: int) -> torch.Tensor:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return _to_tensor(value[start:stop])
        items = [_to_tensor(v) for v in value[start:stop]]
        if items[0].ndim == 0:
            return torch.stack(items)
        width = max(int(t.shape[0]) for t in items)
        pad = PAD_VALUES.get(key, self.pad_id if key == "input_ids" else 0)
        out = torch.full((len(items), width, *items[0].shape[1:]), pad, dtype=items[0].dtype)
        for row, item in enumerate(items):  # collation of a handful of rows, not a hot path
            out[row, : item.shape[0]] = item
        return out

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows ``start:stop`` as padded tensors, with all-padding trailing columns removed."""
        batch = {k: self._column(k, v, start, stop) for k, v in self.columns.items()}
        mask = batch.get("attention_mask")
        if mask is not None and mask.ndim == 2 and mask.shape[1] > 0:
            used = torch.nonzero(mask.any(dim=0)).flatten()
            width = int(used.max()) + 1 if used.numel() else 1
            if width < mask.shape[1]:
                length = mask.shape[1]
                batch = {
                    k: v[:, :width] if v.ndim >= 2 and v.shape[1] == length else v for k, v in batch.items()
                }
        return batch


def as_row_source(data: Any, ids: Sequence[str] | None = None) -> RowSource | None:
    """A :class:`RowSource` for column/row data, ``None`` for an iterable of ready batches."""
    if isinstance(data, RowSource):
        return data
    columns = _columns_of(data)
    return None if columns is None else RowSource(columns, ids=ids)


def batch_bounds(n: int, batch_size: int, breaks: Iterable[int] = ()) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of at most ``batch_size`` rows that never cross ``breaks``."""
    if batch_size < 1:
        raise InfscopeError(f"batch_size must be >= 1, got {batch_size}")
    cuts = sorted({0, n, *(b for b in breaks if 0 < b < n)})
    bounds = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        bounds.extend((s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size))
    return bounds


def batch_rows(batch: Mapping[str, Any]) -> int:
    """Number of rows in a ready batch (leading dimension of its tensors)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    raise InfscopeError("batch holds no tensors; each batch must be a dict of (b, ...) tensors")


def iter_ready_batches(batches: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(start, stop, batch)`` for an iterable of ready batches, counting rows as they come."""
    start = 0
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise InfscopeError(
                f"expected dict batches, got {type(batch).__name__}; pass encoded rows or dicts"
            )
        stop = start + batch_rows(batch)
        yield start, stop, dict(batch)
        start = stop
