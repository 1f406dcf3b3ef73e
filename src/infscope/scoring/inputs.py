"""The :class:`~infscope.estimators.inputs.MethodInputs` of one opened run at one checkpoint.

Each accessor computes its value on first use and keeps it, so five gradient methods share one
gradient pass and two model-forward methods share one model load.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.estimators.class_restricted import row_classes
from infscope.estimators.inputs import (
    ALL_CHECKPOINTS,
    CANARIES,
    DYNAMICS,
    EMBEDDINGS,
    KFAC_FACTORS,
    LOSSES,
    MODEL,
    OPTIMIZER_STATE,
    QUERY_GRADS,
    REFIT,
    TRAIN_GRADS,
    CheckpointGradients,
    Embeddings,
    OutOfFold,
)
from infscope.grads.base import GradientSet, InMemoryGradients, to_memory
from infscope.grads.kfac import cached_kfac_factors, collect_kfac_factors
from infscope.scoring.gradients import (
    checkpoint_gradients,
    checkpoint_prefix,
    encode_for,
    query_gradients,
    shuffled_prompts,
)
from infscope.scoring.run import Checkpoint, OpenedRun

IN_MEMORY_LIMIT = 2 << 30
#: What the query gradient measures: the validation loss, or how much the model relies on each
#: validation prompt (``L(A|Q) - L(A|Q')``, own prompt versus another row's).
MEASUREMENTS = ("loss", "pairing")


def per_instance(method):
    """Compute a method's value once per instance and arguments, stored on the instance.

    Unlike ``functools.cache`` on a method, the values (gradient sets, loaded models) go away with
    the instance, so scoring several runs in one process does not keep every model alive.
    """

    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()  # model() and model("checkpoint") are the same value
        key = (method.__name__, *tuple(bound.arguments.items())[1:])
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            memo[key] = method(self, *args, **kwargs)
        return memo[key]

    return wrapper


def in_memory_if_small(grads: GradientSet, limit_bytes: int = IN_MEMORY_LIMIT) -> GradientSet:
    """Load an on-disk store once when it fits in ``limit_bytes``, so methods do not each reread it."""
    if isinstance(grads, InMemoryGradients):
        return grads
    size = 4 * len(grads.ids) * sum(grads.block_dim(b) for b in grads.block_names)
    return to_memory(grads) if size <= limit_bytes else grads


class RunInputs:
    """Inputs of the methods scored on ``run`` at ``checkpoint`` against ``query`` rows."""

    def __init__(
        self,
        run: OpenedRun,
        checkpoint: Checkpoint,
        query: Sequence[dict],
        *,
        query_name: str = "val",
        grad_dtype: str = "float32",
        block_by: str = "matrix",
        aggregate: bool = True,
        seed: int | None = None,
        measurement: str = "loss",
    ) -> None:
        self.run = run
        self.checkpoint = checkpoint
        self._query = list(query)
        self.query_name = query_name
        self.grad_dtype = grad_dtype
        self.block_by = block_by
        self.aggregate = aggregate
        self.seed = run.spec.seed if seed is None else int(seed)
        if measurement not in MEASUREMENTS:
            raise InfscopeError(f"unknown measurement {measurement!r}; use {' or '.join(MEASUREMENTS)}")
        if measurement == "pairing" and run.spec.task != "instruction":
            raise InfscopeError("the pairing measurement needs instruction data; use --measurement loss")
        self.measurement = measurement
        #: Scores computed for these inputs, by method: shared by score_methods and scores_of.
        self.score_cache: dict[str, Any] = {}

    @property
    def task(self) -> str:
        return self.run.spec.task

    @property
    def train_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.run.train]

    def available(self, need: str) -> bool:
        if need in (TRAIN_GRADS, QUERY_GRADS, LOSSES, MODEL, KFAC_FACTORS):
            return True
        if need == ALL_CHECKPOINTS:
            return len(self.run.checkpoints) >= 1
        if need == OPTIMIZER_STATE:
            return all(c.optimizer_path for c in self.run.checkpoints)
        if need == DYNAMICS:
            return self.run.layout.dynamics.is_file()
        if need == CANARIES:
            return bool(self.run.canary_ids)
        if need == REFIT:
            return self.run.record.finetune is not None
        if need == EMBEDDINGS:
            return row_classes(self.run.train) is not None and row_classes(self._query) is not None
        return False

    @per_instance
    def _at(self, path: str):
        return checkpoint_gradients(
            self.run.spec,
            self.run.layout,
            path,
            self.run.train,
            self._query,
            query_name=self.query_name,
            grad_dtype=self.grad_dtype,
            block_by=self.block_by,
        )

    @per_instance
    def train_grads(self) -> GradientSet:
        return in_memory_if_small(self._at(self.checkpoint.path)[0])

    def query_grads(self) -> GradientSet:
        return self._query_at(self.checkpoint.path)

    @per_instance
    def _query_at(self, path: str) -> GradientSet:
        """The query gradient of the measurement: the loss, or the pairing gap (own minus shuffled prompt)."""
        own = self._at(path)[1]
        if self.measurement == "loss":
            return own
        shuffled = query_gradients(
            self.run.spec,
            self.run.layout,
            path,
            shuffled_prompts(self._query, self.seed),
            f"{self.query_name}-shuffled",
            grad_dtype=self.grad_dtype,
            block_by=self.block_by,
        )
        blocks = {b: own.load_block(b) - shuffled.load_block(b) for b in own.block_names}
        return InMemoryGradients(own.ids, blocks)

    def losses(self) -> pd.DataFrame:
        return self._at(self.checkpoint.path)[2]

    @per_instance
    def checkpoints(self) -> list[CheckpointGradients]:
        out = []
        for c in self.run.checkpoints:
            train, query = self._at(c.path)[0], self._query_at(c.path)
            lr = 1.0 if c.lr is None else float(c.lr)
            out.append(CheckpointGradients(c.tag, c.path, train, query, lr, c.optimizer_path))
        return out

    @per_instance
    def _optimizer_param_names(self) -> tuple[str, ...]:
        """Names of the adapter parameters in the order the optimiser was built with (trainable adapter)."""
        from infscope.models.lora import load_adapter, trainable_parameters
        from infscope.models.registry import load_spec

        model = load_adapter(load_spec(self.run.spec), self.checkpoint.path, trainable=True)
        return tuple(trainable_parameters(model))

    def block_moments(self, checkpoint: CheckpointGradients) -> dict[str, Any]:
        from infscope.models.optimizer_state import checkpoint_block_moments

        if not checkpoint.optimizer_path:
            raise InfscopeError(
                f"checkpoint {checkpoint.path} has no optimizer.pt; LESS and TrackStar need it"
            )
        return checkpoint_block_moments(
            checkpoint.optimizer_path, list(self._optimizer_param_names()), checkpoint.train
        )

    @per_instance
    def model(self, which: str = "checkpoint") -> Any:
        """The base model (``which="base"``) or the scored checkpoint's, with its tokenizer, in eval mode."""
        from infscope.models.lora import load_adapter
        from infscope.models.registry import load_spec

        loaded = load_spec(self.run.spec)
        loaded.model.requires_grad_(False)
        if which == "base":
            return loaded
        if which != "checkpoint":
            raise InfscopeError(f"unknown model {which!r}; use 'checkpoint' or 'base'")
        loaded.model = load_adapter(loaded, self.checkpoint.path)
        loaded.model.eval()
        return loaded

    @per_instance
    def prefix_states(self, path: str) -> Any:
        """The frozen-prefix cache of the checkpoint at ``path`` (``None``: LoRA on all layers).

        :func:`~infscope.scoring.gradients.checkpoint_prefix`: the one the gradient passes at that
        checkpoint used in this process, so the K-FAC pass reads the frozen layers' states they left.
        Kept here too, so these inputs hold it while they live.
        """
        return checkpoint_prefix(self.run.spec, path)

    @per_instance
    def kfac_factors(self, fisher: str = "empirical") -> Any:
        """K-FAC factors of the training rows at the checkpoint, cached in ``RunLayout.kfac`` (grads/kfac.py).

        With LoRA on the top layers only, the pass runs from the checkpoint's shared frozen-prefix
        cache (:meth:`prefix_states`): rows the gradient pass already saw skip the frozen layers.
        """

        def collect():
            loaded, spec = self.model("checkpoint"), self.run.spec
            enc = encode_for(spec, self.run.train, loaded.tokenizer)
            cache = self.prefix_states(self.checkpoint.path)
            kw = {"fisher": fisher, "seed": self.seed, "eigen_correction": fisher == "true"}
            return collect_kfac_factors(
                loaded.model,
                enc,
                batch_size=spec.batch_size,
                prefix=cache if cache is not None else True,
                **kw,
            )

        path = self.run.layout.kfac(self.checkpoint.path, self.block_by)
        return cached_kfac_factors(path, collect, ids=self.train_ids, fisher=fisher, seed=self.seed)

    def rows(self) -> list[dict]:
        return self.run.train

    def query_rows(self) -> list[dict]:
        return self._query

    def dynamics(self) -> pd.DataFrame:
        path = self.run.layout.dynamics
        if not path.is_file():
            raise InfscopeError(
                f"{self.run.path} has no training dynamics ({path}); fine-tune it again with this version"
            )
        return pd.read_parquet(path)

    @per_instance
    def out_of_fold(self, k: int) -> OutOfFold:
        """K fine-tunes with the run's settings, each without one fold; every row scored by its fold's model."""
        import torch

        from infscope.estimators.out_of_fold import fold_of
        from infscope.models.config import FinetuneConfig
        from infscope.models.finetune import finetune
        from infscope.models.loss import per_example_loss
        from infscope.models.pair_losses import classifier_logits
        from infscope.models.registry import load_spec
        from infscope.scoring.gradients import encode_for

        if self.run.record.finetune is None:
            raise InfscopeError(
                "out-of-fold scores refit the model; this run has no infscope fine-tune settings"
            )
        config = FinetuneConfig(**self.run.record.finetune)
        spec = self.run.spec
        rows = self.run.train
        folds = fold_of([str(r["id"]) for r in rows], k, self.seed)
        losses = np.zeros(len(rows))
        classifier = spec.model_task == "classification"
        probs = np.zeros((len(rows), len(spec.label_names or []))) if classifier else None
        labels = np.zeros(len(rows), dtype=np.int64) if classifier else None
        for fold in range(k):
            held = np.flatnonzero(folds == fold)
            kept = [rows[i] for i in np.flatnonzero(folds != fold)]
            loaded = load_spec(spec)
            finetune(
                loaded,
                kept,
                self.run.val,
                config,
                self.run.layout.out_of_fold(k, fold),
                label_names=spec.label_names if classifier else None,
            )
            held_rows = [rows[i] for i in held]
            losses[held] = per_example_loss(
                loaded.model, encode_for(spec, held_rows, loaded.tokenizer), batch_size=spec.batch_size
            )
            if classifier:
                logits, given = classifier_logits(
                    loaded.model,
                    loaded.tokenizer,
                    held_rows,
                    max_length=spec.max_length,
                    batch_size=spec.batch_size,
                    label_names=spec.label_names,
                )
                probs[held] = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
                labels[held] = given
        return OutOfFold(k, losses, probs, labels)

    @per_instance
    def embeddings(self) -> Embeddings:
        from infscope.models.embed import mean_hidden_states
        from infscope.scoring.gradients import encode_for

        train_c, query_c = row_classes(self.run.train), row_classes(self._query)
        if train_c is None or query_c is None:
            raise InfscopeError(
                "embedding methods need classes: a label (classification) or a 'class' field per row"
            )
        loaded = self.model("checkpoint")
        spec = self.run.spec

        def embed(rows):
            return mean_hidden_states(
                loaded.model, encode_for(spec, rows, loaded.tokenizer), batch_size=spec.batch_size
            )

        names = {name: i for i, name in enumerate(sorted(set(train_c) | set(query_c)))}
        train_y = np.asarray([names[c] for c in train_c], dtype=np.int64)
        query_y = np.asarray([names[c] for c in query_c], dtype=np.int64)
        return Embeddings(embed(self.run.train), train_y, embed(self._query), query_y)

    @property
    def canary_ids(self) -> list[str]:
        return list(self.run.canary_ids)

    def scores_of(self, names) -> dict[str, Any]:
        from infscope.scoring.methods import score_methods

        return score_methods(list(names), self)

    def encode_options(self) -> dict[str, Any]:
        spec = self.run.spec
        return {
            "task": spec.model_task,
            "max_length": spec.max_length,
            "batch_size": spec.batch_size,
            "response_only": spec.response_only,
            "label_names": spec.label_names if spec.model_task == "classification" else None,
        }
