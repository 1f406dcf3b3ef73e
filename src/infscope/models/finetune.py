"""LoRA fine-tuning: a plain, seeded torch loop (AdamW + warmup/decay schedule) with per-epoch checkpoints.

Each epoch ends with a checkpoint directory ``checkpoints/epoch-N/`` holding the peft adapter,
``optimizer.pt`` (the AdamW state, which LESS-style methods need) and ``trainer_state.json``, and
an updated ``checkpoints.json`` summary. A checkpoint is written to a temporary directory and
renamed, so a crash never leaves a half-written one. Rerunning with the same data and config
continues after the last finished epoch and gives the same result as an uninterrupted run: batch
order and dropout are seeded per epoch, not carried in a random-number stream.

Training dynamics (``record_dynamics``) come free with the training pass: from the logits of the
forward that computes the batch loss, each row's loss, margin, correctness and EL2N error norm are
kept (:func:`row_dynamics`), saved with the next checkpoint (``epoch-N/dynamics.parquet``) and
gathered in ``<out>/dynamics.parquet``, which :mod:`infscope.estimators.dynamics` reads.

Row weights (``finetune(..., weights={id: w})``) make each batch's loss the weighted mean of its
rows' losses, ``sum w_i l_i / sum w_i`` (:func:`batch_loss`); the cleaning loop's ``reweight``
action uses them. ``None`` (or every weight 1) trains exactly as without weights; any other
weights enter the checkpoint fingerprint, so a resumed run never mixes two weightings.

A :class:`StepObserver` (``finetune(..., observer=...)``) sees each captured epoch's training steps
from inside: it may wrap the forward and backward of a batch (e.g. in gradient hooks) and then gets
the rows, their losses and ``dLoss/dl_i``, the factor each row's loss enters the batch loss with.
It only reads, so the trained weights are the same with or without it. In-run gradient capture
(``config.capture``, :mod:`infscope.grads.inrun`) is such an observer; this layer cannot import it,
so callers pass it in.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) every process joins the process group,
the model trains inside DistributedDataParallel and each seeded global batch is split across the
ranks with loss factors that make the averaged gradient the one-process gradient
(:func:`infscope.models.ddp.shard_batch`), so the trained adapter is the one-process adapter up to
the order of summation. Rank 0 alone computes validation losses and writes checkpoints, dynamics
(gathered from every rank) and the summary; the others wait at a barrier and read the summary.
In-run capture is refused there (run it in one process).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from infscope.errors import InfscopeError
from infscope.models import ddp
from infscope.models.config import FinetuneConfig
from infscope.models.encode import IGNORE_INDEX, Encoded, batch_order, collate, encode_rows
from infscope.models.lora import attach_lora, trainable_parameters
from infscope.models.loss import check_finite, forward_logits_losses, per_example_loss
from infscope.models.prefix import frozen_prefix
from infscope.models.registry import LoadedModel, resolve_device, resolve_dtype
from infscope.progress import progress as progress_bar
from infscope.runs import atomic_path, atomic_write_json, ensure_writable_dir

CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "checkpoints.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DYNAMICS_FILE = "dynamics.parquet"
DYNAMICS_COLUMNS = ("id", "epoch", "step", "loss", "margin", "correct", "el2n")
#: Floats of softmax held at once while computing a causal batch's EL2N (64 MB in float32).
_EL2N_CHUNK_FLOATS = 1 << 24


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


def _fingerprint(
    loaded: LoadedModel,
    config: FinetuneConfig,
    train: Encoded,
    val: Encoded | None,
    weights: torch.Tensor | None = None,
) -> str:
    """What a checkpoint must match to be resumed: model, settings, token data and row weights.

    None of the device, ``record_dynamics`` and ``capture`` changes the trained weights, so none counts.
    Without row weights the record is the one earlier versions wrote, so their runs still resume.
    """
    settings = config.to_dict()
    settings.pop("device", None)
    settings.pop("record_dynamics", None)
    settings.pop("capture", None)
    record = {
        "model": loaded.name,
        "task": loaded.task,
        "config": settings,
        "train": _encoded_digest(train),
        "val": _encoded_digest(val),
    }
    if weights is not None:
        record["weights"] = hashlib.sha256(weights.double().numpy().tobytes()).hexdigest()[:16]
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
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    target: Path,
    dynamics: pd.DataFrame | None = None,
) -> None:
    """Write adapter, optimiser state, trainer state (and dynamics rows) into a temp dir, then rename it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if dynamics is not None:
            dynamics.to_parquet(tmp / DYNAMICS_FILE, index=False)
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


@torch.no_grad()
def row_dynamics(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> dict[str, np.ndarray]:
    """Each row's ``loss``, ``margin``, ``correct`` and ``el2n`` from one batch's logits (float64/bool arrays).

    ``logits``, ``labels`` and ``losses`` are those of :func:`~infscope.models.loss.forward_logits_losses`,
    so ``loss`` is exactly the row's term of the batch loss. Classifier: ``margin`` is the logit of
    the assigned label minus the largest other logit, ``correct`` whether the argmax is the label,
    ``el2n`` is ``||softmax - onehot||_2``. Causal LM: ``el2n`` is the mean over the row's target
    tokens of ``||softmax_t - onehot_t||_2`` (the softmax taken in chunks of target positions, so
    memory stays at ~64 MB whatever the vocabulary); ``margin`` is NaN and ``correct`` is None.
    """
    loss = losses.detach().double().cpu().numpy()
    if labels.ndim == 1:
        z = logits.detach().float()
        gold = z.gather(1, labels[:, None]).squeeze(1)
        other = z.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        error = z.softmax(dim=1)
        error[torch.arange(len(labels), device=z.device), labels] -= 1.0
        return {
            "loss": loss,
            "margin": (gold - other).double().cpu().numpy(),
            "correct": (z.argmax(dim=1) == labels).cpu().numpy(),
            "el2n": error.norm(dim=1).double().cpu().numpy(),
        }
    shift, targets = logits.detach()[:, :-1], labels[:, 1:]
    mask = targets != IGNORE_INDEX
    positions = mask.nonzero()
    sums = torch.zeros(len(labels), dtype=torch.float64, device=logits.device)
    for part in positions.split(max(1, _EL2N_CHUNK_FLOATS // shift.shape[-1])):
        rows, cols = part[:, 0], part[:, 1]
        error = shift[rows, cols].float().softmax(dim=-1)
        error[torch.arange(len(rows), device=error.device), targets[rows, cols]] -= 1.0
        sums.index_add_(0, rows, error.norm(dim=-1).double())
    el2n = sums / mask.sum(dim=1).clamp(min=1)
    return {"loss": loss, "margin": np.full(len(loss), np.nan), "correct": None, "el2n": el2n.cpu().numpy()}


def dynamics_frame(
    ids: Sequence[str], epoch: int, parts: Sequence[tuple[np.ndarray, int, dict[str, Any]]]
) -> pd.DataFrame:
    """One epoch's dynamics table (columns :data:`DYNAMICS_COLUMNS`, rows in training-data order).

    ``parts`` holds, per batch, the row positions, the optimiser steps taken before that batch
    (so ``step`` names the weights the values were measured with) and :func:`row_dynamics`.
    """
    index = np.concatenate([rows for rows, _, _ in parts])
    order = np.argsort(index, kind="stable")

    def column(name: str) -> np.ndarray:
        return np.concatenate([stats[name] for _, _, stats in parts])[order]

    steps = np.concatenate([np.full(len(rows), step, dtype=np.int64) for rows, step, _ in parts])
    correct = (
        pd.array([pd.NA] * len(index), dtype="boolean")
        if parts[0][2]["correct"] is None
        else pd.array(column("correct"), dtype="boolean")
    )
    return pd.DataFrame(
        {
            "id": [ids[i] for i in index[order]],
            "epoch": np.full(len(index), epoch, dtype=np.int64),
            "step": steps[order],
            "loss": column("loss"),
            "margin": column("margin"),
            "correct": correct,
            "el2n": column("el2n"),
        }
    )


def _recorded_dynamics(states: Sequence[dict[str, Any]]) -> list[pd.DataFrame]:
    """Dynamics rows saved with the finished checkpoints a run resumes from (none if not recorded)."""
    files = [Path(s["path"]) / DYNAMICS_FILE for s in states]
    return [pd.read_parquet(f) for f in files if f.is_file()]


def _write_dynamics(out: Path, frames: Sequence[pd.DataFrame]) -> None:
    """Gather every recorded epoch into ``out/dynamics.parquet`` (atomically)."""
    table = pd.concat(frames, ignore_index=True).sort_values(["epoch", "step"], kind="stable")
    with atomic_path(out / DYNAMICS_FILE) as tmp:
        table.reset_index(drop=True).to_parquet(tmp, index=False)


def row_weights(weights: Mapping[str, float] | None, ids: Sequence[str]) -> torch.Tensor | None:
    """Per-row training weights in ``ids`` order (float32), or ``None`` when there are none.

    Rows ``weights`` does not name get 1. Weights must be finite and >= 0 with a positive sum and
    name only training rows; all-one weights are no weights (``None``), so they train bit-for-bit
    as an unweighted run.
    """
    if weights is None:
        return None
    known = set(ids)
    unknown = [str(i) for i in weights if str(i) not in known]
    if unknown:
        raise InfscopeError(
            f"row weights name {len(unknown)} ids that are not training rows (first: {unknown[0]!r}); "
            "give weights for training rows only"
        )
    by_id = {str(k): float(v) for k, v in weights.items()}
    values = np.array([by_id.get(i, 1.0) for i in ids], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        raise InfscopeError(
            f"row weight of {ids[bad[0]]!r} is {values[bad[0]]}; weights must be finite and >= 0"
        )
    if not values.sum() > 0:
        raise InfscopeError("every row weight is 0, so nothing would be trained; keep some weight > 0")
    if np.all(values == 1.0):
        return None
    return torch.tensor(values, dtype=torch.float32)


def batch_loss(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss a batch is trained on: the mean of its rows' losses, or ``sum w_i l_i / sum w_i``.

    A batch whose weights are all 0 contributes a zero loss (and zero gradient).
    """
    if weights is None:
        return losses.mean()
    w = weights.to(device=losses.device, dtype=losses.dtype)
    total = w.sum()
    if not total > 0:
        return (losses * w).sum()
    return (losses * w).sum() / total


class StepObserver(Protocol):
    """Reads training steps of chosen epochs (see the module docstring); must not change any state."""

    def wants(self, epoch: int) -> bool:
        """Whether to observe ``epoch`` (1-based)."""
        ...

    def begin_epoch(self, model: Any, epoch: int) -> None:
        """Called before the epoch's first step (weights as they enter the epoch)."""
        ...

    def batch(self, batch: Mapping[str, torch.Tensor]) -> AbstractContextManager[Any]:
        """A context around one batch's forward and backward."""
        ...

    def after_backward(self, rows: np.ndarray, losses: torch.Tensor, scale: torch.Tensor) -> None:
        """Rows of the batch, their losses and ``dLoss/dl_i`` (the batch backward has just run)."""
        ...

    def end_epoch(self, model: Any, epoch: int, step: int) -> None:
        """Called after the epoch's last step, before its checkpoint is written."""
        ...


def loss_scale(n_rows: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``dLoss/dl_i`` of :func:`batch_loss`: ``1/b`` per row, or ``w_i / sum w`` (``w_i`` if the sum is 0)."""
    if weights is None:
        return torch.full((n_rows,), 1.0 / n_rows, dtype=torch.float64)
    w = weights.double()
    total = w.sum()
    return w / total if total > 0 else w


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
        weights: torch.Tensor | None = None,
        observer: StepObserver | None = None,
    ) -> None:
        self.model, self.config, self.train, self.val, self.device = model, config, train, val, device
        self.forward_model = model  # the DDP wrapper under torchrun (see :meth:`distribute`)
        self.weights = weights
        self.observer = observer
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

    def distribute(self) -> None:
        """Train through DistributedDataParallel from now on (after any checkpoint was restored)."""
        self.forward_model = ddp.wrap(self.model, self.device)

    def run_epoch(
        self, epoch: int, history: list[dict[str, Any]], on_rows: Callable[[int], None] | None = None
    ) -> tuple[float, pd.DataFrame | None]:
        """Train one epoch (batch order and dropout seeded by ``(seed, epoch)``).

        Returns the epoch's mean loss and, with ``record_dynamics``, its :func:`dynamics_frame`.
        ``on_rows(n)`` is called after each batch of ``n`` rows. Under torchrun each rank runs its
        :func:`~infscope.models.ddp.shard_batch` of every global batch; the mean loss is summed over
        the ranks and the dynamics gathered, returned on rank 0 only (``None`` elsewhere).
        """
        config, train = self.config, self.train
        epoch_seed = config.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)  # dropout stream, fixed per epoch so a resumed run matches
        self.model.train()
        loss_sum, seen = 0.0, 0
        parts: list[tuple[np.ndarray, int, dict[str, Any]]] = []
        observer = self.observer if self.observer is not None and self.observer.wants(epoch) else None
        world, me = ddp.world_size(), ddp.rank()
        for rows in batch_order(len(train), config.batch_size, shuffle=True, seed=epoch_seed):
            row_w = None if self.weights is None else self.weights[torch.as_tensor(rows)]
            shard = ddp.shard_batch(rows, row_w, me, world) if world > 1 else None
            local = rows if shard is None else shard.rows
            batch = collate(train, local)
            with observer.batch(batch) if observer is not None else nullcontext():
                logits, labels, losses = forward_logits_losses(self.forward_model, batch, self.device)
                if not torch.isfinite(losses).all():
                    check_finite(losses.detach().double().cpu().numpy(), [train.ids[i] for i in local])
                if config.record_dynamics and (shard is None or not shard.dummy):
                    parts.append((local, self.step, row_dynamics(logits, labels, losses)))
                del logits, labels  # free the logits before backward, as without recording
                if shard is None:
                    loss = batch_loss(losses, row_w)
                else:  # this rank's share, scaled so that DDP's average is the global batch's gradient
                    loss = (losses * shard.factors.to(device=losses.device, dtype=losses.dtype)).sum()
                loss.backward()
            if observer is not None:
                observer.after_backward(rows, losses.detach(), loss_scale(len(rows), row_w))
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_sum += float(loss.detach()) / world * len(rows)  # summed over the ranks below
            seen += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
            if (
                isinstance(config.eval_every, int)
                and self.val is not None
                and self.step % config.eval_every == 0
                and ddp.is_main()
            ):
                history.append(
                    {
                        "step": self.step,
                        "epoch": epoch,
                        "val_loss": _mean_loss(self.model, self.val, config.batch_size),
                    }
                )
                self.model.train()
        if world > 1:
            loss_sum = ddp.sum_over_ranks(loss_sum)
            gathered = ddp.gather_to_main(parts)
            parts = [part for rank_parts in gathered for part in rank_parts] if gathered else []
        dynamics = dynamics_frame(train.ids, epoch, parts) if parts else None
        return loss_sum / seen, dynamics


def finetune(
    loaded: LoadedModel,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict] | None,
    config: FinetuneConfig,
    out_dir: str | os.PathLike,
    *,
    label_names: Sequence[Any] | None = None,
    progress: bool = True,
    weights: Mapping[str, float] | None = None,
    observer: StepObserver | None = None,
) -> FinetuneResult:
    """Fine-tune LoRA adapters on ``train_rows`` and save a checkpoint after each epoch.

    LoRA (``config.lora``) is attached if ``loaded.model`` has none yet; on return
    ``loaded.model`` is the peft model with the last epoch's weights, in eval mode. Validation
    loss (mean per-example loss of ``val_rows``) picks the best checkpoint. Reusing ``out_dir``
    with the same model, data and settings resumes after the last finished epoch. With
    ``config.record_dynamics`` each epoch's per-row dynamics are saved with its checkpoint and
    gathered in ``out_dir/dynamics.parquet``. ``progress`` shows a bar per epoch (on a terminal
    only, see :mod:`infscope.progress`). ``weights`` (row id -> weight, absent rows 1) make each
    batch's loss the weighted mean of its rows' losses (:func:`batch_loss`); the reported train
    loss is then the weighted one too. ``observer`` (a :class:`StepObserver`) reads the training
    steps of the epochs it wants; ``config.capture`` needs one (use
    :func:`infscope.grads.inrun.finetune_with_capture`).

    Launched by torchrun with ``WORLD_SIZE`` > 1, this trains data-parallel (see the module
    docstring): every rank calls it with the same arguments, ``config.device`` ``cuda`` means the
    local rank's GPU, and ``out_dir`` must be a directory every rank sees.
    """
    ddp.refuse_capture(config.capture, observer)
    if config.capture is not None and observer is None:
        raise InfscopeError(
            f"capture={config.capture!r} needs a gradient observer; call "
            "infscope.grads.inrun.finetune_with_capture (or `infscope finetune --capture`)"
        )
    if not train_rows:
        raise InfscopeError("no training rows; check the dataset and the validation split")
    target = resolve_device(config.device) if config.device is not None else None
    if ddp.launched():
        target = ddp.train_device(target or next(loaded.model.parameters()).device)
    if target is not None:
        loaded.model.to(target)
    distributed = ddp.init_from_env(target)
    main = ddp.is_main()
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
    row_w = row_weights(weights, train.ids)
    fingerprint = _fingerprint(loaded, config, train, val, row_w)
    states = _existing_states(ckpt_root, fingerprint)

    trainer = _Trainer(
        model,
        config,
        train,
        val,
        device,
        total=config.epochs * math.ceil(len(train) / config.batch_size),
        weights=row_w,
        observer=observer,
    )
    start_epoch, history = 0, []
    if states:
        last = states[-1]
        _restore(model, trainer.optimizer, Path(last["path"]))
        start_epoch, history = int(last["epoch"]), list(last.get("history", []))
        trainer.resume_at(int(last["step"]))
    if distributed:
        trainer.distribute()
    infos = [_info(s) for s in states]
    recorded = _recorded_dynamics(states)
    if config.record_dynamics and recorded and main:  # the table matches the checkpoints resumed from
        _write_dynamics(out, recorded)
    elif config.record_dynamics and main:
        (out / DYNAMICS_FILE).unlink(missing_ok=True)
    pending: list[pd.DataFrame] = []  # dynamics of epochs not yet saved with a checkpoint

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), frozen_prefix(model):
        for epoch in range(start_epoch + 1, config.epochs + 1):
            title = f"finetune epoch {epoch}/{config.epochs}"
            bars = progress_bar(title, total=len(train), unit="rows") if progress and main else nullcontext()
            watched = observer is not None and observer.wants(epoch)
            if watched:
                observer.begin_epoch(model, epoch)
            with bars as bar:
                train_loss, dynamics = trainer.run_epoch(epoch, history, bar.advance if bar else None)
            if watched:
                observer.end_epoch(model, epoch, trainer.step)
            if dynamics is not None:
                pending.append(dynamics)
            val_loss = _mean_loss(model, val, config.batch_size) if main else None
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
                saved = pd.concat(pending, ignore_index=True) if pending else None
                infos.append(_info({**state, "path": str(target)}))
                if main:
                    _save_checkpoint(model, trainer.optimizer, state, target, saved)
                    atomic_write_json(
                        out / SUMMARY_FILE, FinetuneResult(infos, _select_best(infos), start_epoch).to_dict()
                    )
                if saved is not None:
                    recorded.append(saved)
                    pending = []
                    _write_dynamics(out, recorded)
                ddp.barrier()  # the checkpoint exists for every rank before any goes on
    model.eval()
    result = FinetuneResult(infos, _select_best(infos), resumed_from=start_epoch)
    if main:
        atomic_write_json(out / SUMMARY_FILE, result.to_dict())
    ddp.barrier()
    return result if main else read_checkpoints(out)
