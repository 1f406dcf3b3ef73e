"""LoRA fine-tuning: a plain, seeded torch loop (AdamW + warmup/decay schedule) with per-epoch checkpoints.

Each epoch ends with a checkpoint directory ``checkpoints/epoch-N/`` holding the peft adapter,
``optimizer.pt`` (the AdamW state, which LESS-style methods need) and ``trainer_state.json``, and
an updated ``checkpoints.json`` summary. A checkpoint is written to a temporary directory and
renamed, so a crash never leaves a half-written one. Rerunning with the same data and config
continues after the last finished epoch and gives the same result as an uninterrupted run: batch
order and dropout are seeded per epoch, not carried in a random-number stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.models.encode import Encoded, batch_order, collate, encode_rows
from infscope.models.lora import LoraSpec, attach_lora, trainable_parameters
from infscope.models.loss import check_finite, forward_losses, per_example_loss
from infscope.models.prefix import frozen_prefix
from infscope.models.registry import LoadedModel, resolve_device, resolve_dtype
from infscope.runs import atomic_write_json, ensure_writable_dir

SCHEDULES = ("linear", "cosine", "constant")
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "checkpoints.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (validated on creation).

    ``lr`` defaults to 1e-3, which moves LoRA adapters of small models (tiny test models,
    SmolLM2-135M) within a few epochs; 2e-4 is closer to what larger models want. ``eval_every``
    is ``"epoch"`` or a number of optimiser steps between validation losses (logged in the
    trainer state). ``device``/``dtype`` ``None`` keep the model's own.
    """

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    seed: int = 0
    max_length: int = 256
    response_only: bool = True
    eval_every: str | int = "epoch"
    save_every_epoch: bool = True
    max_grad_norm: float | None = 1.0
    device: str | None = None
    dtype: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)
        checks = [
            (int(self.epochs) >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (float(self.lr) > 0 and math.isfinite(float(self.lr)), f"lr must be positive, got {self.lr}"),
            (int(self.batch_size) >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (float(self.weight_decay) >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                0.0 <= float(self.warmup_ratio) < 1.0,
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
            (
                self.schedule in SCHEDULES,
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
            ),
            (int(self.max_length) >= 2, f"max_length must be at least 2, got {self.max_length}"),
            (
                self.eval_every == "epoch" or (isinstance(self.eval_every, int) and self.eval_every >= 1),
                f"eval_every must be 'epoch' or a positive number of steps, got {self.eval_every!r}",
            ),
            (
                self.max_grad_norm is None or float(self.max_grad_norm) > 0,
                f"max_grad_norm must be positive or None, got {self.max_grad_norm}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InfscopeError(f"{message}; fix the fine-tuning settings")
        if self.dtype is not None:
            resolve_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


@dataclass
class CheckpointInfo:
    """One saved checkpoint: where, after which epoch and step, the lr then and its losses."""

    path: str
    epoch: int
    step: int
    lr: float
    val_loss: float | None
    train_loss: float


@dataclass
class FinetuneResult:
    """All checkpoints in epoch order and the best one (lowest validation loss, else the last)."""

    checkpoints: list[CheckpointInfo]
    best: CheckpointInfo
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "best": asdict(self.best),
            "resumed_from": self.resumed_from,
        }


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr before optimiser step ``step`` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def _select_best(checkpoints: Sequence[CheckpointInfo]) -> CheckpointInfo:
    with_val = [c for c in checkpoints if c.val_loss is not None]
    return min(with_val, key=lambda c: (c.val_loss, c.epoch)) if with_val else checkpoints[-1]


def _encoded_digest(encoded: Encoded | None) -> str:
    if encoded is None:
        return "none"
    payload = json.dumps([encoded.ids, encoded.input_ids, encoded.labels], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _fingerprint(loaded: LoadedModel, config: FinetuneConfig, train: Encoded, val: Encoded | None) -> str:
    """What a checkpoint must match to be resumed: model, settings (but not device) and token data."""
    settings = config.to_dict()
    settings.pop("device", None)
    record = {
        "model": loaded.name,
        "task": loaded.task,
        "config": settings,
        "train": _encoded_digest(train),
        "val": _encoded_digest(val),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_checkpoints(out_dir: str | os.PathLike) -> FinetuneResult:
    """The :class:`FinetuneResult` recorded in ``out_dir/checkpoints.json`` by an earlier run."""
    summary = Path(out_dir) / SUMMARY_FILE
    try:
        data = json.loads(summary.read_text())
        checkpoints = [CheckpointInfo(**c) for c in data["checkpoints"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InfscopeError(
            f"cannot read {summary} ({exc}); run `infscope finetune` into that directory first"
        ) from None
    if not checkpoints:
        raise InfscopeError(f"{summary} lists no checkpoints; run `infscope finetune` again")
    return FinetuneResult(checkpoints, _select_best(checkpoints), int(data.get("resumed_from", 0)))


def _existing_states(ckpt_root: Path, fingerprint: str) -> list[dict[str, Any]]:
    """Trainer states of finished checkpoints under ``ckpt_root``; refuses ones from other settings."""
    states = []
    if not ckpt_root.is_dir():
        return states
    for sub in sorted(ckpt_root.glob("epoch-*")):
        state_file = sub / STATE_FILE
        if not state_file.is_file():
            continue
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != fingerprint:
            raise InfscopeError(
                f"{ckpt_root} holds checkpoints from other data or settings; choose another --out or delete it"
            )
        state["path"] = str(sub)
        states.append(state)
    return sorted(states, key=lambda s: s["epoch"])


def _info(state: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(
        path=state["path"],
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        lr=float(state["lr"]),
        val_loss=state["val_loss"],
        train_loss=float(state["train_loss"]),
    )


def _save_checkpoint(
    model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], target: Path
) -> None:
    """Write adapter, optimiser state and trainer state into a temp dir, then rename it to ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _restore(model: Any, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Load adapter weights and optimiser state of a checkpoint into the live model and optimiser."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    weights = load_file(str(ckpt / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, map_location=device, weights_only=True))


def _mean_loss(model: Any, encoded: Encoded | None, batch_size: int) -> float | None:
    if encoded is None:
        return None
    return float(per_example_loss(model, encoded, batch_size=batch_size).mean())


def _encode(loaded: LoadedModel, rows: Sequence[dict], config: FinetuneConfig, label_names: Any) -> Encoded:
    encoded = encode_rows(
        rows,
        loaded.tokenizer,
        task=loaded.task,
        max_length=config.max_length,
        response_only=config.response_only,
        label_names=label_names,
    )
    if loaded.task == "classification" and loaded.num_labels is not None:
        too_big = [i for i, lab in zip(encoded.ids, encoded.labels, strict=True) if lab >= loaded.num_labels]
        if too_big:
            raise InfscopeError(
                f"rows {', '.join(too_big[:5])} have labels >= num_labels={loaded.num_labels}; "
                "load the model with the dataset's number of classes"
            )
    return encoded


class _Trainer:
    """AdamW + lr schedule over the trainable parameters, and one seeded epoch at a time."""

    def __init__(
        self,
        model: Any,
        config: FinetuneConfig,
        train: Encoded,
        val: Encoded | None,
        device: torch.device,
        total: int,
    ) -> None:
        self.model, self.config, self.train, self.val, self.device = model, config, train, val, device
        self.params = list(trainable_parameters(model).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.total = total
        self.warmup = math.ceil(config.warmup_ratio * total)
        self.step = 0
        self.scheduler = self._scheduler(last_step=-1)

    def _scheduler(self, last_step: int) -> torch.optim.lr_scheduler.LambdaLR:
        total, warmup, schedule = self.total, self.warmup, self.config.schedule
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, schedule), last_epoch=last_step
        )

    def resume_at(self, step: int) -> None:
        """Continue the schedule after ``step`` optimiser steps (the optimiser state is already loaded).

        The restored param groups carry ``initial_lr``, which a scheduler built at a later step needs.
        """
        self.step = step
        self.scheduler = self._scheduler(last_step=step - 1)

    def run_epoch(self, epoch: int, history: list[dict[str, Any]], on_step: Any) -> float:
        """Train one epoch (batch order and dropout seeded by ``(seed, epoch)``); return its mean loss."""
        config, train = self.config, self.train
        epoch_seed = config.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)  # dropout stream, fixed per epoch so a resumed run matches
        self.model.train()
        loss_sum, seen = 0.0, 0
        for rows in batch_order(len(train), config.batch_size, shuffle=True, seed=epoch_seed):
            batch = collate(train, rows)
            losses = forward_losses(self.model, batch, self.device)
            if not torch.isfinite(losses).all():
                check_finite(losses.detach().double().cpu().numpy(), [train.ids[i] for i in rows])
            loss = losses.mean()
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_sum += float(loss.detach()) * len(rows)
            seen += len(rows)
            on_step(loss_sum / seen)
            if (
                isinstance(config.eval_every, int)
                and self.val is not None
                and self.step % config.eval_every == 0
            ):
                history.append(
                    {
                        "step": self.step,
                        "epoch": epoch,
                        "val_loss": _mean_loss(self.model, self.val, config.batch_size),
                    }
                )
                self.model.train()
        return loss_sum / seen


def finetune(
    loaded: LoadedModel,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict] | None,
    config: FinetuneConfig,
    out_dir: str | os.PathLike,
    *,
    label_names: Sequence[Any] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune LoRA adapters on ``train_rows`` and save a checkpoint after each epoch.

    LoRA (``config.lora``) is attached if ``loaded.model`` has none yet; on return
    ``loaded.model`` is the peft model with the last epoch's weights, in eval mode. Validation
    loss (mean per-example loss of ``val_rows``) picks the best checkpoint. Reusing ``out_dir``
    with the same model, data and settings resumes after the last finished epoch.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not train_rows:
        raise InfscopeError("no training rows; check the dataset and the validation split")
    if config.device is not None:
        loaded.model.to(resolve_device(config.device))
    if config.dtype is not None:
        loaded.model.to(resolve_dtype(config.dtype))
    train = _encode(loaded, train_rows, config, label_names)
    val = _encode(loaded, val_rows, config, label_names) if val_rows else None
    if not hasattr(loaded.model, "peft_config"):
        attach_lora(loaded, config.lora, seed=config.seed)
    model = loaded.model
    device = next(model.parameters()).device

    out = ensure_writable_dir(out_dir)
    ckpt_root = out / CHECKPOINTS_DIR
    ckpt_root.mkdir(exist_ok=True)
    fingerprint = _fingerprint(loaded, config, train, val)
    states = _existing_states(ckpt_root, fingerprint)

    trainer = _Trainer(
        model, config, train, val, device, total=config.epochs * math.ceil(len(train) / config.batch_size)
    )
    start_epoch, history = 0, []
    if states:
        last = states[-1]
        _restore(model, trainer.optimizer, Path(last["path"]))
        start_epoch, history = int(last["epoch"]), list(last.get("history", []))
        trainer.resume_at(int(last["step"]))
    infos = [_info(s) for s in states]

    columns = (TextColumn("finetune epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn())
    columns += (TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
    fork_devices = [device] if device.type == "cuda" else []
    with (
        Progress(*columns, disable=not progress, transient=True) as bar,
        torch.random.fork_rng(devices=fork_devices),
        frozen_prefix(model),
    ):
        task_id = bar.add_task(
            "train", total=trainer.total, completed=trainer.step, epoch=start_epoch + 1, loss=0.0
        )
        for epoch in range(start_epoch + 1, config.epochs + 1):
            train_loss = trainer.run_epoch(
                epoch, history, lambda loss, e=epoch: bar.update(task_id, advance=1, epoch=e, loss=loss)
            )
            val_loss = _mean_loss(model, val, config.batch_size)
            history.append(
                {"step": trainer.step, "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
            )
            if config.save_every_epoch or epoch == config.epochs:
                target = ckpt_root / f"epoch-{epoch}"
                state = {
                    "epoch": epoch,
                    "step": trainer.step,
                    "lr": float(trainer.optimizer.param_groups[0]["lr"]),
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "fingerprint": fingerprint,
                    "model": loaded.name,
                    "task": loaded.task,
                    "config": config.to_dict(),
                    "n_train": len(train),
                    "n_val": len(val) if val is not None else 0,
                    "history": history,
                }
                _save_checkpoint(model, trainer.optimizer, state, target)
                infos.append(_info({**state, "path": str(target)}))
                atomic_write_json(
                    out / SUMMARY_FILE, FinetuneResult(infos, _select_best(infos), start_epoch).to_dict()
                )
    model.eval()
    result = FinetuneResult(infos, _select_best(infos), resumed_from=start_epoch)
    atomic_write_json(out / SUMMARY_FILE, result.to_dict())
    return result
