"""Run directories, atomic writes, argument guards and the CLI error contract."""

from __future__ import annotations

import json
import os

import pytest

from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.runs import (
    ModelSpec,
    RunDir,
    RunLayout,
    RunRecord,
    atomic_path,
    atomic_write_json,
    ensure_writable_dir,
    file_fingerprint,
)


def test_atomic_path_keeps_old_file_when_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_write_json_is_stable_bytes(tmp_path):
    a = atomic_write_json(tmp_path / "a.json", {"b": 1, "a": "é"})
    b = atomic_write_json(tmp_path / "b.json", {"a": "é", "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text()) == {"a": "é", "b": 1}


def test_error_message_is_one_line():
    assert str(InfscopeError("bad\n  input\tgiven")) == "bad input given"


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(InfscopeError, match="not writable"):
        ensure_writable_dir(blocker / "sub")


def _record(**args):
    return RunRecord(kind="finetune", model=ModelSpec(name="m"), args=args)


def _make(path, args, **kwargs):
    return RunDir.create(path, _record(**args), **kwargs)


def test_rundir_refuses_other_arguments_and_resumes(tmp_path):
    run = _make(tmp_path / "run", {"seed": 1, "model": "m"})
    with run.stage("first") as rec:
        rec.info["rows"] = 3
    again = _make(tmp_path / "run", {"model": "m", "seed": 1})
    assert again.done("first") and again.stage_info("first") == {"rows": 3}
    assert again.stages()["first"]["seconds"] >= 0
    with pytest.raises(InfscopeError, match="seed was 1, now 2"):
        _make(tmp_path / "run", {"seed": 2, "model": "m"})
    fresh = _make(tmp_path / "run", {"seed": 2, "model": "m"}, overwrite=True)
    assert not fresh.done("first")


def test_nested_argument_change_names_the_inner_field(tmp_path):
    _make(tmp_path / "run", {"config": {"lr": 0.1, "epochs": 2}})
    with pytest.raises(InfscopeError, match=r"config\.lr was 0\.1, now 0\.2"):
        _make(tmp_path / "run", {"config": {"lr": 0.2, "epochs": 2}})


def test_record_round_trips_and_stages_keep_their_order(tmp_path):
    run = _make(tmp_path / "run", {"seed": 1})
    for name in ("zeta", "alpha", "mid"):
        with run.stage(name):
            pass
    reopened = RunDir.open(tmp_path / "run")
    assert list(reopened.stages()) == ["zeta", "alpha", "mid"]
    assert reopened.record.model == ModelSpec(name="m") and reopened.record.kind == "finetune"


def test_old_finetune_record_is_upgraded(tmp_path):
    """A run.json written before the record schema opens with its model spec and data source."""
    old = {
        "args": {
            "command": "finetune",
            "data": "/data/train.jsonl",
            "data_fingerprint": "abc",
            "val": None,
            "val_fraction": 0.2,
            "model": "tiny-llama",
            "config": {"max_length": 64, "batch_size": 4, "seed": 3, "device": None},
        },
        "stages": {"finetune": {"seconds": 1.0, "peak_rss_mb": 1.0, "info": {}}},
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps(old))
    record = RunDir.open(tmp_path / "run").record
    assert record.kind == "finetune" and record.model.name == "tiny-llama"
    assert (record.model.max_length, record.model.batch_size, record.model.seed) == (64, 4, 3)
    assert record.model.device == "cpu"
    assert (record.data.train, record.data.fingerprint, record.data.val_fraction) == (
        "/data/train.jsonl",
        "abc",
        0.2,
    )


def test_not_a_run_directory_is_one_line(tmp_path):
    with pytest.raises(InfscopeError, match="not a run directory"):
        RunDir.open(tmp_path)


def test_layout_names_every_artifact(tmp_path):
    layout = RunLayout(tmp_path)
    assert (
        layout.grads("/x/finetune/checkpoints/epoch-2", "train") == tmp_path / "scoring/epoch-2/grads/train"
    )
    assert layout.grads("epoch-2", "val", "layer") == tmp_path / "scoring/epoch-2-layer/grads/val"
    assert layout.losses("epoch-1") == tmp_path / "scoring/epoch-1/losses.parquet"
    assert layout.results("datainf@epoch-1", "csv") == tmp_path / "results/datainf@epoch-1.csv"
    assert layout.scores("loss") == tmp_path / "scores/loss.npz"


def test_failed_stage_is_not_recorded(tmp_path):
    run = _make(tmp_path / "run", {})
    with pytest.raises(ValueError), run.stage("boom"):
        raise ValueError
    assert not RunDir.open(tmp_path / "run").done("boom")


def test_file_fingerprint_changes_with_content(tmp_path):
    path = tmp_path / "f"
    path.write_text("a")
    first = file_fingerprint(path)
    path.write_text("b")
    assert file_fingerprint(path) != first and len(first) == 16


def test_cli_version_and_unknown_command(capsys):
    assert main(["version"]) == 0
    assert "torch" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2


def test_atomic_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "shared.json", {})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_runs_recorded_before_a_new_option_existed_still_resume(tmp_path):
    """A new option defaulting to None (e.g. lora_layers) must not make older run directories foreign."""
    _make(tmp_path / "run", {"lr": 0.01})
    _make(tmp_path / "run", {"lr": 0.01, "lora_layers": None})  # same run
    with pytest.raises(InfscopeError, match="lora_layers was None, now 'top:1'"):
        _make(tmp_path / "run", {"lr": 0.01, "lora_layers": "top:1"})
