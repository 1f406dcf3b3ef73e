"""LoRA fine-tuning: loss goes down, checkpoints reload exactly, runs are seeded, resume is exact."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.models.encode import encode_rows
from infscope.models.finetune import FinetuneConfig, finetune, lr_factor, read_checkpoints
from infscope.models.lora import LoraSpec, load_adapter
from infscope.models.loss import per_example_loss
from infscope.models.registry import load_model

ROWS = [
    {"id": f"r{i}", "instruction": f"Name the color of item {i}.", "input": "", "output": color}
    for i, color in enumerate(["red", "blue", "green", "red", "blue", "green", "red", "blue"])
]
VAL = [{"id": "v0", "instruction": "Name the color of item 9.", "input": "", "output": "green"}]
CONFIG = FinetuneConfig(epochs=3, lr=5e-3, batch_size=4, lora=LoraSpec(r=4))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    loaded = load_model("tiny-llama")
    enc = encode_rows(ROWS, loaded.tokenizer, task="causal")
    before = per_example_loss(loaded.model, enc)
    result = finetune(loaded, ROWS, VAL, CONFIG, out, progress=False)
    after = per_example_loss(loaded.model, enc)
    return {"out": out, "loaded": loaded, "enc": enc, "before": before, "after": after, "result": result}


def test_training_lowers_loss(run):
    assert run["after"].mean() < run["before"].mean() - 0.5
    train_losses = [c.train_loss for c in run["result"].checkpoints]
    assert train_losses[-1] < train_losses[0]


def test_checkpoints_written_with_state(run):
    result = run["result"]
    assert [c.epoch for c in result.checkpoints] == [1, 2, 3]
    assert [c.step for c in result.checkpoints] == [2, 4, 6]
    assert result.best.val_loss == min(c.val_loss for c in result.checkpoints)
    for c in result.checkpoints:
        files = {p.name for p in (run["out"] / "checkpoints" / f"epoch-{c.epoch}").iterdir()}
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.pt",
            "trainer_state.json",
        } <= files
        state = json.loads(
            (run["out"] / "checkpoints" / f"epoch-{c.epoch}" / "trainer_state.json").read_text()
        )
        assert state["epoch"] == c.epoch and state["val_loss"] == c.val_loss
        opt = torch.load(run["out"] / "checkpoints" / f"epoch-{c.epoch}" / "optimizer.pt", weights_only=True)
        assert opt["state"][0]["step"].item() == c.step  # AdamW state of the first LoRA matrix
    assert read_checkpoints(run["out"]).checkpoints == result.checkpoints
    # lr schedule: 6 steps, 1 warmup step, linear decay to 0 at the end
    assert result.checkpoints[-1].lr == 0.0
    assert math.isclose(result.checkpoints[0].lr, 5e-3 * (1 - 1 / 5))


def test_last_checkpoint_reloads_identical_logits(run):
    reloaded = load_adapter(load_model("tiny-llama"), run["result"].checkpoints[-1].path)
    np.testing.assert_array_equal(per_example_loss(reloaded, run["enc"]), run["after"])
    batch = torch.tensor([run["enc"].input_ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=batch).logits, run["loaded"].model(input_ids=batch).logits, rtol=0, atol=0
        )


def test_val_loss_is_mean_per_example_loss_of_checkpoint(run):
    best = run["result"].best
    model = load_adapter(load_model("tiny-llama"), best.path)
    val_enc = encode_rows(VAL, model_tokenizer(), task="causal")
    assert math.isclose(per_example_loss(model, val_enc).mean(), best.val_loss, rel_tol=1e-9)


def model_tokenizer():
    return load_model("tiny-llama").tokenizer


def test_seeded_runs_are_identical_and_resume_is_exact(run, tmp_path):
    two = finetune(load_model("tiny-llama"), ROWS, VAL, CONFIG, tmp_path / "two", progress=False)
    assert [c.train_loss for c in two.checkpoints] == [c.train_loss for c in run["result"].checkpoints]
    assert [c.val_loss for c in two.checkpoints] == [c.val_loss for c in run["result"].checkpoints]
    # interrupt after epoch 1: keep only that checkpoint, then rerun
    import shutil

    for epoch in (2, 3):
        shutil.rmtree(tmp_path / "two" / "checkpoints" / f"epoch-{epoch}")
    resumed = finetune(load_model("tiny-llama"), ROWS, VAL, CONFIG, tmp_path / "two", progress=False)
    assert resumed.resumed_from == 1
    assert [c.val_loss for c in resumed.checkpoints] == [c.val_loss for c in run["result"].checkpoints]
    assert [c.train_loss for c in resumed.checkpoints] == [c.train_loss for c in run["result"].checkpoints]
    done = finetune(load_model("tiny-llama"), ROWS, VAL, CONFIG, tmp_path / "two", progress=False)
    assert done.resumed_from == 3 and done.checkpoints == resumed.checkpoints
    # the dynamics table of the resumed run equals the uninterrupted one (epoch 1 from its checkpoint)
    whole = pd.read_parquet(run["out"] / "dynamics.parquet")
    assert sorted(whole["epoch"].unique()) == [1, 2, 3] and len(whole) == 3 * len(ROWS)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two" / "dynamics.parquet"), whole)


def test_record_dynamics_option_keeps_old_runs_resumable(run):
    """Runs recorded before ``record_dynamics`` existed match: the default is left out of the record,
    and the option is not part of the checkpoint fingerprint (it does not change the weights)."""
    assert "record_dynamics" not in CONFIG.to_dict()
    state = json.loads((run["out"] / "checkpoints" / "epoch-3" / "trainer_state.json").read_text())
    assert FinetuneConfig(**state["config"]).to_dict() == state["config"]
    off = FinetuneConfig(**{**CONFIG.to_dict(), "record_dynamics": False})
    assert off.to_dict()["record_dynamics"] is False
    done = finetune(load_model("tiny-llama"), ROWS, VAL, off, run["out"], progress=False)
    assert done.resumed_from == 3 and done.checkpoints == run["result"].checkpoints


def test_progress_bar_per_epoch(tmp_path, monkeypatch, capsys):
    cfg = FinetuneConfig(epochs=2, lr=5e-3, batch_size=4, lora=LoraSpec(r=2))
    monkeypatch.delenv("INFSCOPE_PROGRESS", raising=False)
    finetune(load_model("tiny-llama"), ROWS, None, cfg, tmp_path / "quiet", progress=True)
    assert capsys.readouterr().err == ""  # not a terminal: silent
    monkeypatch.setenv("INFSCOPE_PROGRESS", "1")
    finetune(load_model("tiny-llama"), ROWS, None, cfg, tmp_path / "shown", progress=True)
    err = capsys.readouterr().err
    assert "finetune epoch 1/2" in err and "finetune epoch 2/2" in err and "8/8" in err
    finetune(load_model("tiny-llama"), ROWS, None, cfg, tmp_path / "off", progress=False)
    assert capsys.readouterr().err == ""


def test_other_settings_refuse_existing_checkpoints(run):
    other = FinetuneConfig(epochs=3, lr=1e-3, batch_size=4, lora=LoraSpec(r=4))
    with pytest.raises(InfscopeError, match="other data or settings"):
        finetune(load_model("tiny-llama"), ROWS, VAL, other, run["out"], progress=False)


def test_classification_finetune_learns_labels(tmp_path):
    rows = [
        {"id": str(i), "text": ("good great fine " if i % 2 else "bad awful poor ") * 2, "label": i % 2}
        for i in range(16)
    ]
    loaded = load_model("tiny-bert", task="classification", num_labels=2)
    enc = encode_rows(rows, loaded.tokenizer, task="classification")
    before = per_example_loss(loaded.model, enc).mean()
    cfg = FinetuneConfig(epochs=5, lr=2e-2, batch_size=8, warmup_ratio=0.0, schedule="constant")
    result = finetune(loaded, rows, None, cfg, tmp_path, progress=False)
    assert result.best.epoch == 5 and result.best.val_loss is None
    after = per_example_loss(loaded.model, enc)
    assert after.mean() < before - 0.3 and after.max() < np.log(2)  # every row classified correctly
    with pytest.raises(InfscopeError, match="num_labels"):
        bad = [{"id": "x", "text": "hello", "label": 5}]
        finetune(
            load_model("tiny-bert", task="classification"), bad, None, cfg, tmp_path / "b", progress=False
        )


def test_lr_factor_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [round(lr_factor(s, 10, 2, "linear"), 6) for s in (2, 6, 10)] == [1.0, 0.5, 0.0]
    assert math.isclose(lr_factor(6, 10, 2, "cosine"), 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"lr": -1},
        {"schedule": "step"},
        {"warmup_ratio": 1.5},
        {"eval_every": 0},
        {"dtype": "int8"},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(InfscopeError):
        FinetuneConfig(**kwargs)


def test_eval_every_steps_logs_validation(tmp_path):
    cfg = FinetuneConfig(epochs=1, lr=5e-3, batch_size=4, eval_every=1, lora=LoraSpec(r=2))
    result = finetune(load_model("tiny-llama"), ROWS, VAL, cfg, tmp_path, progress=False)
    state = json.loads((tmp_path / "checkpoints" / "epoch-1" / "trainer_state.json").read_text())
    steps = [h for h in state["history"] if "train_loss" not in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert steps[-1]["val_loss"] == result.checkpoints[0].val_loss  # last step = end of epoch
