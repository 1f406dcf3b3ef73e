"""Training dynamics: hand-computed scores on a toy table, recorded values against a per-row reference
run with the weights live at each step, and recording leaves the trained weights unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from infscope.errors import InfscopeError
from infscope.estimators.dynamics import (
    aum,
    cartography,
    confidence_variability,
    el2n,
    forgetting,
    load_dynamics,
    variability,
)
from infscope.models.encode import IGNORE_INDEX, encode_rows
from infscope.models.finetune import DYNAMICS_COLUMNS, FinetuneConfig, finetune
from infscope.models.lora import LoraSpec, load_adapter
from infscope.models.loss import per_example_loss
from infscope.models.registry import load_model

# --- toy table: 4 rows x 3 epochs, values chosen so every score is easy to work out by hand ---------
P_GOLD = {"a": [0.9, 0.8, 0.7], "b": [0.2, 0.6, 0.4], "c": [0.5, 0.5, 0.5], "d": [0.6, 0.3, 0.6]}
MARGIN = {"a": [1.0, 2.0, 3.0], "b": [-1.0, 0.5, -2.5], "c": [-0.5, -1.5, -4.0], "d": [0.5, -0.2, 0.3]}
EL2N = {"a": [0.2, 0.4, 0.9], "b": [1.0, 0.6, 0.1], "c": [0.5, 0.7, 0.0], "d": [0.1, 0.2, 0.3]}
IDS = ["c", "a", "d", "b"]  # another order than the table's, to check alignment


def toy_table() -> pd.DataFrame:
    records = [
        {
            "id": rid,
            "epoch": e + 1,
            "step": e,
            "loss": -np.log(P_GOLD[rid][e]),
            "margin": MARGIN[rid][e],
            "correct": MARGIN[rid][e] > 0,
            "el2n": EL2N[rid][e],
        }
        for rid in "abcd"
        for e in range(3)
    ]
    table = pd.DataFrame(records)
    return table.sample(frac=1.0, random_state=3).reset_index(drop=True)  # records out of order


def test_cartography_by_hand():
    # confidence = mean p(gold): a (.9+.8+.7)/3 = .8, b (.2+.6+.4)/3 = .4, c .5, d (.6+.3+.6)/3 = .5
    np.testing.assert_allclose(cartography(toy_table(), IDS), [-0.5, -0.8, -0.5, -0.4], rtol=1e-12)
    # population std: a sqrt(.02/3), b sqrt(.08/3), c 0, d sqrt((.01+.04+.01)/3) = sqrt(.02)
    expected = [0.0, 0.08164965809277261, 0.1414213562373095, 0.16329931618554522]
    np.testing.assert_allclose(variability(toy_table(), IDS), expected, rtol=1e-9, atol=1e-15)
    conf, var = confidence_variability(toy_table(), IDS)
    np.testing.assert_allclose(conf, [0.5, 0.8, 0.5, 0.4], rtol=1e-12)
    np.testing.assert_allclose(var, expected, rtol=1e-9, atol=1e-15)


def test_aum_by_hand():
    # mean margin: a 2, b -1, c -2, d 0.2; score = -mean
    np.testing.assert_allclose(aum(toy_table(), IDS), [2.0, -2.0, -0.2, 1.0], rtol=1e-12)


def test_forgetting_by_hand():
    # a TTT: 0; b FTF: one T->F; c FFF never learned: 3 presentations; d TFT: one T->F
    np.testing.assert_array_equal(forgetting(toy_table(), IDS), [3.0, 0.0, 1.0, 1.0])


def test_el2n_by_hand():
    # default: first ceil(3/2) = 2 epochs: a .3, b .8, c .6, d .15
    np.testing.assert_allclose(el2n(toy_table(), IDS), [0.6, 0.3, 0.15, 0.8], rtol=1e-12)
    np.testing.assert_allclose(el2n(toy_table(), IDS, epochs=1), [0.5, 0.2, 0.1, 1.0], rtol=1e-12)
    np.testing.assert_allclose(el2n(toy_table(), IDS, epochs=3), [0.4, 0.5, 0.2, 1.7 / 3], rtol=1e-12)


def test_missing_columns_and_rows_are_one_line_errors():
    causal = toy_table().assign(margin=np.nan, correct=pd.array([pd.NA] * 12, dtype="boolean"))
    with pytest.raises(InfscopeError, match=r"^aum needs classification margins") as err:
        aum(causal, IDS)
    assert "\n" not in str(err.value)
    with pytest.raises(InfscopeError, match="forgetting needs classification correctness"):
        forgetting(causal, IDS)
    with pytest.raises(InfscopeError, match="no 'el2n' column"):
        el2n(toy_table().drop(columns="el2n"), IDS)
    with pytest.raises(InfscopeError, match="no 'loss' for rows zz"):
        cartography(toy_table(), ["a", "zz"])
    with pytest.raises(InfscopeError, match="epochs must be at least 1"):
        el2n(toy_table(), IDS, epochs=0)


# --- recorded values against a per-row reference ---------------------------------------------------
ROWS = [
    {"id": f"r{i}", "instruction": f"Name the color of item {i}.", "input": "", "output": color}
    for i, color in enumerate(["red", "blue", "green", "red", "blue", "green"])
]
CLS_ROWS = [
    {"id": str(i), "text": ("good great fine " if i % 3 else "bad awful poor ") * 2, "label": int(i % 2 == 1)}
    for i in range(10)
]


def no_dropout(loaded):
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return loaded


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn_causal")
    config = FinetuneConfig(epochs=3, lr=5e-3, batch_size=len(ROWS), warmup_ratio=0.0, lora=LoraSpec(r=4))
    result = finetune(load_model("tiny-llama"), ROWS, None, config, out, progress=False)
    return out, result


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn_cls")
    config = FinetuneConfig(
        epochs=3, lr=3e-2, batch_size=len(CLS_ROWS), warmup_ratio=0.0, schedule="constant"
    )
    loaded = no_dropout(load_model("tiny-bert", task="classification", num_labels=2))
    result = finetune(loaded, CLS_ROWS, None, config, out, progress=False)
    return out, result


def causal_reference(model, enc) -> tuple[np.ndarray, np.ndarray]:
    """Per row alone: loss via per_example_loss, EL2N by a plain loop over target tokens in float64."""
    losses = per_example_loss(model, enc, batch_size=1)
    norms = []
    for ids, labels in zip(enc.input_ids, enc.labels, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        row = []
        for t in range(len(ids) - 1):
            if labels[t + 1] == IGNORE_INDEX:
                continue
            error = logits[t].softmax(-1)
            error[labels[t + 1]] -= 1.0
            row.append(float(error.norm()))
        norms.append(np.mean(row))
    return losses, np.array(norms)


def model_at(checkpoints, epoch: int, base):
    """The weights live during epoch ``epoch``: the previous checkpoint, or the base model (LoRA B = 0)."""
    return base().model if epoch == 1 else load_adapter(base(), checkpoints[epoch - 2].path)


def test_recorded_causal_values_match_per_row_reference(causal_run):
    out, result = causal_run
    table = load_dynamics(out)
    assert tuple(table.columns) == DYNAMICS_COLUMNS and len(table) == 3 * len(ROWS)
    enc = encode_rows(ROWS, load_model("tiny-llama").tokenizer, task="causal")
    assert table["margin"].isna().all() and table["correct"].isna().all()
    for epoch in (1, 2, 3):
        rows = table[table["epoch"] == epoch].set_index("id").loc[enc.ids]
        assert (rows["step"] == epoch - 1).all()  # one step per epoch: step = updates taken before
        losses, norms = causal_reference(
            model_at(result.checkpoints, epoch, lambda: load_model("tiny-llama")), enc
        )
        np.testing.assert_allclose(rows["loss"].to_numpy(), losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rows["el2n"].to_numpy(), norms, rtol=1e-5, atol=1e-6)
    # cartography on the real table: -mean over epochs of exp(-loss)
    ids = enc.ids[::-1]
    expected = [-np.exp(-table.loc[table["id"] == i, "loss"]).mean() for i in ids]
    np.testing.assert_allclose(cartography(table, ids), expected, rtol=1e-12)
    with pytest.raises(InfscopeError, match="aum needs classification margins"):
        aum(table, ids)


def test_recorded_classification_values_match_per_row_reference(cls_run):
    out, result = cls_run
    table = load_dynamics(out)
    base = lambda: no_dropout(load_model("tiny-bert", task="classification", num_labels=2))  # noqa: E731
    enc = encode_rows(CLS_ROWS, base().tokenizer, task="classification")
    margins, correct = [], []
    for epoch in (1, 2, 3):
        model = model_at(result.checkpoints, epoch, base)
        model.eval()
        expected = {"loss": [], "margin": [], "correct": [], "el2n": []}
        for ids, label in zip(enc.input_ids, enc.labels, strict=True):
            with torch.no_grad():
                z = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
            z = z.double()
            others = [float(z[k]) for k in range(len(z)) if k != label]
            error = z.softmax(-1)
            error[label] -= 1.0
            expected["loss"].append(float(-z.log_softmax(-1)[label]))
            expected["margin"].append(float(z[label]) - max(others))
            expected["correct"].append(int(z.argmax()) == label)
            expected["el2n"].append(float(error.norm()))
        rows = table[table["epoch"] == epoch].set_index("id").loc[enc.ids]
        for name in ("loss", "margin", "el2n"):
            np.testing.assert_allclose(rows[name].to_numpy(), expected[name], rtol=1e-5, atol=1e-5)
        assert rows["correct"].tolist() == expected["correct"]
        margins.append(expected["margin"])
        correct.append(expected["correct"])
    assert table["correct"].any() and not table["correct"].all()  # the toy run has both outcomes
    np.testing.assert_allclose(aum(table, enc.ids), -np.mean(margins, axis=0), rtol=1e-5, atol=1e-5)
    # forgetting by a plain loop over each row's epochs
    by_row = list(zip(*correct, strict=True))
    events = [
        sum(a and not b for a, b in zip(seq[:-1], seq[1:], strict=True)) if any(seq) else len(seq)
        for seq in by_row
    ]
    np.testing.assert_array_equal(forgetting(table, enc.ids), events)


def adapter_weights(result) -> list[dict[str, torch.Tensor]]:
    return [load_file(f"{c.path}/adapter_model.safetensors") for c in result.checkpoints]


@pytest.mark.parametrize("task", ["causal", "classification"])
def test_recording_does_not_change_training(task, tmp_path):
    """Same seed with recording on and off: identical losses and adapter weights at every epoch."""
    if task == "causal":
        load = lambda: load_model("tiny-llama")  # noqa: E731
        rows, config = ROWS, FinetuneConfig(epochs=2, lr=5e-3, batch_size=4, lora=LoraSpec(r=4, dropout=0.1))
    else:  # tiny-bert keeps its own dropout on, so random draws must match too
        load = lambda: load_model("tiny-bert", task="classification", num_labels=2)  # noqa: E731
        rows, config = CLS_ROWS, FinetuneConfig(epochs=2, lr=2e-2, batch_size=4, schedule="constant")
    on = finetune(load(), rows, None, config, tmp_path / "on", progress=False)
    off_config = FinetuneConfig(**{**config.to_dict(), "record_dynamics": False})
    off = finetune(load(), rows, None, off_config, tmp_path / "off", progress=False)
    assert [c.train_loss for c in on.checkpoints] == [c.train_loss for c in off.checkpoints]
    for a, b in zip(adapter_weights(on), adapter_weights(off), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "on" / "dynamics.parquet").is_file()
    assert not (tmp_path / "off" / "dynamics.parquet").exists()
    with pytest.raises(InfscopeError, match="no training dynamics"):
        load_dynamics(tmp_path / "off")
