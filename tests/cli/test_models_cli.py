"""``infscope finetune`` end to end on tiny models, and its one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from infscope.cli import main
from infscope.data.splits import split_validation


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"id": f"r{i}", "instruction": f"Add one to {i}.", "input": "", "output": f"The answer is {i + 1}."}
        for i in range(12)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_command_writes_checkpoints_and_table(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", str(data_file), "--model", "tiny-llama", "--out", str(out), "--epochs", "2"]
    argv += ["--batch-size", "4", "--rank", "2", "--val-fraction", "0.25", "--lr", "5e-3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "on 9 rows (3 validation)" in printed and "best checkpoint" in printed
    summary = json.loads((out / "finetune" / "checkpoints.json").read_text())
    assert [c["epoch"] for c in summary["checkpoints"]] == [1, 2]
    assert summary["best"]["val_loss"] == min(c["val_loss"] for c in summary["checkpoints"])
    adapter = json.loads((out / "finetune" / "checkpoints" / "epoch-2" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["finetune"]["info"]["epochs"] == 2
    # the same command again resumes (nothing left to train) and reports the same checkpoints
    assert main(argv) == 0
    assert "resumed after epoch 2" in capsys.readouterr().out
    # other arguments into the same run directory are refused
    assert main([*argv[:-2], "--lr", "1e-3"]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_lora_layers_option_tunes_only_the_named_layers(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", str(data_file), "--model", "tiny-llama", "--out", str(out), "--epochs", "1"]
    assert main([*argv, "--lora-layers", "top:1"]) == 0
    adapter = json.loads((out / "finetune" / "checkpoints" / "epoch-1" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]  # tiny-llama has 2 decoder layers


def test_finetune_classification_builtin(tmp_path, capsys):
    data = tmp_path / "cls.jsonl"
    rows = [{"id": str(i), "text": "good day" if i % 2 else "bad day", "label": i % 2} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["finetune", str(data), "--model", "tiny-bert", "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "finetune" / "checkpoints" / "epoch-1" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "no-such-model"], "unknown"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--epochs", "0"], "epochs"),
        (["--dtype", "float8"], "dtype"),
        (["--model", "tiny-llama", "--target-modules", "nope"], "target"),
        (["--model", "tiny-llama", "--lora-layers", "top:x"], "--lora-layers"),
        (["--model", "tiny-llama", "--lora-layers", "5"], "--lora-layers"),
    ],
)
def test_bad_input_exits_2_with_one_line(data_file, tmp_path, capsys, extra, message):
    code = main(["finetune", str(data_file), "--out", str(tmp_path / "run"), "--epochs", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_split_validation_is_seeded_and_disjoint():
    rows = [{"id": str(i)} for i in range(20)]
    train, val = split_validation(rows, 0.2, seed=1)
    again = split_validation(rows, 0.2, seed=1)
    assert len(val) == 4 and (train, val) == again
    assert {r["id"] for r in train} | {r["id"] for r in val} == {str(i) for i in range(20)}
    assert split_validation(rows, 0.2, seed=2)[1] != val
    assert split_validation(rows, 0.0, seed=1) == (rows, [])
