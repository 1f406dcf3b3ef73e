"""End-to-end pipeline on tiny-llama: every stage, resume, argument guard, and numbers checked
against independent computations (a per-row loss loop, sklearn AUROC on the saved tables)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.runs import RunLayout
from infscope.scoring import score_run

SMALL = dict(
    model="tiny-llama",
    classes=3,
    train_per_class=8,
    val_per_class=2,
    epochs=2,
    max_length=64,
    noise_ratio=0.25,
    methods=("datainf", "exact", "hessian_free", "loss", "base_loss", "random"),
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    return out, run_pipeline(PipelineConfig(**SMALL), out)


def test_every_stage_recorded_and_artifacts_written(finished):
    out, result = finished
    best = Path(result.evaluation["checkpoint"]["checkpoint"]).name
    assert list(result.stages) == ["data", "noise", "finetune", f"gradients:{best}", "score"]
    for stage in result.stages.values():
        assert stage["seconds"] >= 0 and stage["peak_rss_mb"] > 0
    manifest = pd.read_json(out / "data" / "manifest.jsonl", lines=True)
    assert len(manifest) == 24 and manifest["is_noisy"].sum() == 6
    for method in SMALL["methods"]:
        table = pd.read_parquet(out / "results" / f"{method}.parquet")
        assert sorted(table["id"]) == sorted(manifest["id"])


def test_leaderboard_auroc_matches_sklearn_on_saved_tables(finished):
    out, result = finished
    manifest = pd.read_json(out / "data" / "manifest.jsonl", lines=True).set_index("id")
    for row in result.evaluation["leaderboard"]:
        table = pd.read_parquet(out / "results" / f"{row['method']}.parquet").set_index("id")
        truth = manifest.loc[table.index, "is_noisy"].astype(bool)
        assert row["auroc"] == pytest.approx(roc_auc_score(truth, table["score"]), abs=1e-12)


def test_loss_baseline_equals_a_plain_per_row_loop(finished):
    """The training-loss baseline must be each row's mean response-token loss at the scored checkpoint."""
    from infscope.models.encode import encode_rows
    from infscope.models.lora import load_adapter
    from infscope.models.registry import load_model

    out, result = finished
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    loaded = load_model("tiny-llama", seed=0)
    model = load_adapter(loaded, result.evaluation["checkpoint"]["checkpoint"])
    enc = encode_rows(rows, loaded.tokenizer, task="instruction", max_length=64)
    expected = []
    with torch.no_grad():
        for ids, labels in zip(enc.input_ids, enc.labels, strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != -100
            expected.append(torch.nn.functional.cross_entropy(logits[keep], target[keep]).item())
    from infscope.runs import RunLayout

    losses = RunLayout(out).losses(result.evaluation["checkpoint"]["checkpoint"])
    saved = pd.read_parquet(losses).set_index("id").loc[enc.ids, "loss"].to_numpy()
    np.testing.assert_allclose(saved, expected, rtol=1e-4, atol=1e-5)


def test_rerun_resumes_without_recomputing(finished, monkeypatch):
    out, result = finished
    import infscope.models.finetune as ft

    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("fine-tuning ran again"))
    again = run_pipeline(PipelineConfig(**SMALL), out)
    assert again.stages == result.stages
    assert again.evaluation["leaderboard"] == result.evaluation["leaderboard"]


def test_other_arguments_are_refused(finished):
    out, _ = finished
    with pytest.raises(InfscopeError, match="seed was 0, now 1"):
        run_pipeline(PipelineConfig(**{**SMALL, "seed": 1}), out)


def test_evaluate_and_score_commands(finished, capsys):
    out, result = finished
    assert main(["evaluate", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in printed["leaderboard"]} == set(SMALL["methods"])
    before = pd.read_parquet(out / "results" / "hessian_free.parquet").set_index("id")["score"]
    assert main(["score", str(out), "--method", "hessian_free,loss"]) == 0
    after = pd.read_parquet(out / "results" / "hessian_free.parquet").set_index("id")["score"]
    # gradients recollected in RUN/scoring/<checkpoint> from the same adapter and rows give the same scores
    assert (out / "scoring").is_dir()
    np.testing.assert_allclose(after.loc[before.index], before, rtol=1e-4, atol=1e-6 * before.abs().max())


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run, for tests that rescore it (the module's other tests see the original)."""
    import shutil

    return Path(shutil.copytree(finished[0], tmp_path / "run"))


def test_score_every_checkpoint_side_by_side(run_copy, capsys):
    from infscope.scoring import open_run

    run = open_run(run_copy)
    assert len(run.checkpoints) == 2
    scored = score_run(run_copy, ["hessian_free", "loss"], checkpoint="all")
    tags = [f"@{Path(c.path).name}" for c in run.checkpoints]
    expected = ["hessian_free", "loss"] + [
        f"{m}{t}" for t in tags + ["@ensemble"] for m in ("hessian_free", "loss")
    ]
    assert sorted(scored) == sorted(expected)
    from scipy.stats import rankdata

    per_epoch = [pd.Series(scored[f"loss{t}"].values, index=scored[f"loss{t}"].train_ids) for t in tags]
    ids = scored["loss@ensemble"].train_ids
    mean_rank = np.mean([rankdata(s.loc[ids].to_numpy()) / len(ids) for s in per_epoch], axis=0)
    np.testing.assert_allclose(scored["loss@ensemble"].values, mean_rank, rtol=1e-12)
    assert list(scored)[0] == "hessian_free" and scored["loss"].meta["checkpoint"] == str(run.best.path)
    best_tag = f"@{Path(run.best.path).name}"
    np.testing.assert_array_equal(scored[f"loss{best_tag}"].values, scored["loss"].values)
    other = next(c for c in run.checkpoints if c.path != run.best.path)
    tag = f"@{Path(other.path).name}"
    alone = score_run(run_copy, ["hessian_free", "loss"], checkpoint=Path(other.path).name)
    for method in ("hessian_free", "loss"):  # the same numbers as scoring that checkpoint on its own
        np.testing.assert_allclose(scored[f"{method}{tag}"].values, alone[method].values, rtol=1e-6)
    assert not np.allclose(scored["loss"].values, alone["loss"].values)
    # scoring again removed the epoch scores of those methods: nothing stale is ranked beside the new ones
    assert not list((run_copy / "scores").glob("loss@*")) and not list((run_copy / "results").glob("loss@*"))
    score_run(run_copy, ["loss"], checkpoint="all")
    assert (run_copy / "results" / f"loss{tag}.csv").is_file()
    assert main(["evaluate", str(run_copy), "--json"]) == 0
    methods = {r["method"] for r in json.loads(capsys.readouterr().out)["leaderboard"]}
    assert {f"loss{t}" for t in tags} <= methods and not any(m.startswith("hessian_free@") for m in methods)


def test_score_tracin_command(run_copy, capsys):
    from infscope.estimators.scores import Scores

    assert main(["score", str(run_copy), "--method", "tracin,hessian_free"]) == 0
    out = capsys.readouterr().out
    assert "gradients:" in out and "tracin" in out
    tracin = Scores.load(run_copy / "scores" / "tracin.npz")
    assert len(tracin.meta["checkpoints"]) == 2


def test_score_block_by_layer_groups_the_gradients(run_copy):
    from infscope.grads.store import GradientStore

    out = run_copy
    hf_matrix = score_run(out, ["hessian_free", "datainf"])
    hf_layer = score_run(out, ["hessian_free", "datainf"], block_by="layer")
    store = GradientStore.open(
        out / "scoring" / f"{Path(hf_layer['datainf'].meta['checkpoint']).name}-layer" / "grads" / "train"
    )
    assert store.meta["block_by"] == "layer"
    assert len(store.block_names) == 2  # tiny-llama: one block per decoder layer
    matrix = GradientStore.open(RunLayout(out).grads(hf_matrix["datainf"].meta["checkpoint"], "train"))
    assert sum(store.block_dim(b) for b in store.block_names) == sum(
        matrix.block_dim(b) for b in matrix.block_names
    )
    # dot products add over blocks, so hessian-free is the same; DataInf's per-block inverse is not
    np.testing.assert_allclose(hf_layer["hessian_free"].values, hf_matrix["hessian_free"].values, rtol=1e-4)
    assert not np.allclose(hf_layer["datainf"].values, hf_matrix["datainf"].values, rtol=1e-3)


def test_gradients_made_with_other_blocks_are_collected_again(run_copy):
    import shutil

    from infscope.grads.store import GradientStore

    matrix = score_run(run_copy, ["datainf"])
    work = RunLayout(run_copy).scoring(matrix["datainf"].meta["checkpoint"])
    layer_dir = work.with_name(work.name + "-layer")
    shutil.copytree(work, layer_dir)  # what `--block-by layer` left before it reached the gradient pass
    assert GradientStore.open(layer_dir / "grads" / "train").meta["block_by"] == "matrix"
    layer = score_run(run_copy, ["datainf"], block_by="layer")
    store = GradientStore.open(
        RunLayout(run_copy).grads(layer["datainf"].meta["checkpoint"], "train", "layer")
    )
    assert store.meta["block_by"] == "layer" and len(store.block_names) == 2


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert main(["score", str(tmp_path), "--method", "nope"]) == 2
    assert main(["demo", "--model", "tiny-llama", "--ratio", "1.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and "outside" in err and "Traceback" not in err


def test_tracin_over_checkpoints_is_the_lr_weighted_sum_of_gradient_dot_products(finished):
    """TracIn = sum over checkpoints of (mean lr of that epoch's steps) * (-mean query grad . train grad)."""
    from infscope.grads.store import GradientStore
    from infscope.scoring import score_run

    out, _ = finished
    tracin = score_run(out, ["tracin"])["tracin"]
    steps_per_epoch, epochs, peak = 3, 2, 2e-3  # 24 rows / batch 8; PipelineConfig lr
    total = steps_per_epoch * epochs
    warmup = int(np.ceil(0.1 * total))
    factors = [(t + 1) / warmup if t < warmup else 1 - (t - warmup) / (total - warmup) for t in range(total)]
    expected = np.zeros(len(tracin.train_ids))
    for epoch in range(1, epochs + 1):
        weight = peak * np.mean(factors[(epoch - 1) * steps_per_epoch : epoch * steps_per_epoch])
        train = GradientStore.open(out / "scoring" / f"epoch-{epoch}" / "grads" / "train")
        val = GradientStore.open(out / "scoring" / f"epoch-{epoch}" / "grads" / "val")
        assert train.ids == tracin.train_ids
        for block in train.block_names:
            G = train.load_block(block, torch.float64).numpy()
            v = val.load_block(block, torch.float64).numpy().mean(axis=0)
            expected += weight * -(G @ v)
    np.testing.assert_allclose(tracin.values, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_demo_command_defaults_match_the_pipeline_defaults():
    """The demo's options take PipelineConfig's defaults (from the torch-free pipeline_config), whose
    default methods are all registered."""
    from infscope.estimators.registry import METHODS

    assert set(PipelineConfig().methods) <= set(METHODS)
    import inspect

    from infscope.cli.pipeline_cmds import demo_command

    defaults = PipelineConfig()
    names = {
        "train_per_class": "train_per_class",
        "val_per_class": "val_per_class",
        "ratio": "noise_ratio",
        "epochs": "epochs",
        "lr": "lr",
        "model": "model",
        "dataset": "dataset",
        "classes": "classes",
        "checkpoint": "checkpoint",
        "seed": "seed",
        "strategy": "noise_strategy",
        "lora_layers": "lora_layers",
    }
    params = inspect.signature(demo_command).parameters
    for option, field in names.items():
        assert params[option].default.default == getattr(defaults, field), option


def test_busy_cores_sees_a_process_spinning_now():
    """The thread default counts cores in use at this moment (not the lagging load average)."""
    import subprocess
    import sys
    from pathlib import Path

    from infscope.runtime import busy_cores

    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat here")
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"]
    )
    try:
        import time

        time.sleep(0.5)  # let it start spinning
        assert busy_cores(window=1.0) >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_pairing_measurement_query_is_the_gradient_of_own_minus_shuffled_prompt_loss(run_copy):
    """hessian_free+pairing = -G v with v the mean over validation rows of grad [L(A|Q) - L(A|Q')], by autograd per row."""
    from infscope.grads.store import GradientStore
    from infscope.models.lora import load_adapter
    from infscope.models.registry import load_model
    from infscope.scoring import open_run
    from infscope.scoring.gradients import encode_for, shuffled_prompts

    opened = open_run(run_copy)
    scored = score_run(run_copy, ["hessian_free", "loss"], measurement="pairing")
    assert "hessian_free+pairing" in scored and "loss" in scored  # the loss does not use the query
    ckpt = opened.best.path
    loaded = load_model("tiny-llama", seed=0)
    model = load_adapter(loaded, ckpt, trainable=True).eval()  # gradients are taken in eval mode (no dropout)
    params = dict(model.named_parameters())
    names = [n for n in params if params[n].requires_grad]
    shuffled = shuffled_prompts(opened.val, opened.spec.seed)
    assert all(
        a["id"] == b["id"] and a["output"] == b["output"] for a, b in zip(opened.val, shuffled, strict=True)
    )
    assert all(
        a["instruction"] + a.get("input", "") != b["instruction"] + b.get("input", "")
        for a, b in zip(opened.val, shuffled, strict=True)
    )

    def row_grad(row):
        enc = encode_for(opened.spec, [row], loaded.tokenizer)
        ids, labels = torch.tensor([enc.input_ids[0]]), torch.tensor(enc.labels[0][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
        return torch.autograd.grad(loss, [params[n] for n in names])

    total = None
    for own, other in zip(opened.val, shuffled, strict=True):
        diff = [a - b for a, b in zip(row_grad(own), row_grad(other), strict=True)]
        total = diff if total is None else [t + d for t, d in zip(total, diff, strict=True)]
    v = {n: (t / len(opened.val)).reshape(-1).double() for n, t in zip(names, total, strict=True)}
    train = GradientStore.open(RunLayout(run_copy).grads(ckpt, "train"))
    expected = np.zeros(len(train.ids))
    for block in train.block_names:
        expected -= train.load_block(block, torch.float64).numpy() @ v[block + ".weight"].numpy()
    got = pd.Series(scored["hessian_free+pairing"].values, index=scored["hessian_free+pairing"].train_ids)
    np.testing.assert_allclose(
        got.loc[train.ids].to_numpy(), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )


def test_shapley_methods_value_the_tuned_models_embeddings(run_copy):
    """knn_shapley = -KNN-Shapley of per-row mean hidden states (computed here row by row) with the rows' classes."""
    from infscope.estimators.shapley import knn_shapley
    from infscope.models.lora import load_adapter
    from infscope.models.registry import load_model
    from infscope.scoring import open_run
    from infscope.scoring.gradients import encode_for

    opened = open_run(run_copy)
    scored = score_run(
        run_copy,
        ["knn_shapley", "data_oob", "tmc_shapley"],
        options={"tmc_shapley": {"max_permutations": 40}},
    )
    loaded = load_model("tiny-llama", seed=0)
    model = load_adapter(loaded, opened.best.path).eval()

    def embed(row):
        enc = encode_for(opened.spec, [row], loaded.tokenizer)
        with torch.no_grad():
            hidden = model(
                input_ids=torch.tensor([enc.input_ids[0]]), output_hidden_states=True
            ).hidden_states[-1]
        return hidden[0].double().mean(dim=0).numpy()

    train_x = np.stack([embed(r) for r in opened.train])
    query_x = np.stack([embed(r) for r in opened.val])
    train_y = np.array([r["class"] for r in opened.train])
    query_y = np.array([r["class"] for r in opened.val])
    expected = -knn_shapley(train_x, train_y, query_x, query_y, k=10)
    got = pd.Series(scored["knn_shapley"].values, index=scored["knn_shapley"].train_ids)
    ids = [str(r["id"]) for r in opened.train]
    np.testing.assert_allclose(got.loc[ids].to_numpy(), expected, rtol=1e-6, atol=1e-9)
    tmc = scored["tmc_shapley"]
    assert tmc.meta["n_utility_calls"] > 0 and "mtm_r2" in tmc.meta
    assert np.isfinite(scored["data_oob"].values).all()


def test_checkpoint_all_on_a_one_epoch_run_lists_each_method_once(tmp_path):
    out = tmp_path / "one"
    run_pipeline(PipelineConfig(**{**SMALL, "epochs": 1, "methods": ("loss", "random")}), out)
    scored = score_run(out, ["loss", "hessian_free"], checkpoint="all")
    assert sorted(scored) == ["hessian_free", "loss"]
    assert sorted(p.stem for p in RunLayout(out).scores_dir.glob("*.npz")) == [
        "hessian_free",
        "loss",
        "random",
    ]


def test_run_inputs_free_their_gradients_and_models_with_them(run_copy):
    """Values computed once per RunInputs live on the instance: nothing keeps a scored run's inputs alive."""
    import gc
    import weakref

    from infscope.scoring import RunInputs, open_run

    opened = open_run(run_copy)
    inputs = RunInputs(opened, opened.best, opened.val)
    assert inputs.train_grads() is inputs.train_grads()  # computed once
    assert inputs.model() is inputs.model("checkpoint")
    ref = weakref.ref(inputs)
    del inputs
    gc.collect()
    assert ref() is None


def test_demo_canaries_from_validation_rows_leave_the_validation_set(tmp_path, capsys):
    """``auto`` takes validation rows when half the validation set stays: 1 canary of 24 rows, 6 -> 5 rows."""
    from infscope.noise.canaries import canary_count
    from infscope.runs import RunDir, read_jsonl
    from infscope.scoring import open_run

    out = tmp_path / "canary"
    cfg = {**SMALL, "epochs": 1, "methods": ("loss",), "canaries": 0.05}
    run_pipeline(PipelineConfig(**cfg), out)
    canaries = RunDir.open(out).record.canaries
    written_val = read_jsonl(RunLayout(out).val)
    assert canaries["source"] == "validation"
    assert len(canaries["source_ids"]) == canary_count(0.05, 24) == 1
    opened = open_run(out)
    assert [r["id"] for r in opened.val] == [
        r["id"] for r in written_val if r["id"] not in canaries["source_ids"]
    ]
    canary_rows = {r["id"]: r for r in opened.train if r["id"] in canaries["ids"]}
    source = next(r for r in written_val if r["id"] == canaries["source_ids"][0])
    (canary,) = canary_rows.values()
    assert canary["instruction"] == source["instruction"] and canary["output"] != source["output"]
    with pytest.raises(InfscopeError, match="unknown canary source"):
        PipelineConfig(**{**cfg, "canary_source": "test"})
    with pytest.raises(InfscopeError, match="would leave fewer than 4 for validation"):  # 6 of 6 rows
        PipelineConfig(**{**cfg, "canaries": 0.25, "canary_source": "validation"})
