"""Start a run for adapters trained elsewhere (peft, ``transformers.Trainer``, TRL), ready to score.

The adapters stay where they are and are never modified: the run directory records their path,
the base model, the data the user gives (copied into the run) and the encoding, so every later
command (score, evaluate, report, peers) opens it like any other run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscope.data.columns import ColumnMap
from infscope.data.training import find_manifest, load_training_data
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError
from infscope.models.external import detect_external, read_external_run
from infscope.runs import ExternalAdapter, ModelSpec, RunDir, RunRecord


@dataclass
class ExternalRequest:
    """What ``infscope score ADAPTERS --data ...`` was given."""

    adapters: Path
    data: str | None
    val: str | None = None
    val_fraction: float = 0.1
    base_model: str | None = None
    out: Path | None = None
    manifest: Path | None = None
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    columns: ColumnMap | None = None


def default_out(adapters: Path) -> Path:
    """``infscope-score-<adapter folder name>`` in the working directory."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", adapters.resolve().name).strip("-") or "adapters"
    return Path(f"infscope-score-{name}")


def start_external_run(request: ExternalRequest, *, overwrite: bool = False) -> Path:
    """Create (or reopen) the run directory of external adapters and return its path."""
    adapters = Path(request.adapters)
    kind = detect_external(adapters)
    if kind is None:
        raise InfscopeError(
            f"{adapters} is neither an infscope run (run.json) nor a peft adapter or Trainer output folder; "
            "pass a run directory, an adapter folder, or a folder with checkpoint-N subfolders"
        )
    if request.data is None:
        raise InfscopeError(f"{adapters} holds adapters only; pass the training rows with --data FILE")
    external = read_external_run(adapters)
    base = request.base_model or external.base_model
    if not base:
        raise InfscopeError(f"{adapters} does not name its base model; pass --base-model NAME_OR_PATH")
    split = load_training_data(request.data, request.val, request.val_fraction, request.seed, request.columns)
    spec = ModelSpec(
        name=base,
        task=split.task,
        label_names=split.label_names,
        max_length=request.max_length,
        batch_size=request.batch_size,
        seed=request.seed,
        device=request.device,
        dtype=request.dtype,
    )
    manifest = find_manifest(request.data, request.manifest)
    args: dict[str, Any] = {
        "command": "score-external",
        "adapters": str(adapters.resolve()),
        "base_model": base,
        "data": split.source.train,
        "data_fingerprint": split.source.fingerprint,
        "val": split.source.val,
        "val_fraction": split.source.val_fraction,
        "max_length": request.max_length,
        "seed": request.seed,
    }
    record = RunRecord(
        kind="external",
        model=spec,
        data=split.source,
        external=ExternalAdapter(path=str(adapters.resolve()), kind=kind),
        manifest=str(manifest) if manifest else None,
        args=args,
    )
    out = request.out or default_out(adapters)
    run = RunDir.create(out, record, overwrite=overwrite)
    if not run.done("data"):
        with run.stage("data") as rec:
            write_rows(split.train, run.layout.train)
            write_rows(split.val, run.layout.val)
            rec.info.update(train_rows=len(split.train), val_rows=len(split.val), task=split.task)
    return run.path
