"""The training and validation rows of a fine-tuning run, and where they came from.

``infscope finetune`` and ``infscope score ADAPTER --data ...`` both load data this way, so the run
record describes the source the same way (absolute path, fingerprint, column mapping) and a
classification set with integer labels gets label names (``"0" .. "K-1"``) that size the head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infscope.data.columns import ColumnMap
from infscope.data.loading import load_rows
from infscope.data.splits import split_validation
from infscope.errors import InfscopeError
from infscope.runs import DataSource, absolute_source


@dataclass
class TrainingData:
    """Training rows, query (validation) rows, task, label names and the recorded source."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    task: str
    label_names: list | None
    source: DataSource = field(default_factory=DataSource)


def label_names_for(rows: list[dict[str, Any]], names: list | None) -> list | None:
    """The label names of classification rows: the loaded ones, else ``"0" .. str(max label)``."""
    if names:
        return list(names)
    labels = [int(r["label"]) for r in rows if r.get("label") is not None]
    if not labels:
        raise InfscopeError(
            "the classification rows have no labels; add a label column or map it with --label-col"
        )
    return [str(i) for i in range(max(max(labels) + 1, 2))]


def load_training_data(
    data: str | os.PathLike,
    val: str | os.PathLike | None,
    val_fraction: float,
    seed: int,
    columns: ColumnMap | None = None,
) -> TrainingData:
    """Load ``data`` (and ``val``, else a seeded ``val_fraction`` split of ``data``) for fine-tuning."""
    loaded = load_rows(data, columns=columns)
    if val is not None:
        loaded_val = load_rows(val, task=loaded.task, columns=columns)
        train, val_rows = loaded.rows, loaded_val.rows
        val_fingerprint = loaded_val.fingerprint
    else:
        train, val_rows = split_validation(loaded.rows, val_fraction, seed)
        val_fingerprint = None
    if not val_rows:
        raise InfscopeError("the validation set is empty; pass --val FILE or a --val-fraction above 0")
    names = None
    if loaded.task == "classification":
        names = label_names_for(loaded.rows + (val_rows if val is not None else []), loaded.label_names)
    source = DataSource(
        train=absolute_source(data),
        fingerprint=loaded.fingerprint,
        val=absolute_source(val),
        val_fingerprint=val_fingerprint,
        val_fraction=None if val is not None else val_fraction,
        split_seed=seed,
        columns=columns.mapping() if columns is not None else {},
    )
    return TrainingData(train, val_rows, loaded.task, names, source)


def find_manifest(data: str | os.PathLike, given: str | os.PathLike | None = None) -> Path | None:
    """The manifest of ``data``: ``given`` (must exist), else ``<data stem>.manifest.jsonl`` beside it."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise InfscopeError(f"manifest {path} not found; pass an existing file to --manifest")
        return path.resolve()
    source = Path(os.fspath(data))
    if not source.suffix or not source.exists():
        return None
    candidate = source.with_name(source.name[: -len(source.suffix)] + ".manifest.jsonl")
    return candidate.resolve() if candidate.is_file() else None
