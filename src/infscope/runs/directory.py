"""A run directory guarded by the record that made it, with per-stage time and memory.

:meth:`RunDir.create` writes ``run.json`` once. Reopening a run with other guarded arguments is
refused with one line naming the field that differs, unless ``overwrite`` clears it. Stages are
timed with :meth:`RunDir.stage`; :meth:`RunDir.done` tells whether one already finished, so an
interrupted command resumes where it stopped. :meth:`RunDir.open` reads an existing run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError
from infscope.runs.io import atomic_write_json, ensure_writable_dir, read_json
from infscope.runs.layout import RunLayout
from infscope.runs.measure import PeakMemory, StageRecord, package_versions
from infscope.runs.record import RunRecord


def _plain(obj: Any) -> Any:
    """``obj`` as plain JSON values (what ``run.json`` will hold), so comparisons see the same types."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def changed_args(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key one side lacks counts as ``None`` there.

    Options added in a later version default to ``None``, so runs recorded before they existed
    still match the same command.
    """
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def same_args(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when two recorded argument sets describe the same run (see :func:`changed_args`)."""
    return not changed_args(old, new)


def _describe_change(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        inner = changed_args(old, new)
        if inner:
            return _describe_change(f"{key}.{inner[0]}", old.get(inner[0]), new.get(inner[0]))
    return f"{key} was {old!r}, now {new!r}"


class RunDir:
    """One run directory: its layout, its record and the stages that finished."""

    def __init__(self, layout: RunLayout, record: RunRecord) -> None:
        self.layout = layout
        self.record = record

    @property
    def path(self) -> Path:
        return self.layout.root

    @classmethod
    def create(cls, path: str | os.PathLike, record: RunRecord, *, overwrite: bool = False) -> RunDir:
        """Start a run (or reopen the same one) at ``path``.

        An existing run whose guarded ``args`` differ is refused naming the first field that
        differs, unless ``overwrite`` (which removes it first).
        """
        layout = RunLayout(path)
        record.args = _plain(record.args)
        if layout.record.exists():
            existing = cls.open(path)
            changed = changed_args(existing.record.args, record.args)
            if not changed:
                return existing
            if not overwrite:
                key = changed[0]
                detail = _describe_change(key, existing.record.args.get(key), record.args.get(key))
                raise InfscopeError(
                    f"run directory {layout.root} was made with other arguments ({detail}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            shutil.rmtree(layout.root)
        ensure_writable_dir(layout.root)
        record.versions = record.versions or package_versions()
        record.created = record.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run = cls(layout, record)
        run.save()
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """An existing run; one line saying how to make one when ``path`` is not a run directory."""
        layout = RunLayout(path)
        if not layout.record.is_file():
            raise InfscopeError(
                f"{layout.root} is not a run directory (no run.json); make one with `infscope finetune` "
                "or `infscope demo`, or pass an adapter folder with --data to `infscope score`"
            )
        data = read_json(layout.record)
        if not isinstance(data, dict) or "args" not in data and "kind" not in data:
            raise InfscopeError(f"{layout.record} is not an infscope run record; choose another directory")
        return cls(layout, RunRecord.from_dict(data))

    def save(self) -> None:
        """Write the record to ``run.json`` atomically."""
        atomic_write_json(self.layout.record, self.record.to_dict())

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier call."""
        return stage in self.record.stages

    def stage_info(self, stage: str) -> dict[str, Any]:
        """The info a finished stage recorded (empty if it did not finish)."""
        return self.record.stages.get(stage, {}).get("info", {})

    def forget(self, stage: str) -> None:
        """Mark ``stage`` as not done (its artifacts will be made again)."""
        if self.record.stages.pop(stage, None) is not None:
            self.save()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Time a stage and record its peak memory; the record is saved only if the stage succeeds."""
        rec = StageRecord(name=name, seconds=0.0, peak_rss_mb=0.0)
        start = time.perf_counter()
        with PeakMemory() as mem:
            yield rec
        rec.seconds = time.perf_counter() - start
        rec.peak_rss_mb = mem.peak_rss / 2**20
        rec.peak_cuda_mb = mem.peak_cuda / 2**20
        order = 1 + max((int(v.get("order", 0)) for v in self.record.stages.values()), default=0)
        self.record.stages[name] = {
            "order": order,
            "seconds": round(rec.seconds, 3),
            "peak_rss_mb": round(rec.peak_rss_mb, 1),
            "peak_cuda_mb": round(rec.peak_cuda_mb, 1),
            "info": _plain(rec.info),
        }
        self.save()

    def stages(self) -> dict[str, dict[str, Any]]:
        """All finished stages with their time, peak memory and info, in the order they finished."""
        return dict(sorted(self.record.stages.items(), key=lambda item: int(item[1].get("order", 0))))
