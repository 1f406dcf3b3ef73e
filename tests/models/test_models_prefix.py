"""The frozen-prefix cache: same losses and per-example gradients as the full model (float64)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from infscope.errors import InfscopeError
from infscope.grads import compute_gradients
from infscope.models.lora import LoraSpec, parse_layers
from infscope.models.prefix import PrefixStates, first_tuned_layer, frozen_prefix

VOCAB = 40


def top_lora_llama(layers: list[int] | None, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=dropout,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        layers_to_transform=layers,
    )
    return get_peft_model(LlamaForCausalLM(cfg).double(), lora)


def batch(lengths: list[int], seed: int = 3) -> dict[str, torch.Tensor]:
    """A right-padded batch (pad id 0 also appears as a real token) with prompt positions masked."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, n in enumerate(lengths):
        row = torch.randint(0, VOCAB, (n,), generator=gen)
        row[-1] = 0  # a real trailing token equal to the pad id
        ids[j, :n], mask[j, :n] = row, 1
        labels[j, 2:n] = row[2:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_first_tuned_layer_reads_trainable_parameters():
    assert first_tuned_layer(top_lora_llama([2, 3])) == 2
    assert first_tuned_layer(top_lora_llama(None)) == 0


def test_prefix_logits_equal_full_model_and_second_pass_hits_the_cache():
    model = top_lora_llama([2, 3]).eval()
    data = batch([5, 9, 3, 7])
    with torch.no_grad():
        full = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        with frozen_prefix(model) as cache:
            assert cache is not None and cache.depth == 2
            fast = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
            again = model(
                input_ids=data["input_ids"][[2, 0]], attention_mask=data["attention_mask"][[2, 0]]
            ).logits
    real = data["attention_mask"].bool()
    assert torch.allclose(fast[real], full[real], rtol=0, atol=1e-12)
    width = int(data["attention_mask"][[2, 0]].sum(1).max())
    assert torch.allclose(
        again[:, :width][data["attention_mask"][[2, 0], :width].bool()],
        full[[2, 0], :width][data["attention_mask"][[2, 0], :width].bool()],
        atol=1e-12,
    )
    assert (cache.misses, cache.hits) == (4, 2) and len(cache) == 4 and not cache.disabled
    # the layer list is restored: saving and peft names see all four layers
    assert len(model.base_model.model.model.layers) == 4


def test_prefix_per_example_gradients_equal_full_model():
    model = top_lora_llama([2, 3])
    data = batch([6, 4, 8, 5, 7])
    rows = [
        {
            "id": f"r{j}",
            "input_ids": data["input_ids"][j, : int(data["attention_mask"][j].sum())].tolist(),
            "attention_mask": [1] * int(data["attention_mask"][j].sum()),
            "labels": data["labels"][j, : int(data["attention_mask"][j].sum())].tolist(),
        }
        for j in range(5)
    ]
    full = compute_gradients(model, rows, batch_size=3, dtype=torch.float64, progress=False)
    with frozen_prefix(model) as cache:
        fast = compute_gradients(model, rows, batch_size=3, dtype=torch.float64, progress=False)
    assert cache is not None and cache.misses == 5
    for name in full.block_names:
        a, b = fast.load_block(name, torch.float64), full.load_block(name, torch.float64)
        assert float((a - b).abs().max() / b.abs().max()) < 1e-10
    assert abs(fast.losses - full.losses).max() < 1e-12


def test_training_step_through_prefix_matches_full_model():
    data = batch([6, 4, 8])
    grads = []
    for use_cache in (False, True):
        model = top_lora_llama([1, 2, 3]).train()
        cache = PrefixStates(1) if use_cache else None
        with frozen_prefix(model, cache) if use_cache else torch.enable_grad():
            loss = model(**data).loss
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_no_cache_when_the_bottom_layer_is_tuned_or_trainable_below():
    with frozen_prefix(top_lora_llama(None)) as cache:
        assert cache is None
    model = top_lora_llama([2, 3])
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    with frozen_prefix(model) as cache:
        assert cache is None


def test_architecture_that_rescales_its_inputs_switches_the_cache_off():
    """Granite multiplies inputs_embeds by a constant inside forward: cached states would be scaled twice."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    cfg = GraniteConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        embedding_multiplier=3.0,
    )
    lora = LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, layers_to_transform=[2]
    )
    model = get_peft_model(GraniteForCausalLM(cfg).double(), lora).eval()
    data = batch([5, 6])
    with torch.no_grad():
        full = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        with frozen_prefix(model) as cache:
            with pytest.warns(RuntimeWarning, match="frozen-prefix cache disagrees"):
                first = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
            assert torch.allclose(
                first, full, atol=1e-12
            )  # the checked batch itself comes from the full model
            assert cache.disabled
            after = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert torch.allclose(after, full, atol=1e-12)  # the full model runs from then on


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [("all", 30, None), ("top:10", 30, list(range(20, 30))), ("0,20-22", 30, [0, 20, 21, 22]), ("5", 6, [5])],
)
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["top:0", "top:x", "3-1", "a", "top:31", "30"])
def test_parse_layers_rejects_bad_specs(spec):
    with pytest.raises(InfscopeError, match="lora-layers"):
        parse_layers(spec, 30)


def test_lora_spec_checks_layer_syntax_early():
    with pytest.raises(InfscopeError, match="lora-layers"):
        LoraSpec(layers="top:zero")


def test_dropout_in_training_does_not_pass_for_a_disagreement():
    torch.manual_seed(1)
    model = top_lora_llama([2, 3], dropout=0.5).train()
    data = batch([5, 6, 4])
    with frozen_prefix(model) as cache:
        model(**data).loss.backward()
        assert cache.checked and not cache.disabled


def test_gradient_stores_with_and_without_the_prefix_cache_agree(tmp_path, monkeypatch):
    """collect_gradients on a top-layer adapter (prefix cache on) equals the same passes with the cache off."""
    import numpy as np

    import infscope.scoring.gradients as gradients
    from infscope.models.finetune import FinetuneConfig, finetune
    from infscope.models.prefix import adapter_first_layer
    from infscope.models.registry import load_model
    from infscope.runs import ModelSpec, RunLayout
    from infscope.scoring.gradients import collect_gradients

    rows = [
        {"id": f"r{i}", "instruction": f"Add one to {i}.", "input": "", "output": f"The answer is {i + 1}."}
        for i in range(10)
    ]
    config = FinetuneConfig(epochs=1, batch_size=4, lr=5e-3, lora=LoraSpec(r=2, layers="top:1"))
    result = finetune(load_model("tiny-llama"), rows[:8], rows[8:], config, tmp_path / "ft", progress=False)
    checkpoint = result.checkpoints[-1].path
    assert adapter_first_layer(checkpoint) == 1
    spec = ModelSpec(name="tiny-llama", task="causal", max_length=64, batch_size=3)
    import infscope.models.prefix as prefix

    found = []
    original_get = prefix.PrefixStates.get

    def spy(self, key):
        state = original_get(self, key)
        found.append(state is not None)
        return state

    monkeypatch.setattr(prefix.PrefixStates, "get", spy)
    layouts = {run: RunLayout(tmp_path / run) for run in ("fast", "slow")}
    fast = collect_gradients(spec, layouts["fast"], checkpoint, rows[:8], rows[8:])
    # base-loss pass fills the cache with the 8 training rows; their gradient pass hits it; 2 query rows miss
    assert (len(found), sum(found)) == (18, 8)
    monkeypatch.setattr(gradients, "adapter_first_layer", lambda _: None)  # cache off: full model every pass
    slow = collect_gradients(spec, layouts["slow"], checkpoint, rows[:8], rows[8:])
    import pandas as pd

    from infscope.grads.store import GradientStore

    assert fast["train_rows"] == slow["train_rows"] == 8
    for name in ("train", "val"):
        a, b = (GradientStore.open(layouts[run].grads(checkpoint, name)) for run in ("fast", "slow"))
        assert a.block_names == b.block_names
        for block in a.block_names:
            np.testing.assert_allclose(
                a.load_block(block).numpy(), b.load_block(block).numpy(), rtol=1e-4, atol=1e-7
            )
    fast_loss, slow_loss = (pd.read_parquet(layouts[run].losses(checkpoint)) for run in ("fast", "slow"))
    for column in ("loss", "base_loss"):
        np.testing.assert_allclose(fast_loss[column], slow_loss[column], rtol=1e-5)


def test_nested_blocks_keep_the_outer_cache_and_states_do_not_pin_their_batch():
    model = top_lora_llama([2, 3]).eval()
    data = batch([5, 9, 3])
    stack = model.base_model.model.model
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    real = data["attention_mask"].bool()  # padding positions get zero states; nothing reads them
    with torch.no_grad():
        full = model(**inputs).logits
    with torch.no_grad(), frozen_prefix(model) as outer:
        outer_forward = stack.forward
        with frozen_prefix(model, PrefixStates(1)) as inner:
            assert inner is outer  # nested: the active block keeps serving
            assert torch.allclose(model(**inputs).logits[real], full[real], atol=1e-12)
        assert stack.forward == outer_forward  # the inner exit put the outer runner back
        assert torch.allclose(model(**inputs).logits[real], full[real], atol=1e-12)
        misses, hits = outer.misses, outer.hits
        model(**inputs)
        assert (outer.misses, outer.hits) == (misses, hits + 3)  # the outer cache still serves the rows
        for state in outer._states.values():  # each row owns exactly its own bytes
            assert state.untyped_storage().nbytes() == state.numel() * state.element_size()
    assert "forward" not in stack.__dict__
