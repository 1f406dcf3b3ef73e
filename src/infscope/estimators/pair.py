"""Pair-consistency scores: does each response belong to its own instruction? (higher = more harmful)

Label-changing noise (a response swapped in from another row, a wrong answer, a flipped label)
breaks the *pairing* of instruction and response, not the text. A row's training loss mixes that
pairing error with how hard the response is on its own; these scores cancel the second part by
comparing losses of the same response (or the same instruction) in other pairings. All of them
need only forward passes, batched through :func:`infscope.models.pair_losses.pair_losses`.

Notation: ``L(y_i | x_k)`` is the mean token loss of row ``i``'s response under row ``k``'s
instruction (encoded as fine-tuning encodes rows), ``L(y_i | ∅)`` under an empty instruction, and
``C_i`` the ``k`` competitor rows of row ``i`` (never ``i`` itself).

- ``pmi``        ``L(y_i|x_i) - L(y_i|∅)``: the instruction does not help predict the response.
- ``ifd``        ``L(y_i|x_i) / L(y_i|∅)``: instruction-following difficulty (Li et al., 2024).
- ``xprompt``    ``L(y_i|x_i) - mean_{k∈C_i} L(y_i|x_k)``: another instruction explains this
                 response as well as its own. The response is fixed, so its difficulty cancels.
- ``xresponse``  ``[L(y_i|x_i) - L(y_i|∅)] - mean_{k∈C_i} [L(y_k|x_i) - L(y_k|∅)]``: this
                 instruction helps other rows' responses as much as its own. Each response is
                 measured against its own empty-instruction loss, so if ``L(y|x) = d(y) + e(x) +
                 g(x, y)`` (response difficulty, prompt effect, pairing term), ``d`` cancels within
                 each bracket and ``e(x_i)`` between the brackets: only the pairing terms
                 ``g(x_i, y_i) - mean_k g(x_i, y_k)`` remain, and no competitor's own pairing enters
                 (unlike the swap contrast ``L(y_i|x_i) + L(y_k|x_k) - L(y_i|x_k) - L(y_k|x_i)``).
- ``label_margin`` (classifiers) ``CE(y|x) - min_{y'≠y} CE(y'|x) = max_{y'≠y} z_{y'} - z_y``:
                 another label fits the text better than the given one.

Competitors are ``random`` (per row, seeded by ``(seed, row id)`` and independent of row order)
or ``nearest`` (highest cosine similarity of the ``embeddings`` the caller passes, e.g.
:func:`infscope.models.pair_losses.prompt_embeddings`).

Every score function takes ``(model, tokenizer, rows, *, max_length, batch_size, response_only,
...options)`` and returns a float64 array aligned with ``rows``; :data:`PAIR_SCORES` maps names
to them, :func:`pair_score` calls one by name with checked options and :func:`pair_scores` runs
several causal scores over one shared batched pass. Use ``response_only=True`` (the default):
with the prompt in the loss, the instruction's own difficulty enters every term.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.models.pair_losses import EMPTY, classifier_logits, pair_losses
from infscope.noise.rng import stable_hash

COMPETITORS = ("random", "nearest", "response")
#: Hashed bag-of-words size for ``competitors="response"`` (fixed, so memory is rows x this).
RESPONSE_WORD_DIMS = 2048
_WITH_COMPETITORS = ("xprompt", "xresponse")
_COMPETITOR_OPTIONS = ("k", "competitors", "embeddings", "seed")
_COMPETITOR_TAG = "pair-competitors"
Rows = Sequence[Mapping[str, Any]]


# ---------------------------------------------------------------- competitors


def check_k(k: int, n: int) -> int:
    """``k`` as an int when ``1 <= k <= n - 1``, otherwise an :class:`InfscopeError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise InfscopeError(
            f"k={k!r} competitors is not possible with {n} rows (need 1 <= k <= {n - 1}); pass a smaller k"
        )
    return int(k)


def random_competitors(ids: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """``k`` distinct other rows per row, ``(n, k)`` positions, seeded by ``(seed, row id)``.

    Rows are drawn among the others in id order, so a row's competitors do not depend on the
    order the rows come in.
    """
    n = len(ids)
    k = check_k(k, n)
    by_id = np.argsort(np.asarray([str(i) for i in ids], dtype=object), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[by_id] = np.arange(n)
    draws = np.stack(
        [
            np.random.default_rng(stable_hash(seed, str(row_id), _COMPETITOR_TAG)).choice(
                n - 1, size=k, replace=False
            )
            for row_id in ids
        ]
    )
    draws += draws >= rank[:, None]  # skip the row's own slot in id order
    return by_id[draws]


def nearest_competitors(embeddings: Any, k: int, chunk_elements: int = 1 << 24) -> np.ndarray:
    """The ``k`` other rows of highest cosine similarity per row, ``(n, k)``, most similar first.

    Similarities are computed in row chunks of about ``chunk_elements`` entries; ties go to the
    lower row position. Zero vectors have similarity 0 to every row.
    """
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    if emb.ndim != 2 or not torch.isfinite(emb).all():
        raise InfscopeError(
            f"embeddings must be a finite (rows, dim) array, got shape {tuple(emb.shape)}; pass one vector per row"
        )
    n = emb.shape[0]
    k = check_k(k, n)
    unit = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-300)
    step = max(1, chunk_elements // max(n, 1))
    out = []
    for start in range(0, n, step):
        sim = unit[start : start + step] @ unit.T
        rows = torch.arange(start, min(start + step, n))
        sim[rows - start, rows] = -torch.inf
        # stable descending sort: equal similarities keep position order
        out.append(torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out).numpy().astype(np.int64)


def response_words(rows: Rows, dims: int = RESPONSE_WORD_DIMS) -> np.ndarray:
    """Hashed, l2-normalised bag of words of each row's response, ``(n, dims)`` float32.

    The competitors of ``competitors="response"``: the rows whose *responses* read most like this
    row's. When a row carries another row's response, that row's own instruction is among them, so
    the prompt margin compares the response with the instruction it really belongs to.
    """
    from infscope.data.formatting import prompt_response_view

    out = np.zeros((len(rows), dims), dtype=np.float32)
    bucket: dict[str, int] = {}  # each distinct word hashed once
    for i, row in enumerate(rows):
        for word in prompt_response_view(row)[1].lower().split():
            if word not in bucket:
                bucket[word] = stable_hash(0, word, "response-words") % dims
            out[i, bucket[word]] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def competitor_index(
    ids: Sequence[str],
    k: int,
    *,
    competitors: str = "random",
    embeddings: Any = None,
    seed: int = 0,
) -> np.ndarray:
    """Competitor positions ``(n, k)`` for every row by ``competitors``.

    ``random`` (seeded per row id), ``nearest`` (cosine of the ``embeddings`` given) or ``response``
    (the rows whose responses share the most words: :func:`response_words`, which the caller passes
    as ``embeddings``).
    """
    if competitors == "random":
        return random_competitors(ids, k, seed)
    if competitors in ("nearest", "response"):
        if embeddings is None:
            raise InfscopeError(
                "competitors='nearest' needs embeddings (one vector per row); pass embeddings= or use 'random'"
            )
        if len(embeddings) != len(ids):
            raise InfscopeError(
                f"got {len(embeddings)} embeddings for {len(ids)} rows; pass one embedding per row"
            )
        return nearest_competitors(embeddings, k)
    raise InfscopeError(f"unknown competitors {competitors!r}; use one of {', '.join(COMPETITORS)}")


# ---------------------------------------------------------------- plans: pairs to run + how to combine


@dataclass(frozen=True)
class PairPlan:
    """The ``(response, prompt)`` pairs a score needs and how it turns their losses into values.

    ``combine`` receives the losses of ``pairs`` (same order) and returns one value per row.
    Plans are pure, so they are tested on synthetic loss tables and merged to share one pass.
    """

    pairs: np.ndarray
    combine: Callable[[np.ndarray], np.ndarray]


def _own_and_empty(n: int) -> np.ndarray:
    i = np.arange(n)
    return np.concatenate([np.stack([i, i], 1), np.stack([i, np.full(n, EMPTY)], 1)])


def pmi_plan(n: int) -> PairPlan:
    """``L(y_i|x_i) - L(y_i|∅)``."""
    return PairPlan(_own_and_empty(n), lambda loss: loss[:n] - loss[n:])


def _ratio(own: np.ndarray, empty: np.ndarray) -> np.ndarray:
    bad = np.flatnonzero(empty <= 0)
    if bad.size:
        raise InfscopeError(
            f"ifd: the empty-instruction loss is 0 for {bad.size} row(s), so the ratio is undefined; use pmi"
        )
    return own / empty


def ifd_plan(n: int) -> PairPlan:
    """``L(y_i|x_i) / L(y_i|∅)``."""
    return PairPlan(_own_and_empty(n), lambda loss: _ratio(loss[:n], loss[n:]))


#: How ``xprompt`` sums up its competitors: their mean loss, or the best (lowest) one.
AGGREGATES = ("mean", "min")


def xprompt_plan(comp: np.ndarray, aggregate: str = "mean") -> PairPlan:
    """``L(y_i|x_i) - mean_{k∈C_i} L(y_i|x_k)`` (or ``min_k`` with ``aggregate="min"``) for competitors ``comp``.

    ``min`` compares the response with the one competitor instruction that explains it best: with a
    swapped response that is usually its true owner's instruction (benchmarks/detectors.py).
    """
    if aggregate not in AGGREGATES:
        raise InfscopeError(f"unknown aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}")
    n, k = comp.shape
    i = np.arange(n)
    cross = np.stack([np.repeat(i, k), comp.reshape(-1)], 1)
    pairs = np.concatenate([np.stack([i, i], 1), cross])
    pick = np.mean if aggregate == "mean" else np.min
    return PairPlan(pairs, lambda loss: loss[:n] - pick(loss[n:].reshape(n, k), axis=1))


def xresponse_plan(comp: np.ndarray) -> PairPlan:
    """``[L(y_i|x_i) - L(y_i|∅)] - mean_{k∈C_i} [L(y_k|x_i) - L(y_k|∅)]`` for competitors ``comp``."""
    n, k = comp.shape
    i = np.arange(n)
    cross = np.stack([comp.reshape(-1), np.repeat(i, k)], 1)
    pairs = np.concatenate([_own_and_empty(n), cross])

    def combine(loss: np.ndarray) -> np.ndarray:
        own, empty, other = loss[:n], loss[n : 2 * n], loss[2 * n :].reshape(n, k)
        return (own - empty) - (other - empty[comp]).mean(axis=1)

    return PairPlan(pairs, combine)


def _plan(name: str, n: int, comp: np.ndarray | None, aggregate: str = "mean") -> PairPlan:
    if name == "pmi":
        return pmi_plan(n)
    if name == "ifd":
        return ifd_plan(n)
    assert comp is not None
    return xprompt_plan(comp, aggregate) if name == "xprompt" else xresponse_plan(comp)


# ---------------------------------------------------------------- score functions


def _causal(
    names: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    encode: dict[str, Any],
    k: int,
    competitors: str,
    embeddings: Any,
    seed: int,
    aggregate: str = "mean",
) -> dict[str, np.ndarray]:
    """Values of the causal scores ``names`` over one batched pass of all the pairs they need."""
    if not rows:
        raise InfscopeError("no rows to score; check that the dataset is not empty")
    n = len(rows)
    comp = None
    if any(name in _WITH_COMPETITORS for name in names):
        ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
        comp = competitor_index(ids, k, competitors=competitors, embeddings=embeddings, seed=seed)
    plans = [_plan(name, n, comp, aggregate) for name in names]
    losses = pair_losses(model, tokenizer, rows, np.concatenate([p.pairs for p in plans]), **encode)
    ends = np.cumsum([len(p.pairs) for p in plans])
    return {
        name: plan.combine(losses[end - len(plan.pairs) : end])
        for name, plan, end in zip(names, plans, ends, strict=True)
    }


def pair_scores(
    names: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    *,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    k: int = 3,
    competitors: str = "random",
    embeddings: Any = None,
    seed: int = 0,
    aggregate: str = "mean",
) -> dict[str, np.ndarray]:
    """Several causal pair scores from ONE batched pass (shared pairs such as ``L(y_i|x_i)`` run once)."""
    keys = [_key(name) for name in names]
    wrong = [key for key in keys if PAIR_TASKS[key] != "causal"]
    if wrong or not keys:
        raise InfscopeError(
            f"pair_scores combines causal scores only, got {', '.join(keys) or 'none'}; call pair_score for "
            f"{', '.join(wrong) or 'one score'}"
        )
    encode = {"max_length": max_length, "batch_size": batch_size, "response_only": response_only}
    return _causal(
        list(dict.fromkeys(keys)), model, tokenizer, rows, encode, k, competitors, embeddings, seed, aggregate
    )


# ---------------------------------------------------------------- one function per causal score


def _causal_score(name: str, doc: str) -> Callable[..., np.ndarray]:
    """The public function of the causal score ``name``: ``pair_scores([name], ...)[name]``.

    Its signature is :func:`pair_scores`'s without ``names`` (and, for the scores without
    competitors, without the competitor options), so :func:`pair_options` and the registry see each
    score's real keyword options and an unknown one is a ``TypeError``, as for a plain function.
    """
    params = list(inspect.signature(pair_scores).parameters.values())[1:]
    if name not in _WITH_COMPETITORS:
        params = [p for p in params if p.name not in _COMPETITOR_OPTIONS]
    if name != "xprompt":  # only the prompt margin has an aggregate over its competitors
        params = [p for p in params if p.name != "aggregate"]
    signature = inspect.Signature(params, return_annotation="np.ndarray")

    def score(*args: Any, **kwargs: Any) -> np.ndarray:
        return pair_scores([name], **signature.bind(*args, **kwargs).arguments)[name]

    score.__signature__ = signature  # type: ignore[attr-defined]
    score.__name__ = score.__qualname__ = name
    score.__doc__ = doc
    return score


pmi = _causal_score(
    "pmi", "``L(y|x) - L(y|∅)`` per row: high when the instruction does not help predict the response."
)
ifd = _causal_score(
    "ifd", "``L(y|x) / L(y|∅)`` per row (instruction-following difficulty; about 1 = instruction useless)."
)
xprompt = _causal_score(
    "xprompt",
    "``L(y_i|x_i) - mean_{k∈C_i} L(y_i|x_k)`` per row: other instructions fit the response as well.",
)
xresponse = _causal_score(
    "xresponse",
    "``[L(y_i|x_i) - L(y_i|∅)] - mean_k [L(y_k|x_i) - L(y_k|∅)]``: the instruction fits others' responses "
    "as well.",
)


def label_margin(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    *,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    label_names: Sequence[Any] | None = None,
) -> np.ndarray:
    """``CE(y|x) - min_{y'≠y} CE(y'|x) = max_{y'≠y} z_{y'} - z_y`` per classification row (one forward).

    ``response_only`` is accepted for a uniform signature and ignored (a classifier has no prompt).
    """
    del response_only
    if not rows:
        raise InfscopeError("no rows to score; check that the dataset is not empty")
    logits, labels = classifier_logits(
        model, tokenizer, rows, max_length=max_length, batch_size=batch_size, label_names=label_names
    )
    own = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return others.max(axis=1) - own


PAIR_SCORES: dict[str, Callable[..., np.ndarray]] = {
    "pmi": pmi,
    "ifd": ifd,
    "xprompt": xprompt,
    "xresponse": xresponse,
    "label_margin": label_margin,
}
"""Name -> score function ``(model, tokenizer, rows, *, max_length, batch_size, response_only, ...)``."""

PAIR_TASKS: dict[str, str] = {
    "pmi": "causal",
    "ifd": "causal",
    "xprompt": "causal",
    "xresponse": "causal",
    "label_margin": "classification",
}
"""Name -> the task (``causal`` or ``classification``) whose rows and model the score needs."""


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in PAIR_SCORES:
        raise InfscopeError(f"unknown pair score {name!r}; choose one of {', '.join(PAIR_SCORES)}")
    return key


def pair_options(name: str) -> list[str]:
    """The keyword options a pair score accepts (after ``model, tokenizer, rows``)."""
    params = inspect.signature(PAIR_SCORES[_key(name)]).parameters
    return [p for p in params if p not in ("model", "tokenizer", "rows")]


def _check_options(key: str, options: Mapping[str, Any]) -> None:
    accepted = pair_options(key)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InfscopeError(
            f"pair score {key!r} has no option {unknown[0]!r}; its options are {', '.join(accepted)}"
        )


def pair_score(name: str, model: torch.nn.Module, tokenizer: Any, rows: Rows, **options: Any) -> np.ndarray:
    """One pair score by name, with its keyword options checked (unknown option -> InfscopeError)."""
    key = _key(name)
    _check_options(key, options)
    return PAIR_SCORES[key](model, tokenizer, rows, **options)
