"""Progress bars of the gradient pass: drawn on stderr only when asked (label + INFSCOPE_PROGRESS=1),
never on stdout, and the gradients are bit-for-bit those of a silent run."""

from __future__ import annotations

import torch

from conftest import tiny_peft_llama, token_rows
from infscope.grads import collect_to_store, compute_gradients

VOCAB, ROWS = 32, 9


def test_forced_bar_goes_to_stderr_and_changes_no_gradient(tmp_path, monkeypatch, capfd) -> None:
    model, rows = tiny_peft_llama(VOCAB, layers=1, positions=32), token_rows(ROWS, VOCAB, seed=1)
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
    model, rows = tiny_peft_llama(VOCAB, layers=1, positions=32), token_rows(ROWS, VOCAB, seed=1)
    monkeypatch.setenv("INFSCOPE_PROGRESS", "0")
    collect_to_store(model, rows, tmp_path / "a", batch_size=3, progress_label="gradients train")
    monkeypatch.setenv("INFSCOPE_PROGRESS", "1")
    compute_gradients(model, rows, batch_size=3, progress=False, progress_label="gradients val")
    assert capfd.readouterr() == ("", "")
