"""The run record: one typed description of a run, written once to ``run.json``.

Every kind of run (``infscope demo``, ``finetune``, ``bench``, or adapters made by another trainer
and scored with ``infscope score``) writes the same record: where the data came from and its
fingerprint, the task and label names, how to rebuild the model and encode rows
(:class:`ModelSpec`), the fine-tuning settings, the external adapter if any, and the manifest.
Commands never re-derive a path or a default from the arguments: they ask the record.

Records written before this schema (two older ``run.json`` shapes) are upgraded on reading by
:func:`upgrade_record`, so runs made by earlier versions still open.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA = 2
KINDS = ("demo", "finetune", "external", "bench")


def _known(cls: type, data: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``cls`` (newer keys are ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (data or {}).items() if k in names}


def absolute_source(source: str | os.PathLike | None) -> str | None:
    """An absolute path for a local file or folder; built-in and Hub names unchanged."""
    if source is None:
        return None
    text = os.fspath(source)
    if text.startswith("builtin:") or not Path(text).exists():
        return text
    return str(Path(text).resolve())


@dataclass
class DataSource:
    """Where the training and validation rows came from.

    The rows a run trained on are also saved inside the run (``data/train.jsonl``,
    ``data/val.jsonl``), so a moved or edited source never changes what is scored; the path and
    fingerprint here say what the user gave and let commands report when it changed since.
    """

    train: str | None = None
    fingerprint: str | None = None
    val: str | None = None
    val_fingerprint: str | None = None
    val_fraction: float | None = None
    split_seed: int = 0
    columns: dict[str, str] = field(default_factory=dict)
    builtin: dict[str, Any] | None = None


@dataclass
class ModelSpec:
    """How to rebuild the base model and encode rows exactly as during fine-tuning.

    ``task`` is ``instruction`` or ``classification``; :attr:`model_task` is the model family
    (``causal`` or ``classification``). Loading lives in :func:`infscope.models.registry.load_spec`.
    """

    name: str
    task: str = "instruction"
    label_names: list | None = None
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    response_only: bool = True

    @property
    def model_task(self) -> str:
        return "classification" if self.task == "classification" else "causal"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**_known(cls, data))


@dataclass
class ExternalAdapter:
    """Adapters trained elsewhere: a peft adapter folder or a ``Trainer`` output folder."""

    path: str
    kind: str  # "adapter" or "trainer"


@dataclass
class RunRecord:
    """Everything a run depends on, plus versions, creation time and finished stages.

    ``args`` are the guarded arguments: reopening a run with other ``args`` is refused naming the
    first field that differs. ``stages`` maps a stage name to its seconds, peak memory and info.
    """

    kind: str
    model: ModelSpec
    data: DataSource = field(default_factory=DataSource)
    finetune: dict[str, Any] | None = None
    external: ExternalAdapter | None = None
    manifest: str | None = None
    canaries: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def label_names(self) -> list | None:
        return self.model.label_names

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        if int(data.get("schema", 0)) < SCHEMA:
            data = upgrade_record(data)
        known = _known(cls, data)
        known["model"] = ModelSpec.from_dict(data["model"])
        known["data"] = DataSource(**_known(DataSource, data.get("data")))
        if data.get("external"):
            known["external"] = ExternalAdapter(**_known(ExternalAdapter, data["external"]))
        return cls(**known)


def upgrade_record(old: dict[str, Any]) -> dict[str, Any]:
    """Turn a ``run.json`` written before schema 2 into the current shape.

    Two older shapes exist: ``infscope finetune`` runs (``args.command == "finetune"``, the data
    path, its fingerprint and the fine-tune config) and pipeline runs (``args`` = the demo's
    settings; rows saved under ``data/``). The old records kept no copy of a finetune run's rows,
    which :attr:`DataSource.builtin` ``None`` plus ``rows_in_run = False`` in ``args`` marks.
    """
    args = dict(old.get("args") or {})
    stages = old.get("stages") or {}
    common = {
        "args": args,
        "versions": old.get("versions") or {},
        "created": old.get("created", ""),
        "stages": stages,
        "schema": SCHEMA,
    }
    if args.get("command") == "finetune":
        config = args.get("config") or {}
        return {
            **common,
            "kind": "finetune",
            "model": {
                "name": args.get("model"),
                "task": "instruction",  # corrected from the rows when the run is opened
                "max_length": int(config.get("max_length", 256)),
                "batch_size": int(config.get("batch_size", 8)),
                "seed": int(config.get("seed", 0)),
                "device": config.get("device") or "cpu",
                "dtype": config.get("dtype") or "float32",
                "response_only": bool(config.get("response_only", True)),
            },
            "data": {
                "train": args.get("data"),
                "fingerprint": args.get("data_fingerprint"),
                "val": args.get("val"),
                "val_fraction": args.get("val_fraction"),
                "split_seed": int(config.get("seed", 0)),
            },
            "finetune": config,
            "args": {**args, "rows_in_run": False},
        }
    data_info = (stages.get("data") or {}).get("info") or {}
    return {
        **common,
        "kind": "demo",
        "model": {
            "name": args.get("model"),
            "task": "classification" if data_info.get("task") == "classification" else "instruction",
            "label_names": data_info.get("label_names"),
            "max_length": int(args.get("max_length", 128)),
            "batch_size": int(args.get("batch_size", 8)),
            "seed": int(args.get("seed", 0)),
            "device": args.get("device", "cpu"),
            "dtype": args.get("dtype", "float32"),
        },
        "data": {"builtin": {"name": args.get("dataset")}, "split_seed": int(args.get("seed", 0))},
        "manifest": "data/manifest.jsonl",
    }
