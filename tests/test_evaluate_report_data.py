"""Report data: every number checked against pandas/sklearn or a plain loop, and strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from infscope.errors import InfscopeError
from infscope.evaluate.report_data import build_report_data, spearman_matrix


def _run(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.25
    family = np.where(noisy, rng.choice(["grammar", "label"], n), "")
    operator = np.where(noisy, rng.choice(["typo", "flip", "swap"], n), "")
    manifest = pd.DataFrame(
        {"id": [f"r{i}" for i in range(n)], "is_noisy": noisy, "family": family, "operator": operator}
    )
    good = rng.normal(size=n) + 2.0 * noisy
    weak = rng.normal(size=n) + 0.5 * noisy * (family == "label")
    rand = np.round(rng.normal(size=n), 1)  # ties
    perm = rng.permutation(n)
    scores = {
        "weak": weak,  # array in manifest order
        "good": pd.DataFrame({"id": manifest["id"].to_numpy()[perm], "score": good[perm]}),
        "random": pd.Series(rand, index=manifest["id"]),
    }
    return manifest, scores, {"good": good, "weak": weak, "random": rand}


def test_report_data_values_match_independent_references():
    manifest, scores, raw = _run()
    noisy = manifest["is_noisy"].to_numpy()
    data = build_report_data(scores, manifest, costs={"good": {"seconds": 3.5, "peak_mb": 120.0}}, ks=(10,))
    json.dumps(data, allow_nan=False)
    assert data["methods"][0] == "good" and data["n"] == 200 and data["n_noisy"] == int(noisy.sum())
    assert [row["method"] for row in data["leaderboard"]] == data["methods"]
    assert data["leaderboard"][0]["seconds"] == 3.5 and data["leaderboard"][1]["seconds"] is None
    for method in data["methods"]:
        assert data["curves"][method]["auroc"] == pytest.approx(roc_auc_score(noisy, raw[method]), abs=1e-12)
        assert len(data["curves"][method]["roc"]["fpr"]) <= 201
    matrix = data["group_auroc"]["family"]
    assert matrix["groups"] == ["grammar", "label"] and matrix["methods"] == data["methods"]
    family = manifest["family"].to_numpy()
    for i, method in enumerate(matrix["methods"]):
        for j, group in enumerate(matrix["groups"]):
            keep = ~noisy | (family == group)
            expected = roc_auc_score(noisy[keep], raw[method][keep])
            assert matrix["values"][i][j] == pytest.approx(expected, abs=1e-12)
    assert set(data["group_auroc"]["operator"]["groups"]) == {"typo", "flip", "swap"}
    assert data["detection"]["good"]["precision_at_k"]["10"] is not None


def test_histograms_count_like_a_plain_loop():
    manifest, scores, raw = _run(n=80, seed=1)
    noisy = manifest["is_noisy"].to_numpy()
    data = build_report_data(scores, manifest, bins=7)
    hist = data["histograms"]["weak"]
    edges = hist["edges"]
    assert (
        len(edges) == 8
        and edges[0] == pytest.approx(raw["weak"].min())
        and edges[-1] == pytest.approx(raw["weak"].max())
    )
    for name, flag in (("clean", False), ("noisy", True)):
        counts = [0] * 7
        for value, is_noisy in zip(raw["weak"], noisy, strict=True):
            if bool(is_noisy) == flag:
                b = min(int(np.searchsorted(edges, value, side="right")) - 1, 6)
                counts[b] += 1
        assert hist[name] == counts


def test_spearman_matches_pandas_including_ties_and_constant_rows():
    manifest, scores, raw = _run(n=150, seed=2)
    data = build_report_data(scores, manifest)
    methods = data["correlation"]["methods"]
    frame = pd.DataFrame({m: raw[m] for m in methods})
    expected = frame.corr(method="spearman").to_numpy()
    np.testing.assert_allclose(np.array(data["correlation"]["spearman"], dtype=float), expected, atol=1e-12)
    with_constant = spearman_matrix(np.stack([raw["good"], np.ones(150)]))
    assert (
        with_constant[0, 0] == pytest.approx(1.0)
        and np.isnan(with_constant[0, 1])
        and np.isnan(with_constant[1, 1])
    )


def test_report_data_bad_input():
    manifest, scores, _ = _run(n=20)
    with pytest.raises(InfscopeError, match="no scores"):
        build_report_data({}, manifest)
    with pytest.raises(InfscopeError, match="'severity'"):
        build_report_data(scores, manifest, by=("severity",))
    with pytest.raises(InfscopeError, match="'short' have 19 values but the manifest has 20 rows"):
        build_report_data({"short": np.zeros(19)}, manifest)
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(19)], "score": np.zeros(19)})
    with pytest.raises(InfscopeError, match="r19"):
        build_report_data({"partial": frame}, manifest)
