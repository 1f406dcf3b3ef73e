"""TracIn-WE: TracIn restricted to the word-embedding rows a training row and a query share.

Yeh et al. (2022) observe that for language models the gradient of the (input) word-embedding
matrix ``E`` carries most of what makes TracIn useful, and that it is sparse: example ``z`` only
touches the rows of the tokens it contains. Its gradient on row ``E_t`` is the sum of the loss
gradients w.r.t. the embedding *output* at every position holding token ``t``. So

    TracIn-WE(z, q) = sum over tokens t in both z and q of <dL_z/dE_t, dL_q/dE_t>,

and the score here is ``-TracIn-WE`` (higher = more harmful, as ``hessian_free``: a row whose
embedding gradients point with the query's lowers the query loss when trained on). The row
score is the mean over queries, which equals the product with the mean query gradient.

Under LoRA ``E`` is frozen, so no ``.grad`` is touched: a forward hook on the input embedding
module swaps its output for a leaf tensor, one batched backward gives ``dL_i/de_{i,p}`` for every
row ``i`` and position ``p``, and a scatter-add sums them per token into the universe of tokens
the queries contain (other tokens meet a zero query gradient and add nothing). Only the input
embedding counts: with tied weights the output head's share of ``dL/dE`` is left out.
:func:`token_scores` splits one row's score into its tokens.

For the report, the method saves in its meta ``token_marks``: for the :data:`META_ROWS` most
harmful rows, the ``top`` tokens that push the row's score up (positive contributions against the
mean query) and the character spans where they sit in the row's own fields (``instruction``,
``input``, ``output``, ``text``, ...), found by decoding the encoded ids (:func:`token_field_spans`),
so the report can mark them in the text it shows without a tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from infscope.errors import InfscopeError
from infscope.estimators.inputs import MODEL, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.scores import Scores
from infscope.grads.hooks import eval_with_grad
from infscope.grads.losses import default_loss
from infscope.models.encode import Encoded, batches, encode_rows
from infscope.models.loss import model_device
from infscope.models.pair_losses import length_sorted

Rows = Sequence[Mapping[str, Any]]
#: How many most harmful rows get their top tokens in the method's meta (the report shows 50 by default).
META_ROWS = 50
#: Row fields whose text the tokens are located in, in the order an encoded row holds them.
TEXT_FIELDS = ("instruction", "input", "output", "text", "text_a", "text_b")
#: Fewest characters of a truncated field that still count as finding it (shorter matches may be chance).
MIN_PARTIAL = 8


@contextlib.contextmanager
def embedding_outputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward appends its input-embedding output (a grad-requiring leaf)."""
    module = model.get_input_embeddings()
    if module is None:
        raise InfscopeError(
            f"{type(model).__name__} has no input embedding module; TracIn-WE needs a token-embedding model"
        )
    seen: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        seen.append(leaf)
        return leaf

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def position_grads(
    model: torch.nn.Module, encoded: Encoded, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, input_ids, mask, grads)`` per length-sorted batch.

    ``grads[i, p]`` is ``dL_i / de_{i,p}`` (float32, ``(b, t, hidden)``), ``rows`` the positions of
    the batch's rows in ``encoded``, ``mask`` the attention mask as bools. One backward of the sum of
    the per-row losses serves the whole batch, since row ``i``'s loss depends only on its own inputs.
    """
    order = length_sorted(encoded)
    dev = model_device(model)
    with eval_with_grad(model), embedding_outputs(model) as seen:
        for batch in batches(encoded.subset(order), batch_size, with_index=True):
            rows = order[batch.pop("index").numpy()]
            seen.clear()
            losses = default_loss(model, {k: v.to(dev) for k, v in batch.items()})
            if not bool(torch.isfinite(losses).all()):
                bad = [encoded.ids[i] for i in rows[~torch.isfinite(losses).cpu().numpy()]]
                raise InfscopeError(f"tracin_we: loss is NaN or infinite for rows {', '.join(bad[:5])}")
            (grads,) = torch.autograd.grad(losses.sum(), seen[0])
            yield rows, batch["input_ids"], batch["attention_mask"].bool(), grads.detach().float().cpu()


def scatter_tokens(
    grads: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, universe: torch.Tensor
) -> torch.Tensor:
    """Per-row embedding-row gradients ``(b, len(universe), hidden)``: position grads summed by token.

    ``universe`` is a sorted 1-D tensor of token ids; positions whose token is outside it, or that
    are padding, are dropped.
    """
    b, _, hidden = grads.shape
    n_u = universe.numel()
    slot = torch.searchsorted(universe, input_ids).clamp(max=max(n_u - 1, 0))
    hit = mask & (universe[slot] == input_ids) if n_u else torch.zeros_like(mask)
    rows = torch.arange(b).unsqueeze(1).expand_as(slot)
    out = torch.zeros(b * n_u, hidden, dtype=torch.float64)
    out.index_add_(0, (rows * n_u + slot)[hit], grads[hit].double())
    return out.view(b, n_u, hidden)


def query_token_grads(
    model: torch.nn.Module, query: Encoded, batch_size: int, *, aggregate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(universe, Q)``: sorted query token ids and their embedding-row gradients.

    ``Q`` is ``(n_query, n_u, hidden)``, or ``(1, n_u, hidden)`` (the mean query) when ``aggregate``.
    """
    universe = torch.unique(torch.cat([torch.as_tensor(seq, dtype=torch.long) for seq in query.input_ids]))
    hidden = int(model.get_input_embeddings().weight.shape[1])
    total = torch.zeros(1 if aggregate else len(query), universe.numel(), hidden, dtype=torch.float64)
    for rows, ids, mask, grads in position_grads(model, query, batch_size):
        per_row = scatter_tokens(grads, ids, mask, universe)
        if aggregate:
            total[0] += per_row.sum(dim=0)
        else:
            total[torch.as_tensor(rows)] = per_row
    if aggregate:
        total /= len(query)
    return universe, total


def _encode(rows: Rows, tokenizer: Any, encode: Mapping[str, Any]) -> Encoded:
    return encode_rows(
        list(rows),
        tokenizer,
        task=encode.get("task", "causal"),
        max_length=encode.get("max_length", 256),
        response_only=encode.get("response_only", True),
        label_names=encode.get("label_names"),
    )


def tracin_we_values(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    query_rows: Rows,
    *,
    aggregate: bool = True,
    top: int = 5,
    **encode: Any,
) -> tuple[np.ndarray, list[list[tuple[int, float]]]]:
    """``-TracIn-WE`` scores and each row's ``top`` tokens by contribution to its mean-query score.

    Returns ``values`` (``(n,)`` for the mean query when ``aggregate``, else ``(n_query, n)``) and,
    per row, ``[(token_id, contribution), ...]`` most harmful first. ``encode`` takes ``task``,
    ``max_length``, ``batch_size``, ``response_only`` and ``label_names`` as the run encodes rows.
    """
    if not query_rows:
        raise InfscopeError("tracin_we: no query rows; pass validation rows (--query)")
    batch_size = int(encode.pop("batch_size", 8))
    train, query = _encode(rows, tokenizer, encode), _encode(query_rows, tokenizer, encode)
    universe, Q = query_token_grads(model, query, batch_size, aggregate=aggregate)
    mean_q = Q.mean(dim=0)
    values = np.zeros((Q.shape[0], len(train)), dtype=np.float64)
    tops: list[list[tuple[int, float]]] = [[] for _ in range(len(train))]
    for batch_rows, ids, mask, grads in position_grads(model, train, batch_size):
        G = scatter_tokens(grads, ids, mask, universe)
        values[:, batch_rows] = -torch.einsum("buh,quh->qb", G, Q).numpy()
        contrib = -(G * mean_q).sum(dim=2)  # (b, n_u): each shared token's part of the row score
        contrib[G.abs().sum(dim=2) == 0] = -torch.inf  # tokens the row does not hold
        k = min(top, universe.numel())
        best = torch.topk(contrib, k, dim=1) if k else None
        for j, row in enumerate(batch_rows.tolist()):
            if best is not None:
                tops[row] = [
                    (int(universe[u]), float(v))
                    for u, v in zip(best.indices[j].tolist(), best.values[j].tolist(), strict=True)
                    if v > -np.inf
                ]
    if not np.isfinite(values).all():
        raise InfscopeError(
            "tracin_we: some scores are NaN or infinite; compute in float32 (--dtype float32)"
        )
    return (values[0] if aggregate else values), tops


def token_scores(
    model: torch.nn.Module, tokenizer: Any, row: Mapping[str, Any], query_rows: Rows, **encode: Any
) -> pd.DataFrame:
    """Which tokens carry one row's TracIn-WE score against the mean query.

    A table with one line per distinct token of ``row`` (``token_id``, ``token`` text, ``count`` of
    positions, ``score``), most harmful first; the scores sum to the row's ``tracin_we`` score.
    Tokens no query contains score 0. ``encode`` as in :func:`tracin_we_values`.
    """
    if not query_rows:
        raise InfscopeError("tracin_we: no query rows; pass validation rows")
    batch_size = int(encode.pop("batch_size", 8))
    encoded = _encode([row], tokenizer, encode)
    query = _encode(query_rows, tokenizer, encode)
    _, own = query_token_grads(model, encoded, batch_size, aggregate=False)
    universe, Q = query_token_grads(model, query, batch_size, aggregate=True)
    tokens, counts = np.unique(np.asarray(encoded.input_ids[0]), return_counts=True)
    slot = np.searchsorted(universe.numpy(), tokens).clip(max=max(universe.numel() - 1, 0))
    shared = universe.numpy()[slot] == tokens if universe.numel() else np.zeros(len(tokens), bool)
    score = np.zeros(len(tokens), dtype=np.float64)
    # own[0] is indexed by the row's own sorted token ids, which are exactly ``tokens``
    score[shared] = -(own[0][torch.as_tensor(np.flatnonzero(shared))] * Q[0][slot[shared]]).sum(dim=1).numpy()
    frame = pd.DataFrame(
        {
            "token_id": tokens.astype(np.int64),
            "token": [tokenizer.decode([int(t)]) for t in tokens],
            "count": counts.astype(np.int64),
            "score": score,
        }
    )
    return frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def _decoded_length(tokenizer: Any, ids: Sequence[int]) -> int:
    """Characters in the decoded text of ``ids`` (special tokens and spacing kept as they are)."""
    if not ids:
        return 0
    text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return len(text)


def _shortest_found(full: str, value: str, cursor: int, *, suffix: bool) -> int:
    """Length of the longest suffix (or prefix) of ``value`` found in ``full`` from ``cursor`` on.

    A binary search: if a suffix occurs, every shorter suffix does too (likewise for prefixes).
    """
    lo, hi = 0, len(value)  # lo: a length known to be found; hi: the longest one to try
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = value[len(value) - mid :] if suffix else value[:mid]
        if full.find(part, cursor) >= 0:
            lo = mid
        else:
            hi = mid - 1
    return lo


def locate_field(full: str, value: str, cursor: int = 0) -> tuple[int, int, int] | None:
    """Where a row field's text sits in an encoded row's decoded text: ``(start, end, offset)``.

    ``full[start:end]`` equals ``value[offset:offset + end - start]``. The whole value is looked for
    first; a value cut by truncation (a prompt loses its beginning, a response its end) is matched
    by its longest surviving suffix or prefix of at least :data:`MIN_PARTIAL` characters. Search
    starts at ``cursor``; ``None`` when nothing of the field is left.
    """
    whole = full.find(value, cursor)
    if whole >= 0:
        return whole, whole + len(value), 0
    best: tuple[int, int, int] | None = None
    for suffix in (True, False):
        size = _shortest_found(full, value, cursor, suffix=suffix)
        if size < MIN_PARTIAL or (best is not None and size <= best[1] - best[0]):
            continue
        part = value[len(value) - size :] if suffix else value[:size]
        start = full.find(part, cursor)
        best = (start, start + size, len(value) - size if suffix else 0)
    return best


def token_field_spans(
    tokenizer: Any, input_ids: Sequence[int], row: Mapping[str, Any], positions: Sequence[int]
) -> list[tuple[str, int, int] | None]:
    """Where the tokens at ``positions`` of an encoded row sit in the row's own fields.

    Returns, per position, ``(field, start, end)`` character offsets into ``str(row[field])`` (the
    token's leading and trailing whitespace left out), or ``None`` for a token in the prompt
    template, in a special token, or in what truncation cut off. Offsets come from decoding prefixes
    of ``input_ids`` (a token spans the characters its id adds), and the fields are found in order in
    the decoded text (:func:`locate_field`), so this needs nothing of the tokenizer beyond ``decode``.
    """
    ids = [int(t) for t in input_ids]
    full = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    bounds: dict[str, tuple[int, int, int]] = {}
    cursor = 0
    for name in TEXT_FIELDS:
        value = row.get(name)
        if not isinstance(value, str) or not value:
            continue
        found = locate_field(full, value, cursor)
        if found is not None:
            bounds[name] = found
            cursor = found[1]
    out: list[tuple[str, int, int] | None] = []
    for pos in positions:
        start, end = _decoded_length(tokenizer, ids[:pos]), _decoded_length(tokenizer, ids[: pos + 1])
        while start < end and full[start].isspace():
            start += 1
        while end > start and full[end - 1].isspace():
            end -= 1
        hit = None
        for name, (lo, hi, shift) in bounds.items():
            if start < hi and end > lo and end > start:
                hit = (name, max(start, lo) - lo + shift, min(end, hi) - lo + shift)
                break
        out.append(hit)
    return out


def token_marks(
    tokenizer: Any,
    rows: Rows,
    tops: Sequence[Sequence[tuple[int, float]]],
    encode: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Per row: its tokens with a positive share of the score, and their spans in the row's fields.

    ``tops[i]`` is row ``i``'s ``[(token_id, contribution), ...]`` (most harmful first, as
    :func:`tracin_we_values` gives). Each entry is ``{"tokens": [[text, score, token_id], ...],
    "spans": {field: [[start, end, k], ...]}}`` with ``k`` the index into ``tokens``.
    """
    if not rows:
        return []
    encoded = _encode(rows, tokenizer, encode)
    out: list[dict[str, Any]] = []
    for row, seq, top in zip(rows, encoded.input_ids, tops, strict=True):
        carrying = [(int(t), float(v)) for t, v in top if v > 0]
        index = {t: k for k, (t, _) in enumerate(carrying)}
        positions = [p for p, t in enumerate(seq) if int(t) in index]
        spans: dict[str, list[list[int]]] = {}
        for pos, hit in zip(positions, token_field_spans(tokenizer, seq, row, positions), strict=True):
            if hit is not None:
                spans.setdefault(hit[0], []).append([hit[1], hit[2], index[int(seq[pos])]])
        tokens = [[tokenizer.decode([t]), round(v, 8), t] for t, v in carrying]
        out.append({"tokens": tokens, "spans": spans})
    return out


def _compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    """The ``tracin_we`` method at the scored checkpoint, against the run's query rows."""
    check_options("tracin_we", lambda top=5: None, options)
    loaded = inputs.model("checkpoint")
    encode = inputs.encode_options()
    values, tops = tracin_we_values(
        loaded.model,
        loaded.tokenizer,
        inputs.rows(),
        inputs.query_rows(),
        aggregate=inputs.aggregate,
        top=int(options.get("top", 5)),
        **encode,
    )
    ids = inputs.train_ids
    query_ids = [str(r["id"]) for r in inputs.query_rows()]
    row_scores = values if values.ndim == 1 else values.mean(axis=0)
    hidden = set(getattr(inputs, "canary_ids", ()))  # canaries never appear in any output
    harmful = [i for i in np.argsort(-row_scores, kind="stable") if ids[i] not in hidden][:META_ROWS]
    rows = inputs.rows()
    marks = token_marks(loaded.tokenizer, [rows[i] for i in harmful], [tops[i] for i in harmful], encode)
    meta = {
        "family": "forward",
        "aggregate": inputs.aggregate,
        "top_tokens": {
            ids[i]: [[loaded.tokenizer.decode([t]), round(v, 8)] for t, v in tops[i]] for i in harmful
        },
        "token_marks": {ids[i]: mark for i, mark in zip(harmful, marks, strict=True)},
    }
    return Scores(values, ids, query_ids, "tracin_we", meta)


REGISTER = [
    Method(
        "tracin_we",
        (MODEL,),
        _compute,
        "TracIn-WE: gradient dot products on the word-embedding rows a row shares with the queries",
        family="forward",
        per_query=True,
        options={"top": 5},
    )
]
