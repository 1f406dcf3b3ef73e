"""Progress bars of the gradient pass: drawn on stderr only when asked (label + INFSCOPE_PROGRESS=1),
never on stdout, and the gradients are bit-for-bit those of a silent run."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from infscope.grads import collect_to_store, compute_gradients

VOCAB, ROWS = 32, 9


def _model() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def _rows() -> dict[str, list]:
    gen = torch.Generator().manual_seed(1)
    cols: dict[str, list] = {"ids": [], "input_ids": [], "attention_mask": [], "labels": []}
    for i in range(ROWS):
        toks = torch.randint(0, VOCAB, (3 + i % 4,), generator=gen).tolist()
        cols["ids"].append(f"r{i}")
        cols["input_ids"].append(toks)
        cols["attention_mask"].append([1] * len(toks))
        cols["labels"].append([-100] + toks[1:])
    return cols


def test_forced_bar_goes_to_stderr_and_changes_no_gradient(tmp_path, monkeypatch, capfd) -> None:
    model, rows = _model(), _rows()
    monkeypatch.setenv("INFSCOPE_PROGRESS", "1")
    silent = collect_to_store(model, rows, tmp_path / "silent", batch_size=2, shard_rows=4)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # forced on, but no label: callers choose
    shown = collect_to_store(
        model, rows, tmp_path / "train", batch_size=2, shard_rows=4, progress_label="gradients train"
    )
    out, err = capfd.readouterr()
    assert out == ""
    assert "gradients train" in err and f"{ROWS}/{ROWS}" in err and "rows/s" in err
    for name in silent.block_names:
        assert torch.equal(shown.load_block(name), silent.load_block(name))
    assert (shown.losses() == silent.losses()).all()

    memory = compute_gradients(model, rows, batch_size=2, progress_label="gradients val")
    out, err = capfd.readouterr()
    assert out == "" and "gradients val" in err and f"{ROWS}/{ROWS}" in err
    for name in silent.block_names:
        assert torch.equal(memory.load_block(name), silent.load_block(name))


def test_bar_stays_off_when_disabled(tmp_path, monkeypatch, capfd) -> None:
    model, rows = _model(), _rows()
    monkeypatch.setenv("INFSCOPE_PROGRESS", "0")
    collect_to_store(model, rows, tmp_path / "a", batch_size=3, progress_label="gradients train")
    monkeypatch.setenv("INFSCOPE_PROGRESS", "1")
    compute_gradients(model, rows, batch_size=3, progress=False, progress_label="gradients val")
    assert capfd.readouterr() == ("", "")
