"""The names of every artifact inside a run directory, in one place.

::

    run.json                                  the run record (:mod:`infscope.runs.record`)
    data/train.clean.jsonl                    training rows before noise (demo and bench runs)
    data/train.jsonl, data/val.jsonl          the rows the model was tuned on and the query rows
    data/manifest.jsonl                       ground truth: which rows were corrupted and how
    data/canaries.jsonl, canary_rows.jsonl    canaries' manifest and rows, added before fine-tuning
                                              (scored, used for calibration, never in any output)
    finetune/checkpoints/epoch-N/             adapter + optimizer state per epoch
    finetune/dynamics.parquet                 per-row loss (and margin) at every epoch
    scoring/<checkpoint>[-<block_by>]/        per checkpoint and block grouping:
        grads/train, grads/<query>            gradient stores (resumable shards)
        losses.parquet                        id, loss at the checkpoint, base_loss
        gradients.json                        what the gradient pass recorded
        kfac/<fisher>/                        K-FAC factors of the training rows (ekfac, kfac)
    scoring/inrun-epoch-N/grads/{train,val}   gradients captured inside fine-tuning epoch N
                                              (train: in the training step; val: before the epoch)
    out_of_fold/k<K>/fold-<i>/                K-fold fine-tunes for out-of-fold scores
    scores/<method>.npz                       Scores per method (``<method>@epoch-N`` per epoch)
    results/<method>.{parquet,csv}            ranked tables (id, score, rank, is_flagged)
    evaluation.json                           detection metrics per method
    report.html                               the human report
    peers/                                    other libraries on the same run

No command builds one of these paths itself: it asks :class:`RunLayout`.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_FILE = "run.json"
BLOCK_BY_DEFAULT = "matrix"


def checkpoint_tag(checkpoint: str | os.PathLike) -> str:
    """The folder name that identifies a checkpoint (``epoch-2``, ``checkpoint-40``, ``adapter``)."""
    return Path(checkpoint).name


class RunLayout:
    """Paths of one run directory's artifacts (pure: creates nothing)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- record and data
    @property
    def record(self) -> Path:
        return self.root / RUN_FILE

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_clean(self) -> Path:
        return self.data_dir / "train.clean.jsonl"

    @property
    def train(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def val(self) -> Path:
        return self.data_dir / "val.jsonl"

    @property
    def manifest(self) -> Path:
        return self.data_dir / "manifest.jsonl"

    @property
    def canaries(self) -> Path:
        return self.data_dir / "canaries.jsonl"

    @property
    def canary_rows(self) -> Path:
        return self.data_dir / "canary_rows.jsonl"

    # -- fine-tuning
    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def dynamics(self) -> Path:
        return self.finetune / "dynamics.parquet"

    # -- gradients and losses per checkpoint
    def scoring(self, checkpoint: str | os.PathLike, block_by: str = BLOCK_BY_DEFAULT) -> Path:
        suffix = "" if block_by == BLOCK_BY_DEFAULT else f"-{block_by}"
        return self.root / "scoring" / (checkpoint_tag(checkpoint) + suffix)

    def kfac(self, checkpoint: str | os.PathLike, block_by: str = BLOCK_BY_DEFAULT) -> Path:
        """K-FAC factors of the training rows at ``checkpoint`` (one subfolder per Fisher)."""
        return self.scoring(checkpoint, block_by) / "kfac"

    def grads(self, checkpoint: str | os.PathLike, split: str, block_by: str = BLOCK_BY_DEFAULT) -> Path:
        return self.scoring(checkpoint, block_by) / "grads" / split

    def losses(self, checkpoint: str | os.PathLike, block_by: str = BLOCK_BY_DEFAULT) -> Path:
        return self.scoring(checkpoint, block_by) / "losses.parquet"

    def gradient_info(self, checkpoint: str | os.PathLike, block_by: str = BLOCK_BY_DEFAULT) -> Path:
        return self.scoring(checkpoint, block_by) / "gradients.json"

    def inrun(self, epoch: int) -> Path:
        """Gradients captured during fine-tuning epoch ``epoch`` (``grads/train``, ``grads/val``)."""
        return self.root / "scoring" / f"inrun-epoch-{int(epoch)}"

    def out_of_fold(self, k: int, fold: int) -> Path:
        """Fine-tune output of fold ``fold`` of ``k`` (out-of-fold scores: a model that never saw the fold)."""
        return self.root / "out_of_fold" / f"k{k}" / f"fold-{fold}"

    # -- scores and what is made from them
    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    def scores(self, method: str) -> Path:
        return self.scores_dir / f"{method}.npz"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def results(self, method: str, ext: str = "parquet") -> Path:
        return self.results_dir / f"{method}.{ext}"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def peers(self) -> Path:
        return self.root / "peers"

    def peer_part(self, name: str) -> Path:
        return self.peers / "parts" / name
