"""Hook-based per-example gradients against a per-example autograd loop (float64, tiny models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from infscope.errors import InfscopeError
from infscope.grads import block_inventory, compute_gradients, format_inventory, lora_linear_names
from infscope.grads.blocks import block_key

VOCAB = 48


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3, init_lora_weights=False
    )
    return get_peft_model(LlamaForCausalLM(cfg).double(), lora)


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"], init_lora_weights=False
    )
    return get_peft_model(BertForSequenceClassification(cfg).double(), lora)


def lm_rows(lengths: list[int], seed: int = 1) -> list[dict]:
    """Rows of different lengths; the first two tokens are a prompt (label -100)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, length in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        rows.append(
            {
                "id": f"r{i}",
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": [-100, -100] + ids[2:],
            }
        )
    return rows


def reference(
    model: nn.Module, rows: list[dict], layers: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example loop: each row alone (no padding), a hand-written loss, torch.autograd.grad per row."""
    modules = dict(model.named_modules())
    params = [
        (name, p) for name in layers for p in (modules[name].weight, modules[name].bias) if p is not None
    ]
    flags = [p.requires_grad for _, p in params]
    for _, p in params:
        p.requires_grad_(True)
    model.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    losses = []
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]]))[0][0]
        logp = torch.log_softmax(logits, dim=-1)
        if isinstance(row["labels"], int):  # classification: -log p(label)
            loss = -logp[row["labels"]]
        else:  # causal LM: mean over target tokens of -log p(token | prefix)
            terms = [-logp[t - 1, tok] for t, tok in enumerate(row["labels"]) if tok != -100]
            loss = torch.stack(terms).mean()
        grads = torch.autograd.grad(loss, [p for _, p in params])
        per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        for (name, _), g in zip(params, grads, strict=True):
            per_layer[name].append(g.flatten())
        for name in layers:
            out[name].append(torch.cat(per_layer[name]))
        losses.append(loss.detach())
    for (_, p), flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)
    return {name: torch.stack(v) for name, v in out.items()}, torch.stack(losses)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm(dim=1).max() / b.norm(dim=1).min())


def test_llama_lora_hooks_match_per_example_loop_with_padding():
    model = tiny_llama()
    model.train()  # dropout 0.3 is on in train mode: the engine must switch it off
    rows = lm_rows([5, 11, 3, 8, 6])
    layers = lora_linear_names(model)
    assert len(layers) == 8 and all(".lora_" in n for n in layers)
    got = compute_gradients(model, rows, batch_size=3, dtype=torch.float64, progress=False)
    assert model.training  # mode restored
    ref, ref_loss = reference(model, rows, layers)
    assert got.ids == [r["id"] for r in rows]
    assert got.block_names == layers
    for name in layers:
        assert got.block_dim(name) == ref[name].shape[1]
        assert rel_err(got.load_block(name, torch.float64), ref[name]) < 1e-8
    assert torch.allclose(torch.from_numpy(got.losses), ref_loss, rtol=1e-10, atol=0)


def test_ready_batches_with_extra_padding_give_the_same_gradients():
    model = tiny_llama()
    rows = lm_rows([4, 7, 5, 9])
    width = 12  # more padding than any row needs, in ready-made batches
    batches = []
    for chunk in (rows[:2], rows[2:]):
        batch = {
            "input_ids": torch.full((2, width), 3),
            "attention_mask": torch.zeros(2, width, dtype=torch.long),
            "labels": torch.full((2, width), -100),
        }
        for i, row in enumerate(chunk):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(row["labels"])
        batches.append(batch)
    got = compute_gradients(model, batches, ids=[r["id"] for r in rows], dtype=torch.float64, progress=False)
    ref, _ = reference(model, rows, lora_linear_names(model))
    for name, tensor in ref.items():
        assert rel_err(got.load_block(name, torch.float64), tensor) < 1e-8


def test_bert_classifier_with_head_block():
    model = tiny_bert()
    gen = torch.Generator().manual_seed(2)
    rows = []
    for i, length in enumerate([6, 3, 9, 4]):
        rows.append(
            {
                "id": f"c{i}",
                "input_ids": torch.randint(0, VOCAB, (length,), generator=gen).tolist(),
                "attention_mask": [1] * length,
                "labels": i % 3,
            }
        )
    head = "base_model.model.classifier.modules_to_save.default"
    layers = lora_linear_names(model) + [head]
    got = compute_gradients(model, rows, layers=layers, batch_size=4, dtype=torch.float64, progress=False)
    ref, ref_loss = reference(model, rows, layers)
    assert got.block_dim(head) == 3 * 16 + 3  # weight and bias
    for name in layers:
        assert rel_err(got.load_block(name, torch.float64), ref[name]) < 1e-8
    assert torch.allclose(torch.from_numpy(got.losses), ref_loss, rtol=1e-10, atol=0)
    inventory = {row.name: row for row in block_inventory(got)}
    assert inventory[head].shape == (4, 51) and inventory[head].params == ((3, 16), (3,))
    assert "total (9 blocks)" in format_inventory(list(inventory.values()))


def test_block_by_module_and_layer_concatenate_matrices():
    model = tiny_llama()
    rows = lm_rows([5, 7, 4])
    by_matrix = compute_gradients(model, rows, dtype=torch.float64, progress=False)
    by_module = compute_gradients(model, rows, block_by="module", dtype=torch.float64, progress=False)
    by_layer = compute_gradients(model, rows, block_by="layer", dtype=torch.float64, progress=False)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert by_module.block_names[0] == q0 and len(by_module.block_names) == 4
    assert by_layer.block_names == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    expect = torch.cat(
        [by_matrix.load_block(f"{q0}.lora_A.default"), by_matrix.load_block(f"{q0}.lora_B.default")], 1
    )
    assert torch.equal(by_module.load_block(q0), expect)
    layer0 = [n for n in by_matrix.block_names if ".layers.0." in n]
    assert torch.equal(
        by_layer.load_block(by_layer.block_names[0]), torch.cat([by_matrix.load_block(n) for n in layer0], 1)
    )
    assert block_key("classifier", "layer") == "classifier"
    with pytest.raises(InfscopeError, match="block_by"):
        compute_gradients(model, rows, block_by="head", progress=False)


def test_plain_logistic_regression_matches_closed_form():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 5, generator=gen, dtype=torch.float64)
    y = (torch.rand(13, generator=gen) > 0.5).double()
    model = nn.Sequential(nn.Linear(5, 1)).double()
    got = compute_gradients(
        model, {"inputs": x, "labels": y}, layers=["0"], batch_size=4, dtype=torch.float64, progress=False
    )
    w, b = model[0].weight.detach()[0], model[0].bias.detach()
    p = torch.sigmoid(x @ w + b)
    expect = (p - y)[:, None] * torch.cat([x, torch.ones(13, 1, dtype=torch.float64)], 1)  # d BCE / d(w, b)
    assert torch.allclose(got.load_block("0", torch.float64), expect, rtol=1e-12, atol=1e-14)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    assert torch.allclose(torch.from_numpy(got.losses), bce, rtol=1e-12)


def test_multiclass_linear_frozen_weight_and_shared_layer():
    """A layer used twice sums both uses; a frozen layer still gets its per-example gradient."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(4)
    model = Twice().double()
    model.head.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    got = compute_gradients(
        model, {"inputs": x, "labels": y}, layers=["inner", "head"], dtype=torch.float64, progress=False
    )
    assert not model.head.weight.requires_grad  # the frozen flag is restored
    params = [model.inner.weight, model.inner.bias, model.head.weight, model.head.bias]
    model.head.weight.requires_grad_(True)
    model.head.bias.requires_grad_(True)
    for i in range(6):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        g = [t.flatten() for t in torch.autograd.grad(loss, params)]
        assert torch.allclose(
            got.load_block("inner", torch.float64)[i], torch.cat(g[:2]), rtol=1e-10, atol=1e-14
        )
        assert torch.allclose(
            got.load_block("head", torch.float64)[i], torch.cat(g[2:]), rtol=1e-10, atol=1e-14
        )


def test_errors_are_one_line_infscope_errors():
    plain = nn.Linear(3, 1).double()
    data = {"inputs": torch.randn(4, 3, dtype=torch.float64), "labels": torch.ones(4, dtype=torch.float64)}
    with pytest.raises(InfscopeError, match="no LoRA layers found"):
        compute_gradients(plain, data, progress=False)
    with pytest.raises(InfscopeError, match="not in the model"):
        compute_gradients(plain, data, layers=["nope"], progress=False)
    data["inputs"][2, 0] = float("inf")
    with pytest.raises(InfscopeError, match=r"rows c;") as info:
        compute_gradients(plain, data, layers=[""], ids=["a", "b", "c", "d"], progress=False)
    assert "\n" not in str(info.value)


def test_row_without_targets_has_zero_gradient_and_loss():
    model = tiny_llama()
    rows = lm_rows([5, 6])
    rows[1]["labels"] = [-100] * 6
    got = compute_gradients(model, rows, dtype=torch.float64, progress=False)
    assert got.losses[1] == 0.0 and got.losses[0] > 0
    for name in got.block_names:
        block = got.load_block(name, torch.float64)
        assert torch.count_nonzero(block[1]) == 0 and torch.count_nonzero(block[0]) > 0


@dataclasses.dataclass
class EncodedLike:
    """Shape of ``models.encode.Encoded``: ragged per-row lists, no attention mask field."""

    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]
    task: str
    pad_token_id: int
    truncated: list[str]


def test_encoded_dataclass_without_mask_and_frozen_adapter():
    model = tiny_llama()
    rows = lm_rows([4, 9, 6])
    for param in model.parameters():
        param.requires_grad_(False)  # an adapter loaded for scoring only
    enc = EncodedLike(
        [r["id"] for r in rows], [r["input_ids"] for r in rows], [r["labels"] for r in rows], "causal", 0, []
    )
    got = compute_gradients(model, enc, batch_size=3, dtype=torch.float64, progress=False)
    assert got.ids == ["r0", "r1", "r2"] and len(got.block_names) == 8
    assert not any(p.requires_grad for p in model.parameters())
    ref, _ = reference(model, rows, lora_linear_names(model))
    for name, tensor in ref.items():
        assert rel_err(got.load_block(name, torch.float64), tensor) < 1e-8
