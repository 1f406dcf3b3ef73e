"""The cleaning loop end to end on tiny-bert (sentence_transform_cls with label flips): two rounds,
drops checked against the saved scores, test accuracy against a per-row loop, resume after an
interruption, undo byte for byte, canaries never in outputs, and the bad inputs (exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import infscope.actions.loop as loop_module
from infscope.actions.loop import CleanConfig, run_clean, tuned_model
from infscope.cli import main
from infscope.data.builtin import make_builtin
from infscope.data.manifest import write_manifest
from infscope.data.writing import write_rows
from infscope.noise.inject import inject_noise

CANARIES = [
    {"id": "canary-0", "text": "a canary sentence => A CANARY SENTENCE", "label": 0, "class": 0},
    {"id": "canary-1", "text": "another canary => another", "label": 1, "class": 1},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean-data")
    split = make_builtin("sentence_transform_cls", n_classes=3, per_class=14, n_test_per_class=6)
    noisy = inject_noise(split.train, task="classification", ratio=0.25, weights="label=1", seed=0,
                         label_names=split.label_names)  # fmt: skip
    write_rows(noisy.rows + CANARIES, root / "train.csv")
    write_manifest(noisy.manifest, root / "train.manifest.jsonl")
    write_rows(split.test[:6], root / "val.jsonl")
    write_rows(split.test[6:], root / "test.jsonl")
    instr = make_builtin("math_reason", n_classes=2, per_class=5, n_test_per_class=2)
    write_rows(instr.train, root / "math.jsonl")
    write_rows(instr.test, root / "math_test.jsonl")
    return root


def _config(root, **kw):
    base = dict(data=str(root / "train.csv"), val=str(root / "val.jsonl"), test=str(root / "test.jsonl"),
                model="tiny-bert", method="loss", action="drop", rounds=2, k="4", epochs=2, lr=1e-2,
                batch_size=8, max_length=48, rank=4, early_stop=False)  # fmt: skip
    return CleanConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    return out, run_clean(_config(files), out)


def test_two_rounds_drop_the_most_harmful_rows(files, finished):
    out, result = finished
    assert [row["round"] for row in result.table] == [0, 1, 2]
    assert [row["rows"] for row in result.table] == [26, 22, 18]
    for r in (1, 2):  # each round drops the 4 non-canary rows with the highest loss of the round before
        scores = pd.read_parquet(out / "rounds" / f"round-{r - 1}" / "results" / "loss.parquet")
        candidates = scores[~scores["id"].str.startswith("canary-")].sort_values(
            "score", ascending=False, kind="stable"
        )
        dropped = [json.loads(line)["id"] for line in (out / "rounds" / f"round-{r}.changes.jsonl").open()]
        assert sorted(dropped) == sorted(candidates["id"].head(4))
    best = result.best_round
    assert result.table[best]["kept"] and sum(row["kept"] for row in result.table) == 1
    values = [row["val_accuracy"] for row in result.table]  # kept by validation accuracy (the default)
    ties = [r for r, v in enumerate(values) if v == max(values)]
    assert best == min(ties, key=lambda r: (result.table[r]["val_loss"], r))
    assert result.report["select"] == "val" and result.report["selected_by"] == "validation accuracy"
    assert set(result.baselines) == {"noisy", "random", "oracle"}
    assert result.baselines["oracle"]["rows_changed"] == 6  # round(0.25 * 24) flipped labels
    assert result.baselines["noisy"]["accuracy"] == result.table[0]["accuracy"]


def test_test_accuracy_matches_a_per_row_loop(files, finished):
    out, result = finished
    test = [json.loads(line) for line in (files / "test.jsonl").open()]
    loaded = tuned_model(out / "rounds" / "round-2")
    correct, losses = [], []
    with torch.no_grad():
        for row in test:
            enc = loaded.tokenizer(row["text"], return_tensors="pt", truncation=True, max_length=48)
            logits = loaded.model(**enc).logits[0].double()
            correct.append(int(logits.argmax()) == row["label"])
            losses.append(float(-torch.log_softmax(logits, -1)[row["label"]]))
    assert result.table[2]["accuracy"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert result.table[2]["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    n = len(test)
    assert result.table[2]["accuracy_se"] == pytest.approx(np.std(correct, ddof=1) / np.sqrt(n), abs=1e-12)
    assert result.table[2]["loss_se"] == pytest.approx(np.std(losses, ddof=1) / np.sqrt(n), rel=1e-3)


def test_best_round_by_metric_then_loss_then_earlier_round():
    table = [
        {"round": 0, "accuracy": 0.5, "loss": 1.0, "val_accuracy": 0.7, "val_loss": 0.9},
        {"round": 1, "accuracy": 0.9, "loss": 0.5, "val_accuracy": 0.7, "val_loss": 0.8},
        {"round": 2, "accuracy": 0.9, "loss": 0.4, "val_accuracy": 0.6, "val_loss": 0.1},
        {"round": 3, "accuracy": 0.9, "loss": 0.4, "val_accuracy": 0.6, "val_loss": 0.1},
    ]
    assert loop_module.best_round(table, "val_accuracy", True) == 1  # tie at 0.7: lower val loss
    assert loop_module.best_round(table, "accuracy", True) == 2  # tie at 0.9 and 0.4: earlier round
    assert loop_module.best_round(table, "val_loss", False) == 2
    assert loop_module.selection_key("accuracy", "val") == "val_accuracy"
    assert loop_module.selection_key("accuracy", "test") == "accuracy"


def test_select_val_keeps_the_round_validation_prefers_and_reuse_trains_nothing_twice(
    files, tmp_path, monkeypatch
):
    """Validation and test disagree by construction: val picks round 2, test picks round 1, and the
    validation loss (``select_metric="loss"``) round 1."""
    test_acc, val_acc, val_loss = iter([0.5, 0.9, 0.6]), iter([0.5, 0.6, 0.8]), iter([1.0, 0.5, 0.7])

    def fake(loaded, rows, **kwargs):
        is_val = [r["id"] for r in rows] == [json.loads(line)["id"] for line in (files / "val.jsonl").open()]
        value = next(val_acc if is_val else test_acc)
        return {"loss": next(val_loss) if is_val else 1.0 - value, "accuracy": value}

    monkeypatch.setattr(loop_module, "test_metrics", fake)
    reuse = tmp_path / "reuse"
    by_val = run_clean(_config(files, baselines=False), tmp_path / "val", reuse=reuse)
    assert [row["val_accuracy"] for row in by_val.table] == [0.5, 0.6, 0.8]
    assert [row["accuracy"] for row in by_val.table] == [0.5, 0.9, 0.6]
    assert by_val.best_round == 2 and by_val.table[2]["gain"] == pytest.approx(0.2)
    assert by_val.report["selected_by"] == "validation accuracy"

    def no_training(*args, **kwargs):
        raise AssertionError("a round already in the reuse folder was trained again")

    monkeypatch.setattr("infscope.models.finetune.finetune", no_training)
    by_test = run_clean(_config(files, baselines=False, select="test"), tmp_path / "test", reuse=reuse)
    assert [row["accuracy"] for row in by_test.table] == [0.5, 0.9, 0.6]  # the same rounds, copied
    assert by_test.best_round == 1 and by_test.report["select"] == "test"
    by_loss = run_clean(_config(files, baselines=False, select_metric="loss"), tmp_path / "loss", reuse=reuse)
    assert [row["val_loss"] for row in by_loss.table] == [1.0, 0.5, 0.7]
    assert by_loss.best_round == 1 and by_loss.report["selected_by"] == "validation loss"
    assert [row["gain"] for row in by_loss.table[1:]] == pytest.approx([0.5, -0.2])  # lower loss is a gain
    for r in range(3):  # the copies point at their own checkpoints
        text = (tmp_path / "test" / "rounds" / f"round-{r}" / "finetune" / "checkpoints.json").read_text()
        assert str(tmp_path / "val") not in text and str(tmp_path / "test") in text


def test_outputs_hide_canaries_and_undo_restores_bytes(files, finished, tmp_path):
    out, result = finished
    cleaned = pd.read_csv(result.cleaned)
    kept_drops = {c["id"] for c in result.report["changes"] if c["action"] == "drop"}
    original = pd.read_csv(files / "train.csv")
    expected = [i for i in original["id"] if not i.startswith("canary-") and i not in kept_drops]
    assert cleaned["id"].tolist() == expected
    assert list(cleaned.columns) == list(original.columns)
    for path in (result.cleaned, result.audit, out / "rounds.json", out / "clean_report.json"):
        assert "canary-" not in path.read_text()
    restored = tmp_path / "restored.csv"
    assert main(["clean", str(result.cleaned), "--undo", str(result.audit), "--out", str(restored)]) == 0
    assert restored.read_bytes() == (files / "train.csv").read_bytes()
    wrong = main(
        ["clean", str(files / "val.jsonl"), "--undo", str(result.audit), "--out", str(tmp_path / "x.csv")]
    )
    assert wrong == 2 and not (tmp_path / "x.csv").exists()


def test_resume_after_an_interruption_in_round_2(files, finished, tmp_path, monkeypatch):
    _, uninterrupted = finished
    out = tmp_path / "out"
    real = loop_module.train_round

    def failing(cfg, prep, name, *args, **kwargs):
        if name == "round-2":
            raise RuntimeError("interrupted")
        return real(cfg, prep, name, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_round", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_clean(_config(files), out)
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert set(stages) == {"round-0", "round-1"}
    finished_at = {n: (out / "rounds" / n / "run.json").stat().st_mtime_ns for n in ("round-0", "round-1")}
    monkeypatch.setattr(loop_module, "train_round", real)
    resumed = run_clean(_config(files), out)
    for n, mtime in finished_at.items():  # finished rounds were not trained, scored or evaluated again
        assert (out / "rounds" / n / "run.json").stat().st_mtime_ns == mtime
    strip = [{k: v for k, v in row.items()} for row in resumed.table]
    assert strip == uninterrupted.table
    assert resumed.baselines == uninterrupted.baselines


@pytest.mark.parametrize(
    "args, message",
    [
        (["--test", "{root}/val.jsonl", "--val", "{root}/test.jsonl"], None),  # fine: disjoint
        (["--test", "{root}/train.csv"], "shares"),
        (["--action", "repair", "--expert", "local:tiny-llama"], "repair rewrites responses"),
        (["--rounds", "0"], "--rounds 0"),
        (["--k", "0"], "0 rows"),
        (["--select", "best"], "--select 'best' is not val or test"),
        (["--select-metric", "exact_match"], "not measured on this data"),
        (["--canaries", "0.1", "--canary-source", "heldout"], "unknown canary source 'heldout'"),
        (["--canaries", "0.5", "--canary-source", "validation"], "--canary-source train"),
        (["--canaries", "0.1", "--canary-noise", "response_swap"], "canary"),
        (["--method", "fusion"], "method fusion chooses on canaries; pass --canaries 0.05"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(files, tmp_path, capsys, args, message):
    if message is None:
        return
    out = tmp_path / "never"
    argv = ["clean", str(files / "train.csv"), "--val", str(files / "val.jsonl"), "--test", str(files / "test.jsonl"),
            "--out", str(out), "--model", "tiny-bert"]  # fmt: skip
    argv += [a.format(root=files) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--action", "relabel"], "relabel moves rows between classes"),
        (["--action", "repair", "--expert", "openai:http://127.0.0.1:9/v1#m"], "cannot reach"),
        (["--action", "repair"], "needs an expert"),
    ],
)
def test_bad_inputs_on_instruction_data(files, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    argv = ["clean", str(files / "math.jsonl"), "--val", str(files / "math_test.jsonl"), "--test",
            str(files / "math_test.jsonl"), "--out", str(out), "--model", "tiny-llama", *args]  # fmt: skip
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_canaries_train_in_every_round_and_never_reach_outputs(files, tmp_path):
    """``--canaries``: each round trains on the rows plus seeded label-flip canaries, scores them
    (canary AUROC in the table), never acts on one, and no output names them."""
    from infscope.noise.canaries import canary_count
    from infscope.runs import RunDir
    from infscope.scoring import open_run

    out = tmp_path / "out"
    result = run_clean(_config(files, rounds=1, baselines=False, canaries=0.2, canary_source="train"), out)
    made: set[str] = set()
    for r in (0, 1):
        run_dir = out / "rounds" / f"round-{r}"
        canaries = RunDir.open(run_dir).record.canaries
        assert canaries["source"] == "train"
        assert len(canaries["ids"]) == canary_count(0.2, result.table[r]["rows"])
        assert set(canaries["ids"]) <= {str(row["id"]) for row in open_run(run_dir).train}
        assert 0.0 <= result.table[r]["canary_auroc"] <= 1.0
        made |= set(canaries["ids"])
    dropped = {json.loads(line)["id"] for line in (out / "rounds" / "round-1.changes.jsonl").open()}
    assert len(dropped) == 4 and not dropped & made
    assert not made & set(pd.read_csv(result.cleaned)["id"].astype(str))
    assert not made & {str(json.loads(line).get("id")) for line in result.audit.open() if line.strip()}
