"""What a scoring method may ask for, and the object that provides it.

Every method in the registry declares its needs as a tuple of the names below; the scoring layer
(:mod:`infscope.scoring.inputs`) implements :class:`MethodInputs` for a run and provides exactly
those, each computed once and shared by every method of one call. So adding a method never
touches the orchestration, and a method whose needs a run cannot meet is left out of ``all``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd

from infscope.grads.base import GradientSet

#: Per-example gradients of the training rows at the scored checkpoint.
TRAIN_GRADS = "train_grads"
#: Per-example gradients of the query rows at the scored checkpoint.
QUERY_GRADS = "query_grads"
#: Per-row training loss at the scored checkpoint and under the base model.
LOSSES = "losses"
#: Train and query gradients at every saved checkpoint, with each checkpoint's mean learning rate.
ALL_CHECKPOINTS = "all_checkpoints"
#: Adam moments saved with every checkpoint (LESS, TrackStar).
OPTIMIZER_STATE = "optimizer_state"
#: A model forward: the tuned checkpoint (and the base model) with its tokenizer and the rows.
MODEL = "model"
#: Per-row loss (and margin) at every epoch, recorded during fine-tuning.
DYNAMICS = "dynamics"
#: Canary rows (known-bad copies added before fine-tuning) and other methods' scores on every row.
CANARIES = "canaries"
#: Row embeddings of the tuned model for train and query rows, with their labels (classes).
EMBEDDINGS = "embeddings"
#: Fine-tuning again with the run's own settings (K-fold models for out-of-fold scores).
REFIT = "refit"
#: K-FAC covariance factors of the LoRA layers over the training rows at the scored checkpoint.
KFAC_FACTORS = "kfac_factors"

NEEDS = (
    TRAIN_GRADS,
    QUERY_GRADS,
    LOSSES,
    ALL_CHECKPOINTS,
    OPTIMIZER_STATE,
    MODEL,
    DYNAMICS,
    CANARIES,
    EMBEDDINGS,
    KFAC_FACTORS,
    REFIT,
)


@dataclass
class Embeddings:
    """Train and query row embeddings with integer class labels (``-1`` never occurs)."""

    train_x: Any
    train_y: Any
    query_x: Any
    query_y: Any


@dataclass
class OutOfFold:
    """Per training row (in ``train_ids`` order): loss, and for classifiers class probabilities and labels."""

    k: int
    losses: Any
    probs: Any = None
    labels: Any = None


@dataclass
class CheckpointGradients:
    """Gradients at one saved checkpoint, with TracIn's weight (mean learning rate since the last)."""

    name: str
    path: str
    train: GradientSet
    query: GradientSet
    lr: float
    optimizer_path: str | None = None


class MethodInputs(Protocol):
    """What scoring provides to a method; each accessor computes its value once, on first use."""

    seed: int
    aggregate: bool
    task: str  # "instruction" or "classification"

    @property
    def train_ids(self) -> list[str]: ...

    def available(self, need: str) -> bool:
        """Whether this run can provide ``need`` (a run without checkpoints has no dynamics, ...)."""
        ...

    def train_grads(self) -> GradientSet: ...

    def query_grads(self) -> GradientSet: ...

    def losses(self) -> pd.DataFrame: ...

    def checkpoints(self) -> list[CheckpointGradients]: ...

    def block_moments(self, checkpoint: CheckpointGradients) -> dict[str, Any]:
        """Adam moments saved with ``checkpoint``, laid out like its gradient blocks."""
        ...

    def model(self, which: str = "checkpoint") -> Any: ...

    def rows(self) -> list[dict]: ...

    def query_rows(self) -> list[dict]: ...

    def dynamics(self) -> pd.DataFrame: ...

    def kfac_factors(self, fisher: str = "empirical") -> Any:
        """:class:`~infscope.grads.kfac.KFACFactors` of the training rows (``fisher``: empirical or true)."""
        ...

    def encode_options(self) -> dict[str, Any]: ...

    @property
    def canary_ids(self) -> list[str]: ...

    def out_of_fold(self, k: int) -> OutOfFold:
        """Each row's loss (and class probabilities) under a K-fold model trained without it."""
        ...

    def embeddings(self) -> Embeddings:
        """Mean hidden states of the tuned model for train and query rows, with their classes."""
        ...

    def scores_of(self, names: Sequence[str]) -> dict[str, Any]:
        """Other methods' :class:`Scores` on every training row (canaries included), computed once."""
        ...


class GradientInputs:
    """Inputs made of gradient sets already in hand (and per-row losses, if any).

    For library users and peers who hold gradients but no run: provides the train and query
    gradients, the losses when given, and nothing that needs a model or checkpoints.
    """

    def __init__(
        self,
        train: GradientSet,
        query: GradientSet,
        losses: pd.DataFrame | None = None,
        *,
        seed: int = 0,
        aggregate: bool = True,
        task: str = "instruction",
    ) -> None:
        self._train, self._query, self._losses = train, query, losses
        self.seed, self.aggregate, self.task = seed, aggregate, task

    @property
    def train_ids(self) -> list[str]:
        return list(self._train.ids)

    def available(self, need: str) -> bool:
        return need in (TRAIN_GRADS, QUERY_GRADS) or (need == LOSSES and self._losses is not None)

    def train_grads(self) -> GradientSet:
        return self._train

    def query_grads(self) -> GradientSet:
        return self._query

    def losses(self) -> pd.DataFrame:
        if self._losses is None:
            raise ValueError("no losses were given")
        return self._losses
