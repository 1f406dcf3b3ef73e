"""In-run gradient capture: the trained weights are bit-identical to training without capture, and the
captured per-example gradients and losses equal a plain per-row loop at the weights each row was
trained with (one batch per epoch, so epoch 2 trains every row at the epoch-1 checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infscope.errors import InfscopeError
from infscope.grads.inrun import finetune_with_capture
from infscope.grads.store import GradientStore
from infscope.models.config import FinetuneConfig
from infscope.models.encode import collate, encode_rows
from infscope.models.finetune import finetune
from infscope.models.lora import LoraSpec, load_adapter
from infscope.models.loss import forward_logits_losses
from infscope.models.registry import load_model
from infscope.runs import RunLayout

ROWS = [
    {"id": f"r{i}", "instruction": f"Name the color of item {i}.", "input": "", "output": color}
    for i, color in enumerate(["red", "blue", "green", "red", "blue", "green", "red", "blue"])
]
VAL = [
    {"id": "v0", "instruction": "Name the color of item 9.", "input": "", "output": "green"},
    {"id": "v1", "instruction": "Name the color of item 10.", "input": "", "output": "red"},
]


def _config(**kw) -> FinetuneConfig:
    return FinetuneConfig(epochs=2, lr=5e-3, batch_size=8, lora=LoraSpec(r=4), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inrun")
    plain = finetune(
        load_model("tiny-llama"), ROWS, VAL, _config(), root / "plain" / "finetune", progress=False
    )
    captured = finetune_with_capture(
        load_model("tiny-llama"),
        ROWS,
        VAL,
        _config(capture="every"),
        root / "run" / "finetune",
        progress=False,
    )
    return root, plain, captured


def test_weights_and_optimizer_state_are_bit_identical_with_capture(runs):
    _, plain, captured = runs
    for a, b in zip(plain.checkpoints, captured.checkpoints, strict=True):
        wa = load_file(f"{a.path}/adapter_model.safetensors")
        wb = load_file(f"{b.path}/adapter_model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
        oa = torch.load(f"{a.path}/optimizer.pt", weights_only=True)["state"]
        ob = torch.load(f"{b.path}/optimizer.pt", weights_only=True)["state"]
        assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)


def _per_row_reference(checkpoint: str, rows: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each row's gradient of its own loss, one row at a time, at ``checkpoint`` (a plain loop)."""
    loaded = load_model("tiny-llama")
    model = load_adapter(loaded, checkpoint)
    lora = {n: m for n, m in model.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"])}
    for module in lora.values():
        module.weight.requires_grad_(True)
    enc = encode_rows(rows, loaded.tokenizer, task="instruction", max_length=256)
    grads = {name: [] for name in lora}
    losses = []
    for i in range(len(rows)):
        _, _, loss = forward_logits_losses(model, collate(enc, np.array([i])), torch.device("cpu"))
        weights = [m.weight for m in lora.values()]
        for name, g in zip(lora, torch.autograd.grad(loss.sum(), weights), strict=True):
            grads[name].append(g.flatten().double().numpy())
        losses.append(float(loss.detach()))
    return {name: np.stack(g) for name, g in grads.items()}, np.array(losses)


def test_captured_gradients_equal_a_per_row_loop_at_the_weights_trained_with(runs):
    root, _, captured = runs
    layout = RunLayout(root / "run")
    epoch1 = captured.checkpoints[0].path  # epoch 2's single step trains every row at these weights
    for split, rows in (("train", ROWS), ("val", VAL)):
        store = GradientStore.open(layout.inrun(2) / "grads" / split)
        assert store.ids == [r["id"] for r in rows] and store.meta["epoch"] == 2
        expected, losses = _per_row_reference(epoch1, rows)
        assert set(store.block_names) == set(expected)
        for name in store.block_names:
            np.testing.assert_allclose(
                store.load_block(name, torch.float64), expected[name], rtol=1e-4, atol=1e-7
            )
        np.testing.assert_allclose(store.losses(), losses, rtol=1e-5)
    assert (layout.inrun(1) / "grads" / "train" / "index.json").is_file()  # capture="every"


def test_capture_option_is_checked_and_old_configs_still_match():
    with pytest.raises(InfscopeError, match="capture"):
        FinetuneConfig(capture="first")
    assert "capture" not in FinetuneConfig().to_dict()  # runs recorded before the option still resume
    assert FinetuneConfig(capture="last").to_dict()["capture"] == "last"
    with pytest.raises(InfscopeError, match="observer"):
        finetune(load_model("tiny-llama"), ROWS, VAL, _config(capture="last"), "/nonexistent", progress=False)
