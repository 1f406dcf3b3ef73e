"""RepSim: cosine similarity of last-token hidden states, the representation baseline of data attribution.

"Do Influence Functions Work on Large Language Models?" (2024) and the DATE-LM benchmark find that
plain representation similarity often rivals gradient methods: embed each example by the model's
final hidden state at its last non-padding token (the whole encoded row, prompt and response, as
fine-tuning sees it) and compare training rows with the query rows by cosine.

Sign (higher = more harmful): the score is **minus** the mean cosine to the queries. RepSim ranks
the training rows most similar to a query as the most influential, i.e. helpful; under our one
convention the least similar rows come first. For noise detection against clean validation rows
this reads as "a row that does not look like the clean data is suspicious". It is a relevance
score, not a signed influence: a dissimilar row is not shown to raise the query loss.

Cost: one forward pass over the training rows and one over the queries, no backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.estimators.inputs import MODEL, MethodInputs
from infscope.estimators.method import Method, check_options
from infscope.estimators.scores import Scores
from infscope.models.encode import batches, encode_rows
from infscope.models.loss import model_device
from infscope.models.pair_losses import length_sorted

Rows = Sequence[Mapping[str, Any]]


def _hidden(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], dev: torch.device) -> torch.Tensor:
    """Final-layer hidden states ``(b, t, hidden)`` of a padded batch."""
    inputs = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev)}
    try:  # a causal LM need not project every position onto the vocabulary
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # models without ``logits_to_keep`` (encoders, classifiers)
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1]


def last_token_states(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    *,
    task: str = "causal",
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    label_names: Sequence[Any] | None = None,
) -> np.ndarray:
    """Final hidden state at each row's last non-padding token, ``(n, hidden)`` float64, row order.

    Rows are encoded as fine-tuning encodes them and run in length-sorted, right-padded batches,
    in eval mode without gradients; the model's mode is restored afterwards.
    """
    encoded = encode_rows(
        list(rows),
        tokenizer,
        task=task,
        max_length=max_length,
        response_only=response_only,
        label_names=label_names,
    )
    order = length_sorted(encoded)
    dev = model_device(model)
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    try:
        with torch.no_grad():
            for batch in batches(encoded.subset(order), batch_size, with_index=True):
                hidden = _hidden(model, batch, dev)
                last = batch["attention_mask"].sum(dim=1) - 1
                states = hidden[torch.arange(hidden.shape[0]), last.to(hidden.device)].double().cpu().numpy()
                if out is None:
                    out = np.empty((len(encoded), states.shape[1]), dtype=np.float64)
                out[order[batch["index"].numpy()]] = states
    finally:
        model.train(was_training)
    assert out is not None  # encode_rows refuses empty input
    if not np.isfinite(out).all():
        raise InfscopeError("repsim: hidden states are NaN or infinite; check the model weights and dtype")
    return out


def cosine_matrix(query: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(n_query, n_train)`` of two sets of row vectors (zero vectors give 0)."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-300)
    t = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-300)
    return q @ t.T


def repsim_values(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    query_rows: Rows,
    *,
    aggregate: bool = True,
    **encode: Any,
) -> np.ndarray:
    """``-cos(h_z, h_q)``: ``(n_query, n)``, or its mean over queries ``(n,)`` when ``aggregate``.

    ``encode`` takes ``task``, ``max_length``, ``batch_size``, ``response_only``, ``label_names``.
    """
    if not query_rows:
        raise InfscopeError("repsim: no query rows; pass validation rows (--query)")
    train = last_token_states(model, tokenizer, rows, **encode)
    query = last_token_states(model, tokenizer, query_rows, **encode)
    values = -cosine_matrix(query, train)
    return values.mean(axis=0) if aggregate else values


def _compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    """The ``repsim`` method at the scored checkpoint, against the run's query rows."""
    check_options("repsim", lambda: None, options)
    loaded = inputs.model("checkpoint")
    values = repsim_values(
        loaded.model,
        loaded.tokenizer,
        inputs.rows(),
        inputs.query_rows(),
        aggregate=inputs.aggregate,
        **inputs.encode_options(),
    )
    query_ids = [str(r["id"]) for r in inputs.query_rows()]
    meta = {"family": "forward", "aggregate": inputs.aggregate, "representation": "last-token final hidden"}
    return Scores(values, inputs.train_ids, query_ids, "repsim", meta)


REGISTER = [
    Method(
        "repsim",
        (MODEL,),
        _compute,
        "RepSim: minus the mean cosine of last-token hidden states with the queries (relevance baseline)",
        family="forward",
        per_query=True,
    )
]
