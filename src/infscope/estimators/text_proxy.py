"""A second opinion on label errors: a cross-fitted TF-IDF probe, and its fusion with ``oof_loss``.

``oof_loss`` judges every row by the tuned model trained without it; its mistakes come from that
model (what the backbone finds hard, what LoRA could not learn from few rows). A bag of word and
character n-grams with a linear classifier makes *different* mistakes: it sees package-name
prefixes, suffixes and rare words that a sentence encoder blurs. Each row's out-of-fold probability
of its given label under such a probe is cheap (one L-BFGS fit per fold, no gradients through a
network) and, ranked together with ``oof_loss``, finds more label flips than either alone
(``benchmarks/detectors.py``, setting ``sections_flip_canary``).

- ``text_oof``: ``1 - p(given label)`` under a multinomial logistic regression (L2, the objective
  ``C * sum CE + |W|^2 / 2``) on hashed, sublinear TF-IDF features of words and character
  2-5-grams next to the *base* model's mean hidden states (l2-normalised; ``features="text"``
  leaves them out), each row predicted by the fold model that did not see it (K folds, seeded;
  rows with the same text share a fold, so a duplicate or a canary copy never gives its label away).
  The base model never saw the labels, so its embeddings leak nothing into the held-out folds;
  the tuned model's would.
- ``oof_fusion``: the mean percentile rank of ``oof_loss`` and ``text_oof``, weights fixed in advance.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from infscope.errors import InfscopeError
from infscope.estimators.baselines import from_values
from infscope.estimators.inputs import MODEL, REFIT, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.out_of_fold import fold_of
from infscope.estimators.scores import Scores
from infscope.models.embed import mean_hidden_states
from infscope.models.encode import encode_rows, label_indices
from infscope.noise.rng import stable_hash

#: Hashed feature space (words and character n-grams share it); collisions are rare at this size.
FEATURE_DIMS = 1 << 18
_WORD = re.compile(r"\w\w+")


def _grams(text: str, char_range: tuple[int, int]) -> list[str]:
    """Words of 2+ characters and character n-grams inside space-padded words (like ``char_wb``)."""
    lowered = text.lower()
    out = ["w:" + w for w in _WORD.findall(lowered)]
    lo, hi = char_range
    for word in lowered.split():
        padded = f" {word} "
        for n in range(lo, hi + 1):
            out.extend("c:" + padded[i : i + n] for i in range(max(len(padded) - n + 1, 1)))
    return out


def tfidf_features(
    texts: Sequence[str], dims: int = FEATURE_DIMS, char_range: tuple[int, int] = (2, 5)
) -> torch.Tensor:
    """Sparse ``(n, dims)`` float64 rows: ``(1 + log tf) * idf``, l2-normalised; ``idf = log((1+n)/(1+df)) + 1``.

    Features are hashed (each distinct gram once), so memory is the number of non-zeros, not a
    vocabulary. Rows with no gram at all stay zero.
    """
    bucket: dict[str, int] = {}
    rows, cols, counts = [], [], []
    for i, text in enumerate(texts):
        tf: dict[int, int] = {}
        for gram in _grams(str(text), char_range):
            j = bucket.get(gram)
            if j is None:
                j = bucket[gram] = stable_hash(0, gram, "tfidf") % dims
            tf[j] = tf.get(j, 0) + 1
        rows.extend([i] * len(tf))
        cols.extend(tf)
        counts.extend(tf.values())
    n = len(texts)
    r, c = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    df = np.bincount(c, minlength=dims)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    values = (1.0 + np.log(np.asarray(counts, dtype=np.float64))) * idf[c]
    norms = np.sqrt(np.bincount(r, weights=values**2, minlength=n))
    values = values / np.maximum(norms[r], 1e-300)
    return torch.sparse_coo_tensor(
        np.stack([r, c]), values, (n, dims), dtype=torch.float64, check_invariants=False
    ).coalesce()


#: Up to this many training rows the probe is fitted in its dual form (``W = X^T A``, an ``n x n`` Gram
#: matrix): the same minimiser, but the unknowns are ``n x classes`` instead of ``features x classes``.
DUAL_MAX_ROWS = 4000


def fit_logistic(
    x: torch.Tensor,
    labels: np.ndarray,
    n_classes: int,
    c: float = 100.0,
    max_iter: int = 500,
    tolerance: float = 1e-7,
) -> torch.Tensor:
    """Weights ``(dims + 1, classes)`` (last row: intercept, not penalised) minimising ``c * sum CE + |W|^2/2``.

    By the representer theorem the minimiser is ``W = X^T A``; with few rows (``<= DUAL_MAX_ROWS``)
    L-BFGS runs over ``A`` on the Gram matrix ``K = X X^T`` (penalty ``tr(A^T K A) / 2``), which
    is the same problem with far fewer unknowns than there are hashed features.
    """
    y = torch.as_tensor(labels, dtype=torch.long)
    dual = x.shape[0] <= DUAL_MAX_ROWS
    gram = None
    if dual:
        with warnings.catch_warnings():  # torch notes its sparse-sparse product is beta; the result is exact
            warnings.simplefilter("ignore", UserWarning)
            gram = torch.sparse.mm(x, x.t().coalesce()).to_dense()
    size = x.shape[0] if dual else x.shape[1]
    params = torch.zeros(size, n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [params, bias],
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        if dual:
            projected = gram @ params
            penalty = (params * projected).sum()
        else:
            projected = torch.sparse.mm(x, params)
            penalty = (params**2).sum()
        ce = torch.nn.functional.cross_entropy(projected + bias, y, reduction="sum")
        loss = c * ce + 0.5 * penalty
        loss.backward()
        return loss

    optimiser.step(objective)
    weights = torch.sparse.mm(x.t().coalesce(), params.detach()) if dual else params.detach()
    return torch.cat([weights, bias.detach()[None]])


def predict_proba(x: torch.Tensor, coef: torch.Tensor) -> np.ndarray:
    """Class probabilities ``(n, classes)`` of :func:`fit_logistic` weights."""
    logits = torch.sparse.mm(x, coef[:-1]) + coef[-1]
    return torch.softmax(logits, dim=1).numpy()


def with_dense(x: torch.Tensor, dense: np.ndarray | None) -> torch.Tensor:
    """``[x | dense]`` as one sparse matrix (``dense`` rows l2-normalised), or ``x`` when ``dense`` is None."""
    if dense is None:
        return x
    d = torch.as_tensor(np.asarray(dense, dtype=np.float64))
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    rows, cols = torch.meshgrid(torch.arange(d.shape[0]), torch.arange(d.shape[1]), indexing="ij")
    indices = torch.cat([x.indices(), torch.stack([rows.reshape(-1), cols.reshape(-1) + x.shape[1]])], dim=1)
    values = torch.cat([x.values(), d.reshape(-1)])
    return torch.sparse_coo_tensor(
        indices, values, (x.shape[0], x.shape[1] + d.shape[1]), check_invariants=False
    ).coalesce()


def grouped_folds(texts: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Seeded folds in which rows with the same text (case and spacing aside) always share a fold.

    A duplicated text in another fold would let the probe read the held-out row's label, or, when the
    copies disagree (a canary is a copy of a row with its label changed), learn the wrong one.
    """
    keys = [" ".join(str(t).lower().split()) for t in texts]
    groups = list(dict.fromkeys(keys))
    if not 2 <= k <= len(groups):
        raise InfscopeError(
            f"text_oof k={k} folds need 2 <= k <= {len(groups)} distinct texts; pass --option text_oof.k=5"
        )
    group_fold = dict(zip(groups, fold_of(groups, k, seed), strict=True))
    return np.asarray([group_fold[key] for key in keys], dtype=np.int64)


def out_of_fold_proba(
    x: torch.Tensor, labels: np.ndarray, n_classes: int, folds: np.ndarray, *, c: float = 100.0
) -> np.ndarray:
    """Each row's class probabilities from the probe fitted on the rows of the other ``folds``."""
    n, k = x.shape[0], int(folds.max()) + 1
    probs = np.zeros((n, n_classes))
    for fold in range(k):
        held = folds == fold
        # the fold's feature columns: those its training rows use (the others have zero weight anyway)
        train = x.index_select(0, torch.as_tensor(np.flatnonzero(~held), dtype=torch.long)).coalesce()
        used = torch.unique(train.indices()[1])
        remap = torch.full((x.shape[1],), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        coef = fit_logistic(_remapped(train, remap, len(used)), labels[~held], n_classes, c)
        test = x.index_select(0, torch.as_tensor(np.flatnonzero(held), dtype=torch.long)).coalesce()
        probs[held] = predict_proba(_remapped(test, remap, len(used)), coef)
    return probs


def _remapped(x: torch.Tensor, remap: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with columns renumbered by ``remap``; columns mapped to -1 (unseen in training) dropped."""
    cols = remap[x.indices()[1]]
    keep = cols >= 0
    return torch.sparse_coo_tensor(
        torch.stack([x.indices()[0][keep], cols[keep]]),
        x.values()[keep],
        (x.shape[0], width),
        check_invariants=False,
    ).coalesce()


def _label_positions(rows: Sequence[dict], label_names: Sequence[Any] | None) -> tuple[np.ndarray, int]:
    """Class indices as fine-tuning reads them, and the number of classes."""
    positions = np.asarray(label_indices(rows, label_names), dtype=np.int64)
    n_classes = len(label_names) if label_names is not None else 0
    return positions, max(n_classes, int(positions.max(initial=-1)) + 1)


def text_oof_scores(
    rows: Sequence[dict],
    label_names: Sequence[Any] | None,
    *,
    k: int,
    c: float,
    seed: int,
    embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """``1 - p(given label)`` per row under the cross-fitted probe (TF-IDF, plus ``embeddings`` when given)."""
    texts = [str(r.get("text", "")) for r in rows]
    labels, n_classes = _label_positions(rows, label_names)
    if not 2 <= k <= len(rows):
        raise InfscopeError(
            f"text_oof k={k} folds need 2 <= k <= {len(rows)} rows; pass --option text_oof.k=5"
        )
    if c <= 0:
        raise InfscopeError(f"text_oof c={c} must be positive (inverse L2 strength); pass e.g. 100")
    folds = grouped_folds(texts, k, seed)
    x = with_dense(tfidf_features(texts), embeddings)
    probs = out_of_fold_proba(x, labels, n_classes, folds, c=c)
    return 1.0 - probs[np.arange(len(labels)), labels]


#: What the probe reads: word and character n-grams, plus the *base* model's mean hidden states
#: (frozen, never trained on these labels, so nothing leaks into the held-out folds).
FEATURES = ("text+base", "text")


def base_embeddings(inputs: MethodInputs) -> np.ndarray:
    """Mean last hidden states of the base model over each training row (one batched forward pass)."""
    loaded = inputs.model("base")
    options = inputs.encode_options()
    encoded = encode_rows(
        inputs.rows(),
        loaded.tokenizer,
        task=options["task"],
        max_length=options["max_length"],
        label_names=options["label_names"],
    )
    return mean_hidden_states(loaded.model, encoded, batch_size=options["batch_size"])


def _text_oof(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("text_oof", lambda k=10, c=100.0, features="text+base": None, options)
    k, c, features = (
        int(options.get("k", 10)),
        float(options.get("c", 100.0)),
        options.get("features", "text+base"),
    )
    if features not in FEATURES:
        raise InfscopeError(f"text_oof features={features!r} is unknown; use one of {', '.join(FEATURES)}")
    embeddings = base_embeddings(inputs) if features == "text+base" else None
    label_names = inputs.encode_options().get("label_names")
    values = text_oof_scores(inputs.rows(), label_names, k=k, c=c, seed=inputs.seed, embeddings=embeddings)
    meta = {"k": k, "c": c, "features": features, "family": "out_of_fold"}
    return from_values(values, inputs.train_ids, "text_oof", meta)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks over ``n`` in (0, 1]; non-finite values rank lowest (least harmful)."""
    v = np.where(np.isfinite(values), values, -np.inf)
    return pd.Series(v).rank(method="average").to_numpy() / len(v)


def _oof_fusion(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("oof_fusion", lambda: None, options)
    scores = inputs.scores_of(["oof_loss", "text_oof"])
    fused = (
        percentile_ranks(scores["oof_loss"].vector()) + percentile_ranks(scores["text_oof"].vector())
    ) / 2
    meta = {"family": "out_of_fold", "members": ["oof_loss", "text_oof"], "weights": [0.5, 0.5]}
    return from_values(fused, inputs.train_ids, "oof_fusion", meta)


REGISTER = [
    Method(
        "text_oof",
        (MODEL,),
        _text_oof,
        "1 - out-of-fold p(given label) under a logistic probe on TF-IDF n-grams + base-model embeddings",
        family="out_of_fold",
        tasks=("classification",),
    ),
    Method(
        "oof_fusion",
        (REFIT,),
        _oof_fusion,
        "mean percentile rank of oof_loss and text_oof (two models whose mistakes differ)",
        family="out_of_fold",
        tasks=("classification",),
    ),
]
