"""Mirrored influence (Forward-INF) on tiny-llama, against a plain loop of its definition: per-row losses
before and after hand-written SGD / Adam steps on a copy of the LoRA weights; its first-order agreement
with hessian_free; that the model is left unchanged; and option checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import FakeInputs
from infscope.errors import InfscopeError
from infscope.estimators.hessian_free import HessianFree
from infscope.estimators.mirrored import lora_weights, mirrored_values
from infscope.estimators.registry import get_method
from infscope.grads.hooks import compute_gradients
from infscope.models.encode import encode_rows

MAX_LEN = 64
ENCODE = {"task": "causal", "max_length": MAX_LEN, "batch_size": 3, "response_only": True}


def row_loss(model, tokenizer, row) -> torch.Tensor:
    """One row's mean response-token loss, alone (no padding), differentiable."""
    enc = encode_rows([row], tokenizer, task="causal", max_length=MAX_LEN)
    logits = model(input_ids=torch.tensor([enc.input_ids[0]])).logits[0, :-1].float()
    target = torch.tensor(enc.labels[0][1:])
    keep = target != -100
    return torch.nn.functional.cross_entropy(logits[keep], target[keep])


def loop_losses(model, tokenizer, rows) -> np.ndarray:
    with torch.no_grad():
        return np.array([row_loss(model, tokenizer, r).item() for r in rows])


def loop_mirrored(loaded, rows, queries, lr, steps, optimizer, direction) -> np.ndarray:
    """The definition, by hand: a deep copy, per-query loss loop, hand-written SGD or Adam."""
    model = copy.deepcopy(loaded.model)
    params = lora_weights(model)
    before = loop_losses(model, loaded.tokenizer, rows)
    sign = 1.0 if direction == "descent" else -1.0
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        for p in params:
            p.requires_grad_(True)
        loss = sum(row_loss(model, loaded.tokenizer, q) for q in queries) / len(queries)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                g = -g if direction == "ascent" else g  # ascent: descend on minus the loss
                if optimizer == "sgd":
                    p -= lr * g
                else:
                    m[i] = 0.9 * m[i] + 0.1 * g
                    v[i] = 0.999 * v[i] + 0.001 * g * g
                    m_hat, v_hat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                    p -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    after = loop_losses(model, loaded.tokenizer, rows)
    return sign * (after - before)


@pytest.mark.parametrize(
    "steps, lr, optimizer, direction",
    [(1, 0.05, "sgd", "descent"), (2, 0.02, "sgd", "ascent"), (2, 1e-3, "adam", "descent")],
)
def test_matches_the_definition_by_a_plain_loop(tuned_llama, steps, lr, optimizer, direction):
    loaded, rows, queries = tuned_llama
    got, meta = mirrored_values(
        loaded.model,
        loaded.tokenizer,
        rows,
        queries,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        direction=direction,
        max_length=MAX_LEN,
        batch_size=4,
    )
    want = loop_mirrored(loaded, rows, queries, lr, steps, optimizer, direction)
    assert np.abs(want).max() > 1e-3  # the steps really move the losses
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)
    assert len(meta["query_loss"]) == steps + 1
    moved_down = meta["query_loss"][-1] < meta["query_loss"][0]
    assert moved_down == (direction == "descent")


def test_model_is_left_unchanged(tuned_llama):
    loaded, rows, queries = tuned_llama
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    mirrored_values(loaded.model, loaded.tokenizer, rows, queries, steps=2, lr=0.1, max_length=MAX_LEN)
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert not p.requires_grad and p.grad is None


def test_one_small_sgd_step_is_eta_times_hessian_free(tuned_llama):
    """First order: L_z(theta - eta v) - L_z(theta) ~ -eta v.g_z = eta * hessian_free(z)."""
    loaded, rows, queries = tuned_llama
    eta = 1e-3
    got, _ = mirrored_values(
        loaded.model, loaded.tokenizer, rows, queries, lr=eta, max_length=MAX_LEN, batch_size=16
    )
    enc = {"task": "causal", "max_length": MAX_LEN}
    train = compute_gradients(
        loaded.model, encode_rows(rows, loaded.tokenizer, **enc), ids=[r["id"] for r in rows], progress=False
    )
    query = compute_gradients(
        loaded.model,
        encode_rows(queries, loaded.tokenizer, **enc),
        ids=[r["id"] for r in queries],
        progress=False,
    )
    hf = HessianFree().fit(train).score(query).values
    assert spearmanr(got, hf).statistic > 0.9
    np.testing.assert_allclose(got, eta * hf, rtol=0.05, atol=0.02 * eta * np.abs(hf).max())


def test_registered_method_scores_through_inputs(tuned_llama):
    loaded, rows, queries = tuned_llama
    method = get_method("mirrored")
    scores = method.compute(FakeInputs(loaded, rows, queries, ENCODE), {"lr": 0.05})
    want = loop_mirrored(loaded, rows, queries, 0.05, 1, "sgd", "descent")
    assert scores.train_ids == [r["id"] for r in rows]
    np.testing.assert_allclose(scores.values, want, rtol=2e-3, atol=2e-5)
    assert scores.meta["lr"] == 0.05 and scores.meta["direction"] == "descent"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"direction": "sideways"}, "direction"),
        ({"momentum": 0.9}, "no option 'momentum'"),
    ],
)
def test_bad_options_raise(tuned_llama, options, match):
    loaded, rows, queries = tuned_llama
    with pytest.raises(InfscopeError, match=match):
        get_method("mirrored").compute(FakeInputs(loaded, rows, queries, ENCODE), options)
