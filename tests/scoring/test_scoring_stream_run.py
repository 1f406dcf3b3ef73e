"""``infscope score --stream`` behaves like the stored path for the user (tiny-llama, offline).

One fine-tuned run with canaries is copied twice and scored once with gradient stores and once
streamed (no store). The reference is the stored path: the saved tables must hold the same ids and
values, the canaries must be absent from tables and printed output, every method's canary AUROC must
be kept, and the run must record the ``score`` and ``gradients:<tag>`` stages so ``evaluate`` and
``report`` read it. The pairing measurement streams too and saves ``METHOD+pairing``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import sentence_transform_data
from infscope.cli import main
from infscope.estimators.scores import Scores
from infscope.runs import RunDir, RunLayout

METHODS = ("datainf", "hessian_free", "grad_cos", "datainf_cos")
COMMON = ["--threads", "1"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny-llama run fine-tuned with 20 % canaries on a built-in instruction set."""
    root = tmp_path_factory.mktemp("stream")
    data = sentence_transform_data(root / "st.jsonl")
    run = root / "run"
    argv = ["finetune", str(data), "--out", str(run), "--model", "tiny-llama", "--max-length", "64"]
    assert main([*argv, "--epochs", "2", "--lr", "0.01", "--canaries", "0.2", *COMMON]) == 0
    return run


def _copy(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where))


def _table(run: Path, method: str) -> pd.Series:
    frame = pd.read_parquet(RunLayout(run).results(method))
    return pd.Series(frame["score"].to_numpy(np.float64), index=frame["id"].astype(str))


def _user_ids(run: Path) -> set[str]:
    return {str(json.loads(line)["id"]) for line in RunLayout(run).train.read_text().splitlines()}


def _canary_ids(run: Path) -> set[str]:
    return {str(json.loads(line)["id"]) for line in RunLayout(run).canary_rows.read_text().splitlines()}


def _assert_same_tables(stored: Path, streamed: Path, names) -> None:
    for method in names:
        old, new = _table(stored, method), _table(streamed, method)
        assert set(new.index) == set(old.index) == _user_ids(stored)
        np.testing.assert_allclose(
            new.loc[old.index].to_numpy(), old.to_numpy(), rtol=1e-5, atol=1e-7 * np.abs(old).max()
        )


def test_streamed_run_saves_and_records_what_the_stored_path_does(tuned, tmp_path, capsys):
    stored, streamed = _copy(tuned, tmp_path / "stored"), _copy(tuned, tmp_path / "streamed")
    method = ",".join(METHODS)
    assert main(["score", str(stored), "--method", method, *COMMON]) == 0
    capsys.readouterr()
    assert main(["score", str(streamed), "--method", method, "--stream", *COMMON]) == 0
    printed = capsys.readouterr().out
    assert not any((streamed / "scoring").rglob("index.json")), "streaming keeps no gradient store"
    _assert_same_tables(stored, streamed, METHODS)

    canaries = _canary_ids(tuned)
    assert canaries and not any(c in printed for c in canaries)
    for method in METHODS:
        old = Scores.load(RunLayout(stored).scores(method))
        new = Scores.load(RunLayout(streamed).scores(method))
        assert not canaries & set(new.train_ids)
        assert new.meta["streamed"] is True
        assert new.meta["canary_auroc"] == pytest.approx(old.meta["canary_auroc"], abs=1e-9)

    record, reference = RunDir.open(streamed).record, RunDir.open(stored).record
    info, ref_info = record.stages["score"]["info"], reference.stages["score"]["info"]
    for key in ("checkpoint", "checkpoint_tag", "checkpoint_rule", "query", "block_by", "measurement"):
        assert info[key] == ref_info[key]
    assert set(info["methods"]) == set(METHODS) and info["streamed"] is True
    gradient_stages = [name for name in record.stages if name.startswith("gradients:")]
    assert gradient_stages == [name for name in reference.stages if name.startswith("gradients:")]
    assert record.stages[gradient_stages[0]]["info"]["streamed"] is True
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(sorted(_user_ids(streamed))[:3]) + "\n")
    assert main(["evaluate", str(streamed), "--manifest", str(bad)]) == 0
    assert json.loads(RunLayout(streamed).evaluation.read_text())["n_train"] == len(_user_ids(streamed))


def test_streamed_pairing_equals_the_stored_pairing_scores(tuned, tmp_path):
    stored, streamed = _copy(tuned, tmp_path / "stored"), _copy(tuned, tmp_path / "streamed")
    argv = ["--method", "datainf,hessian_free", "--measurement", "pairing", *COMMON]
    assert main(["score", str(stored), *argv]) == 0
    assert main(["score", str(streamed), *argv, "--stream"]) == 0
    names = ("datainf+pairing", "hessian_free+pairing")
    _assert_same_tables(stored, streamed, names)
    assert not RunLayout(streamed).results("datainf").exists()  # the loss query was not saved under it
    for name in names:
        assert Scores.load(RunLayout(streamed).scores(name)).meta["measurement"] == "pairing"
    assert RunDir.open(streamed).record.stages["score"]["info"]["measurement"] == "pairing"


def test_streamed_bad_measurement_is_one_line_exit_2(tuned, tmp_path, capsys):
    run = _copy(tuned, tmp_path / "run")
    assert main(["score", str(run), "--method", "datainf", "--stream", "--measurement", "nope", *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert "measurement" in err and len(err.splitlines()) == 1
    assert "score" not in RunDir.open(run).record.stages
