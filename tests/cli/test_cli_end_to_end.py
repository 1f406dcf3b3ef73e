"""A new user's path through the commands, on their own files (tiny models, offline).

finetune -> score -> evaluate -> report -> peers on one run; a classification file with integer
labels; chat rows; a user's own list of known-bad ids as the manifest. Each step reads the run
through the one run model, so what one command wrote the next one finds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from infscope.cli import main
from infscope.runs import RunDir, RunLayout


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def noisy_files(tmp_path_factory):
    """A built-in instruction set with 25 % response swaps and its manifest, written by `infscope noise`."""
    root = tmp_path_factory.mktemp("user")
    clean = root / "st.jsonl"
    assert (
        main(
            [
                "data",
                "make",
                "sentence_transform",
                "--classes",
                "3",
                "--per-class",
                "10",
                "--test-per-class",
                "2",
                "--out",
                str(clean),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "noise",
                str(clean),
                "--ratio",
                "0.25",
                "--weights",
                "response_swap=1",
                "--out",
                str(root / "noisy"),
            ]
        )
        == 0
    )
    noisy = next((root / "noisy").glob("*.noisy.*.jsonl"))
    manifest = noisy.with_name(noisy.name[: -len(".jsonl")] + ".manifest.jsonl")
    assert manifest.is_file()
    return noisy, manifest


@pytest.fixture(scope="module")
def scored_run(noisy_files, tmp_path_factory):
    noisy, _ = noisy_files
    run = tmp_path_factory.mktemp("runs") / "x"
    common = ["--model", "tiny-llama", "--max-length", "64", "--threads", "1"]
    assert main(["finetune", str(noisy), "--out", str(run), "--epochs", "2", "--lr", "0.01", *common]) == 0
    assert (
        main(["score", str(run), "--method", "datainf,hessian_free,tracin,loss,random", "--threads", "1"])
        == 0
    )
    return run


def test_finetune_records_absolute_source_and_copies_the_rows(scored_run, noisy_files):
    noisy, manifest = noisy_files
    record = RunDir.open(scored_run).record
    assert record.kind == "finetune" and Path(record.data.train).is_absolute()
    assert Path(record.data.train) == noisy.resolve() and Path(record.manifest) == manifest.resolve()
    layout = RunLayout(scored_run)
    copied = [json.loads(line) for line in layout.train.read_text().splitlines()]
    source = {json.loads(line)["id"] for line in noisy.read_text().splitlines()}
    val = [json.loads(line) for line in layout.val.read_text().splitlines()]
    assert {r["id"] for r in copied} | {r["id"] for r in val} == source
    assert any(name.startswith("gradients:") for name in record.stages) and "score" in record.stages


def test_evaluate_matches_sklearn_and_runs_from_another_directory(scored_run, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # the run stores absolute paths, so the working directory does not matter
    assert main(["evaluate", str(scored_run), "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    manifest = pd.read_json(RunDir.open(scored_run).record.manifest, lines=True).set_index("id")
    for row in evaluation["leaderboard"]:
        table = pd.read_parquet(RunLayout(scored_run).results(row["method"])).set_index("id")
        truth = manifest.loc[table.index, "is_noisy"].astype(bool)
        assert row["auroc"] == pytest.approx(roc_auc_score(truth, table["score"]), abs=1e-12)
    assert {r["method"] for r in evaluation["leaderboard"]} == {
        "datainf",
        "hessian_free",
        "tracin",
        "loss",
        "random",
    }


def test_users_own_list_of_bad_ids_is_a_manifest(scored_run, noisy_files, tmp_path, capsys):
    _, manifest = noisy_files
    frame = pd.read_json(manifest, lines=True)
    ids_file = tmp_path / "bad.txt"
    ids_file.write_text("".join(f"{i}\n" for i in frame.loc[frame["is_noisy"], "id"]))
    minimal = _write_jsonl(
        tmp_path / "bad.jsonl", [{"id": r.id, "is_noisy": bool(r.is_noisy)} for r in frame.itertuples()]
    )
    results = []
    for path in (manifest, ids_file, minimal):
        assert main(["evaluate", str(scored_run), "--manifest", str(path), "--json"]) == 0
        results.append({r["method"]: r["auroc"] for r in json.loads(capsys.readouterr().out)["leaderboard"]})
    assert results[0] == results[1] == results[2]


def test_report_and_peers_read_the_same_run(scored_run, capsys):
    assert main(["report", str(scored_run)]) == 0
    html = RunLayout(scored_run).report.read_text()
    assert "datainf" in html and "tracin" in html
    assert main(["peers", str(scored_run), "--peers", "reference_datainf", "--threads", "1"]) == 0
    table = pd.read_csv(RunLayout(scored_run).peers / "peers.csv")
    reference = table[table["method"] == "reference_datainf"].iloc[0]
    assert pd.isna(reference["error"]) or reference["error"] == ""
    assert reference["rel_diff"] < 1e-6  # the plain reference loop computes exactly our DataInf


def test_integer_labels_fine_tune_and_score(tmp_path, capsys):
    rows = [
        {"id": f"r{i}", "text": ("good day " if i % 3 else "bad night ") + str(i), "label": i % 3}
        for i in range(24)
    ]
    data = _write_jsonl(tmp_path / "cls.jsonl", rows)
    run = tmp_path / "run"
    common = ["--model", "tiny-bert", "--threads", "1"]
    assert main(["finetune", str(data), "--out", str(run), "--epochs", "1", *common]) == 0
    assert main(["score", str(run), "--method", "datainf,loss,label_margin", "--threads", "1"]) == 0
    record = RunDir.open(run).record
    assert record.model.task == "classification" and record.model.label_names == ["0", "1", "2"]
    train_ids = {json.loads(line)["id"] for line in RunLayout(run).train.read_text().splitlines()}
    for method in ("datainf", "loss", "label_margin"):
        table = pd.read_parquet(RunLayout(run).results(method))
        assert set(table["id"]) == train_ids and np.isfinite(table["score"]).all()


def test_chat_rows_fine_tune_and_score(tmp_path):
    rows = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"{i + 1}"},
            ],
        }
        for i in range(16)
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    run = tmp_path / "run"
    common = ["--model", "tiny-llama", "--threads", "1", "--max-length", "64"]
    assert main(["finetune", str(data), "--out", str(run), "--epochs", "1", *common]) == 0
    assert main(["score", str(run), "--method", "hessian_free,loss,xprompt", "--threads", "1"]) == 0
    layout = RunLayout(run)
    train_ids = {json.loads(line)["id"] for line in layout.train.read_text().splitlines()}
    for method in ("hessian_free", "loss", "xprompt"):
        table = pd.read_parquet(layout.results(method))
        assert set(table["id"]) == train_ids and np.isfinite(table["score"]).all()


def test_method_all_means_every_method_the_run_can_feed(scored_run, tmp_path, capsys):
    import shutil

    from infscope.scoring import open_run, parse_methods
    from infscope.scoring.inputs import RunInputs

    run = Path(shutil.copytree(scored_run, tmp_path / "copy"))
    opened = open_run(run)
    inputs = RunInputs(opened, opened.best, opened.val)
    names = parse_methods("all", inputs)
    assert "tracin" in names and "label_margin" not in names and "aum" not in names
    assert parse_methods("all,tracin", inputs) == names


def test_wrong_column_names_can_be_mapped_on_finetune(tmp_path):
    rows = [{"id": str(i), "prompt": f"Say {i}.", "completion": str(i)} for i in range(12)]
    data = _write_jsonl(tmp_path / "other.jsonl", rows)
    run = tmp_path / "run"
    argv = [
        "finetune",
        str(data),
        "--out",
        str(run),
        "--model",
        "tiny-llama",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--instruction-col",
        "prompt",
        "--output-col",
        "completion",
        "--max-length",
        "32",
    ]
    assert main(argv) == 0
    assert RunDir.open(run).record.data.columns == {"instruction": "prompt", "output": "completion"}


def test_canaries_calibrate_fusion_and_never_reach_outputs(noisy_files, tmp_path, capsys):
    from infscope.estimators.scores import Scores
    from infscope.scoring import open_run

    noisy, _ = noisy_files
    run = tmp_path / "run"
    common = ["--model", "tiny-llama", "--max-length", "64", "--threads", "1"]
    argv = [
        "finetune",
        str(noisy),
        "--out",
        str(run),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--canaries",
        "0.25",
        *common,
    ]
    assert main(argv) == 0
    opened = open_run(run)
    from infscope.noise.canaries import canary_count

    n_user = len(RunLayout(run).train.read_text().splitlines())
    assert len(opened.canary_ids) == canary_count(0.25, n_user)
    assert all(i.startswith("canary-") for i in opened.canary_ids)
    assert set(opened.canary_ids) <= {str(r["id"]) for r in opened.train}
    assert (
        main(
            ["score", str(run), "--method", "loss,xprompt,fusion", "--checkpoint", "canary", "--threads", "1"]
        )
        == 0
    )
    layout = RunLayout(run)
    user_ids = {json.loads(line)["id"] for line in layout.train.read_text().splitlines()}
    for path in layout.results_dir.glob("*.parquet"):
        assert set(pd.read_parquet(path)["id"]) == user_ids, path.name
    fusion = Scores.load(layout.scores("fusion"))
    choice = fusion.meta["fusion"]
    assert set(choice["members"]) <= {
        "loss",
        "base_loss",
        "xprompt",
        "xresponse",
        "pmi",
        "ifd",
        "grad_cos",
        "datainf",
        "hessian_free",
        "cartography",
        "el2n",
    }
    loss = Scores.load(layout.scores("loss"))
    assert loss.meta["checkpoint_rule"] == "canary" and 0.0 <= loss.meta["canary_auroc"] <= 1.0
    # the chosen checkpoint is the one whose canary AUROC is highest among the per-epoch scores
    per_epoch = [Scores.load(p).meta["canary_auroc"] for p in sorted(layout.scores_dir.glob("loss@*.npz"))]
    assert loss.meta["canary_auroc"] == max(per_epoch)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    board = json.loads(capsys.readouterr().out)["leaderboard"]
    assert {"loss", "xprompt", "fusion"} <= {r["method"] for r in board}


def test_canary_noise_that_does_not_fit_writes_nothing(noisy_files, tmp_path, capsys):
    noisy, _ = noisy_files
    run = tmp_path / "run"
    argv = [
        "finetune",
        str(noisy),
        "--out",
        str(run),
        "--model",
        "tiny-llama",
        "--canaries",
        "0.1",
        "--canary-noise",
        "label_flip_uniform",
        "--threads",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "response_swap" in err and len(err.strip().splitlines()) == 1 and not run.exists()


def test_streamed_scores_equal_the_store_based_ones_without_a_store(scored_run, tmp_path):
    import shutil

    from infscope.estimators.scores import Scores

    run = Path(shutil.copytree(scored_run, tmp_path / "copy"))
    before = {m: Scores.load(RunLayout(run).scores(m)) for m in ("datainf", "hessian_free")}
    shutil.rmtree(RunLayout(run).root / "scoring")
    assert main(["score", str(run), "--method", "datainf,hessian_free", "--stream", "--threads", "1"]) == 0
    assert not (RunLayout(run).root / "scoring").exists() or not any(
        (RunLayout(run).root / "scoring").rglob("index.json")
    )
    for method, old in before.items():
        new = Scores.load(RunLayout(run).scores(method))
        got = pd.Series(new.values, index=new.train_ids).loc[old.train_ids].to_numpy()
        np.testing.assert_allclose(got, old.values, rtol=1e-4, atol=1e-6 * np.abs(old.values).max())


def test_method_options_on_the_command_line(scored_run, tmp_path, capsys):
    import shutil

    from infscope.cli.pipeline_cmds import parse_method_options
    from infscope.estimators.scores import Scores

    assert parse_method_options(["xprompt.k=5", "xprompt.aggregate=min", "lissa.tol=1e-6"]) == {
        "xprompt": {"k": 5, "aggregate": "min"},
        "lissa": {"tol": 1e-6},
    }
    run = Path(shutil.copytree(scored_run, tmp_path / "copy"))
    argv = [
        "score",
        str(run),
        "--method",
        "xprompt",
        "--option",
        "xprompt.k=2",
        "--option",
        "xprompt.aggregate=min",
    ]
    assert main([*argv, "--threads", "1"]) == 0
    meta = Scores.load(RunLayout(run).scores("xprompt")).meta
    assert (meta["k"], meta["aggregate"], meta["competitors"]) == (2, "min", "response")
    assert main(["score", str(run), "--method", "xprompt", "--option", "xprompt.nope=1"]) == 2
    assert main(["score", str(run), "--option", "bad"]) == 2
    assert "no option 'nope'" in capsys.readouterr().err


def test_streamed_scores_leave_canaries_out(noisy_files, tmp_path):
    noisy, _ = noisy_files
    run = tmp_path / "run"
    common = ["--model", "tiny-llama", "--max-length", "64", "--threads", "1"]
    assert (
        main(["finetune", str(noisy), "--out", str(run), "--epochs", "1", "--canaries", "0.2", *common]) == 0
    )
    assert main(["score", str(run), "--method", "hessian_free", "--stream", "--threads", "1"]) == 0
    user_ids = {json.loads(line)["id"] for line in RunLayout(run).train.read_text().splitlines()}
    assert set(pd.read_parquet(RunLayout(run).results("hessian_free"))["id"]) == user_ids


def test_validation_sourced_canaries_leave_the_validation_set(noisy_files, tmp_path, capsys):
    """Canaries copied from validation rows: those rows are gone from the validation the run uses."""
    from infscope.scoring import open_run

    noisy, _ = noisy_files
    run = tmp_path / "run"
    common = ["--model", "tiny-llama", "--max-length", "64", "--threads", "1", "--epochs", "1"]
    argv = ["finetune", str(noisy), "--out", str(run), "--canaries", "0.1", "--canary-source", "validation"]
    assert main([*argv, "--val-fraction", "0.3", *common]) == 0
    record = RunDir.open(run).record
    assert record.canaries["source"] == "validation" and record.args["canary_source"] == "validation"
    taken = set(record.canaries["source_ids"])
    opened = open_run(run)
    all_val = {str(r["id"]) for r in opened.val} | taken
    assert len(taken) == len(record.canaries["ids"]) == 2
    assert not taken & {str(r["id"]) for r in opened.val}
    assert not taken & {str(r["id"]) for r in opened.train}
    assert len(opened.val) == len(all_val) - 2
    assert "canaries copied from validation rows" in " ".join(capsys.readouterr().out.split())


def test_validation_canaries_that_would_empty_the_validation_set_write_nothing(noisy_files, tmp_path, capsys):
    noisy, _ = noisy_files
    run = tmp_path / "run"
    argv = ["finetune", str(noisy), "--out", str(run), "--model", "tiny-llama", "--canaries", "0.25"]
    assert main([*argv, "--canary-source", "validation", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "--canary-source train" in err and len(err.strip().splitlines()) == 1 and not run.exists()
    assert main([*argv, "--canary-source", "heldout", "--threads", "1"]) == 2
    assert "unknown canary source 'heldout'" in capsys.readouterr().err and not run.exists()
