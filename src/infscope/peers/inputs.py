"""Everything a peer needs from one finished pipeline run, read once and shared by all adapters.

A peer must see exactly what our estimators saw: the same base model with the same LoRA adapter
checkpoint, the same encoded training and validation rows, the same tracked LoRA modules (the
gradient store's block names) and the same noise manifest. :meth:`PeerInputs.from_run` reads them
from a run directory written by :func:`infscope.pipeline.run_pipeline`;
:meth:`PeerInputs.from_gradients` wraps bare gradient sets (enough for the reference loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from infscope.errors import InfscopeError
from infscope.grads.base import GradientSet


@dataclass
class PeerInputs:
    """Model factory, rows, gradients, manifest and our own scores of one run.

    ``load_model()`` returns a fresh model with the scored adapter loaded (eval mode), so each peer
    may wrap or modify it freely. ``task`` is ``"instruction"`` or ``"classification"``.
    ``checkpoints`` lists every adapter checkpoint path in epoch order (cleanlab uses the first).
    ``encoder`` (rows -> :class:`~infscope.models.encode.Encoded`) replaces the tokenizer when set
    (tests with hand-made token ids).
    """

    train_grads: GradientSet
    val_grads: GradientSet
    task: str = "instruction"
    train_rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)
    label_names: list | None = None
    load_model: Callable[..., nn.Module] | None = None
    tokenizer: Any = None
    max_length: int = 128
    batch_size: int = 8
    checkpoint: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    manifest: pd.DataFrame | None = None
    run_dir: Path | None = None
    seed: int = 0
    encoder: Callable[[list[dict]], Any] | None = None

    @property
    def train_ids(self) -> list[str]:
        return list(self.train_grads.ids)

    @property
    def tracked_modules(self) -> list[str]:
        """Names of the modules whose gradients our store holds (the LoRA A/B Linear layers)."""
        return list(self.train_grads.block_names)

    def ordered_train_rows(self) -> list[dict]:
        """Training rows in the gradient store's order, so peer scores align with ``train_ids``."""
        by_id = {str(r["id"]): r for r in self.train_rows}
        missing = [i for i in self.train_ids if i not in by_id]
        if missing:
            raise InfscopeError(f"training rows lack ids of the gradient store, e.g. {missing[0]!r}")
        return [by_id[i] for i in self.train_ids]

    def require_model(self) -> Callable[..., nn.Module]:
        """The model factory, or a one-line error naming how to get one."""
        if self.load_model is None or (self.tokenizer is None and self.encoder is None):
            raise InfscopeError(
                "this peer needs the model and rows; build PeerInputs from a run directory (PeerInputs.from_run)"
            )
        return self.load_model

    def encode(self, rows: list[dict]):
        """Encode rows exactly as the pipeline did (same tokenizer, task, max length, label order)."""
        from infscope.models.encode import encode_rows

        if self.encoder is not None:
            return self.encoder(rows)
        labels = self.label_names if self.task == "classification" else None
        return encode_rows(
            rows, self.tokenizer, task=self.task, max_length=self.max_length, label_names=labels
        )

    def our_scores(self, method: str):
        """Our saved :class:`~infscope.estimators.scores.Scores` of ``method`` in this run, or ``None``."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "scores" / f"{method}.npz"
        if not path.exists():
            return None
        from infscope.estimators.scores import Scores

        return Scores.load(path)

    @classmethod
    def from_gradients(cls, train: GradientSet, query: GradientSet, **kwargs: Any) -> PeerInputs:
        """Inputs holding gradients only (for the reference loop and tests)."""
        return cls(train_grads=train, val_grads=query, **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> PeerInputs:
        """Read a finished run (``infscope demo`` or ``infscope finetune`` + ``score``) with gradients.

        The scored checkpoint is the one the training gradient store was computed at, so peers
        and our estimators look at the same adapter.
        """
        from infscope.grads.store import GradientStore
        from infscope.scoring import open_finetuned_run

        run_dir = Path(run_dir)
        run = open_finetuned_run(run_dir)
        grads_dir = run_dir / "grads"
        if not (grads_dir / "train").exists() or not (grads_dir / "val").exists():
            raise InfscopeError(
                f"run {run_dir} has no gradient stores; score it first (`infscope score {run_dir}`)"
            )
        train_grads = GradientStore.open(grads_dir / "train")
        checkpoint = Path(train_grads.meta.get("checkpoint") or run.best.path)
        spec = run.spec
        base = spec.load_base()

        def load_model(path: Path | None = None, attn_implementation: str | None = None) -> nn.Module:
            """Fresh base model (as ``spec.load_base``) with the adapter at ``path`` (default: scored)."""
            import torch

            from infscope.models.lora import load_adapter
            from infscope.models.registry import load_model as load

            torch.manual_seed(spec.seed)
            classes = (
                len(spec.label_names) if spec.model_task == "classification" and spec.label_names else None
            )
            base = load(
                spec.name,
                task=spec.model_task,
                num_labels=classes,
                device=spec.device,
                dtype=spec.dtype,
                seed=spec.seed,
                attn_implementation=attn_implementation,
            )
            return load_adapter(base, path or checkpoint)

        manifest = None
        if run.manifest is not None and Path(run.manifest).is_file():
            from infscope.data.manifest import read_manifest

            manifest = read_manifest(run.manifest)
        return cls(
            train_grads=train_grads,
            val_grads=GradientStore.open(grads_dir / "val"),
            task=spec.task,
            train_rows=list(run.train),
            val_rows=list(run.val),
            label_names=spec.label_names,
            load_model=load_model,
            tokenizer=base.tokenizer,
            max_length=spec.max_length,
            batch_size=spec.batch_size,
            checkpoint=checkpoint,
            checkpoints=[Path(c.path) for c in run.checkpoints],
            manifest=manifest,
            run_dir=run_dir,
            seed=spec.seed,
        )
