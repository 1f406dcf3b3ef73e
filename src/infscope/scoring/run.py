"""Open a run: its record, rows, checkpoints, model spec and manifest, the same way for every command.

:func:`open_run` is the one reader of a run directory that scoring, peers, the report, evaluate,
bench and the CLI share. It works for runs made by ``infscope demo`` / ``bench`` (rows generated
into ``data/``), ``infscope finetune`` (rows copied into ``data/``; runs of older versions reload
and split their source) and adapters trained elsewhere (:mod:`infscope.models.external`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from infscope.data.loading import load_rows
from infscope.data.splits import split_validation
from infscope.errors import InfscopeError
from infscope.grads.store import INDEX_FILE, GradientStore
from infscope.noise.canaries import without_canary_sources
from infscope.runs import ModelSpec, RunDir, RunLayout, RunRecord, file_fingerprint, read_jsonl


@dataclass
class Checkpoint:
    """One scorable adapter checkpoint: where, after which epoch and step, and its mean learning rate.

    ``lr`` is the mean learning rate of the optimiser steps since the previous checkpoint (TracIn's
    weight); ``None`` when unknown (a bare adapter), which TracIn treats as 1.
    """

    path: str
    epoch: int | None
    step: int | None
    lr: float | None
    val_loss: float | None = None
    optimizer_path: str | None = None

    @property
    def tag(self) -> str:
        return Path(self.path).name


@dataclass
class OpenedRun:
    """Everything commands need from a run directory, read once."""

    dir: RunDir
    spec: ModelSpec
    train: list[dict]
    val: list[dict]
    checkpoints: list[Checkpoint]
    best: Checkpoint
    manifest: Path | None
    notes: list[str] = field(default_factory=list)
    canary_ids: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def user_train(self) -> list[dict]:
        """The training rows the user gave (canaries left out): what tables and evaluations cover."""
        canaries = set(self.canary_ids)
        return [r for r in self.train if str(r["id"]) not in canaries]

    @property
    def layout(self) -> RunLayout:
        return self.dir.layout

    @property
    def record(self) -> RunRecord:
        return self.dir.record

    def checkpoint(self, which: str) -> Checkpoint:
        """``best`` (lowest validation loss), ``last``, ``epoch-N``, ``N`` or a checkpoint folder name.

        ``inrun`` is the last epoch whose gradients fine-tuning captured (``finetune --capture``),
        ``inrun:N`` epoch ``N``'s: see :meth:`inrun_checkpoints`.
        """
        if is_inrun_rule(which):
            return self._inrun_choice(which)
        if which == "best":
            return self.best
        if which == "last":
            return self.checkpoints[-1]
        for c in self.checkpoints:
            if c.tag == which or (c.epoch is not None and str(c.epoch) == which.removeprefix("epoch-")):
                return c
        names = ", ".join(c.tag for c in self.checkpoints)
        raise InfscopeError(
            f"no checkpoint {which!r} in {self.path}; choose best, last, all or one of {names}"
        )

    def inrun_checkpoints(self) -> list[Checkpoint]:
        """The epochs whose gradients fine-tuning captured, as checkpoints (path: ``RunLayout.inrun(epoch)``).

        Each one's ``lr`` is the mean learning rate of that epoch's steps (the rows' gradients were
        taken at those steps), read from the saved checkpoint of the same epoch; ``None`` if absent.
        """
        lrs = {c.epoch: c.lr for c in self.checkpoints if c.epoch is not None}
        out = []
        for epoch in inrun_epochs(self.layout):
            meta = GradientStore.open(self.layout.inrun(epoch) / "grads" / "train").meta
            step = meta.get("step")
            out.append(
                Checkpoint(
                    str(self.layout.inrun(epoch)), epoch, None if step is None else int(step), lrs.get(epoch)
                )
            )
        return out

    def inrun_view(self, which: str) -> OpenedRun:
        """This run with the captured epochs as its checkpoints and ``which`` (``inrun[:N]``) as the best.

        Methods summing over checkpoints (TracIn) then sum over the captured epochs.
        """
        chosen = self._inrun_choice(which)
        return replace(self, checkpoints=self.inrun_checkpoints(), best=chosen)

    def _inrun_choice(self, which: str) -> Checkpoint:
        captured = self.inrun_checkpoints()
        if not captured:
            raise InfscopeError(
                f"{self.path} has no in-run gradient stores; fine-tune with `infscope finetune --capture last` "
                "(or every), or score with --checkpoint best"
            )
        _, _, epoch = which.partition(":")
        if not epoch:
            return captured[-1]
        found = [c for c in captured if str(c.epoch) == epoch.strip().removeprefix("epoch-")]
        if not found:
            epochs = ", ".join(f"inrun:{c.epoch}" for c in captured)
            raise InfscopeError(
                f"no in-run gradients of epoch {epoch!r} in {self.path}; choose inrun or {epochs}"
            )
        return found[0]


#: ``--checkpoint`` rule of the gradients captured during fine-tuning (``inrun`` or ``inrun:EPOCH``).
INRUN = "inrun"


def is_inrun_rule(which: str) -> bool:
    """Whether ``which`` asks for captured in-run gradients (``inrun`` or ``inrun:N``)."""
    return which == INRUN or which.startswith(INRUN + ":")


def inrun_epochs(layout: RunLayout) -> list[int]:
    """Epochs with a complete captured training store (``RunLayout.inrun(epoch)/grads/train``), ascending."""
    epochs = []
    for folder in (layout.root / "scoring").glob("inrun-epoch-*"):
        suffix = folder.name.removeprefix("inrun-epoch-")
        store = folder / "grads" / "train"
        if suffix.isdigit() and (store / INDEX_FILE).is_file() and GradientStore.open(store).is_complete:
            epochs.append(int(suffix))
    return sorted(epochs)


def open_run(path: str | os.PathLike) -> OpenedRun:
    """Read a run directory with finished fine-tuning (or external adapters) into an :class:`OpenedRun`."""
    run = RunDir.open(path)
    record = run.record
    checkpoints, best = _checkpoints(run)
    train, val, notes = _rows(run)
    val = without_canary_sources(val, record.canaries)
    spec = record.model
    if spec.task != _row_task(train):
        spec.task = _row_task(train)
    manifest = _manifest(run)
    canary_ids: list[str] = []
    if run.layout.canary_rows.is_file():
        canaries = read_jsonl(run.layout.canary_rows)
        train = train + canaries
        canary_ids = [str(r["id"]) for r in canaries]
    return OpenedRun(run, spec, train, val, checkpoints, best, manifest, notes, canary_ids)


def _row_task(rows: list[dict]) -> str:
    return "classification" if rows and "label" in rows[0] and "output" not in rows[0] else "instruction"


def _checkpoints(run: RunDir) -> tuple[list[Checkpoint], Checkpoint]:
    record = run.record
    if record.external is not None:
        from infscope.models.external import read_external_run

        result = read_external_run(record.external.path)
    else:
        if "finetune" not in record.stages:
            raise InfscopeError(
                f"{run.path} has no finished fine-tuning; run `infscope finetune` (or demo) into it first"
            )
        from infscope.models.finetune import read_checkpoints

        result = read_checkpoints(run.layout.finetune)
        lrs = mean_epoch_lrs(result.checkpoints)
    out = []
    for c in result.checkpoints:
        lr = c.lr if record.external is not None else lrs[c.path]
        out.append(
            Checkpoint(
                path=str(c.path),
                epoch=None if getattr(c, "epoch", None) is None else int(round(c.epoch)),
                step=getattr(c, "step", None),
                lr=lr,
                val_loss=getattr(c, "val_loss", None),
                optimizer_path=getattr(c, "optimizer_path", None) or _optimizer_file(Path(c.path)),
            )
        )
    best = next(c for c in out if c.path == str(result.best.path))
    return out, best


def _optimizer_file(checkpoint: Path) -> str | None:
    candidate = checkpoint / "optimizer.pt"
    return str(candidate) if candidate.is_file() else None


def mean_epoch_lrs(checkpoints: list[Any]) -> dict[str, float]:
    """TracIn's weight of each infscope checkpoint: the mean learning rate of the steps since the previous one.

    The learning rate recorded at a checkpoint is the one after its last step (zero at the end of a
    linear schedule), so the schedule is replayed from the trainer state instead.
    """
    import math

    from infscope.models.finetune import STATE_FILE, lr_factor
    from infscope.runs import read_json

    last = checkpoints[-1]
    config = read_json(Path(last.path) / STATE_FILE)["config"]
    total = int(last.step)
    warmup = math.ceil(float(config.get("warmup_ratio", 0.0)) * total)
    base, schedule = float(config["lr"]), config.get("schedule", "linear")
    out, previous = {}, 0
    for c in checkpoints:
        steps = range(previous, int(c.step))
        out[c.path] = base * sum(lr_factor(t, total, warmup, schedule) for t in steps) / max(1, len(steps))
        previous = int(c.step)
    return out


def _rows(run: RunDir) -> tuple[list[dict], list[dict], list[str]]:
    """Training and query rows: the copies inside the run, or (older finetune runs) the source again."""
    layout, data = run.layout, run.record.data
    notes = source_notes(run)
    if layout.train.is_file() and layout.val.is_file():
        return read_jsonl(layout.train), read_jsonl(layout.val), notes
    if not data.train:
        raise InfscopeError(f"{run.path} has no data/train.jsonl; rerun the command that made it")
    loaded = load_rows(data.train)
    if data.fingerprint and loaded.fingerprint != data.fingerprint:
        raise InfscopeError(
            f"{data.train} changed since fine-tuning (fingerprint {data.fingerprint}, now "
            f"{loaded.fingerprint}); score with the data the run was tuned on"
        )
    if data.val:
        return loaded.rows, load_rows(data.val, task=loaded.task).rows, notes
    train, val = split_validation(loaded.rows, float(data.val_fraction or 0.1), data.split_seed)
    return train, val, notes


def source_notes(run: RunDir) -> list[str]:
    """What changed about the user's data files since the run copied them (moved, edited)."""
    notes = []
    data = run.record.data
    for role, source, fingerprint in (
        ("training", data.train, data.fingerprint),
        ("validation", data.val, data.val_fingerprint),
    ):
        if not source or not fingerprint or source.startswith("builtin:"):
            continue
        path = Path(source)
        if not path.exists():
            if path.is_absolute():
                notes.append(f"the {role} data {source} has moved or been deleted; using the run's copy")
        elif path.is_file() and file_fingerprint(path) != fingerprint:
            notes.append(f"the {role} data {source} changed since fine-tuning; using the run's copy")
    return notes


def _manifest(run: RunDir) -> Path | None:
    recorded = run.record.manifest
    if recorded:
        path = Path(recorded)
        path = path if path.is_absolute() else run.path / path
        return path if path.is_file() else None
    if run.layout.manifest.is_file():
        return run.layout.manifest
    source = run.record.data.train
    if source and Path(source).suffix:
        candidate = Path(source).with_name(Path(source).name[: -len(Path(source).suffix)] + ".manifest.jsonl")
        if candidate.is_file():
            return candidate
    return None
