"""One entry point to load a dataset from anywhere: :func:`load_rows`.

Sources, tried in this order: ``builtin:NAME`` (a built-in generator), an existing file or saved
``datasets`` folder, then a Hub name (``tatsu-lab/alpaca``, ``glue/sst2``, ``glue/mrpc``,
``gsm8k``, or any ``owner/name``) through the local cache of :mod:`infscope.data.hub`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscope.data.columns import ColumnMap
from infscope.data.normalize import normalize_records
from infscope.data.readers import (
    RawData,
    class_label_names,
    dataset_to_records,
    is_hf_disk_dir,
    read_file,
    read_hf_disk,
    rows_fingerprint,
)
from infscope.errors import InfscopeError

BUILTIN_PREFIX = "builtin:"


@dataclass
class LoadedData:
    """Normalised rows plus where they came from.

    ``rows`` are dicts with a unique string ``id``; ``task`` is ``"instruction"`` or
    ``"classification"``; ``format`` is one of ``json, jsonl, csv, parquet, hf_disk, hub, builtin``;
    ``fingerprint`` is the SHA-256 (16 hex digits) of the file bytes, or of the canonical rows for
    folders, Hub and built-in data; ``label_names`` is the label (or built-in class) order, if known.
    """

    rows: list[dict[str, Any]]
    task: str
    source: str
    format: str
    fingerprint: str
    label_names: list[str] | None = None

    @property
    def columns(self) -> list[str]:
        """Union of the rows' keys in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def __len__(self) -> int:
        return len(self.rows)


def _read_builtin(name: str, split: str) -> tuple[RawData, str]:
    from infscope.data.builtin import make_builtin

    if split not in ("train", "test"):
        raise InfscopeError(
            f"built-in datasets have splits train and test, not {split!r}; pass --split train or test"
        )
    built = make_builtin(name)
    records = built.train if split == "train" else built.test
    return RawData(records, "builtin", rows_fingerprint(records), built.label_names), built.task


def _read_hub(
    name: str, split: str, limit: int | None, cache_dir: str | os.PathLike | None
) -> tuple[RawData, str | None, ColumnMap]:
    from infscope.data.hub import HUB_DATASETS, load_hub

    dataset = load_hub(name, split, cache_dir)
    spec = HUB_DATASETS.get(name)
    records = dataset_to_records(dataset, limit)
    raw = RawData(records, "hub", rows_fingerprint(records), class_label_names(dataset))
    return raw, (spec.task if spec else None), (spec.columns if spec else ColumnMap())


def _missing_source(source: str) -> InfscopeError:
    from infscope.data.builtin import BUILTIN_DATASETS
    from infscope.data.hub import HUB_DATASETS

    return InfscopeError(
        f"data source {source!r} not found; pass an existing JSON/JSONL/CSV/Parquet file or save_to_disk folder, "
        f"builtin:NAME ({', '.join(BUILTIN_DATASETS)}) or a Hub name ({', '.join(HUB_DATASETS)})"
    )


def load_rows(
    source: str | os.PathLike,
    *,
    task: str | None = None,
    columns: ColumnMap | None = None,
    split: str = "train",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedData:
    """Load ``source`` and normalise it (columns, task, ids, labels); see :class:`LoadedData`.

    ``columns`` maps source columns onto canonical fields (flags win over a Hub dataset's own
    mapping); ``split`` picks a split of a DatasetDict, a Hub dataset or a built-in (train/test);
    ``limit`` keeps the first rows; ``cache_dir`` overrides the Hub cache folder.
    """
    if limit is not None and limit < 1:
        raise InfscopeError(f"--limit must be at least 1, got {limit}")
    text = os.fspath(source)
    default_task: str | None = None
    base_columns = ColumnMap()
    path = Path(text).expanduser()
    if text.startswith(BUILTIN_PREFIX):
        raw, default_task = _read_builtin(text[len(BUILTIN_PREFIX) :], split)
    elif path.is_dir():
        if not is_hf_disk_dir(path):
            raise InfscopeError(
                f"{path} is a folder but not a saved datasets folder; pass a data file or a save_to_disk folder"
            )
        raw = read_hf_disk(path, split, limit)
    elif path.exists():
        raw = read_file(path)
    else:
        from infscope.data.hub import looks_like_hub_name

        if not looks_like_hub_name(text):
            raise _missing_source(text)
        raw, default_task, base_columns = _read_hub(text, split, limit, cache_dir)
    records = raw.records[:limit] if limit is not None else raw.records
    rows, task, label_names = normalize_records(
        records,
        source=text,
        task=task or default_task,
        columns=base_columns.merged(columns),
        label_names=raw.label_names,
    )
    return LoadedData(rows, task, text, raw.format, raw.fingerprint, label_names)
