"""TracIn-WE on tiny-llama against a per-token loop: each row alone, autograd on a trainable copy of the
input embedding matrix (untied from the output head), dot products summed over the shared tokens.
Also the per-query matrix, the token split of one row's score, and the registered method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FakeInputs
from infscope.errors import InfscopeError
from infscope.estimators.registry import get_method
from infscope.estimators.tracin_we import scatter_tokens, token_scores, tracin_we_values
from infscope.models.encode import encode_rows
from infscope.models.loss import token_loss

MAX_LEN = 64
ENCODE = {"task": "causal", "max_length": MAX_LEN, "batch_size": 4, "response_only": True}


def embedding_grad(loaded, row) -> tuple[list[int], torch.Tensor]:
    """A row's token ids and dL/dE (vocab, hidden): autograd on a trainable copy of the input embeddings."""
    enc = encode_rows([row], loaded.tokenizer, task="causal", max_length=MAX_LEN)
    ids = torch.tensor([enc.input_ids[0]])
    table = torch.nn.Parameter(loaded.model.get_input_embeddings().weight.detach().clone())
    logits = loaded.model(inputs_embeds=table[ids]).logits
    loss = token_loss(logits, torch.tensor([enc.labels[0]]))[0]
    (grad,) = torch.autograd.grad(loss, table)
    return enc.input_ids[0], grad.double()


def loop_tracin_we(loaded, rows, queries) -> np.ndarray:
    """-sum over shared tokens t of <dL_z/dE_t, dL_q/dE_t>, one (query, row) pair and one token at a time."""
    train = [embedding_grad(loaded, r) for r in rows]
    query = [embedding_grad(loaded, q) for q in queries]
    out = np.zeros((len(queries), len(rows)))
    for qi, (q_ids, q_grad) in enumerate(query):
        for zi, (z_ids, z_grad) in enumerate(train):
            for token in set(q_ids) & set(z_ids):
                out[qi, zi] -= float(z_grad[token] @ q_grad[token])
    return out


@pytest.fixture(scope="module")
def reference(tuned_llama):
    loaded, rows, queries = tuned_llama
    return loop_tracin_we(loaded, rows, queries)


def test_mean_query_scores_match_the_loop(tuned_llama, reference):
    loaded, rows, queries = tuned_llama
    values, _ = tracin_we_values(loaded.model, loaded.tokenizer, rows, queries, **ENCODE)
    want = reference.mean(axis=0)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_per_query_matrix_matches_the_loop(tuned_llama, reference):
    loaded, rows, queries = tuned_llama
    values, _ = tracin_we_values(loaded.model, loaded.tokenizer, rows, queries, aggregate=False, **ENCODE)
    assert values.shape == (len(queries), len(rows))
    np.testing.assert_allclose(values, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())


def test_token_scores_split_the_row_score(tuned_llama, reference):
    loaded, rows, queries = tuned_llama
    row = rows[4]
    table = token_scores(loaded.model, loaded.tokenizer, row, queries, **ENCODE)
    ids, z_grad = embedding_grad(loaded, row)
    assert sorted(table["token_id"]) == sorted(set(ids))
    assert table["count"].sum() == len(ids)
    assert table["score"].sum() == pytest.approx(reference.mean(axis=0)[4], rel=1e-4)
    q_grads = [embedding_grad(loaded, q) for q in queries]
    for token_id, score in zip(table["token_id"], table["score"], strict=True):
        want = -np.mean([float(z_grad[token_id] @ g[token_id]) if token_id in q else 0.0 for q, g in q_grads])
        assert score == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert list(table["score"]) == sorted(table["score"], reverse=True)


def test_scatter_tokens_sums_positions_by_token_and_drops_others():
    grads = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    ids = torch.tensor([[5, 7, 5, 0], [9, 7, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    out = scatter_tokens(grads, ids, mask, torch.tensor([2, 5, 7]))
    want = torch.zeros(2, 3, 3, dtype=torch.float64)
    want[0, 1] = grads[0, 0] + grads[0, 2]  # token 5 twice; the padded 0 and token 9 are dropped
    want[0, 2] = grads[0, 1]
    want[1, 0] = grads[1, 2] + grads[1, 3]
    want[1, 2] = grads[1, 1]
    assert torch.equal(out, want)


def test_registered_method_and_its_top_tokens(tuned_llama, reference):
    loaded, rows, queries = tuned_llama
    scores = get_method("tracin_we").compute(FakeInputs(loaded, rows, queries, ENCODE), {"top": 3})
    want = reference.mean(axis=0)
    np.testing.assert_allclose(scores.values, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    worst = scores.harmful(1)[0]
    tops = scores.meta["top_tokens"][worst]
    assert 1 <= len(tops) <= 3
    table = token_scores(
        loaded.model, loaded.tokenizer, rows[scores.train_ids.index(worst)], queries, **ENCODE
    )
    assert tops[0][1] == pytest.approx(table["score"].iloc[0], rel=1e-4)
    matrix = get_method("tracin_we").compute(FakeInputs(loaded, rows, queries, ENCODE, aggregate=False), {})
    assert matrix.is_matrix and matrix.query_ids == [q["id"] for q in queries]
    with pytest.raises(InfscopeError, match="no option"):
        get_method("tracin_we").compute(FakeInputs(loaded, rows, queries, ENCODE), {"k": 2})
    with pytest.raises(InfscopeError, match="no query rows"):
        tracin_we_values(loaded.model, loaded.tokenizer, rows, [], **ENCODE)
