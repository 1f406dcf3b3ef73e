"""Peers: the plain-loop DataInf reference, the result guard and the registry (no optional packages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.estimators.registry import get_estimator
from infscope.grads.base import InMemoryGradients
from infscope.peers import PEERS, PeerInputs, run_peer
from infscope.peers import registry as peer_registry
from infscope.peers.agreement import max_rel_diff, spearman
from infscope.peers.reference import block_damping, reference_datainf
from infscope.peers.result import guarded


def store(n: int, dims: dict[str, int], seed: int, ids_prefix: str = "r") -> InMemoryGradients:
    gen = torch.Generator().manual_seed(seed)
    blocks = {
        name: torch.randn(n, d, generator=gen, dtype=torch.float64) * (1 + k)
        for k, (name, d) in enumerate(dims.items())
    }
    return InMemoryGradients([f"{ids_prefix}{i}" for i in range(n)], blocks)


DIMS = {"a.lora_A": 5, "a.lora_B": 12, "b.lora_A": 3}


def test_reference_loop_equals_vectorised_datainf_float64():
    train, query = store(9, DIMS, seed=0), store(4, DIMS, seed=1, ids_prefix="q")
    ours = get_estimator("datainf", dtype="float64").fit(train).score(query).vector()
    ref = reference_datainf(train, query)
    assert np.abs(ref - ours).max() <= 1e-8 * np.abs(ours).max()
    assert ref.std() > 0


def test_reference_with_one_damping_for_all_blocks():
    train, query = store(7, DIMS, seed=2), store(3, DIMS, seed=3, ids_prefix="q")
    ours = get_estimator("datainf", dtype="float64", damping=0.37).fit(train).score(query).vector()
    ref = reference_datainf(train, query, damping=0.37)
    assert np.abs(ref - ours).max() <= 1e-8 * np.abs(ours).max()


def test_reference_with_one_training_row_is_the_exact_damped_inverse():
    """With n = 1 DataInf's average of inverses is the inverse itself: compare with a dense solve."""
    train, query = store(1, {"w": 6}, seed=4), store(2, {"w": 6}, seed=5, ids_prefix="q")
    g = train.load_block("w", torch.float64).numpy()[0]
    v = query.load_block("w", torch.float64).numpy().mean(axis=0)
    lam = 0.1 * float(g @ g) / 6
    assert block_damping(g[None, :]) == pytest.approx(lam, rel=1e-12)
    dense = -v @ np.linalg.solve(np.outer(g, g) + lam * np.eye(6), g)
    assert reference_datainf(train, query)[0] == pytest.approx(dense, rel=1e-10)


def test_run_peer_reference_on_gradient_inputs_and_agreement_helpers():
    train, query = store(8, DIMS, seed=6), store(2, DIMS, seed=7, ids_prefix="q")
    result = run_peer("reference_datainf", PeerInputs.from_gradients(train, query))
    assert result.ok and result.error is None and result.seconds >= 0
    assert result.train_ids == train.ids
    ours = get_estimator("datainf", dtype="float64").fit(train).score(query).vector()
    assert max_rel_diff(result.scores, ours) < 1e-8
    assert spearman(result.scores, ours) == pytest.approx(1.0)
    assert spearman(result.scores, -ours) == pytest.approx(-1.0)


def test_model_peer_without_model_returns_error_instead_of_raising():
    train, query = store(4, DIMS, seed=8), store(1, DIMS, seed=9, ids_prefix="q")
    inputs = PeerInputs.from_gradients(train, query)
    for name in ("kronfluence_ekfac", "dattri_tracin"):
        result = run_peer(name, inputs)
        assert result.scores is None and not result.ok
        assert "PeerInputs.from_run" in result.error or "not installed" in result.error


def test_missing_package_and_not_applicable(monkeypatch):
    train, query = store(4, DIMS, seed=10), store(1, DIMS, seed=11, ids_prefix="q")
    inputs = PeerInputs.from_gradients(train, query)
    monkeypatch.setattr(peer_registry, "is_installed", lambda package: package is None)
    result = run_peer("kronfluence_ekfac", inputs)
    assert result.error == "not installed: pip install kronfluence"
    monkeypatch.undo()
    if peer_registry.is_installed("cleanlab"):
        result = run_peer("cleanlab", inputs)  # instruction task by default
        assert result.error.startswith("not applicable")


def test_unknown_peer_and_bad_run_dir_are_one_line_errors(tmp_path):
    with pytest.raises(InfscopeError, match="unknown peer"):
        run_peer("nope", tmp_path)
    with pytest.raises(InfscopeError, match="not a run directory"):
        run_peer("reference_datainf", tmp_path)
    assert set(PEERS) >= {"reference_datainf", "kronfluence_ekfac", "dattri_datainf", "cleanlab"}


def test_guard_turns_failures_into_rows():
    ids = ["a", "b"]
    assert guarded("x", ids, lambda: (np.array([1.0, np.nan]), {})).error.endswith("1 non-finite scores")
    assert "3 scores for 2" in guarded("x", ids, lambda: (np.zeros(3), {})).error

    def boom():
        raise MemoryError("out of memory")

    result = guarded("x", ids, boom)
    assert result.error == "MemoryError: out of memory" and result.scores is None
    ok = guarded("x", ids, lambda: (np.array([2.0, -1.0]), {"k": 1}))
    assert ok.ok and ok.meta["k"] == 1 and ok.peak_mb > 0


def test_compare_peers_table_against_independent_references():
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from infscope.peers import compare_peers

    train, query = store(12, DIMS, seed=12), store(3, DIMS, seed=13, ids_prefix="q")
    noisy = np.zeros(12, dtype=bool)
    noisy[[1, 4, 9]] = True
    manifest = pd.DataFrame(
        {
            "id": train.ids,
            "is_noisy": noisy,
            "family": ["x"] * 12,
            "operator": ["y"] * 12,
        }
    )
    inputs = PeerInputs.from_gradients(train, query, manifest=manifest)
    result = run_peer("reference_datainf", inputs)
    failed = run_peer("kronfluence_ekfac", inputs)  # no model: an error row, not an exception
    table = compare_peers([result, failed], inputs).set_index("method")
    row = table.loc["reference_datainf"]
    assert row["vs"] == "datainf"
    assert row["rel_diff"] < 1e-5  # our production DataInf computes in float32
    assert row["spearman"] == pytest.approx(1.0)
    assert row["auroc"] == pytest.approx(roc_auc_score(noisy, result.scores))
    assert table.loc["ours:datainf", "auroc"] == pytest.approx(row["auroc"])
    assert isinstance(table.loc["kronfluence_ekfac", "error"], str)
    assert pd.isna(table.loc["kronfluence_ekfac", "auroc"])


# ------------------------------------------------------------------ a run made by `infscope finetune` + score

N_ROWS = 16
BAD_IDS = ("r00", "r05", "r10", "r15")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """``infscope finetune`` on tiny-llama with a plain list of bad ids, then ``score_run``.

    Returns the run, and the error PeerInputs.from_run gave between fine-tuning and scoring.
    """
    import json

    from infscope.cli import main
    from infscope.scoring import score_run

    root = tmp_path_factory.mktemp("peers-run")
    rows = [
        {
            "id": f"r{i:02d}",
            "instruction": f"Repeat the number {i}",
            "input": "",
            "output": f"banana {7 * i}" if f"r{i:02d}" in BAD_IDS else f"The number is {i}.",
        }
        for i in range(N_ROWS)
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = root / "bad.txt"
    bad.write_text("\n".join(BAD_IDS) + "\n")
    run = root / "run"
    args = ["finetune", str(data), "--out", str(run), "--model", "tiny-llama", "--epochs", "2"]
    args += ["--batch-size", "4", "--max-length", "32", "--val-fraction", "0.25", "--manifest", str(bad)]
    assert main(args) == 0
    try:
        PeerInputs.from_run(run)
        before = ""
    except InfscopeError as exc:
        before = str(exc)
    score_run(run, ["datainf", "loss"])
    return run, before


def test_finetune_run_opens_in_peers_after_scoring(finetuned):
    from infscope.estimators.scores import Scores
    from infscope.models.encode import encode_rows
    from infscope.models.registry import load_model
    from infscope.peers.suite import gradient_seconds
    from infscope.runs import RunDir, RunLayout, read_jsonl

    run, before = finetuned
    assert "no gradient stores; score it first" in before
    inputs = PeerInputs.from_run(run)
    layout, record = RunLayout(run), RunDir.open(run).record
    train = read_jsonl(layout.train)
    assert inputs.train_ids == [r["id"] for r in train] and len(train) == 12
    assert inputs.checkpoint == Path(record.stages["score"]["info"]["checkpoint"])
    assert inputs.block_by == "matrix" and layout.losses(inputs.checkpoint, inputs.block_by).is_file()
    # the user's list: listed training rows noisy, every other training row clean, validation ids left out
    truth = inputs.manifest.set_index("id")["is_noisy"]
    assert list(truth.index) == inputs.train_ids
    assert truth.to_dict() == {i: i in BAD_IDS for i in inputs.train_ids}
    # only the tokenizer was loaded, and it encodes exactly like the model's own
    ours = inputs.encode(train)
    reference = encode_rows(train, load_model("tiny-llama").tokenizer, task="instruction", max_length=32)
    assert ours.input_ids == reference.input_ids and ours.labels == reference.labels
    # the plain float64 loop on the same stores equals the DataInf scores the run saved
    result = run_peer("reference_datainf", inputs)
    saved = Scores.load(layout.scores("datainf"))
    assert result.ok and saved.train_ids == inputs.train_ids
    assert max_rel_diff(result.scores, saved.vector()) < 1e-4
    tag = f"gradients:{inputs.checkpoint.name}"
    assert gradient_seconds(run) == record.stages[tag]["seconds"]


def test_peers_follow_the_scored_checkpoint_and_blocks(finetuned, tmp_path):
    import shutil

    from infscope.scoring import score_run

    run = Path(shutil.copytree(finetuned[0], tmp_path / "run"))
    score_run(run, ["hessian_free"], checkpoint="epoch-1", block_by="layer")
    inputs = PeerInputs.from_run(run)
    assert inputs.checkpoint.name == "epoch-1" and inputs.block_by == "layer"
    assert len(inputs.tracked_modules) == 2  # tiny-llama: one block per decoder layer
    shutil.rmtree(run / "scoring" / "epoch-1-layer")  # stores gone: fall back to the best checkpoint's
    fallback = PeerInputs.from_run(run)
    best = fallback.checkpoints[-1] if fallback.checkpoint.name == "epoch-2" else fallback.checkpoint
    assert fallback.block_by == "matrix" and fallback.checkpoint.name == best.name
    assert len(fallback.tracked_modules) > 2


def test_report_of_the_finetune_run_matches_sklearn(finetuned):
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from infscope.report import collect

    run, _ = finetuned
    data = collect(run, top_k=3)
    assert data["run"]["kind"] == "finetune" and data["run"]["manifest"].endswith("bad.txt")
    for row in data["leaderboard"]:
        table = pd.read_parquet(run / "results" / f"{row['method']}.parquet")
        truth = [i in BAD_IDS for i in table["id"]]
        assert row["auroc"] == pytest.approx(roc_auc_score(truth, table["score"]), abs=1e-12)
        assert row["k"] == sum(truth)
    stages = [s["stage"] for s in data["stages"]]
    assert stages[:2] == ["data", "finetune"] and stages[-1] == "score"
    assert any(s.startswith("gradients:epoch-") for s in stages)


def test_peer_suite_on_the_finetune_run_saves_under_the_run_layout(finetuned, tmp_path):
    import shutil

    from sklearn.metrics import roc_auc_score

    from infscope.peers.suite import run_peer_suite
    from infscope.runs import RunDir, RunLayout

    run = Path(shutil.copytree(finetuned[0], tmp_path / "run"))
    layout = RunLayout(run)
    table = run_peer_suite(run, ["reference_datainf"], isolate=False).set_index("method")
    stages = RunDir.open(run).record.stages
    tag = "gradients:" + Path(stages["score"]["info"]["checkpoint"]).name
    assert table.loc["ours:gradients", "seconds"] == stages[tag]["seconds"]
    row = table.loc["reference_datainf"]
    assert row["vs"] == "datainf" and row["rel_diff"] < 1e-4
    inputs = PeerInputs.from_run(run)
    truth = [i in BAD_IDS for i in inputs.train_ids]
    scores = run_peer("reference_datainf", inputs).scores
    assert row["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
    assert (layout.peers / "peers.json").is_file() and (layout.peers / "peers.csv").is_file()
    assert (layout.peer_part("reference_datainf") / "result.json").is_file()
