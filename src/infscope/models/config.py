"""Fine-tuning and LoRA settings as plain dataclasses, importable without torch.

The command line takes its defaults from these classes, and importing torch costs seconds, so the
settings live apart from the code that trains (:mod:`infscope.models.finetune`,
:mod:`infscope.models.lora`), which re-exports them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from infscope.errors import InfscopeError

SCHEDULES = ("linear", "cosine", "constant")
#: When in-run gradient capture happens (``FinetuneConfig.capture``).
CAPTURES = (None, "last", "every")
#: Dtype names the model loader accepts (:func:`infscope.models.registry.resolve_dtype`).
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


@dataclass
class LoraSpec:
    """LoRA hyper-parameters. ``target_modules=None`` picks the architecture's attention q/v defaults."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    #: Which decoder layers get adapters: ``None``/``"all"``, ``"top:N"`` (the last N) or a list such
    #: as ``"20-29"`` / ``"0,2,4"``. Tuning only the top layers lets the frozen bottom run once per row
    #: (:mod:`infscope.models.prefix`).
    layers: str | None = None

    def __post_init__(self) -> None:
        if int(self.r) < 1:
            raise InfscopeError(f"LoRA rank must be at least 1, got {self.r}; pass --rank 8 or similar")
        if float(self.alpha) <= 0:
            raise InfscopeError(f"LoRA alpha must be positive, got {self.alpha}; pass --alpha 16 or similar")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InfscopeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            self.target_modules = [str(t) for t in self.target_modules if str(t).strip()]
            if not self.target_modules:
                raise InfscopeError("target_modules is empty; name at least one module or leave it unset")
        if self.layers is not None:
            self.layers = str(self.layers).strip() or None
            parse_layers(self.layers, None)  # syntax check now; range check once the model is known

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for configs and fingerprints)."""
        return asdict(self)


def parse_layers(spec: str | None, n_layers: int | None) -> list[int] | None:
    """Decoder layer indices of a ``--lora-layers`` spec (``None`` = all layers).

    ``"all"``, ``"top:N"`` (the last N of ``n_layers``), ``"a-b"`` ranges and comma lists, e.g. ``"0,20-29"``.
    """
    if spec is None or spec == "all":
        return None
    bad = InfscopeError(
        f"--lora-layers {spec!r} is not understood; use all, top:N (the last N layers) or a list like 20-29"
    )
    if spec.startswith("top:"):
        try:
            count = int(spec[4:])
        except ValueError:
            raise bad from None
        if count < 1:
            raise bad
        if n_layers is None:
            return []
        if count > n_layers:
            raise InfscopeError(f"--lora-layers {spec} asks for more than the model's {n_layers} layers")
        return list(range(n_layers - count, n_layers))
    indices: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise bad from None
        if first < 0 or last < first:
            raise bad
        indices.update(range(first, last + 1))
    if n_layers is not None and max(indices) >= n_layers:
        raise InfscopeError(
            f"--lora-layers {spec} names layer {max(indices)}, but the model has {n_layers} layers"
        )
    return sorted(indices)


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (validated on creation).

    ``lr`` defaults to 1e-3, which moves LoRA adapters of small models (tiny test models,
    SmolLM2-135M) within a few epochs; 2e-4 is closer to what larger models want. ``eval_every``
    is ``"epoch"`` or a number of optimiser steps between validation losses (logged in the
    trainer state). ``device``/``dtype`` ``None`` keep the model's own. ``record_dynamics`` keeps
    each row's loss, margin, correctness and error norm from the training forward pass (no extra
    pass; the trained weights are the same either way) in ``dynamics.parquet``.
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
    record_dynamics: bool = True
    #: In-run gradient capture (:mod:`infscope.grads.inrun`): per-example gradients and losses of the
    #: training rows taken inside the training step of the ``"last"`` epoch or of ``"every"`` epoch,
    #: so influence needs no extra pass over the training set. ``None``: no capture.
    capture: str | None = None

    #: Options added after runs were first recorded, with their defaults. :meth:`to_dict` leaves
    #: them out while at the default, so a run recorded before an option existed still matches.
    LATER_OPTIONS: ClassVar[dict[str, Any]] = {"record_dynamics": True, "capture": None}

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
        if self.capture not in CAPTURES:
            raise InfscopeError(f"capture must be last, every or None, got {self.capture!r}; fix --capture")
        if self.dtype is not None and str(self.dtype).lower() not in DTYPE_NAMES:
            raise InfscopeError(f"unknown dtype {self.dtype!r}; use one of float32, bfloat16, float16")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (later options at their default left out, see ``LATER_OPTIONS``)."""
        data = asdict(self)
        for name, default in self.LATER_OPTIONS.items():
            if data.get(name) == default:
                data.pop(name)
        return data


def lora_finetune_config(
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int,
    device: str | None,
    dtype: str | None,
    rank: int,
    alpha: float,
    target_modules: str | None = None,
    lora_layers: str | None = None,
) -> FinetuneConfig:
    """The fine-tuning settings of a command's flat options (``target_modules`` comma-separated, no dropout)."""
    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
    return FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        max_length=max_length,
        device=device,
        dtype=dtype,
        lora=LoraSpec(r=rank, alpha=alpha, dropout=0.0, target_modules=targets, layers=lora_layers),
    )
