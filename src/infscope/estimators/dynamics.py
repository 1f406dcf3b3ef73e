"""Training-dynamics scores: what the per-row values recorded during fine-tuning say about each row.

The table is ``<finetune out>/dynamics.parquet`` (see :func:`infscope.models.finetune.row_dynamics`):
one record per row and epoch with ``id, epoch, step, loss, margin, correct, el2n``, measured in
the training forward pass itself. Every function here is pure: ``(table, ids) -> np.ndarray``
aligned with ``ids``, **higher = more suspicious**, vectorised over rows with pandas group-bys.

- :func:`cartography` (Swayamdipta et al. 2020, dataset cartography): confidence is the mean over
  epochs of ``p(gold) = exp(-loss)`` (for a causal LM the per-token geometric mean, since the loss
  is the mean token loss); score ``-confidence``. :func:`variability` is its spread over epochs.
- :func:`aum` (Pleiss et al. 2020, area under the margin; classification): mean margin (logit of
  the assigned label minus the largest other logit) over every recorded step; score ``-aum``.
- :func:`forgetting` (Toneva et al. 2019; classification): correct -> incorrect transitions
  between consecutive presentations; a row never predicted correctly counts as its number of
  presentations, above any count a learned row can reach.
- :func:`el2n` (Paul et al. 2021): mean error norm ``||softmax - onehot||_2`` over early epochs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.models.finetune import DYNAMICS_FILE

_RECORD_HINT = "fine-tune with record_dynamics=True to record it"


def load_dynamics(path: str | os.PathLike) -> pd.DataFrame:
    """The dynamics table of a fine-tuning output directory (or of a ``dynamics.parquet`` file)."""
    file = Path(path)
    if file.is_dir():
        file = file / DYNAMICS_FILE
    if not file.is_file():
        raise InfscopeError(f"no training dynamics at {file}; {_RECORD_HINT}")
    return pd.read_parquet(file)


def _require(table: pd.DataFrame, column: str, method: str, what: str) -> None:
    """Raise a one-line error when ``column`` is missing or holds no value at all."""
    for needed in ("id", "epoch", column):
        if needed not in table.columns:
            raise InfscopeError(
                f"{method} needs {what}, but the dynamics table has no {needed!r} column; {_RECORD_HINT}"
            )
    if table[column].isna().all():
        fix = (
            "a causal run records none; use cartography or el2n there, or score a classification run"
            if column in ("margin", "correct")
            else _RECORD_HINT
        )
        raise InfscopeError(f"{method} needs {what}, but the table's {column!r} column is empty; {fix}")


def _records(table: pd.DataFrame, column: str, ids: Sequence[str], method: str) -> pd.DataFrame:
    """Records of ``table`` with a value in ``column``, ids as str, in presentation order per row.

    Every id of ``ids`` must have at least one record.
    """
    order = ["id", "epoch", *(["step"] if "step" in table.columns else [])]
    frame = table.loc[table[column].notna(), [*order, column]]
    frame = frame.assign(id=frame["id"].astype(str))
    missing = pd.Index([str(i) for i in ids]).difference(frame["id"].unique())
    if len(missing):
        names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InfscopeError(
            f"{method}: the dynamics table has no {column!r} for rows {names}; "
            "score the rows that were fine-tuned, or fine-tune again on these rows"
        )
    return frame.sort_values(order, kind="stable")


def _aligned(values: pd.Series, ids: Sequence[str]) -> np.ndarray:
    return values.reindex([str(i) for i in ids]).to_numpy(dtype=np.float64)


def confidence_variability(table: pd.DataFrame, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cartography coordinates per row: mean and (population) std over epochs of ``exp(-loss)``."""
    _require(table, "loss", "cartography", "per-row losses")
    frame = _records(table, "loss", ids, "cartography")
    p_gold = np.exp(-frame["loss"].to_numpy(dtype=np.float64))
    groups = pd.Series(p_gold, index=frame["id"].to_numpy()).groupby(level=0)
    return _aligned(groups.mean(), ids), _aligned(groups.std(ddof=0), ids)


def cartography(table: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
    """``-confidence``: rows the model keeps giving a low probability to (hard or mislabeled)."""
    return -confidence_variability(table, ids)[0]


def variability(table: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
    """Std over epochs of ``p(gold)`` (cartography's "ambiguous" axis; high = unstable row)."""
    return confidence_variability(table, ids)[1]


def aum(table: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
    """``-AUM``: minus the mean margin of each row over all its recorded steps (classification)."""
    _require(table, "margin", "aum", "classification margins")
    frame = _records(table, "margin", ids, "aum")
    return -_aligned(frame.groupby("id")["margin"].mean(), ids)


def forgetting(table: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
    """Forgetting events per row (classification); never-learned rows count as their presentations."""
    _require(table, "correct", "forgetting", "classification correctness")
    frame = _records(table, "correct", ids, "forgetting")
    correct = frame["correct"].astype(bool).to_numpy()
    same_row = frame["id"].to_numpy()[1:] == frame["id"].to_numpy()[:-1]
    forgot = np.concatenate([[False], same_row & correct[:-1] & ~correct[1:]])
    stats = pd.DataFrame({"id": frame["id"].to_numpy(), "forgot": forgot, "correct": correct}).groupby("id")
    counts = stats["forgot"].sum().astype(np.float64)
    never = ~stats["correct"].any()
    counts[never] = stats["correct"].size()[never].astype(np.float64)
    return _aligned(counts, ids)


def el2n(table: pd.DataFrame, ids: Sequence[str], *, epochs: int | None = None) -> np.ndarray:
    """Mean error norm of each row over the first ``epochs`` recorded epochs.

    ``None`` takes the first half of training, ``ceil(E / 2)`` of the ``E`` recorded epochs (EL2N
    is meant as an early-training signal).
    """
    _require(table, "el2n", "el2n", "per-row error norms")
    if epochs is not None and int(epochs) < 1:
        raise InfscopeError(f"el2n: epochs must be at least 1, got {epochs}; pass a positive number")
    recorded = np.sort(table.loc[table["el2n"].notna(), "epoch"].unique())
    keep = recorded[: int(epochs) if epochs is not None else math.ceil(len(recorded) / 2)]
    frame = _records(table[table["epoch"].isin(keep)], "el2n", ids, "el2n")
    return _aligned(frame.groupby("id")["el2n"].mean(), ids)
