"""``infscope bench``: spec validation, expansion, results tables, aggregation over seeds, resume.

The end-to-end tests share one real benchmark (tiny Llama, 2 seeds, 12 training rows) built once
per module; everything else works on specs and synthetic evaluations without running models.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from rich.console import Console

from infscope import pipeline
from infscope.bench.config import expand_spec, load_spec, parse_spec
from infscope.bench.results import RESULT_COLUMNS, aggregate_results, results_frame, run_rows
from infscope.bench.summary import render_summary
from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.pipeline import PipelineConfig

T_975_DF1 = 12.706204736174705  # Student t quantile 0.975 with 1 degree of freedom (tables / scipy)
METHODS = ["datainf", "hessian_free", "loss", "random"]
MINI = {
    "name": "mini",
    "description": "two seeds of a tiny run",
    "axes": {
        "datasets": [{"name": "sentence_transform", "classes": 2, "train_per_class": 6, "val_per_class": 2}],
        "noise": [{"strategy": "balanced", "ratio": 0.2}],
        "models": [{"name": "tiny-llama", "epochs": 1, "max_length": 64}],
        "methods": METHODS,
        "seeds": [0, 1],
    },
}
RUNS = [
    "sentence_transform/balanced-0.2/tiny-llama/seed-0",
    "sentence_transform/balanced-0.2/tiny-llama/seed-1",
]


def _write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _with_axes(**changes) -> dict:
    data = json.loads(json.dumps(MINI))
    data["axes"].update(changes)
    return data


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**MINI, "axis": {}}, "unknown key 'axis'; valid keys: name, description, axes, grids, device"),
        (
            _with_axes(datasets=[{"name": "sentence_transform", "clases": 2}]),
            "axes.datasets[0]: unknown key 'clases'; valid keys: name, label, classes",
        ),
        (_with_axes(datasets=["imdb"]), "unknown dataset 'imdb'; built-in datasets: sentence_transform"),
        (
            _with_axes(noise=[{"strategy": "balanced", "ratio": 1.5}]),
            "axes.noise[0].ratio: must be a number in [0, 1]",
        ),
        (
            _with_axes(noise=[{"strategy": "loud", "ratio": 0.2}]),
            "unknown strategy 'loud'; choose from balanced",
        ),
        (
            _with_axes(noise=[{"weights": {"nonsense": 1}, "ratio": 0.2}]),
            "axes.noise[0].weights: unknown noise family",
        ),
        (
            _with_axes(models=[{"name": "tiny-llama", "epoch": 1}]),
            "unknown key 'epoch'; valid keys: name, label, rank",
        ),
        (_with_axes(models=["minilm"]), "model 'minilm' cannot do causal"),
        (
            _with_axes(models=[{"name": "tiny-llama", "lora_layers": "top:none"}]),
            "axes.models[0].lora_layers: --lora-layers 'top:none' is not understood",
        ),
        (_with_axes(methods=["datainf", "magic"]), "axes.methods: unknown method 'magic'"),
        (_with_axes(seeds=[0, 0]), "axes.seeds: repeats a seed"),
        (_with_axes(peers=["kronfluence_magic"]), "axes.peers: unknown peer 'kronfluence_magic'"),
        (_with_axes(attribution="yes"), "axes.attribution: must be true or false"),
        (
            _with_axes(models=[{"name": "tiny-llama", "rank": 4}, {"name": "tiny-llama", "rank": 8}]),
            "two models share the directory label 'tiny-llama'; give each a distinct 'label'",
        ),
        ({"name": "x", "description": "no axes"}, "needs 'axes' (one grid) or 'grids'"),
    ],
)
def test_bad_spec_exits_2_with_one_line_naming_the_key(tmp_path, capsys, data, expected):
    spec = _write_spec(tmp_path / "spec.yaml", data)
    code = main(["bench", "run", str(spec), "--out", str(tmp_path / "out"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in " ".join(err.split())
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_spec_name_seeds_and_yaml_exit_2(tmp_path, capsys):
    assert main(["bench", "run", "no-such-spec", "--out", str(tmp_path), "--dry-run"]) == 2
    assert "built-in specs: quick, demo, datainf-paper" in capsys.readouterr().err
    assert main(["bench", "run", "quick", "--out", str(tmp_path), "--seeds", "0,x", "--dry-run"]) == 2
    assert "--seeds '0,x' is not a comma-separated list" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\naxes: [unclosed\n", encoding="utf-8")
    assert main(["bench", "run", str(broken), "--out", str(tmp_path), "--dry-run"]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err


# ---------------------------------------------------------------- expansion


def test_expansion_counts_names_and_configs():
    data = _with_axes(
        datasets=[
            {"name": "sentence_transform", "classes": 3},
            {"name": "sentence_transform", "label": "st-para", "paraphrase": True},
        ],
        noise=[
            {"strategy": "balanced", "ratio": [0, 0.1]},
            {"weights": "grammar=1,label=1", "ratio": 0.3},
            {"strategy": "grammar_heavy", "ratio": 0},  # the same clean run again: dropped
        ],
        models=[{"name": "tiny-llama", "rank": 4, "lr": 0.01}],
        methods="datainf,tracin",
        seeds=[3, 7],
    )
    combos = expand_spec(parse_spec(data, source="t.yaml"))
    assert len(combos) == 2 * 3 * 1 * 2
    names = [c.relpath.as_posix() for c in combos]
    assert len(set(names)) == len(names)
    assert names[:6] == [
        "sentence_transform/clean/tiny-llama/seed-3",
        "sentence_transform/clean/tiny-llama/seed-7",
        "sentence_transform/balanced-0.1/tiny-llama/seed-3",
        "sentence_transform/balanced-0.1/tiny-llama/seed-7",
        "sentence_transform/custom-grammar1+label1-0.3/tiny-llama/seed-3",
        "sentence_transform/custom-grammar1+label1-0.3/tiny-llama/seed-7",
    ]
    assert names[6] == "st-para/clean/tiny-llama/seed-3"
    assert combos[5].config == PipelineConfig(
        dataset="sentence_transform",
        classes=3,
        noise_ratio=0.3,
        noise_weights="grammar=1,label=1",
        model="tiny-llama",
        rank=4,
        lr=0.01,
        methods=("datainf", "tracin"),  # TracIn stays TracIn (every checkpoint), never hessian_free
        seed=7,
    )
    assert combos[6].config.paraphrase is True and combos[6].config.classes == 10
    yaml_text = "name: y\naxes: {datasets: [sentence_transform], models: [{name: tiny-llama, lr: 2e-3, lora_layers: top:1}]}"
    (only,) = expand_spec(parse_spec(yaml.safe_load(yaml_text)))
    assert (only.config.lr, only.config.lora_layers) == (0.002, "top:1")  # YAML reads 2e-3 as a string
    overridden = expand_spec(parse_spec(data), seeds=[0, 1, 2])
    assert len(overridden) == 2 * 3 * 3
    assert sorted({c.seed for c in overridden}) == [0, 1, 2]


def test_grids_share_axes_drop_identical_runs_and_refuse_collisions():
    shared = {"models": ["tiny-llama"], "seeds": [0], "methods": ["loss"]}
    same = {"datasets": ["sentence_transform"], "noise": [{"ratio": 0}]}
    spec = parse_spec({"name": "g", "axes": shared, "grids": [same, same, {**same, "attribution": True}]})
    with pytest.raises(InfscopeError, match="both write sentence_transform/clean/tiny-llama/seed-0"):
        expand_spec(spec)
    spec = parse_spec({"name": "g", "axes": shared, "grids": [same, same]})
    assert [c.relpath.as_posix() for c in expand_spec(spec)] == ["sentence_transform/clean/tiny-llama/seed-0"]


def test_builtin_specs_expand_to_the_documented_settings():
    assert [c.relpath.as_posix() for c in expand_spec(load_spec("quick"))] == [
        "sentence_transform/balanced-0.2/tiny-llama/seed-0"
    ]
    demo = expand_spec(load_spec("demo"))
    assert [c.config for c in demo] == [PipelineConfig(seed=s) for s in (0, 1, 2)]
    paper = expand_spec(load_spec("datainf-paper"))
    assert len(paper) == 12
    attribution = [c for c in paper if c.config.attribution]
    assert {c.config.dataset for c in attribution} == {"sentence_transform", "math_no_reason", "math_reason"}
    assert all(c.config.noise_ratio == 0 and c.config.model == "smollm2-135m" for c in attribution)
    assert all(c.config.methods == ("datainf", "hessian_free", "exact", "lissa") for c in attribution)
    flips = [c for c in paper if not c.config.attribution]
    assert {
        (c.config.dataset, c.config.model, c.config.noise_weights, c.config.noise_ratio) for c in flips
    } == {("sentence_transform_cls", "minilm", "label=1", 0.2)}


def test_dry_run_lists_runs_and_count(tmp_path, capsys):
    spec = _write_spec(tmp_path / "mini.yaml", MINI)
    assert (
        main(["bench", "run", str(spec), "--out", str(tmp_path / "out"), "--seeds", "0,1,2", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "3 runs (3 to run, 0 done), 12 method scorings" in out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- rows and aggregation (synthetic)


def _group(auroc, ap, p, area, n, n_noisy):
    return {"auroc": auroc, "ap": ap, "p_at_n_noisy": p, "curve_area": area, "n": n, "n_noisy": n_noisy}


def test_run_rows_flatten_detection_groups_attribution_and_costs():
    key = {
        "dataset": "d",
        "noise": "z",
        "strategy": "balanced",
        "weights": "",
        "ratio": 0.2,
        "model": "m",
        "seed": 4,
        "run": "r",
    }
    evaluation = {
        "detection": {
            "datainf": {
                **_group(0.8, 0.5, 0.4, 0.7, 10, 2),
                "by": {
                    "family": {"grammar": _group(0.9, 0.6, 1.0, 0.8, 9, 1)},
                    "operator": {"typo": _group(None, None, None, None, 9, 1)},
                },
            }
        },
        "leaderboard": [{"method": "datainf", "seconds": 1.5, "peak_mb": 300.0}],
        "attribution": {"datainf": {"auc": 0.95, "recall": 0.6}},
    }
    stages = {
        "finetune": {"seconds": 10.0, "peak_rss_mb": 500.0},
        "gradients": {"seconds": 5.0, "peak_rss_mb": 510.0},
        "score": {"seconds": 2.0, "peak_rss_mb": 520.0},
    }
    frame = results_frame(run_rows(key, evaluation, stages))
    assert list(frame.columns) == list(RESULT_COLUMNS)
    assert frame["group"].tolist() == ["all", "family:grammar", "operator:typo", "attribution"]
    assert frame["level"].tolist() == ["all", "family", "operator", "attribution"]
    assert (
        frame["auroc"].tolist()[:2] == [0.8, 0.9]
        and np.isnan(frame["auroc"][2])
        and np.isnan(frame["auroc"][3])
    )
    assert frame["p_at_k"].tolist()[:2] == [0.4, 1.0]
    assert frame.loc[3, ["auc", "recall"]].tolist() == [0.95, 0.6]
    assert frame["method_seconds"].tolist() == [1.5] * 4
    assert frame[["finetune_seconds", "gradients_peak_mb", "score_seconds"]].iloc[0].tolist() == [
        10.0,
        510.0,
        2.0,
    ]
    assert (frame["seed"] == 4).all() and (frame["run"] == "r").all()


def test_aggregate_single_seed_has_mean_but_no_interval():
    key = {
        "dataset": "d",
        "noise": "z",
        "strategy": "s",
        "weights": "",
        "ratio": 0.1,
        "model": "m",
        "seed": 0,
        "run": "r",
    }
    frame = results_frame(run_rows(key, {"detection": {"loss": _group(0.7, 0.3, 0.5, 0.6, 10, 1)}}, {}))
    agg = aggregate_results(frame).set_index("metric")
    assert agg.loc["auroc", "mean"] == 0.7 and agg.loc["auroc", "n_seeds"] == 1
    assert np.isnan(agg.loc["auroc", "std"]) and np.isnan(agg.loc["auroc", "ci_half"])


# ---------------------------------------------------------------- end to end (real tiny runs)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    spec = _write_spec(root / "mini.yaml", MINI)
    out = root / "out"
    assert main(["bench", "run", str(spec), "--out", str(out)]) == 0
    return out


def test_results_table_equals_each_runs_evaluation(bench_dir):
    results = pd.read_parquet(bench_dir / "results.parquet")
    assert list(results.columns) == list(RESULT_COLUMNS)
    csv = pd.read_csv(bench_dir / "results.csv", keep_default_na=False, na_values=[""])
    np.testing.assert_allclose(csv["auroc"].to_numpy(float), results["auroc"].to_numpy(float), equal_nan=True)
    assert sorted(results["run"].unique()) == RUNS
    for seed, run in enumerate(RUNS):
        evaluation = json.loads((bench_dir / run / "evaluation.json").read_text())
        stages = json.loads((bench_dir / run / "run.json").read_text())["stages"]
        mine = results[results["run"] == run]
        assert (mine["seed"] == seed).all() and (mine["ratio"] == 0.2).all()
        assert sorted(mine["method"].unique()) == sorted(METHODS)
        for method, report in evaluation["detection"].items():
            expected = {"all": report}
            for level, groups in report["by"].items():
                expected.update({f"{level}:{name}": g for name, g in groups.items()})
            got = mine[mine["method"] == method].set_index("group")
            assert sorted(got.index) == sorted(expected)
            for group, ref in expected.items():
                for column, field in (
                    ("auroc", "auroc"),
                    ("ap", "ap"),
                    ("p_at_k", "p_at_n_noisy"),
                    ("curve_area", "curve_area"),
                ):
                    want = np.nan if ref[field] is None else ref[field]
                    np.testing.assert_equal(got.loc[group, column], want)
                assert got.loc[group, "n_noisy"] == ref["n_noisy"] and got.loc[group, "n"] == ref["n"]
            assert got.loc["all", "method_seconds"] == stages["score"]["info"]["methods"][method]["seconds"]
            assert got.loc["all", "finetune_seconds"] == stages["finetune"]["seconds"]
            gradient_stages = [v for k, v in stages.items() if k.startswith("gradients:")]
            assert len(gradient_stages) == 1  # one scored checkpoint
            assert got.loc["all", "gradients_peak_mb"] == gradient_stages[0]["peak_rss_mb"]


def test_aggregate_over_seeds_equals_hand_computation(bench_dir):
    results = pd.read_parquet(bench_dir / "results.parquet")
    aggregate = pd.read_parquet(bench_dir / "aggregate.parquet")
    for method in METHODS:
        for metric in ("auroc", "ap", "method_seconds"):
            values = [
                results[
                    (results["run"] == run) & (results["method"] == method) & (results["group"] == "all")
                ][metric].item()
                for run in RUNS
            ]
            row = aggregate[
                (aggregate["method"] == method)
                & (aggregate["group"] == "all")
                & (aggregate["metric"] == metric)
            ]
            assert len(row) == 1 and row["n_seeds"].item() == 2
            mean = (values[0] + values[1]) / 2
            std = math.sqrt(((values[0] - mean) ** 2 + (values[1] - mean) ** 2) / (2 - 1))
            assert row["mean"].item() == pytest.approx(mean, abs=1e-12)
            assert row["std"].item() == pytest.approx(std, abs=1e-12)
            assert row["ci_half"].item() == pytest.approx(T_975_DF1 * std / math.sqrt(2), rel=1e-6, abs=1e-12)
    assert set(aggregate["dataset"]) == {"sentence_transform"} and set(aggregate["noise"]) == {"balanced-0.2"}


def test_rerun_skips_finished_runs_and_resumes_an_unfinished_one(bench_dir, monkeypatch, capsys):
    spec = _write_spec(bench_dir.parent / "mini.yaml", MINI)
    before = pd.read_parquet(bench_dir / "results.parquet")
    calls: list[str] = []
    real = pipeline.run_pipeline

    def counting(cfg, out_dir, **kwargs):
        calls.append(Path(out_dir).relative_to(bench_dir).as_posix())
        return real(cfg, out_dir, **kwargs)

    monkeypatch.setattr(pipeline, "run_pipeline", counting)
    assert main(["bench", "run", str(spec), "--out", str(bench_dir)]) == 0
    assert calls == []
    assert "0 runs done, 2 skipped" in " ".join(capsys.readouterr().out.split())
    pd.testing.assert_frame_equal(pd.read_parquet(bench_dir / "results.parquet"), before)

    # an interrupted run (no evaluation.json yet) is handed back to the pipeline, which resumes it
    (bench_dir / RUNS[1] / "evaluation.json").unlink()
    stamp = (bench_dir / RUNS[0] / "run.json").stat().st_mtime_ns
    tuned = json.loads((bench_dir / RUNS[1] / "run.json").read_text())["stages"]["finetune"]
    assert main(["bench", "run", str(spec), "--out", str(bench_dir)]) == 0
    assert calls == [RUNS[1]]
    assert (bench_dir / RUNS[0] / "run.json").stat().st_mtime_ns == stamp
    assert json.loads((bench_dir / RUNS[1] / "run.json").read_text())["stages"]["finetune"] == tuned
    after = pd.read_parquet(bench_dir / "results.parquet")
    cols = ["run", "method", "group", "auroc", "ap", "p_at_k"]
    pd.testing.assert_frame_equal(after[cols], before[cols])


def test_changed_settings_refuse_to_reuse_a_run(bench_dir, capsys):
    data = _with_axes(models=[{"name": "tiny-llama", "epochs": 2, "max_length": 64}])
    spec = _write_spec(bench_dir.parent / "changed.yaml", data)
    assert main(["bench", "run", str(spec), "--out", str(bench_dir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "made with other arguments (epochs was 1, now 2)" in err and "--overwrite" in err


def test_show_reprints_the_summary(bench_dir, capsys):
    assert main(["bench", "show", str(bench_dir)]) == 0
    out = capsys.readouterr().out
    aggregate = pd.read_parquet(bench_dir / "aggregate.parquet")
    auroc = aggregate[(aggregate["group"] == "all") & (aggregate["metric"] == "auroc")]
    assert "mini: mean ± 95% CI over seeds" in out
    assert "sentence_transform / balanced-0.2 (ratio 0.2) / tiny-llama" in out
    for method, mean in auroc[["method", "mean"]].itertuples(index=False):
        assert method in out and f"{mean:.3f}" in out
    wide = Console(width=200, record=True, file=io.StringIO())
    render_summary(aggregate, wide)
    text = wide.export_text()
    ranked = auroc.sort_values(["mean", "method"], ascending=[False, True])
    positions = [text.index(f"{m} ") for m in ranked["method"]]
    assert positions == sorted(positions)  # best AUROC first
    for mean, ci in ranked[["mean", "ci_half"]].itertuples(index=False):
        assert f"{mean:.3f} ± {ci:.3f}" in text
    assert main(["bench", "show", str(bench_dir / "nowhere")]) == 2
    assert "no results.parquet" in capsys.readouterr().err


def test_peers_run_on_finished_runs_and_are_reused(bench_dir, capsys, monkeypatch):
    """A spec's peers run after each (here already finished) run; the plain-loop reference equals our DataInf."""
    spec = _write_spec(bench_dir.parent / "peers.yaml", _with_axes(peers=["reference_datainf"]))
    assert main(["bench", "run", str(spec), "--out", str(bench_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "peers on sentence_transform / balanced-0.2" in out and "reference_datainf" in out
    peers = pd.read_parquet(bench_dir / "peers.parquet")
    assert sorted(peers["run"].unique()) == RUNS
    reference = peers[peers["method"] == "reference_datainf"]
    assert len(reference) == 2 and (reference["vs"] == "datainf").all()
    assert (reference["rel_diff"] < 1e-5).all() and (reference["spearman"] > 0.999).all()
    for run in RUNS:  # its AUROC is that of our DataInf on the same run (same scores, same manifest)
        ours = json.loads((bench_dir / run / "evaluation.json").read_text())["detection"]["datainf"]["auroc"]
        assert reference.set_index("run").loc[run, "auroc"] == pytest.approx(ours, abs=1e-9)
    assert {"ours:gradients", "ours:datainf"} <= set(peers["method"])
    import infscope.peers.registry as registry

    monkeypatch.setattr(registry, "run_peer", lambda *a, **k: pytest.fail("saved peer tables are reused"))
    assert main(["bench", "run", str(spec), "--out", str(bench_dir)]) == 0
    capsys.readouterr()
    assert main(["bench", "show", str(bench_dir)]) == 0
    assert "reference_datainf" in capsys.readouterr().out
    assert main(["bench", "show", str(bench_dir), "--markdown"]) == 0
    text = capsys.readouterr().out
    aggregate = pd.read_parquet(bench_dir / "aggregate.parquet").set_index(["method", "group", "metric"])
    datainf = aggregate.loc[("datainf", "all", "auroc")]
    assert f"| datainf | {datainf['mean']:.3f} ± {datainf['ci_half']:.2f} |" in text
    assert "AUROC per noise family" in text and "Peers on **sentence_transform / balanced-0.2" in text
    reference = peers[peers["method"] == "reference_datainf"]
    assert f"| reference_datainf | datainf | {reference['auroc'].mean():.3f} |" in text


def test_a_peer_process_that_dies_becomes_an_error_row(bench_dir):
    from infscope.peers.suite import run_isolated

    result = run_isolated(bench_dir / RUNS[0], "no_such_peer")
    assert result.scores is None and not result.ok
    assert "peer process exited with code 1" in result.error and "unknown peer 'no_such_peer'" in result.error


def test_a_peer_saved_as_not_installed_is_run_again(tmp_path):
    from infscope.peers.suite import load_peer_table

    table = [
        {"method": "reference_datainf", "error": None},
        {"method": "cleanlab", "error": "not installed: pip install cleanlab"},
    ]
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "peers.json").write_text(
        json.dumps({"peers": ["reference_datainf", "cleanlab"], "table": table})
    )
    assert load_peer_table(tmp_path, ["reference_datainf"]) is not None
    assert load_peer_table(tmp_path, ["reference_datainf", "cleanlab"]) is None
    assert load_peer_table(tmp_path, ["kronfluence_ekfac"]) is None


def test_an_interrupted_peer_suite_reruns_only_unfinished_peers(bench_dir, tmp_path, monkeypatch):
    import shutil

    import infscope.peers.registry as registry
    from infscope.peers.result import PeerResult
    from infscope.peers.suite import PARTS_DIR, run_peer_suite

    run = tmp_path / "run"
    shutil.copytree(bench_dir / RUNS[0], run)
    shutil.rmtree(run / "peers", ignore_errors=True)
    first = run_peer_suite(run, ["reference_datainf"], isolate=False)
    (run / "peers" / "peers.json").unlink()  # stopped before the table of a longer suite was written
    calls = []

    def fake(name, inputs):
        calls.append(name)
        if name == "reference_datainf":
            pytest.fail("a finished peer ran again")
        error = "not installed: pip install cleanlab" if len(calls) == 1 else None
        scores = None if error else np.arange(len(inputs.train_ids), dtype=float)
        return PeerResult(name, scores, 1.0, 2.0, error, list(inputs.train_ids))

    monkeypatch.setattr(registry, "run_peer", fake)
    table = run_peer_suite(run, ["reference_datainf", "cleanlab"], isolate=False).set_index("method")
    reference = first.set_index("method").loc["reference_datainf"]
    assert table.loc["reference_datainf", "rel_diff"] == reference["rel_diff"] < 1e-5
    assert str(table.loc["cleanlab", "error"]).startswith("not installed")
    assert (run / "peers" / PARTS_DIR / "cleanlab" / "result.json").is_file()
    (run / "peers" / "peers.json").unlink()
    table = run_peer_suite(run, ["reference_datainf", "cleanlab"], isolate=False).set_index("method")
    assert calls == ["cleanlab", "cleanlab"]  # a peer that failed (here: not installed) is tried again
    assert pd.isna(table.loc["cleanlab", "error"]) and table.loc["cleanlab", "seconds"] == 1.0
