"""The HTML report: collected numbers against sklearn/scipy/numpy, escaping, self-containment, CLI, browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.report import collect, write_report
from infscope.report.diff import tokenize, word_diff_html
from infscope.report.html import json_for_script, render_html
from infscope.report.png import matplotlib_available
from infscope.runs import ModelSpec, RunDir, RunLayout, RunRecord

N_ROWS = 40
FAMILIES = {"grammar": range(0, 5), "semantic": range(5, 9), "quality": range(9, 12)}
EVIL = '<script>alert(1)</script> "quoted" café — 日本語'
EVIL_ROW = 2  # a noisy grammar row whose text carries markup, quotes and non-ASCII


def _rows_and_manifest(task: str = "instruction") -> tuple[list[dict], list[dict], list[dict]]:
    family_of = {i: fam for fam, idx in FAMILIES.items() for i in idx}
    rows, clean, manifest = [], [], []
    for i in range(N_ROWS):
        rid = f"r{i:02d}"
        original = f"The cat sat on mat number {i}."
        noisy_text = f"Cat the sat on on mat number {i}." if i in family_of else original
        if i == EVIL_ROW:
            noisy_text = f"The cat {EVIL} sat."
        if task == "instruction":
            base = {"id": rid, "instruction": f"Describe item {i}", "input": "" if i % 2 else f"ctx {i}"}
            rows.append({**base, "output": noisy_text})
            clean.append({**base, "output": original})
            field = "output"
        else:
            rows.append({"id": rid, "text": noisy_text, "label": i % 3})
            clean.append({"id": rid, "text": original, "label": i % 3})
            field = "text"
        noisy = i in family_of
        manifest.append(
            {
                "id": rid,
                "is_noisy": noisy,
                "family": family_of.get(i),
                "operator": f"{family_of[i]}_op" if noisy else None,
                "field": field if noisy else None,
                "original": original if noisy else None,
                "noisy": noisy_text if noisy else None,
                "label_changed": False,
                "severity": 0.5 if noisy else 0.0,
                "seed": 0,
            }
        )
    return rows, clean, manifest


def _scores() -> dict[str, np.ndarray]:
    """Known scores: a good method, a weaker one with ties, and noise."""
    rng = np.random.default_rng(7)
    noisy = np.zeros(N_ROWS, dtype=bool)
    noisy[:12] = True
    return {
        "loss": noisy * 1.0 + rng.normal(0, 0.6, N_ROWS),
        "datainf": np.round(noisy * 0.5 + rng.normal(0, 0.5, N_ROWS), 1),  # ties on purpose
        "random": rng.normal(0, 1, N_ROWS),
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _fake_finetune(layout: RunLayout) -> None:
    """The files a finished fine-tuning leaves that opening a run reads (checkpoint list, trainer state)."""
    checkpoint = layout.finetune / "checkpoints" / "epoch-1"
    checkpoint.mkdir(parents=True)
    info = {"path": str(checkpoint), "epoch": 1, "step": 5, "lr": 0.0, "val_loss": 1.0, "train_loss": 1.5}
    (layout.finetune / "checkpoints.json").write_text(json.dumps({"checkpoints": [info]}))
    config = {"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "linear"}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"config": config}))


STAGES = {  # run.json keeps keys sorted: "order" says in which order the stages ran
    "data": {"order": 1, "seconds": 0.5, "peak_rss_mb": 100.0, "info": {}},
    "finetune": {"order": 3, "seconds": 12.25, "peak_rss_mb": 900.5, "info": {}},
    "gradients:epoch-1": {"order": 4, "seconds": 2.0, "peak_rss_mb": 500.0, "info": {}},
    "noise": {"order": 2, "seconds": 0.25, "peak_rss_mb": 110.0, "info": {}},
    "score": {
        "order": 5,
        "seconds": 3.0,
        "peak_rss_mb": 300.0,
        "info": {"checkpoint_tag": "epoch-1", "methods": {"datainf": {"seconds": 0.75, "peak_rss_mb": 40.0}}},
    },
}


def make_run(
    root: Path, task: str = "instruction", *, kind: str = "demo", manifest: Path | None = None
) -> Path:
    """A finished run as ``infscope demo`` lays it out (``kind="finetune"``: no clean rows, and the
    manifest, if any, outside the run at ``manifest``), with known scores."""
    rows, clean, records = _rows_and_manifest(task)
    labels = [0, 1, 2] if task == "classification" else None
    demo = kind == "demo"
    record = RunRecord(
        kind=kind,
        model=ModelSpec(name="tiny-llama", task=task, label_names=labels),
        manifest="data/manifest.jsonl" if demo else (str(manifest) if manifest else None),
        args={"model": "tiny", "note": "</script><!-- arg"},
        versions={"python": "3.11"},
        created="2025-01-01T00:00:00",
        stages=json.loads(json.dumps(STAGES)),
    )
    layout = RunDir.create(root / "run", record).layout
    _write_jsonl(layout.train, rows)
    _write_jsonl(layout.val, rows[:2])
    if demo:
        _write_jsonl(layout.train_clean, clean)
        _write_jsonl(layout.manifest, records)
    elif manifest is not None:
        _write_jsonl(manifest, records)
    _fake_finetune(layout)
    ids = np.array([r["id"] for r in rows])
    shuffle = np.random.default_rng(1).permutation(N_ROWS)  # tables need not be in manifest order
    for method, values in _scores().items():
        order = np.argsort(-values, kind="stable")
        ranks = np.empty(N_ROWS, dtype=np.int64)
        ranks[order] = np.arange(1, N_ROWS + 1)
        frame = pd.DataFrame({"id": ids, "score": values, "rank": ranks, "is_flagged": ranks <= 4})
        layout.results_dir.mkdir(exist_ok=True)
        frame.iloc[shuffle].to_parquet(layout.results(method), index=False)
    Scores(_scores()["loss"], list(ids), method="loss", meta={"seconds": 1.5}).save(layout.scores("loss"))
    return layout.root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def _truth() -> tuple[np.ndarray, np.ndarray]:
    _, _, manifest = _rows_and_manifest()
    noisy = np.array([m["is_noisy"] for m in manifest])
    families = np.array([m["family"] or "" for m in manifest], dtype=object)
    return noisy, families


# ------------------------------------------------------------------ collect: numbers


def test_leaderboard_matches_sklearn(run_dir):
    data = collect(run_dir, top_k=5)
    noisy, _ = _truth()
    scores = _scores()
    board = {e["method"]: e for e in data["leaderboard"]}
    assert set(board) == set(scores)
    for method, values in scores.items():
        assert board[method]["auroc"] == pytest.approx(roc_auc_score(noisy, values), abs=1e-12)
        assert board[method]["ap"] == pytest.approx(average_precision_score(noisy, values), abs=1e-12)
        assert board[method]["k"] == 12
    for method in ("loss", "random"):  # no ties: P@k is a plain top-k count
        top = np.argsort(-scores[method])[:12]
        assert board[method]["p_at_k"] == pytest.approx(noisy[top].mean())
    aurocs = [e["auroc"] for e in data["leaderboard"]]
    assert aurocs == sorted(aurocs, reverse=True)
    assert data["methods"] == [e["method"] for e in data["leaderboard"]]
    assert board["loss"]["n_flagged"] == 4
    assert board["loss"]["seconds"] == 1.5  # from scores/loss.npz metadata
    assert board["datainf"]["seconds"] == 0.75  # from run.json stages.score.info.methods
    assert board["datainf"]["peak_rss_mb"] == 40.0
    assert board["random"]["seconds"] is None


def test_roc_and_detection_curves_match_sklearn(run_dir):
    data = collect(run_dir)
    noisy, _ = _truth()
    for method, values in _scores().items():
        fpr, tpr, _ = roc_curve(noisy, values, drop_intermediate=False)
        curve = data["curves"][method]["roc"]
        np.testing.assert_allclose(curve["fpr"], fpr, atol=1e-12)
        np.testing.assert_allclose(curve["tpr"], tpr, atol=1e-12)
        det = data["curves"][method]["detection"]
        order = np.argsort(-values, kind="stable")
        distinct = np.append(np.diff(values[order]) != 0, True)
        found = np.cumsum(noisy[order])[distinct] / noisy.sum()
        np.testing.assert_allclose(det["y"][1:], found)
        np.testing.assert_allclose(det["x"][1:], (np.flatnonzero(distinct) + 1) / N_ROWS)


def test_family_auroc_matches_sklearn_subsets(run_dir):
    data = collect(run_dir)
    noisy, families = _truth()
    fam = data["family_auroc"]
    assert fam["families"] == sorted(FAMILIES)
    assert fam["counts"] == {f: len(idx) for f, idx in FAMILIES.items()}
    for i, method in enumerate(fam["methods"]):
        values = _scores()[method]
        for j, family in enumerate(fam["families"]):
            keep = ~noisy | (families == family)
            assert fam["values"][i][j] == pytest.approx(roc_auc_score(noisy[keep], values[keep]), abs=1e-12)


def test_histograms_and_spearman_match_numpy_scipy(run_dir):
    data = collect(run_dir)
    noisy, _ = _truth()
    scores = _scores()
    for method, values in scores.items():
        hist = data["distributions"][method]
        edges = np.histogram_bin_edges(values, bins=20)
        np.testing.assert_allclose(hist["edges"], edges)
        assert hist["clean"] == np.histogram(values[~noisy], bins=edges)[0].tolist()
        assert hist["noisy"] == np.histogram(values[noisy], bins=edges)[0].tolist()
        assert sum(hist["clean"]) + sum(hist["noisy"]) == N_ROWS
    corr = data["correlation"]
    for i, a in enumerate(corr["methods"]):
        for j, b in enumerate(corr["methods"]):
            assert corr["values"][i][j] == pytest.approx(spearmanr(scores[a], scores[b]).statistic, abs=1e-12)


def test_stages_come_from_run_json(run_dir):
    stages = collect(run_dir)["stages"]
    assert [s["stage"] for s in stages] == ["data", "noise", "finetune", "gradients:epoch-1", "score"]
    assert stages[2] == {"stage": "finetune", "seconds": 12.25, "peak_rss_mb": 900.5}


def test_flagged_rows_are_top_k_with_noise_and_text(run_dir):
    data = collect(run_dir, top_k=5)
    noisy, families = _truth()
    rows, _, manifest = _rows_and_manifest()
    for method, values in _scores().items():
        flagged = [r for r in data["flagged"] if r["method"] == method]
        expected = [f"r{i:02d}" for i in np.argsort(-values, kind="stable")[:5]]
        assert [r["id"] for r in flagged] == expected
        assert [r["rank"] for r in flagged] == [1, 2, 3, 4, 5]
        for r in flagged:
            i = int(r["id"][1:])
            assert r["is_noisy"] == noisy[i]
            assert r["family"] == families[i]
            assert r["fields"] == {k: rows[i][k] for k in ("instruction", "input", "output")}
            assert r["original_text"] == (manifest[i]["original"] or "")
            assert r["score"] == pytest.approx(values[i])
    assert len(collect(run_dir, top_k=1000)["flagged"]) == 3 * N_ROWS


def test_classification_rows_show_text_and_label(tmp_path):
    data = collect(make_run(tmp_path, task="classification"), top_k=3)
    assert data["run"]["task"] == "classification"
    assert data["run"]["fields"] == ["text", "label"]
    first = data["flagged"][0]
    assert set(first["fields"]) == {"text", "label"}
    assert first["fields"]["label"] == str(int(first["id"][1:]) % 3)


def test_run_without_noise_reports_undefined_metrics(run_dir):
    path = run_dir / "data" / "manifest.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record.update(is_noisy=False, family=None, operator=None, field=None, original=None, noisy=None)
    _write_jsonl(path, records)
    data = collect(run_dir, top_k=2)
    assert data["run"]["n_noisy"] == 0 and data["family_auroc"]["families"] == []
    assert all(e["auroc"] is None and e["ap"] is None and e["p_at_k"] is None for e in data["leaderboard"])
    assert all(c["roc"] == {"fpr": [], "tpr": []} for c in data["curves"].values())
    page = render_html(data)
    assert "No noisy rows with a family." in page and page.count('data-family="clean"') == 6


# ------------------------------------------------------------------ finetune runs and users' manifests


def test_finetune_run_reads_its_manifest_outside_the_run(tmp_path):
    outside = tmp_path / "elsewhere" / "data.manifest.jsonl"
    run = make_run(tmp_path, kind="finetune", manifest=outside)
    data = collect(run, top_k=5)
    noisy, families = _truth()
    board = {e["method"]: e for e in data["leaderboard"]}
    for method, values in _scores().items():
        assert board[method]["auroc"] == pytest.approx(roc_auc_score(noisy, values), abs=1e-12)
    assert data["run"]["manifest"] == str(outside) and data["run"]["kind"] == "finetune"
    assert data["run"]["checkpoint"] == "epoch-1" and data["family_auroc"]["families"] == sorted(FAMILIES)
    _, _, manifest = _rows_and_manifest()
    for row in data["flagged"]:  # no clean copy in a finetune run: the manifest's original text
        assert row["original_text"] == (manifest[int(row["id"][1:])]["original"] or "")


def test_finetune_run_whose_manifest_moved_says_where_it_was(tmp_path):
    outside = tmp_path / "elsewhere" / "data.manifest.jsonl"
    run = make_run(tmp_path, kind="finetune", manifest=outside)
    outside.unlink()
    with pytest.raises(InfscopeError, match=f"has no {re.escape(str(outside))} .*put the file back"):
        collect(run)


def test_users_list_of_bad_ids_replaces_the_manifest(run_dir, tmp_path):
    bad = ["r00", "r07", "r30"]
    ids_file = tmp_path / "bad.txt"
    ids_file.write_text("\n".join([*bad, "val-1"]) + "\n")  # val-1 is no training row
    data = collect(run_dir, manifest=ids_file)
    truth = np.array([f"r{i:02d}" in bad for i in range(N_ROWS)])
    board = {e["method"]: e for e in data["leaderboard"]}
    for method, values in _scores().items():
        assert board[method]["auroc"] == pytest.approx(roc_auc_score(truth, values), abs=1e-12)
        assert board[method]["k"] == 3
    assert data["run"]["n_noisy"] == 3 and data["family_auroc"]["families"] == []  # no family given
    assert any("1 manifest rows are not training rows" in w for w in data["warnings"])
    assert "No noisy rows with a family." in render_html(data)


def test_finetune_run_without_manifest_is_reported_with_a_warning(tmp_path):
    data = collect(make_run(tmp_path, kind="finetune"), top_k=2)
    assert data["run"]["n_noisy"] == 0 and data["run"]["manifest"] == ""
    assert all(e["auroc"] is None for e in data["leaderboard"])
    assert any("no manifest of known-bad rows" in w for w in data["warnings"])
    values = _scores()["loss"]
    hist = data["distributions"]["loss"]
    assert hist["clean"] == np.histogram(values, bins=np.histogram_bin_edges(values, bins=20))[0].tolist()
    assert "no manifest" in render_html(data)


def test_histogram_counts_match_a_plain_loop_and_constant_scores_correlate_as_none():
    from infscope.report.collect import score_histograms, spearman_matrix

    rng = np.random.default_rng(3)
    values = rng.normal(size=60)
    noisy = rng.random(60) < 0.3
    hist = score_histograms(values, noisy, bins=7)
    edges = hist["edges"]
    for name, flag in (("clean", False), ("noisy", True)):
        counts = [0] * 7
        for value, is_noisy in zip(values, noisy, strict=True):
            if bool(is_noisy) == flag:
                counts[min(int(np.searchsorted(edges, value, side="right")) - 1, 6)] += 1
        assert hist[name] == counts
    table = pd.DataFrame({"a": values, "b": np.round(values, 0), "flat": np.ones(60)})
    corr = spearman_matrix(table)
    assert corr[0][1] == pytest.approx(spearmanr(values, np.round(values, 0)).statistic, abs=1e-12)
    assert corr[0][2] is None and corr[2][2] is None


# ------------------------------------------------------------------ escaping and self-containment


def test_html_escapes_row_text_and_is_self_contained(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "out" / "report.html", top_k=40, png=False)
    page = out.read_text(encoding="utf-8")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;quoted&quot;" in page
    assert "café — 日本語" in page
    assert len(re.findall(r"<script", page)) == 2  # the JSON block and the report's own script
    assert "</script><!--" not in page
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|img|iframe)\b|\bsrc\s*=", page, re.IGNORECASE)
    assert page.count("<svg") == 2 + 1 + 3 + 2 + 1  # curves, family map, histograms, stage bars, correlation
    embedded = re.search(r'<script type="application/json" id="infscope-data">(.*?)</script>', page, re.S)
    summary = json.loads(embedded.group(1))
    assert summary["run"]["args"]["note"] == "</script><!-- arg"
    assert [e["method"] for e in summary["leaderboard"]] == collect(run_dir)["methods"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # atomic: no temp files left


def test_flagged_table_rows_carry_filter_attributes(run_dir):
    page = render_html(collect(run_dir, top_k=40))
    body = page.split('id="flagged-table"')[1]
    assert len(re.findall(r'<tr data-method="loss" data-family="grammar"', body)) == 5
    assert len(re.findall(r'<tr data-method="[^"]+" data-family="clean"', body)) == 3 * 28
    assert "<del>" in body and "<ins>" in body


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.text() | st.integers() | st.booleans(), _containers, max_leaves=10))
def test_json_for_script_round_trips_without_breakout(obj):
    text = json_for_script(obj)
    assert json.loads(text) == obj
    assert "<" not in text and ">" not in text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab <>&\"'é.\n", max_size=30), st.text(alphabet="ab <>&\"'é.\n", max_size=30))
def test_word_diff_reconstructs_both_texts(original, noisy):
    out = word_diff_html(original, noisy)
    assert "".join(tokenize(original)) == original
    assert html.unescape(re.sub(r"<ins>.*?</ins>|</?del>", "", out, flags=re.S)) == original
    assert html.unescape(re.sub(r"<del>.*?</del>|</?ins>", "", out, flags=re.S)) == noisy
    assert not re.search(r"<(?!/?(?:ins|del)>)", out)  # no tag other than ins/del


def test_word_diff_marks_changed_words():
    assert word_diff_html("the cat sat", "the dog sat") == "the <del>cat</del><ins>dog</ins> sat"


# ------------------------------------------------------------------ errors and CLI


def test_missing_results_and_manifest_raise_clear_errors(run_dir):
    (run_dir / "data" / "manifest.jsonl").unlink()  # the manifest the run recorded is gone
    with pytest.raises(InfscopeError, match=r"no data/manifest\.jsonl.*infscope"):
        collect(run_dir)
    shutil.rmtree(run_dir / "results")
    with pytest.raises(InfscopeError, match=r"no results/<method>\.parquet.*infscope demo"):
        collect(run_dir)


def test_results_for_other_rows_are_refused(run_dir):
    frame = pd.read_parquet(run_dir / "results" / "loss.parquet").iloc[1:]
    frame.to_parquet(run_dir / "results" / "loss.parquet", index=False)
    with pytest.raises(InfscopeError, match="loss.parquet has no score for"):
        collect(run_dir)


def test_cli_writes_report_and_prints_path(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(run_dir), "--out", str(out), "--top-k", "3", "--no-png"]) == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_text(encoding="utf-8").count('<tr data-method="') == 9
    assert main(["report", str(run_dir), "--no-png"]) == 0
    assert (run_dir / "report.html").exists()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda run: shutil.rmtree(run / "results"), "results/"),
        (lambda run: (run / "data" / "manifest.jsonl").unlink(), "manifest.jsonl"),
        (lambda run: None, "--top-k must be at least 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(run_dir, capsys, setup, expected):
    setup(run_dir)
    extra = ["--top-k", "0"] if expected.startswith("--top-k") else []
    assert main(["report", str(run_dir), "--no-png", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_cli_missing_run_dir_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ PNG figures


def test_png_requested_without_matplotlib_is_a_clear_error(run_dir, monkeypatch):
    monkeypatch.setattr("infscope.report.png.matplotlib_available", lambda: False)
    with pytest.raises(InfscopeError, match="matplotlib"):
        write_report(run_dir, png=True)
    assert not (run_dir / "report.html").exists()


@pytest.mark.skipif(
    not matplotlib_available(), reason="matplotlib is not installed (PNG figures are optional)"
)
def test_png_figures_are_written_next_to_the_report(run_dir):
    out = write_report(run_dir, top_k=5, png=True)
    pngs = sorted(p.name for p in (run_dir / "report_files").iterdir())
    expected = [
        "correlation.png",
        "detection.png",
        "distributions.png",
        "family_auroc.png",
        "roc.png",
        "stages.png",
    ]
    assert pngs == expected
    for name in pngs:
        data = (run_dir / "report_files" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "report_files/roc.png" in out.read_text(encoding="utf-8")


# ------------------------------------------------------------------ headless browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not on PATH; install Debian's `chromium` package to run browser tests",
)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@needs_chromium
def test_browser_applies_hash_filter(run_dir, tmp_path):
    out = write_report(run_dir, top_k=40, png=False)
    result = _chromium(tmp_path, "--dump-dom", f"{out.resolve().as_uri()}#method=loss&family=grammar")
    dom = result.stdout
    assert 'data-ready="1"' in dom, result.stderr[-2000:]
    assert 'data-filter="method=loss;family=grammar"' in dom
    rows = re.findall(r"<tr (data-method=\"[^\"]*\" data-family=\"[^\"]*\")([^>]*)>", dom)
    assert len(rows) == 3 * N_ROWS
    visible = [attrs for attrs, rest in rows if "hidden" not in rest]
    assert visible == ['data-method="loss" data-family="grammar"'] * 5
    assert "5 of 120 rows shown" in dom
    assert dom.count("<svg") == 9 and 'id="leaderboard-table"' in dom
    assert "alert(1)" in dom and "<script>alert" not in dom


@needs_chromium
def test_browser_screenshot_is_a_png(run_dir, tmp_path):
    out = write_report(run_dir, top_k=10, png=False)
    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", out.resolve().as_uri())
    assert shot.exists(), result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
