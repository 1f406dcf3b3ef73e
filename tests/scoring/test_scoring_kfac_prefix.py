"""K-FAC in scoring reads the frozen-prefix cache the gradient pass filled at the same checkpoint.

tiny-llama (2 decoder layers) fine-tuned with LoRA on the top layer only (``lora_layers="top:1"``).
One copy is scored with ``datainf`` (the gradient pass) and then ``ekfac`` in the same process: the
ekfac call must not run decoder layer 0 at all, and its scores must equal (1e-6 of the largest) those
of a second copy whose K-FAC factors come from the whole model (no cache: the reference), for
which layer 0 runs again on every training row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers.models.llama import modeling_llama

from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.runs import RunLayout
from infscope.scoring import gradients, inputs, open_run, score_run
from infscope.scoring.gradients import checkpoint_prefix, clear_prefix_cache

TOL = 1e-6


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny-llama run with LoRA on its top decoder layer only, and no gradient stores yet."""
    run = tmp_path_factory.mktemp("kfac_prefix") / "run"
    config = PipelineConfig(
        model="tiny-llama", classes=3, train_per_class=4, epochs=1, lora_layers="top:1", methods=("loss",)
    )
    run_pipeline(config, run)
    shutil.rmtree(run / "scoring")
    return run


@pytest.fixture
def bottom_rows(monkeypatch):
    """Rows run through decoder layer 0 (one entry per call: the batch size)."""
    rows: list[int] = []
    forward = modeling_llama.LlamaDecoderLayer.forward

    def counted(self, hidden_states, *args, **kwargs):
        if self.self_attn.layer_idx == 0:
            rows.append(int(hidden_states.shape[0]))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counted)
    clear_prefix_cache()
    yield rows
    clear_prefix_cache()


def _copy(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where))


def test_ekfac_after_gradients_reuses_the_frozen_prefix(tuned, tmp_path, bottom_rows, monkeypatch):
    n_train = len(RunLayout(tuned).train.read_text().splitlines())
    shared, reference = _copy(tuned, tmp_path / "shared"), _copy(tuned, tmp_path / "reference")

    score_run(shared, ["datainf"])
    assert sum(bottom_rows) >= n_train  # the gradient pass ran the bottom layer for every row
    bottom_rows.clear()
    got = score_run(shared, ["ekfac"])["ekfac"]
    assert bottom_rows == []  # K-FAC (and its gradient reads) ran from the warm cache only

    score_run(reference, ["datainf"])
    clear_prefix_cache()
    whole = inputs.collect_kfac_factors

    def whole_model(*args, **kwargs):
        return whole(*args, **{**kwargs, "prefix": False})

    monkeypatch.setattr(inputs, "collect_kfac_factors", whole_model)
    bottom_rows.clear()
    want = score_run(reference, ["ekfac"])["ekfac"]
    assert sum(bottom_rows) >= n_train  # without sharing the bottom layer runs a second time

    assert got.train_ids == want.train_ids and got.values.shape == want.values.shape
    scale = float(np.abs(want.values).max())
    assert scale > 0
    assert float(np.abs(got.values - want.values).max()) <= TOL * scale


def test_one_cache_per_checkpoint(tuned, tmp_path, bottom_rows):
    run = open_run(tuned)
    ckpt = run.best.path
    cache = checkpoint_prefix(run.spec, ckpt)
    assert cache is not None and cache.depth == 1
    assert checkpoint_prefix(run.spec, ckpt) is cache
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"layers_to_transform": [1]}))
    assert checkpoint_prefix(run.spec, other) is not cache  # another checkpoint: its own cache
    assert checkpoint_prefix(run.spec, ckpt) is not cache  # and only the latest is kept
    (other / "adapter_config.json").write_text(json.dumps({"layers_to_transform": None}))
    assert checkpoint_prefix(run.spec, other) is None  # LoRA on every layer: nothing to cache
    assert len(gradients._PREFIX) == 1
