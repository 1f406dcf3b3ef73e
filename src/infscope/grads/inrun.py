"""In-run gradient capture: per-example gradients of the training rows taken inside fine-tuning.

The training step already back-propagates the batch loss ``L = sum_i c_i l_i`` (``c_i = 1/b``, or
``w_i / sum w`` with row weights). With :class:`~infscope.grads.hooks.PerExampleGradients` hooks on
the LoRA matrices during that backward, each row's slice of the batched gradient is
``c_i dl_i/dW``; dividing by ``c_i`` gives the row's own gradient (a row of weight 0 gets zeros).
The hooks only read ``x`` and ``dL/dy``, so the optimiser step, and with it every trained weight,
is exactly that of training without capture. Gradients are taken before clipping, in train mode
(with LoRA dropout, if any), at the weights of the step each row was trained in: in-run gradients,
not the gradients at the end of the epoch that a separate pass gives.

Before a captured epoch, a hooked pass over the validation rows (eval mode, no optimiser step)
takes the query gradients at the weights entering the epoch. Both land in
``RunLayout.inrun(epoch)/grads/{train,val}`` as :class:`~infscope.grads.store.GradientStore`s in
row order, so influence needs no extra pass over the training set. An epoch's training gradients
are held in memory (``rows x LoRA parameters`` float32) until the epoch ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.grads.hooks import PerExampleGradients, compute_gradients, model_fingerprint
from infscope.grads.store import GradientStore
from infscope.models.config import FinetuneConfig
from infscope.models.encode import Encoded, encode_rows
from infscope.models.finetune import FinetuneResult, finetune
from infscope.models.registry import LoadedModel
from infscope.runs import RunLayout

SHARD_ROWS = 256


def write_store(
    path: Path,
    ids: Sequence[str],
    blocks: Mapping[str, torch.Tensor],
    losses: np.ndarray | None,
    meta: Mapping[str, Any],
    param_shapes: Mapping[str, Any],
) -> GradientStore:
    """Write ``(n, d)`` blocks (and per-row losses) as a complete float32 store at ``path`` (replacing one)."""
    store = GradientStore.create(
        path,
        ids,
        {name: int(t.shape[1]) for name, t in blocks.items()},
        "float32",
        meta,
        shard_rows=SHARD_ROWS,
        overwrite=True,
        param_shapes=param_shapes,
    )
    for shard in range(store.n_shards):
        start, stop = store.shard_range(shard)
        store.write_shard(
            shard,
            {name: t[start:stop] for name, t in blocks.items()},
            None if losses is None else losses[start:stop],
        )
    return store


class InRunCapture:
    """A :class:`~infscope.models.finetune.StepObserver` that stores per-example gradients of chosen epochs.

    ``which`` is ``"last"`` (epoch ``epochs``) or ``"every"``; ``store_dir(epoch)`` is the folder that
    receives ``grads/train`` and ``grads/val`` (e.g. ``RunLayout.inrun``).
    """

    def __init__(
        self,
        which: str,
        epochs: int,
        train: Encoded,
        val: Encoded | None,
        store_dir: Callable[[int], Path],
        *,
        block_by: str = "matrix",
        batch_size: int = 8,
    ) -> None:
        if which not in ("last", "every"):
            raise InfscopeError(f"capture must be last or every, got {which!r}")
        self.which, self.epochs, self.train, self.val = which, int(epochs), train, val
        self.store_dir, self.block_by, self.batch_size = store_dir, block_by, int(batch_size)
        self.engine: PerExampleGradients | None = None
        self.captured: list[int] = []

    def wants(self, epoch: int) -> bool:
        return self.which == "every" or epoch == self.epochs

    def begin_epoch(self, model: Any, epoch: int) -> None:
        """Query gradients at the weights entering the epoch, then hooks on for its training steps."""
        self._meta = {
            "captured": "in-run",
            "epoch": int(epoch),
            "block_by": self.block_by,
            "projection": None,
        }
        self._meta["fingerprint"] = model_fingerprint(model)
        if self.val is not None and len(self.val):
            query = compute_gradients(
                model, self.val, batch_size=self.batch_size, block_by=self.block_by, progress=False
            )
            meta = {**self._meta, "layers": query.meta["layers"], "taken": "before the epoch"}
            blocks = {name: query.load_block(name) for name in query.block_names}
            write_store(self._path(epoch, "val"), query.ids, blocks, query.losses, meta, query.param_shapes)
        self.engine = PerExampleGradients(model)
        self.layout = self.engine.layout(self.block_by)
        self.device = next(model.parameters()).device
        n = len(self.train)
        self.blocks = {name: torch.zeros(n, d) for name, d in self.layout.dims.items()}
        self.losses = np.full(n, np.nan)
        self.engine.__enter__()

    @contextlib.contextmanager
    def batch(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        assert self.engine is not None
        mask = batch.get("attention_mask")
        self.engine.set_mask(None if mask is None else mask.to(self.device))
        yield

    def after_backward(self, rows: np.ndarray, losses: torch.Tensor, scale: torch.Tensor) -> None:
        """Undo each row's factor in the batch loss and keep its gradient and loss at its position."""
        assert self.engine is not None
        # The hooks gathered the gradients during the training step's own backward.
        grads = self.engine.take(len(rows), device=self.device)
        inverse = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-300), torch.zeros_like(scale))
        index = torch.as_tensor(rows, dtype=torch.long)
        for name, tensor in self.layout.assemble(grads).items():
            per_row = tensor.detach().double() * inverse.to(tensor.device).unsqueeze(1)
            self.blocks[name][index] = per_row.to("cpu", torch.float32)
        self.losses[np.asarray(rows)] = losses.double().cpu().numpy()

    def end_epoch(self, model: Any, epoch: int, step: int) -> None:
        """Hooks off; the epoch's training gradients and losses written as a store in row order."""
        assert self.engine is not None
        self.engine.__exit__(None, None, None)
        meta = {**self._meta, "layers": self.engine.layer_names, "step": int(step), "taken": "training step"}
        shapes = self.engine.block_param_shapes(self.layout)
        write_store(self._path(epoch, "train"), self.train.ids, self.blocks, self.losses, meta, shapes)
        self.engine, self.blocks = None, {}
        self.captured.append(int(epoch))

    def _path(self, epoch: int, split: str) -> Path:
        return Path(self.store_dir(epoch)) / "grads" / split


def finetune_with_capture(
    loaded: LoadedModel,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict] | None,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    store_dir: Callable[[int], Path] | None = None,
    label_names: Sequence[Any] | None = None,
    progress: bool = True,
    weights: Mapping[str, float] | None = None,
    block_by: str = "matrix",
) -> FinetuneResult:
    """:func:`~infscope.models.finetune.finetune` with ``config.capture`` honoured (see the module docstring).

    ``store_dir(epoch)`` defaults to ``<out_dir>/../scoring/inrun-epoch-N`` when ``out_dir`` is a
    run's ``finetune`` folder (``RunLayout.inrun``), else ``<out_dir>/inrun-epoch-N``.
    Without ``config.capture`` this is plain fine-tuning.
    """
    observer = None
    if config.capture is not None:
        if store_dir is None:
            out = Path(out_dir)
            root = RunLayout(out.parent) if out.name == "finetune" else None
            store_dir = root.inrun if root is not None else (lambda e: out / f"inrun-epoch-{e}")

        def encode(rows: Sequence[dict]) -> Encoded:
            return encode_rows(
                list(rows),
                loaded.tokenizer,
                task=loaded.task,
                max_length=config.max_length,
                response_only=config.response_only,
                label_names=label_names,
            )

        observer = InRunCapture(
            config.capture,
            config.epochs,
            encode(train_rows),
            encode(val_rows) if val_rows else None,
            store_dir,
            block_by=block_by,
            batch_size=config.batch_size,
        )
    return finetune(
        loaded,
        train_rows,
        val_rows,
        config,
        out_dir,
        label_names=label_names,
        progress=progress,
        weights=weights,
        observer=observer,
    )
