"""Scores: what every estimator and baseline returns, under one sign convention.

**Higher = more harmful** to the query loss. A positive score means that giving the training example
more weight would raise the query (validation) loss, so the example is a candidate for removal.
Helpers rank ids (:meth:`Scores.harmful`, :meth:`Scores.helpful`) so nobody negates by hand.

A :class:`Scores` holds either one value per training example (``(n_train,)``: the noise-detection
mode, scored against the mean query gradient) or a matrix ``(n_query, n_train)`` (the attribution
mode). It saves to a single ``.npz`` file with the metadata embedded as JSON, written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.runs.io import atomic_path, json_lenient_default

SIGN = "higher = more harmful to the query loss"
DEFAULT_FLAG_FRACTION = 0.1
TABLE_FORMATS = (".parquet", ".csv", ".jsonl")


@dataclass(eq=False)
class Scores:
    """Influence or data-value scores of training examples (higher = more harmful).

    ``values`` is ``(n_train,)`` or ``(n_query, n_train)``; ``train_ids`` name the columns and
    ``query_ids`` the rows of a matrix (for a vector they record which queries were averaged).
    ``meta`` is JSON-serialisable: method parameters, damping per block, timings, warnings.
    """

    values: np.ndarray
    train_ids: list[str]
    query_ids: list[str] | None = None
    method: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.train_ids = [str(i) for i in self.train_ids]
        if self.query_ids is not None:
            self.query_ids = [str(i) for i in self.query_ids]
        if self.values.ndim not in (1, 2) or self.values.shape[-1] != len(self.train_ids):
            raise ValueError(
                f"scores of shape {self.values.shape} do not match {len(self.train_ids)} train ids"
            )
        if self.values.ndim == 2 and (self.query_ids is None or len(self.query_ids) != self.values.shape[0]):
            raise ValueError(
                f"a ({self.values.shape[0]}, n) score matrix needs {self.values.shape[0]} query ids"
            )
        self.meta.setdefault("sign", SIGN)

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def is_matrix(self) -> bool:
        return self.values.ndim == 2

    def vector(self) -> np.ndarray:
        """One score per training example: the values, or their mean over queries for a matrix."""
        return self.values.mean(axis=0) if self.is_matrix else self.values.copy()

    def _order(self, descending: bool) -> np.ndarray:
        """Positions sorted by score; non-finite scores last; ties keep input order."""
        v = self.vector()
        key = np.where(np.isfinite(v), -v if descending else v, np.inf)
        return np.argsort(key, kind="stable")

    def harmful(self, k: int | None = None) -> list[str]:
        """Ids from most to least harmful (the ``k`` most harmful if given)."""
        order = self._order(descending=True)
        return [self.train_ids[i] for i in order[:k]]

    def helpful(self, k: int | None = None) -> list[str]:
        """Ids from most to least helpful (the ``k`` most helpful if given)."""
        order = self._order(descending=False)
        return [self.train_ids[i] for i in order[:k]]

    def ranks(self) -> np.ndarray:
        """Rank of each training example in input order (1 = most harmful)."""
        ranks = np.empty(self.n_train, dtype=np.int64)
        ranks[self._order(descending=True)] = np.arange(1, self.n_train + 1)
        return ranks

    def to_frame(self, k: int | None = None, *, fraction: float = DEFAULT_FLAG_FRACTION) -> pd.DataFrame:
        """A table in input order: ``id, score, rank`` (1 = most harmful) and ``is_flagged`` (top ``k``).

        ``k`` defaults to ``fraction`` of the training set (10 %, at least one example).
        """
        n = self.n_train
        if k is None:
            if not 0.0 <= fraction <= 1.0:
                raise InfscopeError(f"flag fraction {fraction} is outside [0, 1]; pass a fraction like 0.1")
            k = max(1, int(math.ceil(fraction * n - 1e-9))) if n else 0
        if k < 0:
            raise InfscopeError(f"cannot flag {k} examples; pass k >= 0")
        ranks = self.ranks()
        return pd.DataFrame(
            {"id": self.train_ids, "score": self.vector(), "rank": ranks, "is_flagged": ranks <= k}
        )

    def write_table(self, path: str | os.PathLike, k: int | None = None) -> Path:
        """Write :meth:`to_frame` as Parquet, CSV or JSONL (chosen by suffix), atomically."""
        return write_table(self.to_frame(k), path)

    def save(self, path: str | os.PathLike) -> Path:
        """Save values, ids and metadata to one ``.npz`` file (metadata embedded as JSON), atomically."""
        target = Path(path)
        if target.suffix != ".npz":
            target = target.with_name(target.name + ".npz")
        payload = {
            "values": self.values,
            "train_ids": np.asarray(self.train_ids, dtype=np.str_),
            "method": np.asarray(self.method),
            "meta_json": np.asarray(json.dumps(self.meta, sort_keys=True, default=json_lenient_default)),
        }
        if self.query_ids is not None:
            payload["query_ids"] = np.asarray(self.query_ids, dtype=np.str_)
        try:
            with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **payload)
        except OSError as exc:
            raise InfscopeError(
                f"cannot write scores to {target} ({exc.strerror or exc}); pass a writable path"
            ) from None
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read scores written by :meth:`save`."""
        source = Path(path)
        if not source.exists() and source.with_name(source.name + ".npz").exists():
            source = source.with_name(source.name + ".npz")
        try:
            with np.load(source, allow_pickle=False) as data:
                query_ids = data["query_ids"].tolist() if "query_ids" in data.files else None
                return cls(
                    values=data["values"],
                    train_ids=data["train_ids"].tolist(),
                    query_ids=query_ids,
                    method=str(data["method"]),
                    meta=json.loads(str(data["meta_json"])),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise InfscopeError(
                f"cannot read scores from {source} ({exc}); pass a file written by Scores.save"
            ) from None


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a results table atomically; the format follows the suffix (.parquet, .csv, .jsonl)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise InfscopeError(
            f"unknown table format {suffix!r} for {target}; use one of {', '.join(TABLE_FORMATS)}"
        )
    try:
        with atomic_path(target) as tmp:
            if suffix == ".parquet":
                frame.to_parquet(tmp, index=False)
            elif suffix == ".csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.to_json(tmp, orient="records", lines=True)
    except OSError as exc:
        raise InfscopeError(
            f"cannot write table to {target} ({exc.strerror or exc}); pass a writable path"
        ) from None
    return target


def results_table(scores: Sequence[Scores] | Mapping[str, Scores]) -> pd.DataFrame:
    """One row per training id with ``score_<name>`` and ``rank_<name>`` for several score sets.

    All score sets must cover the same training ids (in any order); names are the mapping keys or
    each score set's ``method``.
    """
    items = list(scores.items()) if isinstance(scores, Mapping) else [(s.method, s) for s in scores]
    if not items:
        raise InfscopeError("no scores given for the results table; pass at least one Scores")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise InfscopeError(f"duplicate score names {names}; pass a mapping with distinct names")
    ids = items[0][1].train_ids
    table = pd.DataFrame({"id": ids})
    for name, item in items:
        if sorted(item.train_ids) != sorted(ids):
            raise InfscopeError(
                f"scores {name!r} cover other training ids than {names[0]!r}; score the same set"
            )
        frame = item.to_frame().set_index("id").reindex(ids)
        table[f"score_{name}"] = frame["score"].to_numpy()
        table[f"rank_{name}"] = frame["rank"].to_numpy()
    return table
