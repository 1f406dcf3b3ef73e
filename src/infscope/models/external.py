"""Read fine-tuning runs made outside infscope: a peft adapter folder or a Hugging Face ``Trainer`` folder.

Users who tuned with ``transformers.Trainer``, TRL's ``SFTTrainer`` or plain peft already have
adapters; infscope reads them as they are instead of asking for a retrain. Two layouts are known:

* **adapter**: a folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or
  ``.bin``), as written by ``PeftModel.save_pretrained``. It is one checkpoint; when the folder also
  holds a ``trainer_state.json`` (a single ``checkpoint-N`` folder passed directly) its step, epoch,
  learning rates and losses are read from it, otherwise they are unknown (``None``).
* **trainer**: a ``Trainer`` ``output_dir`` with ``checkpoint-N`` sub-folders, each holding the
  adapter, ``optimizer.pt``, ``scheduler.pt`` and ``trainer_state.json``.

Learning rates come from ``log_history``. Since transformers 4.51 the ``learning_rate`` logged at step
``N`` is the one the optimiser applied at step ``N`` (read before the scheduler steps); 4.50 and
older logged the next step's rate, which shifts each mean by one step (small for monotone
schedules; the folder does not say which version wrote it, so no correction is made). A checkpoint's
``lr`` is the mean applied rate over the steps since the previous checkpoint (the first: since step 0),
which is TracIn's weight for it. When only some steps are logged (``logging_steps > 1``) the rate of
each unlogged step is linearly interpolated between the logged steps around it and held at the
nearest logged value before the first / after the last one; with every step logged this is the plain
mean of the logged values. Without any logged rate ``lr`` is ``None`` and TracIn weights the
checkpoint 1.0 (:func:`checkpoint_weights`). When ``save_total_limit`` deleted early checkpoints, the
first one left covers every step from 0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from infscope.errors import InfscopeError
from infscope.models.builtin import BUILTIN_MODELS
from infscope.models.lora import LoraSpec
from infscope.models.registry import LoadedModel, load_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
# peft task types infscope can score, mapped to infscope's task names.
TASK_TYPES = {"CAUSAL_LM": "causal", "SEQ_CLS": "classification"}
BASE_FLAG = "--base-model"

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_PLAIN_MODULE = re.compile(r"^[\w.]+$")
ExternalKind = Literal["trainer", "adapter"]


@dataclass
class ExternalCheckpoint:
    """One adapter checkpoint of an external run (field names follow :class:`CheckpointInfo`).

    ``lr`` is the mean learning rate applied over the steps since the previous checkpoint (see the
    module docstring), not the rate at the checkpoint; ``epoch`` may be fractional (Trainer counts
    epochs as floats). ``step``/``epoch``/``lr``/losses are ``None`` when nothing recorded them.
    """

    path: str
    epoch: float | None
    step: int | None
    lr: float | None
    val_loss: float | None
    train_loss: float | None
    optimizer_path: str | None = None
    scheduler_path: str | None = None


@dataclass
class ExternalRun:
    """The checkpoints of an external run in step order, the best one, and what the adapter was made for.

    ``best`` is the Trainer's ``best_model_checkpoint`` when recorded, else the lowest validation
    loss, else the last checkpoint. ``base_model`` is ``base_model_name_or_path`` from
    ``adapter_config.json``; ``lora`` is ``None`` when the adapter uses settings
    :class:`LoraSpec` cannot express (regex targets, per-module ranks, DoRA, rsLoRA).
    """

    kind: ExternalKind
    path: str
    checkpoints: list[ExternalCheckpoint]
    best: ExternalCheckpoint
    base_model: str | None
    task: str
    lora: LoraSpec | None
    adapter_config: dict[str, Any]
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        out = asdict(self)
        out["lora"] = self.lora.to_dict() if self.lora is not None else None
        return out


def checkpoint_weights(checkpoints: list[ExternalCheckpoint]) -> dict[str, float]:
    """TracIn's weight per checkpoint path: its mean learning rate, or 1.0 when no rate was logged."""
    return {c.path: (c.lr if c.lr is not None else 1.0) for c in checkpoints}


def _checkpoint_dirs(path: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` sub-folders as ``(N, folder)`` in step order (numeric, so 10 follows 9)."""
    found = []
    for sub in path.iterdir():
        match = _CHECKPOINT_DIR.match(sub.name)
        if match and sub.is_dir():
            found.append((int(match.group(1)), sub))
    return sorted(found)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InfscopeError(f"cannot read {path} ({exc}); the file is damaged, save it again") from None
    if not isinstance(data, dict):
        raise InfscopeError(f"{path} does not hold a JSON object; the file is damaged, save it again")
    return data


def _is_infscope_run(path: Path) -> bool:
    """A run folder, a fine-tuning folder or a checkpoint written by infscope itself."""
    if (path / "run.json").is_file() or (path / "checkpoints.json").is_file():
        return True
    state = path / TRAINER_STATE
    if state.is_file():
        try:
            return "fingerprint" in json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            return False
    return False


def detect_external(path: str | Path) -> ExternalKind | None:
    """``"trainer"`` for a folder with ``checkpoint-N`` sub-folders, ``"adapter"`` for a peft adapter folder.

    ``None`` for anything else, including infscope's own runs and checkpoints (which open as runs).
    A Trainer ``output_dir`` that also holds the final adapter counts as ``"trainer"``.
    """
    path = Path(path)
    if not path.is_dir() or _is_infscope_run(path):
        return None
    if _checkpoint_dirs(path):
        return "trainer"
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    return None


def _check_adapter_dir(folder: Path) -> dict[str, Any]:
    """The adapter config of ``folder``; one-line errors for full models, missing weights, non-LoRA."""
    if not (folder / ADAPTER_CONFIG).is_file():
        if any((folder / name).is_file() for name in FULL_MODEL_WEIGHTS):
            raise InfscopeError(
                f"{folder} holds a full model, not a LoRA adapter; infscope scores LoRA adapters only, "
                "so fine-tune with peft LoRA (or pass a folder of adapters)"
            )
        raise InfscopeError(
            f"{folder} holds no adapter ({ADAPTER_CONFIG} missing); delete the unfinished checkpoint "
            "or pass a folder of finished ones"
        )
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise InfscopeError(
            f"{folder} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}; the adapter is incomplete, "
            "save it again"
        )
    config = _read_json(folder / ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InfscopeError(f"{folder} holds a {peft_type} adapter; infscope scores LoRA adapters only")
    return config


def lora_spec_from_config(config: dict[str, Any]) -> LoraSpec | None:
    """The :class:`LoraSpec` of a peft ``adapter_config.json``, or ``None`` if it cannot express it."""
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        return None
    if config.get("use_rslora"):
        return None
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear" or not _PLAIN_MODULE.match(targets):
            return None  # a regex or peft's shorthand, not a list of module names
        targets = [targets]
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = str(layers)
    elif isinstance(layers, list):
        layers = ",".join(str(int(i)) for i in layers)
    try:
        return LoraSpec(
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=sorted(targets) if targets else None,
            layers=layers,
        )
    except (KeyError, TypeError, ValueError, InfscopeError):
        return None


def _task(config: dict[str, Any], folder: Path) -> str:
    task_type = config.get("task_type")
    if task_type is None:
        return "causal"
    if task_type not in TASK_TYPES:
        raise InfscopeError(
            f"{folder} holds a {task_type} adapter; infscope handles {', '.join(TASK_TYPES)} adapters"
        )
    return TASK_TYPES[task_type]


def _history(state: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the log entries carrying ``key``, sorted by step; a repeated step keeps its last."""
    points: dict[int, float] = {}
    for entry in state.get("log_history") or []:
        value, step = entry.get(key), entry.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            points[int(step)] = float(value)
    steps = np.array(sorted(points), dtype=np.int64)
    return steps, np.array([points[s] for s in steps.tolist()], dtype=np.float64)


def _per_step_lr(state: dict[str, Any], last_step: int) -> np.ndarray | None:
    """Applied learning rate of steps ``1..last_step`` (index ``step - 1``), interpolated between logs."""
    steps, values = _history(state, "learning_rate")
    if not len(steps) or last_step < 1:
        return None
    return np.interp(np.arange(1, last_step + 1), steps, values)


def _per_step_loss(state: dict[str, Any], last_step: int) -> np.ndarray:
    """Training loss of steps ``1..last_step``: each logged ``loss`` (a mean since the previous log) spread
    over the steps it covers; NaN where nothing was logged."""
    out = np.full(max(last_step, 0), np.nan)
    steps, values = _history(state, "loss")
    previous = 0
    for step, value in zip(steps.tolist(), values.tolist(), strict=True):
        out[previous : min(step, last_step)] = value
        previous = step
    return out


def _interval_mean(values: np.ndarray | None, start: int, stop: int) -> float | None:
    """Mean of per-step ``values`` over steps ``start+1..stop`` ignoring NaN; ``None`` if none is known."""
    if values is None or stop <= start:
        return None
    window = values[start:stop]
    window = window[~np.isnan(window)]
    return float(window.mean()) if len(window) else None


def _latest_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The trainer state with the longest history (the last checkpoint's, or ``save_state()``'s)."""
    return max(states, key=lambda s: (int(s.get("global_step") or 0), len(s.get("log_history") or [])))


def _build_checkpoints(
    folders: list[tuple[int | None, Path]], state: dict[str, Any], own_states: list[dict[str, Any] | None]
) -> list[ExternalCheckpoint]:
    """One :class:`ExternalCheckpoint` per folder, with interval means taken from ``state``'s log history."""
    steps = [
        int(own["global_step"]) if own and own.get("global_step") is not None else number
        for (number, _), own in zip(folders, own_states, strict=True)
    ]
    last = max((s for s in steps if s is not None), default=0)
    lrs, losses = _per_step_lr(state, last), _per_step_loss(state, last)
    eval_steps, eval_values = _history(state, "eval_loss")
    evals = dict(zip(eval_steps.tolist(), eval_values.tolist(), strict=True))
    epochs = {
        int(e["step"]): float(e["epoch"])
        for e in state.get("log_history") or []
        if isinstance(e.get("step"), (int, float)) and isinstance(e.get("epoch"), (int, float))
    }
    out, previous = [], 0
    for (_, folder), own, step in zip(folders, own_states, steps, strict=True):
        epoch = own.get("epoch") if own else None
        if epoch is None and step is not None:
            epoch = epochs.get(step)
        optimizer, scheduler = folder / OPTIMIZER_FILE, folder / SCHEDULER_FILE
        out.append(
            ExternalCheckpoint(
                path=str(folder),
                epoch=float(epoch) if epoch is not None else None,
                step=step,
                lr=_interval_mean(lrs, previous, step) if step is not None else None,
                val_loss=evals.get(step) if step is not None else None,
                train_loss=_interval_mean(losses, previous, step) if step is not None else None,
                optimizer_path=str(optimizer) if optimizer.is_file() else None,
                scheduler_path=str(scheduler) if scheduler.is_file() else None,
            )
        )
        previous = step if step is not None else previous
    return out


def _select_best(checkpoints: list[ExternalCheckpoint], state: dict[str, Any]) -> ExternalCheckpoint:
    """Trainer's ``best_model_checkpoint`` (matched by folder name, so a moved run still works), else the
    lowest validation loss (earliest on ties), else the last checkpoint."""
    recorded = state.get("best_model_checkpoint")
    if recorded:
        for c in checkpoints:
            if Path(c.path).name == Path(str(recorded)).name:
                return c
    with_val = [c for c in checkpoints if c.val_loss is not None]
    if with_val:
        return min(with_val, key=lambda c: (c.val_loss, c.step or 0))
    return checkpoints[-1]


def read_external_run(path: str | Path) -> ExternalRun:
    """Read a peft adapter folder or a ``Trainer`` output folder as an :class:`ExternalRun`.

    Raises a one-line :class:`InfscopeError` for a missing path, a folder with neither adapter nor
    checkpoints, checkpoints holding full models, incomplete or non-LoRA adapters, and infscope's own
    runs (which open as runs, not as external adapters).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InfscopeError(
            f"{path} does not exist; pass a peft adapter folder or a Trainer output_dir with checkpoint-N folders"
        )
    if not path.is_dir():
        raise InfscopeError(
            f"{path} is a file; pass the folder holding {ADAPTER_CONFIG} or the Trainer output_dir"
        )
    kind = detect_external(path)
    if kind is None:
        if _is_infscope_run(path):
            raise InfscopeError(f"{path} was made by infscope; open it as an infscope run, not as an adapter")
        raise InfscopeError(
            f"{path} holds neither a peft adapter ({ADAPTER_CONFIG}) nor Trainer checkpoint-N folders; "
            "pass the adapter folder or the Trainer output_dir"
        )
    folders: list[tuple[int | None, Path]] = (
        list(_checkpoint_dirs(path)) if kind == "trainer" else [(None, path)]
    )
    configs = [_check_adapter_dir(folder) for _, folder in folders]
    own_states = [
        _read_json(folder / TRAINER_STATE) if (folder / TRAINER_STATE).is_file() else None
        for _, folder in folders
    ]
    states = [s for s in own_states if s is not None]
    if kind == "trainer" and (path / TRAINER_STATE).is_file():
        states.append(_read_json(path / TRAINER_STATE))  # written by trainer.save_state() at the end
    state = _latest_state(states) if states else {}
    checkpoints = _build_checkpoints(folders, state, own_states)
    config = configs[-1]
    return ExternalRun(
        kind=kind,
        path=str(path),
        checkpoints=checkpoints,
        best=_select_best(checkpoints, state),
        base_model=config.get("base_model_name_or_path") or None,
        task=_task(config, Path(folders[-1][1])),
        lora=lora_spec_from_config(config),
        adapter_config=config,
    )


def resolve_base_model(run: ExternalRun, base_model: str | None = None) -> str:
    """The name or folder to load the base model from: ``base_model`` (the ``--base-model`` flag) if
    given, else the adapter's ``base_model_name_or_path``.

    Built-in names and local model folders are checked here; a Hub-style ``org/name`` is left to
    :func:`load_model` (local cache, then the Hub). Anything else raises, naming ``--base-model``.
    """
    name = base_model or run.base_model
    source = f"{BASE_FLAG}" if base_model else f"{ADAPTER_CONFIG} of {run.path}"
    if not name:
        raise InfscopeError(
            f"{ADAPTER_CONFIG} of {run.path} names no base model; pass {BASE_FLAG} with a model folder or name"
        )
    if name in BUILTIN_MODELS:
        return name
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InfscopeError(
                f"base model folder {local} (from {source}) has no config.json; pass {BASE_FLAG} with a model folder"
            )
        return str(local)
    if local.exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise InfscopeError(
            f"base model {name!r} (from {source}) is not found on this machine; pass {BASE_FLAG} with the "
            "local model folder or Hub name the adapter was trained on"
        )
    return name


def load_base_model(run: ExternalRun, base_model: str | None = None, **load_kwargs: Any) -> LoadedModel:
    """Load the base model of ``run`` (see :func:`resolve_base_model`) for the adapter's task.

    ``load_kwargs`` go to :func:`load_model` (device, dtype, num_labels, ...). A failed load names
    ``--base-model`` as the fix.
    """
    name = resolve_base_model(run, base_model)
    load_kwargs.setdefault("task", run.task)
    try:
        return load_model(name, **load_kwargs)
    except InfscopeError as exc:
        raise InfscopeError(
            f"cannot load base model {name!r} for {run.path} ({str(exc).rstrip('.')}); pass {BASE_FLAG} "
            "with the local model folder the adapter was trained on"
        ) from None
