"""Everything a peer needs from one finished pipeline run, read once and shared by all adapters.

A peer must see exactly what our estimators saw: the same base model with the same LoRA adapter
checkpoint, the same encoded training and validation rows, the same tracked LoRA modules (the
gradient store's block names) and the same noise manifest. :meth:`PeerInputs.from_run` reads them
from a run directory through :func:`infscope.scoring.run.open_run`;
:meth:`PeerInputs.from_gradients` wraps bare gradient sets (enough for the reference loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from infscope.data.manifest import manifest_for_ids, read_manifest
from infscope.errors import InfscopeError
from infscope.grads.base import GradientSet
from infscope.grads.store import INDEX_FILE, GradientStore
from infscope.models.registry import load_spec, load_tokenizer
from infscope.runs import RunLayout
from infscope.runs.layout import BLOCK_BY_DEFAULT
from infscope.scoring.run import OpenedRun, open_run


@dataclass
class PeerInputs:
    """Model factory, rows, gradients, manifest and our own scores of one run.

    ``load_model()`` returns a fresh model with the scored adapter loaded (eval mode), so each peer
    may wrap or modify it freely. ``task`` is ``"instruction"`` or ``"classification"``.
    ``checkpoints`` lists every adapter checkpoint path in epoch order (cleanlab uses the first).
    ``encoder`` (rows -> :class:`~infscope.models.encode.Encoded`) replaces the tokenizer when set
    (tests with hand-made token ids). ``block_by`` is the gradient stores' block grouping
    (with ``checkpoint``, it names the run's per-row losses: ``RunLayout.losses``).
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
    block_by: str = BLOCK_BY_DEFAULT

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
        path = RunLayout(self.run_dir).scores(method)
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
        """Read a finished run (``infscope demo``, or ``infscope finetune`` + ``score``) with gradients.

        The gradient stores are the ones ``infscope score`` recorded (its checkpoint and block
        grouping, :func:`gradient_stores`), so peers and our estimators look at the same adapter.
        Only the tokenizer is loaded here; ``load_model()`` builds the model when a peer needs it.
        """
        run = open_run(run_dir)
        checkpoint_path, block_by = gradient_stores(run)
        layout = run.layout
        train_grads = GradientStore.open(layout.grads(checkpoint_path, "train", block_by))
        checkpoint = Path(train_grads.meta.get("checkpoint") or checkpoint_path)
        spec = run.spec

        def load_model(path: Path | None = None, attn_implementation: str | None = None) -> nn.Module:
            """Fresh base model (as the run was tuned) with the adapter at ``path`` (default: scored)."""
            from infscope.models.lora import load_adapter  # peft loads only when a peer needs the model

            return load_adapter(load_spec(spec, attn_implementation=attn_implementation), path or checkpoint)

        manifest = None
        if run.manifest is not None:
            manifest = manifest_for_ids(read_manifest(run.manifest), train_grads.ids)
        return cls(
            train_grads=train_grads,
            val_grads=GradientStore.open(layout.grads(checkpoint_path, "val", block_by)),
            task=spec.task,
            train_rows=list(run.train),
            val_rows=list(run.val),
            label_names=spec.label_names,
            load_model=load_model,
            tokenizer=load_tokenizer(spec),
            max_length=spec.max_length,
            batch_size=spec.batch_size,
            checkpoint=checkpoint,
            checkpoints=[Path(c.path) for c in run.checkpoints],
            manifest=manifest,
            run_dir=run.path,
            seed=spec.seed,
            block_by=block_by,
        )


def _has_stores(layout: RunLayout, checkpoint: str, block_by: str) -> bool:
    return all(
        (layout.grads(checkpoint, split, block_by) / INDEX_FILE).is_file() for split in ("train", "val")
    )


def gradient_stores(run: OpenedRun) -> tuple[str, str]:
    """The ``(checkpoint path, block_by)`` whose train and validation gradient stores peers read.

    First the checkpoint and block grouping ``infscope score`` recorded (stage ``score``), then the
    best checkpoint with that grouping, then the best with the default grouping. Peers compare on
    the validation rows, so a run scored only against another ``--query`` needs ``infscope score``
    once more without it.
    """
    info = run.dir.stage_info("score")
    block_by = str(info.get("block_by") or BLOCK_BY_DEFAULT)
    candidates = [
        (info.get("checkpoint"), block_by),
        (run.best.path, block_by),
        (run.best.path, BLOCK_BY_DEFAULT),
    ]
    for checkpoint, blocks in candidates:
        if checkpoint and _has_stores(run.layout, str(checkpoint), blocks):
            return str(checkpoint), blocks
    if info.get("query") not in (None, "val"):
        raise InfscopeError(
            f"run {run.path} was scored against another query, and peers compare on the validation rows; "
            f"run `infscope score {run.path}` without --query first"
        )
    raise InfscopeError(
        f"run {run.path} has no gradient stores; score it first (`infscope score {run.path}`)"
    )
