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
:func:`token_scores` splits one row's score into its tokens, for the report.
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
#: How many most harmful rows get their top tokens in the method's meta.
META_ROWS = 20


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
    meta = {
        "family": "forward",
        "aggregate": inputs.aggregate,
        "top_tokens": {
            ids[i]: [[loaded.tokenizer.decode([t]), round(v, 8)] for t, v in tops[i]] for i in harmful
        },
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
