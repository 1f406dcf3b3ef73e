"""Model registry (built-ins, paths, errors) and LoRA attach / layer names / adapter reload."""

from __future__ import annotations

import pytest
import torch

from infscope.errors import InfscopeError
from infscope.models.lora import LoraSpec, attach_lora, head_names, load_adapter, lora_layer_names
from infscope.models.registry import load_model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tiny_llama_is_seeded_and_cached():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    assert type(a.model).__name__ == "LlamaForCausalLM" and a.task == "causal"
    assert a.model.config.num_hidden_layers == 2 and a.model.config.hidden_size == 128
    sa, sb = _state(a.model), _state(b.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = _state(load_model("tiny-llama", seed=1).model)
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"]
    )
    assert a.path is not None and (a.path / "infscope_model.json").is_file()


def test_classifier_head_is_seeded_by_load_seed():
    a = load_model("tiny-bert", task="classification", num_labels=4, seed=5)
    b = load_model("tiny-bert", task="classification", num_labels=4, seed=5)
    assert a.model.classifier.out_features == 4
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)


def test_local_path_loads_like_builtin(tmp_path):
    base = load_model("tiny-llama")
    again = load_model(str(base.path))
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(base.model(input_ids=ids).logits, again.model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("no-such-model", {}, "smollm2-135m, minilm, tiny-llama, tiny-bert"),
        ("/definitely/missing/dir", {}, "unknown model"),
        ("tiny-bert", {"task": "causal"}, "does not support task"),
        ("tiny-llama", {"task": "regression"}, "unknown task"),
        ("tiny-llama", {"dtype": "float8"}, "unknown dtype"),
        ("tiny-llama", {"device": "cuda:7"}, "not available|unknown device"),
    ],
)
def test_bad_model_requests_are_one_line_errors(name, kwargs, pattern):
    with pytest.raises(InfscopeError, match=pattern) as info:
        load_model(name, **kwargs)
    assert "\n" not in str(info.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(InfscopeError, match="config.json"):
        load_model(str(tmp_path))


def test_lora_layer_names_and_trainable_counts():
    loaded = load_model("tiny-llama")
    with pytest.raises(InfscopeError, match="no LoRA layers found"):
        lora_layer_names(loaded)
    attach_lora(loaded, LoraSpec(r=4))
    names = lora_layer_names(loaded)
    expected = [
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.default"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in ("A", "B")
    ]
    assert names == expected
    trainable = {n: p.numel() for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 2 * 2 * (4 * 128 + 128 * 4)
    assert head_names(loaded) == []


def test_classifier_keeps_head_trainable():
    loaded = load_model("tiny-bert", task="classification", num_labels=3)
    attach_lora(loaded, LoraSpec(r=2, target_modules=["query"]))
    assert all(".attention.self.query.lora_" in n for n in lora_layer_names(loaded))
    assert head_names(loaded) == ["base_model.model.classifier.modules_to_save.default"]
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable


def test_lora_init_is_seeded():
    a = attach_lora(load_model("tiny-llama"), seed=3)
    b = attach_lora(load_model("tiny-llama"), seed=3)
    c = attach_lora(load_model("tiny-llama"), seed=4)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_bad_target_modules_and_spec():
    with pytest.raises(InfscopeError, match="target-modules"):
        attach_lora(load_model("tiny-llama"), LoraSpec(target_modules=["nonexistent_proj"]))
    with pytest.raises(InfscopeError, match="rank"):
        LoraSpec(r=0)


def test_adapter_roundtrip_and_mismatch(tmp_path):
    loaded = load_model("tiny-llama")
    model = attach_lora(loaded)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ad")
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    reloaded = load_adapter(load_model("tiny-llama"), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=0
        )
        base = load_model("tiny-llama").model(input_ids=ids).logits
    assert not torch.allclose(base, reloaded(input_ids=ids).logits)
    with pytest.raises(InfscopeError, match="does not match the base model"):
        load_adapter(load_model("tiny-bert", task="classification"), tmp_path / "ad")
    with pytest.raises(InfscopeError, match="no LoRA adapter"):
        load_adapter(load_model("tiny-llama"), tmp_path)


def test_bfloat16_model_gives_close_float32_losses():
    from infscope.models.encode import encode_rows
    from infscope.models.loss import per_example_loss

    rows = [
        {"id": str(i), "instruction": "Say a number.", "input": "", "output": f"{i} and {i + 1}"}
        for i in range(4)
    ]
    full = load_model("tiny-llama")
    half = load_model("tiny-llama", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    enc = encode_rows(rows, full.tokenizer, task="causal")
    a, b = per_example_loss(full.model, enc), per_example_loss(half.model, enc)
    assert b.dtype == a.dtype and abs(b - a).max() < 0.05 * abs(a).max()


def test_hub_name_offline_fails_fast_with_hint(monkeypatch):
    import time

    from infscope.models import registry

    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(InfscopeError, match="pass a local checkpoint directory or a built-in name"):
        load_model("some-org/some-model")
    assert time.perf_counter() - start < 10
