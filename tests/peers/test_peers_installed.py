"""Installed peers on a tiny LoRA Llama built from config: sign convention and exact agreement.

The training set holds an exact copy of the query row (id ``dup``): upweighting it lowers the
query loss the most, so in our convention it must get the lowest (most helpful), negative score.
Each peer is skipped with a reason when its package is not installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from infscope.estimators.registry import get_estimator
from infscope.grads.hooks import compute_gradients, lora_linear_names
from infscope.grads.losses import default_loss
from infscope.models.encode import Encoded
from infscope.peers import PeerInputs, run_peer
from infscope.peers.agreement import max_rel_diff, spearman

#: Run by the CI step that installs the peers extras (`pytest -m peers`), not by the default test command.
pytestmark = pytest.mark.peers

VOCAB = 40


def tiny_lora_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attn_implementation="eager",  # vmap (dattri) has no batching rule for CPU SDPA: slow fallback
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(cfg), lora)
    model.eval()
    return model


def make_rows(n: int, seed: int, prefix: str) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + i % 4
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        rows.append({"id": f"{prefix}{i}", "input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return rows


def encoder(rows: list[dict]) -> Encoded:
    return Encoded(
        [r["id"] for r in rows], [r["input_ids"] for r in rows], [r["labels"] for r in rows], "causal", 0, []
    )


@pytest.fixture(scope="module")
def tiny():
    model = tiny_lora_llama()
    val = make_rows(1, seed=1, prefix="q")
    train = make_rows(7, seed=2, prefix="t") + [{**val[0], "id": "dup"}]
    layers = lora_linear_names(model)
    grads = {
        name: compute_gradients(model, encoder(rows), layers=layers, batch_size=4, progress=False)
        for name, rows in (("train", train), ("val", val))
    }
    inputs = PeerInputs(
        train_grads=grads["train"],
        val_grads=grads["val"],
        train_rows=train,
        val_rows=val,
        load_model=lambda path=None: copy.deepcopy(model),
        encoder=encoder,
        batch_size=4,
    )
    ours = {
        m: get_estimator(m, **kw).fit(grads["train"]).score(grads["val"]).vector()
        for m, kw in (("hessian_free", {}), ("exact", {}))
    }
    return inputs, ours


def assert_duplicate_most_helpful(result) -> None:
    assert result.ok, result.error
    dup = result.train_ids.index("dup")
    assert result.scores[dup] < 0
    assert int(np.argmin(result.scores)) == dup


def test_kronfluence_identity_is_minus_gradient_dot_product(tiny):
    pytest.importorskip("kronfluence")
    inputs, ours = tiny
    result = run_peer("kronfluence_identity", inputs)
    assert_duplicate_most_helpful(result)
    assert max_rel_diff(result.scores, ours["hessian_free"]) < 1e-4


def test_kronfluence_ekfac_sign(tiny):
    pytest.importorskip("kronfluence")
    inputs, ours = tiny
    result = run_peer("kronfluence_ekfac", inputs)
    assert_duplicate_most_helpful(result)
    assert spearman(result.scores, ours["exact"]) > 0


def test_dattri_datainf_equals_ours_at_the_same_damping(tiny):
    pytest.importorskip("dattri")
    inputs, _ = tiny
    result = run_peer("dattri_datainf", inputs, damping=0.05)
    ours = get_estimator("datainf", damping=0.05).fit(inputs.train_grads).score(inputs.val_grads).vector()
    assert max_rel_diff(result.scores, ours) < 1e-4
    assert_duplicate_most_helpful(result)


def test_dattri_tracin_ranks_like_our_tracin(tiny):
    pytest.importorskip("dattri")
    inputs, ours = tiny
    result = run_peer("dattri_tracin", inputs, proj_dim=512)
    assert_duplicate_most_helpful(result)
    assert spearman(result.scores, ours["hessian_free"]) > 0.9


def test_dattri_trak_sign_probability_and_ranking(tiny):
    """TRAK on the tiny run: the duplicate is most helpful, scaled by ``1 - p``, ranks agree with ours.

    With 8 rows and a small ``lambda`` TRAK least-squares fits the query gradient by the training
    gradients: the query *is* the duplicate's gradient, so its coefficient is 1 and its score is
    ``-(1 - p_dup)`` with ``p = exp(-loss)``; the other rows are small. A large ``lambda`` makes TRAK a
    ``(1 - p)``-weighted TracIn, close in rank to our hessian-free scores.
    """
    pytest.importorskip("dattri")
    inputs, ours = tiny
    result = run_peer("dattri_trak", inputs)
    assert_duplicate_most_helpful(result)
    assert result.meta["proj_dim"] == 512 and result.meta["regularization"] > 0
    query = inputs.val_rows[0]
    with torch.no_grad():
        batch = {"input_ids": torch.tensor([query["input_ids"]]), "labels": torch.tensor([query["labels"]])}
        p_query = float(torch.exp(-default_loss(inputs.load_model(), batch)))
    dup = result.train_ids.index("dup")
    assert result.scores[dup] == pytest.approx(-(1 - p_query), rel=0.01)  # observed 0.36% off
    rho = spearman(result.scores, ours["hessian_free"])
    heavy = run_peer("dattri_trak", inputs, regularization=1e4 * result.meta["regularization"])
    rho_heavy = spearman(heavy.scores, ours["hessian_free"])
    print(f"dattri_trak spearman vs hessian_free: {rho:.3f} (default), {rho_heavy:.3f} (heavy lambda)")
    assert rho > 0.35  # observed 0.595
    assert_duplicate_most_helpful(heavy)
    assert rho_heavy > 0.8  # observed 0.929


class StubClassifier(nn.Module):
    """Predicts class ``first token % 2`` with high confidence (a stand-in for a tuned classifier)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        cls = input_ids[:, 0] % 2
        logits = torch.stack([(cls == 0).float(), (cls == 1).float()], dim=1) * 6.0
        return SimpleNamespace(logits=logits)


def test_cleanlab_flags_the_mislabelled_row(tiny):
    pytest.importorskip("cleanlab")
    inputs, _ = tiny
    rows = [{"id": f"c{i}", "input_ids": [i + 2, 5, 7], "label": (i + 2) % 2} for i in range(10)]
    rows[3]["label"] = 1 - rows[3]["label"]
    cls_inputs = copy.copy(inputs)
    cls_inputs.task = "classification"
    cls_inputs.train_rows = rows
    cls_inputs.train_grads = SimpleNamespace(ids=[r["id"] for r in rows], block_names=[])
    cls_inputs.load_model = lambda path=None: StubClassifier()
    cls_inputs.checkpoints = [Path("epoch-1")]
    cls_inputs.encoder = lambda rs: Encoded(
        [r["id"] for r in rs], [r["input_ids"] for r in rs], [r["label"] for r in rs], "classification", 0, []
    )
    result = run_peer("cleanlab", cls_inputs)
    assert result.ok, result.error
    assert int(np.argmax(result.scores)) == 3
    assert result.scores[3] > 0.9 and np.delete(result.scores, 3).max() < 0.1
