"""``--checkpoint inrun``: scores read from the gradients fine-tuning captured, with no gradient pass.

A tiny-llama run fine-tuned with ``--capture every`` and canaries. The references are computed here
in float64 from the captured stores' arrays: DataInf with an explicit dense inverse of every row's
damped rank-one term, the hessian-free dot product, TracIn summed over the captured epochs with each
epoch's learning rate, and the stored per-row training losses. Bad requests exit 2 with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import sentence_transform_data
from infscope.cli import app, main
from infscope.errors import InfscopeError
from infscope.grads.store import GradientStore
from infscope.runs import RunDir, RunLayout
from infscope.scoring import open_run, score_run

COMMON = ["--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sentence_transform_data(tmp_path_factory.mktemp("inrun") / "st.jsonl")


def _finetune(data: Path, run: Path, *extra: str) -> Path:
    argv = ["finetune", str(data), "--out", str(run), "--model", "tiny-llama", "--max-length", "64"]
    assert (
        main([*argv, "--epochs", "2", "--lr", "0.01", "--batch-size", "4", "--rank", "2", *extra, *COMMON])
        == 0
    )
    return run


@pytest.fixture(scope="module")
def captured(data, tmp_path_factory) -> Path:
    return _finetune(
        data, tmp_path_factory.mktemp("runs") / "every", "--capture", "every", "--canaries", "0.2"
    )


def _blocks(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    store = GradientStore.open(path)
    return store.ids, {b: store.load_block(b).double().numpy() for b in store.block_names}


def _reference(run: Path, epoch: int, *, datainf: bool = True) -> dict[str, dict[str, float]]:
    """Hessian-free (and DataInf) of every row against the mean captured validation gradient, float64."""
    folder = RunLayout(run).inrun(epoch) / "grads"
    ids, train = _blocks(folder / "train")
    _, val = _blocks(folder / "val")
    n = len(ids)
    influence, dot = np.zeros(n), np.zeros(n)
    for name, G in train.items():
        v = val[name].mean(axis=0)
        dot += G @ v
        d = G.shape[1]
        lam = 0.1 * np.mean(np.sum(G * G, axis=1)) / d
        if not datainf or lam == 0:  # an all-zero block adds nothing to DataInf
            continue
        # DataInf: the mean of the inverses of each row's damped rank-one term, applied to v (dense solves)
        terms = G[:, :, None] * G[:, None, :] + lam * np.eye(d)
        u = np.linalg.solve(terms, np.broadcast_to(v, (n, d))[..., None])[..., 0].mean(axis=0)
        influence += G @ u
    out = {"hessian_free": dict(zip(ids, -dot, strict=True))}
    if datainf:
        out["datainf"] = dict(zip(ids, -influence, strict=True))
    return out


def _user_ids(run: Path) -> set[str]:
    return {str(json.loads(line)["id"]) for line in RunLayout(run).train.read_text().splitlines()}


def _assert_equal(scores, reference: dict[str, float], user: set[str]) -> None:
    assert set(scores.train_ids) == user  # canaries scored with the rows, never saved
    got = scores.vector()
    want = np.array([reference[i] for i in scores.train_ids])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_inrun_scores_equal_datainf_and_hessian_free_of_the_captured_arrays(captured, tmp_path):
    run = Path(shutil.copytree(captured, tmp_path / "run"))
    scored = score_run(run, ["datainf", "hessian_free", "loss"], checkpoint="inrun")
    reference = _reference(run, 2)  # inrun: the last captured epoch
    user = _user_ids(run)
    for method in ("datainf", "hessian_free"):
        _assert_equal(scored[method], reference[method], user)
        assert scored[method].meta["checkpoint"] == str(RunLayout(run).inrun(2))
        assert 0.0 <= scored[method].meta["canary_auroc"] <= 1.0
    store = GradientStore.open(RunLayout(run).inrun(2) / "grads" / "train")
    losses = dict(zip(store.ids, store.losses(), strict=True))
    np.testing.assert_allclose(scored["loss"].vector(), [losses[i] for i in scored["loss"].train_ids])
    info = RunDir.open(run).record.stages["score"]["info"]
    assert (info["checkpoint_rule"], info["checkpoint_tag"]) == ("inrun", "inrun-epoch-2")
    assert not any(name.startswith("gradients:") for name in RunDir.open(run).record.stages)
    assert not any(
        p.name != "inrun-epoch-1" and p.name != "inrun-epoch-2" for p in (run / "scoring").iterdir()
    )

    earlier = score_run(run, ["hessian_free"], checkpoint="inrun:1")
    _assert_equal(earlier["hessian_free"], _reference(run, 1, datainf=False)["hessian_free"], user)


def test_inrun_tracin_sums_the_captured_epochs_lr_weighted(captured, tmp_path):
    run = Path(shutil.copytree(captured, tmp_path / "run"))
    lrs = {c.epoch: c.lr for c in open_run(run).checkpoints}
    assert lrs[1] > 0
    tracin = score_run(run, ["tracin"], checkpoint="inrun")["tracin"]
    want = {i: 0.0 for i in _user_ids(run)}
    for epoch in (1, 2):
        for i, value in _reference(run, epoch, datainf=False)["hessian_free"].items():
            if i in want:
                want[i] += lrs[epoch] * value
    _assert_equal(tracin, want, _user_ids(run))
    assert tracin.meta["checkpoint_weights"] == [lrs[1], lrs[2]]


def test_inrun_refusals_are_one_line_errors_with_exit_2(captured, data, tmp_path, capsys):
    run = Path(shutil.copytree(captured, tmp_path / "run"))
    cases = [
        (["--method", "xprompt"], "--checkpoint best"),
        (["--method", "less"], "--checkpoint best"),
        (["--method", "datainf", "--measurement", "pairing"], "--checkpoint best"),
        (["--method", "datainf", "--query", str(data)], "drop --query"),
        (["--method", "datainf", "--stream"], "drop --stream"),
        (["--method", "datainf", "--block-by", "layer"], "--block-by matrix"),
    ]
    for extra, fix in cases:
        assert main(["score", str(run), "--checkpoint", "inrun", *extra, *COMMON]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert fix in err and len(err.splitlines()) == 1, (extra, err)
    assert main(["score", str(run), "--checkpoint", "inrun:7", "--method", "datainf", *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert "inrun:1, inrun:2" in err and len(err.splitlines()) == 1
    assert "score" not in RunDir.open(run).record.stages


def test_a_run_without_capture_names_the_capture_option(data, tmp_path, capsys):
    run = _finetune(data, tmp_path / "plain")
    assert main(["score", str(run), "--checkpoint", "inrun", "--method", "datainf", *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert "infscope finetune --capture last" in err and len(err.splitlines()) == 1
    with pytest.raises(InfscopeError, match="--capture last"):
        open_run(run).checkpoint("inrun:1")


def test_score_help_lists_inrun_among_checkpoints():
    main(["version"])  # registers every command on the app
    result = CliRunner().invoke(app, ["score", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "inrun" in result.output and "--capture" in result.output
