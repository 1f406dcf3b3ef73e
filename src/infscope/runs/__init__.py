"""The run model: one typed record, one named layout, atomic files, per-stage measurement.

Every command that reads or writes a run directory goes through this package:
:class:`RunRecord` (what the run is), :class:`RunLayout` (where each artifact lives),
:class:`RunDir` (the guarded directory with its stages) and :mod:`infscope.runs.io` (atomic writes,
JSON and JSONL). Assembling rows, checkpoints and models from a run is
:func:`infscope.scoring.run.open_run`, one layer down, because it needs the data and model layers.
"""

from infscope.runs.directory import RunDir, changed_args, same_args
from infscope.runs.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    ensure_writable_dir,
    file_fingerprint,
    json_default,
    json_lenient_default,
    json_line,
    parse_jsonl,
    read_json,
    read_jsonl,
)
from infscope.runs.layout import RUN_FILE, RunLayout, checkpoint_tag
from infscope.runs.measure import PeakMemory, StageRecord, package_versions
from infscope.runs.record import DataSource, ExternalAdapter, ModelSpec, RunRecord, absolute_source

__all__ = [
    "RUN_FILE",
    "DataSource",
    "ExternalAdapter",
    "ModelSpec",
    "PeakMemory",
    "RunDir",
    "RunLayout",
    "RunRecord",
    "StageRecord",
    "absolute_source",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "changed_args",
    "checkpoint_tag",
    "ensure_writable_dir",
    "file_fingerprint",
    "json_default",
    "json_lenient_default",
    "json_line",
    "package_versions",
    "parse_jsonl",
    "read_json",
    "read_jsonl",
    "same_args",
]
