"""Choose a detector with canaries: one method or a rank-average fusion, and the checkpoint.

Canaries (:mod:`infscope.noise.canaries`) are rows known to be bad among rows that are mostly
clean, so a detector is judged by its **canary AUROC**: the chance that a canary scores above a
non-canary row (ties count one half). :func:`choose_fusion` scores these candidates:

- every single method;
- weighted means of percentile ranks of 2..``max_members`` methods taken among the ``top`` single
  methods, with weights on a simplex grid of step ``grid`` (all weights positive) plus equal weights.

The best canary AUROC wins; ties go to fewer members, then to earlier methods (the order of the
``scores`` mapping: pass it in registry order), then to more even weights. Choosing the best of
many candidates on the same canaries flatters the winner, so the choice also reports a **nested
leave-one-canary-out** AUROC: for each canary, the whole choice (top methods included) is redone
without it, and the held-out canary is scored by the candidate so chosen; the estimate is the mean
over canaries, an honest figure for the procedure. :func:`checkpoint_choice` does the same for
(checkpoint, method) pairs, and :func:`drop_canaries` removes canary rows from any
:class:`~infscope.estimators.scores.Scores` before it is ranked, evaluated or shown.

Percentile ranks use average ranks over all rows divided by the row count; a non-finite score
counts as least harmful, as in :meth:`Scores.harmful`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.evaluate.metrics import as_bool_vector, average_ranks
from infscope.noise.canaries import canary_mask

ESTIMATE = "nested leave-one-canary-out"
#: Elements of a (candidates, rows) block ranked at once; bounds peak memory on large datasets.
_BLOCK = 2_000_000

ScoreInput = Mapping[str, "np.ndarray | Scores | Sequence[float]"]


@dataclass(frozen=True)
class _Candidate:
    """A detector: method positions (in mapping order) and their weights (summing to 1)."""

    members: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass
class FusionChoice:
    """The chosen detector and how every candidate did on the canaries.

    ``canary_auroc`` is the chosen candidate's AUROC on the canaries it was chosen with (optimistic);
    ``loo_auroc`` the nested leave-one-canary-out estimate (``None`` with fewer than two canaries).
    ``table`` has one row per candidate, best first: ``rank, candidate, members, weights, n_members,
    canary_auroc, selected``.
    """

    members: tuple[str, ...]
    weights: tuple[float, ...]
    canary_auroc: float
    loo_auroc: float | None
    n_canaries: int
    n_rows: int
    table: pd.DataFrame
    estimate: str = ESTIMATE

    @property
    def name(self) -> str:
        """The method's name for a single method, else ``0.5*a+0.5*b``."""
        return _label(self.members, self.weights)

    @property
    def is_single(self) -> bool:
        return len(self.members) == 1

    def weight(self, method: str) -> float:
        """The weight of ``method`` in the chosen detector (0 when it is not a member)."""
        return dict(zip(self.members, self.weights, strict=True)).get(method, 0.0)

    def to_meta(self) -> dict[str, Any]:
        """A JSON-serialisable summary for :attr:`Scores.meta` and the run record."""
        return {
            "members": list(self.members),
            "weights": list(self.weights),
            "canary_auroc": self.canary_auroc,
            "loo_auroc": self.loo_auroc,
            "estimate": self.estimate,
            "n_canaries": self.n_canaries,
            "n_rows": self.n_rows,
            "n_candidates": len(self.table),
        }


@dataclass
class CheckpointChoice:
    """The (checkpoint, method) pair whose scores rank the canaries highest.

    ``table`` has one row per pair, best first: ``rank, checkpoint, method, canary_auroc, selected``.
    """

    checkpoint: str
    method: str
    canary_auroc: float
    loo_auroc: float | None
    n_canaries: int
    table: pd.DataFrame
    estimate: str = ESTIMATE


def _label(members: Sequence[str], weights: Sequence[float]) -> str:
    if len(members) == 1:
        return members[0]
    return "+".join(f"{w:.4g}*{m}" for m, w in zip(members, weights, strict=True))


def _vector(name: str, value: Any) -> np.ndarray:
    array = value.vector() if isinstance(value, Scores) else np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise InfscopeError(f"scores of {name!r} have shape {array.shape}; pass one score per row (1-D)")
    return array


def _matrix(scores: ScoreInput) -> tuple[list[str], np.ndarray]:
    """Method names and a (methods, rows) float64 matrix; Scores inputs must share train ids in order."""
    if not scores:
        raise InfscopeError("no method scores given; pass at least one method's scores")
    names = [str(name) for name in scores]
    vectors = [_vector(name, value) for name, value in scores.items()]
    lengths = {v.shape[0] for v in vectors}
    if len(lengths) != 1:
        raise InfscopeError(
            f"method scores cover different row counts {sorted(lengths)}; score the same rows with every method"
        )
    id_lists = [value.train_ids for value in scores.values() if isinstance(value, Scores)]
    if any(ids != id_lists[0] for ids in id_lists[1:]):
        raise InfscopeError("method scores list their rows in different orders; align them by train id first")
    return names, np.stack(vectors)


def _mask(mask: Any, n: int) -> np.ndarray:
    out = as_bool_vector(mask, n, name="canary mask")
    n_canaries = int(out.sum())
    if n_canaries == 0 or n_canaries == n:
        raise InfscopeError(
            f"the canary mask marks {n_canaries} of {n} rows; it needs canaries and other rows "
            "(add canaries with --canaries 0.05)"
        )
    return out


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Average rank / row count along the last axis, in (0, 1]; non-finite values rank lowest (tied)."""
    array = np.asarray(values, dtype=np.float64)
    clean = np.where(np.isfinite(array), array, -np.inf)
    return average_ranks(clean) / array.shape[-1]


def _pair_counts(fused: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Twice the Mann-Whitney count of each canary against the non-canary rows, per candidate.

    ``fused`` is (candidates, rows). For canary p, ``rank among all rows - rank among canaries``
    is the number of non-canary rows below it plus half of those tied with it; doubled, an integer.
    Summing over canaries and dividing by ``2 * P * N`` gives the AUROC.
    """
    fused = np.atleast_2d(fused)
    ranks_all = average_ranks(fused)[:, mask]
    ranks_canary = average_ranks(fused[:, mask])
    return np.rint(2.0 * (ranks_all - ranks_canary)).astype(np.int64)


def _weight_grid(size: int, grid: float) -> list[tuple[float, ...]]:
    """Positive weights of ``size`` members on the simplex grid of step ``grid``, plus equal weights.

    Ordered most even first (smallest largest weight), then lexicographically from the first member.
    """
    if size == 1:
        return [(1.0,)]
    steps = round(1.0 / grid)
    parts = [p for p in itertools.product(range(1, steps), repeat=size) if sum(p) == steps]
    weights = {tuple(x / steps for x in p) for p in parts}
    if steps % size:
        weights.add(tuple(1.0 / size for _ in range(size)))
    return sorted(weights, key=lambda w: (max(w), tuple(-x for x in w)))


def _check_options(max_members: int, top: int, grid: float) -> None:
    if isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 1:
        raise InfscopeError(f"max_members must be an integer >= 1, got {max_members}; e.g. 3")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InfscopeError(f"top must be an integer >= 1, got {top}; e.g. 6")
    if (
        not isinstance(grid, (int, float))
        or not 0.0 < grid <= 0.5
        or abs(1.0 / grid - round(1.0 / grid)) > 1e-9
    ):
        raise InfscopeError(f"grid step must divide 1 and lie in (0, 0.5], got {grid}; e.g. 0.25")


def _candidates(
    top_positions: Sequence[int], n_methods: int, max_members: int, grid: float
) -> list[_Candidate]:
    """Every single method, then fusions of 2..max_members of the ``top_positions`` methods."""
    out = [_Candidate((i,), (1.0,)) for i in range(n_methods)]
    pool = sorted(top_positions)
    for size in range(2, max_members + 1):
        grid_weights = _weight_grid(size, grid)
        for members in itertools.combinations(pool, size):
            out.extend(_Candidate(members, w) for w in grid_weights)
    return out


def _static_key(candidate: _Candidate) -> tuple:
    """The tie-break order among equal AUROCs: fewer members, earlier methods, more even weights."""
    return (
        len(candidate.members),
        candidate.members,
        max(candidate.weights),
        tuple(-w for w in candidate.weights),
    )


class _CountCache:
    """Pair counts per candidate, computed in blocks on first use (folds share most candidates)."""

    def __init__(self, pct: np.ndarray, mask: np.ndarray) -> None:
        self.pct, self.mask = pct, mask
        self.counts: dict[_Candidate, np.ndarray] = {}

    def get(self, candidates: Sequence[_Candidate]) -> np.ndarray:
        missing = list(dict.fromkeys(c for c in candidates if c not in self.counts))
        n = self.pct.shape[1]
        block = max(1, _BLOCK // n)
        for start in range(0, len(missing), block):
            part = missing[start : start + block]
            for candidate, row in zip(part, _pair_counts(self._fuse(part), self.mask), strict=True):
                self.counts[candidate] = row
        return np.stack([self.counts[c] for c in candidates])

    def _fuse(self, candidates: Sequence[_Candidate]) -> np.ndarray:
        """Weighted sums of percentile ranks, member slot by slot (padding adds an exact 0)."""
        width = max(len(c.members) for c in candidates)
        index = np.zeros((len(candidates), width), dtype=np.int64)
        weights = np.zeros((len(candidates), width), dtype=np.float64)
        for row, candidate in enumerate(candidates):
            index[row, : len(candidate.members)] = candidate.members
            weights[row, : len(candidate.weights)] = candidate.weights
        fused = weights[:, 0, None] * self.pct[index[:, 0]]
        for slot in range(1, width):
            fused += weights[:, slot, None] * self.pct[index[:, slot]]
        return fused


def _static_order(candidates: Sequence[_Candidate]) -> np.ndarray:
    """Position of each candidate in the tie-break order (see :func:`_static_key`)."""
    order = sorted(range(len(candidates)), key=lambda j: _static_key(candidates[j]))
    static = np.empty(len(candidates), dtype=np.int64)
    static[order] = np.arange(len(candidates))
    return static


def _best(totals: np.ndarray, static: np.ndarray) -> np.ndarray:
    """Per row of ``totals`` (folds, candidates): the highest total, ties to the lowest ``static``."""
    totals = np.atleast_2d(totals)
    top = totals.max(axis=1, keepdims=True)
    tied = np.where(totals == top, static[None, :], np.iinfo(np.int64).max)
    return tied.argmin(axis=1)


def _held_out(counts: np.ndarray, static: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """For each canary in ``folds``: its pair count under the candidate chosen without it."""
    totals = counts.sum(axis=1)[None, :] - counts[:, folds].T
    best = _best(totals, static)
    return counts[best, folds]


def _top_methods(single_totals: np.ndarray, top: int) -> np.ndarray:
    """Per row (folds, methods): positions of the ``top`` best methods (ties: earlier method), sorted."""
    single_totals = np.atleast_2d(single_totals)
    n_methods = single_totals.shape[1]
    key = -single_totals * n_methods + np.arange(n_methods)[None, :]
    return np.sort(np.argsort(key, axis=1, kind="stable")[:, :top], axis=1)


def _leave_one_out(
    cache: _CountCache, singles: np.ndarray, max_members: int, top: int, grid: float
) -> np.ndarray | None:
    """Held-out pair count of every canary, the whole choice redone without it (None below 2 canaries).

    Folds whose top methods agree share one candidate list, so the work is one batched selection per
    distinct top set.
    """
    n_methods, n_canaries = singles.shape
    if n_canaries < 2:
        return None
    fold_singles = singles.sum(axis=1)[None, :] - singles.T
    groups: dict[tuple[int, ...], list[int]] = {}
    for fold, top_set in enumerate(_top_methods(fold_singles, top).tolist()):
        groups.setdefault(tuple(top_set), []).append(fold)
    held = np.empty(n_canaries, dtype=np.int64)
    for top_set, folds in groups.items():
        candidates = _candidates(top_set, n_methods, max_members, grid)
        index = np.asarray(folds)
        held[index] = _held_out(cache.get(candidates), _static_order(candidates), index)
    return held


def choose_fusion(
    scores: ScoreInput,
    canary_mask: Any,
    *,
    max_members: int = 3,
    top: int = 6,
    grid: float = 0.25,
) -> FusionChoice:
    """The single method or rank-average fusion with the best canary AUROC (see the module docstring).

    ``scores`` maps method names to one score per row (arrays, or vector :class:`Scores` over the same
    rows in the same order); ``canary_mask`` is True on canary rows. ``top`` limits fusions to the
    best single methods, ``max_members`` their size and ``grid`` the weight step.
    """
    _check_options(max_members, top, grid)
    names, matrix = _matrix(scores)
    n_methods, n_rows = matrix.shape
    mask = _mask(canary_mask, n_rows)
    n_canaries = int(mask.sum())
    pairs = 2.0 * n_canaries * (n_rows - n_canaries)
    cache = _CountCache(percentile_ranks(matrix), mask)

    singles = cache.get([_Candidate((i,), (1.0,)) for i in range(n_methods)])
    top_set = _top_methods(singles.sum(axis=1), top)[0].tolist()
    candidates = _candidates(top_set, n_methods, max_members, grid)
    totals = cache.get(candidates).sum(axis=1)
    static = _static_order(candidates)
    order = np.lexsort((static, -totals))
    held = _leave_one_out(cache, singles, max_members, top, grid)
    chosen = candidates[order[0]]
    aurocs = totals / pairs
    ranked = [candidates[j] for j in order]
    table = pd.DataFrame(
        {
            "rank": np.arange(1, len(ranked) + 1),
            "candidate": [_label([names[i] for i in c.members], c.weights) for c in ranked],
            "members": ["+".join(names[i] for i in c.members) for c in ranked],
            "weights": [",".join(f"{w:.4g}" for w in c.weights) for c in ranked],
            "n_members": [len(c.members) for c in ranked],
            "canary_auroc": aurocs[order],
            "selected": np.arange(len(ranked)) == 0,
        }
    )
    return FusionChoice(
        members=tuple(names[i] for i in chosen.members),
        weights=tuple(float(w) for w in chosen.weights),
        canary_auroc=float(aurocs[order[0]]),
        loo_auroc=None if held is None else float(held.sum() / pairs),
        n_canaries=n_canaries,
        n_rows=n_rows,
        table=table,
    )


def apply_fusion(choice: FusionChoice, scores: ScoreInput) -> np.ndarray:
    """The chosen detector's score per row: weighted sum of the members' percentile ranks.

    Higher = more harmful. ``scores`` may hold other methods too; percentile ranks are taken over the
    rows given, so fuse the rows the choice was made on (canaries included), then drop the canaries.
    """
    missing = [m for m in choice.members if m not in scores]
    if missing:
        raise InfscopeError(
            f"scores lack the chosen method(s) {', '.join(missing)}; score them before applying the fusion"
        )
    _, matrix = _matrix({m: scores[m] for m in choice.members})
    pct = percentile_ranks(matrix)
    fused = choice.weights[0] * pct[0]
    for weight, row in zip(choice.weights[1:], pct[1:], strict=True):
        fused = fused + weight * row
    return fused


def fusion_scores(choice: FusionChoice, scores: Mapping[str, Scores]) -> Scores:
    """:func:`apply_fusion` as a :class:`Scores` named ``fusion`` with the choice in its metadata."""
    first = scores.get(choice.members[0]) if choice.members else None
    if not isinstance(first, Scores):
        raise InfscopeError("fusion_scores needs Scores for every chosen method; pass Scores, not arrays")
    meta = {"fusion": choice.to_meta()}
    return Scores(apply_fusion(choice, scores), list(first.train_ids), method="fusion", meta=meta)


def checkpoint_choice(per_checkpoint: Mapping[str, ScoreInput], canary_mask: Any) -> CheckpointChoice:
    """The (checkpoint, method) pair with the best canary AUROC; ties go to the earlier checkpoint, then method.

    ``per_checkpoint`` maps checkpoint names to ``{method: scores over the same rows}``. The estimate
    is nested leave-one-canary-out as in :func:`choose_fusion`.
    """
    pairs_named = [(str(ckpt), str(method)) for ckpt, inner in per_checkpoint.items() for method in inner]
    if not pairs_named:
        raise InfscopeError("no checkpoint scores given; pass {checkpoint: {method: scores}}")
    flat = {f"{i}": per_checkpoint[ckpt][method] for i, (ckpt, method) in enumerate(pairs_named)}
    _, matrix = _matrix(flat)
    n_pairs, n_rows = matrix.shape
    mask = _mask(canary_mask, n_rows)
    n_canaries = int(mask.sum())
    pairs = 2.0 * n_canaries * (n_rows - n_canaries)
    candidates = [_Candidate((i,), (1.0,)) for i in range(n_pairs)]
    counts = _CountCache(percentile_ranks(matrix), mask).get(candidates)
    totals = counts.sum(axis=1)
    static = np.arange(n_pairs)
    order = np.lexsort((static, -totals))
    held = _held_out(counts, static, np.arange(n_canaries)) if n_canaries >= 2 else None
    aurocs = totals / pairs
    table = pd.DataFrame(
        {
            "rank": np.arange(1, n_pairs + 1),
            "checkpoint": [pairs_named[j][0] for j in order],
            "method": [pairs_named[j][1] for j in order],
            "canary_auroc": aurocs[order],
            "selected": np.arange(n_pairs) == 0,
        }
    )
    best = int(order[0])
    return CheckpointChoice(
        checkpoint=pairs_named[best][0],
        method=pairs_named[best][1],
        canary_auroc=float(aurocs[best]),
        loo_auroc=None if held is None else float(held.sum() / pairs),
        n_canaries=n_canaries,
        table=table,
    )


def drop_canaries(scores: Scores, canary_ids: Sequence[str]) -> Scores:
    """The same scores without the canary rows (input order kept, same method, a copy of the metadata)."""
    keep = ~canary_mask(scores.train_ids, canary_ids)
    return Scores(
        values=scores.values[..., keep].copy(),
        train_ids=[i for i, k in zip(scores.train_ids, keep, strict=True) if k],
        query_ids=None if scores.query_ids is None else list(scores.query_ids),
        method=scores.method,
        meta=copy.deepcopy(scores.meta),
    )


def rank_ensemble(members: Sequence[Scores], name: str) -> Scores:
    """The mean percentile rank of several score vectors of the same rows (checkpoints, or fine-tune seeds).

    Rows are aligned by id (every member must score the same rows); ranks, not raw values, are averaged,
    so members on different scales weigh the same. Higher = more harmful, as every member.
    """
    if not members:
        raise InfscopeError("an ensemble needs at least one member")
    ids = list(members[0].train_ids)
    ranks = []
    for member in members:
        if sorted(member.train_ids) != sorted(ids):
            raise InfscopeError(
                f"ensemble members score other rows ({member.method}); ensemble runs of the same data"
            )
        position = {i: k for k, i in enumerate(member.train_ids)}
        ranks.append(percentile_ranks(member.vector()[[position[i] for i in ids]]))
    meta = {"ensemble": [m.method for m in members], "family": "ensemble"}
    return Scores(np.mean(ranks, axis=0), ids, None, name, meta)
