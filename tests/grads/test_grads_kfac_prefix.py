"""The K-FAC factor pass with the frozen-prefix cache: the same factors as the whole model, less work.

tiny-llama (2 decoder layers) with LoRA on the top layer only (``lora_layers="top:1"``): factors and
EK-FAC's eigenvalue correction collected from cached hidden states must equal those of the whole
model to 1e-6, and a warm cache must keep the bottom layer from running at all.
"""

from __future__ import annotations

import pytest

from conftest import tuned_tiny_llama
from infscope.data.builtin import make_builtin
from infscope.grads.kfac import collect_kfac_factors, prefix_depth
from infscope.models.config import LoraSpec
from infscope.models.encode import encode_rows
from infscope.models.prefix import PrefixStates, decoder_stack

TOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    loaded = tuned_tiny_llama(LoraSpec(r=4, layers="top:1"), seed=3)
    split = make_builtin("sentence_transform", seed=0, n_classes=3, per_class=4, n_test_per_class=1)
    enc = encode_rows(list(split.train), loaded.tokenizer, task="causal", max_length=128)
    assert len(set(enc.lengths.tolist())) > 1  # padded batches
    return loaded, enc


def _bottom_calls(model) -> tuple[list[int], object]:
    """A counter of forward calls of decoder layer 0, and the hook handle."""
    stack, attr = decoder_stack(model)
    calls: list[int] = []
    handle = getattr(stack, attr)[0].register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def assert_same(got, want) -> None:
    assert list(got.layers) == list(want.layers)
    assert got.n_tokens == want.n_tokens
    for name, f in want.layers.items():
        g = got.layers[name]
        for a, b in ((g.A, f.A), (g.S, f.S)) + (((g.lambdas, f.lambdas),) if f.lambdas is not None else ()):
            scale = float(b.abs().max())
            assert scale > 0
            assert float((a - b).abs().max()) <= TOL * scale, name


def test_lora_top_layer_names_give_the_depth(setup):
    loaded, _ = setup
    from infscope.grads.hooks import lora_linear_names

    names = lora_linear_names(loaded.model)
    assert names and all(".layers.1." in n for n in names)
    assert prefix_depth(names) == 1
    assert prefix_depth([*names, "lm_head"]) is None


def test_factors_equal_with_and_without_the_cache(setup):
    loaded, enc = setup
    full = collect_kfac_factors(loaded.model, enc, batch_size=5, prefix=False)
    cached = collect_kfac_factors(loaded.model, enc, batch_size=5)
    assert full.meta["prefix"] is None
    assert cached.meta["prefix"] == {"depth": 1, "rows_stored": len(enc), "hits": 0, "misses": len(enc)}
    assert_same(cached, full)


def test_true_fisher_eigen_pass_reuses_the_cache(setup):
    loaded, enc = setup
    kw = {"batch_size": 5, "fisher": "true", "seed": 4, "eigen_correction": True}
    full = collect_kfac_factors(loaded.model, enc, prefix=False, **kw)
    calls, handle = _bottom_calls(loaded.model)
    try:
        cached = collect_kfac_factors(loaded.model, enc, **kw)
    finally:
        handle.remove()
    assert_same(cached, full)
    # the second pass (per-example gradients for the lambdas) was served from the cache
    assert cached.meta["prefix"]["hits"] == len(enc)
    # layer 0 ran once per batch of the first pass, plus the one-batch check against the full model
    assert len(calls) == -(-len(enc) // 5) + 1


def test_a_shared_warm_cache_skips_the_bottom_layer(setup):
    loaded, enc = setup
    shared = PrefixStates(1)
    first = collect_kfac_factors(loaded.model, enc, batch_size=4, prefix=shared)
    calls, handle = _bottom_calls(loaded.model)
    try:
        again = collect_kfac_factors(loaded.model, enc, batch_size=4, prefix=shared)
    finally:
        handle.remove()
    assert calls == []
    assert again.meta["prefix"]["hits"] == len(enc)
    assert_same(again, first)
    assert_same(again, collect_kfac_factors(loaded.model, enc, batch_size=4, prefix=False))


def test_lora_on_every_layer_runs_the_whole_model():
    loaded = tuned_tiny_llama(LoraSpec(r=4), seed=3)
    split = make_builtin("sentence_transform", seed=0, n_classes=2, per_class=2, n_test_per_class=1)
    enc = encode_rows(list(split.train), loaded.tokenizer, task="causal", max_length=48)
    assert collect_kfac_factors(loaded.model, enc, batch_size=4).meta["prefix"] is None


def test_a_cache_that_switches_itself_off_gives_the_whole_model_factors(setup, monkeypatch):
    """If the first-batch check disagrees, that batch ran twice through the hooks: the pass starts again."""
    from infscope.models import prefix

    loaded, enc = setup
    full = collect_kfac_factors(loaded.model, enc, batch_size=5, prefix=False)

    def disagree(self, *args, **kwargs):
        self.cache.disabled = True

    monkeypatch.setattr(prefix._PrefixRunner, "_check", disagree)
    again = collect_kfac_factors(loaded.model, enc, batch_size=5)
    assert again.meta["prefix"] is None
    assert_same(again, full)
