"""Run directories, atomic writes, argument guards and the CLI error contract."""

from __future__ import annotations

import json
import os

import pytest

from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.runs import RunDir, atomic_path, atomic_write_json, ensure_writable_dir, file_fingerprint


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


def test_rundir_refuses_other_arguments_and_resumes(tmp_path):
    run = RunDir(tmp_path / "run", {"seed": 1, "model": "m"})
    with run.stage("first") as rec:
        rec.info["rows"] = 3
    again = RunDir(tmp_path / "run", {"model": "m", "seed": 1})
    assert again.done("first") and again.stage_info("first") == {"rows": 3}
    assert again.stages()["first"]["seconds"] >= 0
    with pytest.raises(InfscopeError, match="seed differ"):
        RunDir(tmp_path / "run", {"seed": 2, "model": "m"})
    fresh = RunDir(tmp_path / "run", {"seed": 2, "model": "m"}, overwrite=True)
    assert not fresh.done("first")


def test_failed_stage_is_not_recorded(tmp_path):
    run = RunDir(tmp_path / "run", {})
    with pytest.raises(ValueError), run.stage("boom"):
        raise ValueError
    assert not RunDir(tmp_path / "run", {}).done("boom")


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
    RunDir(tmp_path / "run", {"lr": 0.01})
    RunDir(tmp_path / "run", {"lr": 0.01, "lora_layers": None})  # same run
    with pytest.raises(InfscopeError, match=r"\(lora_layers differ\)"):
        RunDir(tmp_path / "run", {"lr": 0.01, "lora_layers": "top:1"})
