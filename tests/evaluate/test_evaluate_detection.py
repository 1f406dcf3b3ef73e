"""Detection metrics against independent references: sklearn, plain loops, hand-computed values."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from infscope.errors import InfscopeError
from infscope.evaluate.curves import curve_area, detection_curve, roc_curve, subsample_curve
from infscope.evaluate.detection import detection_from_manifest, detection_report, summary_row
from infscope.evaluate.metrics import auroc, average_precision, average_ranks, top_k_hits_rows


def _data(seed: int, n: int = 400, ratio: float = 0.2, ties: bool = False):
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < ratio
    scores = rng.normal(size=n) + 1.2 * noisy
    if ties:
        scores = np.round(scores * 2) / 2  # a handful of distinct values, many ties
    return scores, noisy


def _loop_hits_at_k(scores, noisy, k):
    """Plain loop: expected noisy rows in the top k, a tie group at the cut-off shared out proportionally."""
    above = [i for i in range(len(scores)) if scores[i] > sorted(scores, reverse=True)[k - 1]]
    threshold = sorted(scores, reverse=True)[k - 1]
    tied = [i for i in range(len(scores)) if scores[i] == threshold]
    hits = sum(bool(noisy[i]) for i in above)
    return hits + (k - len(above)) * sum(bool(noisy[i]) for i in tied) / len(tied)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_match_sklearn(seed, ties):
    scores, noisy = _data(seed, ties=ties)
    report = detection_report(scores, noisy)
    assert report["auroc"] == pytest.approx(roc_auc_score(noisy, scores), abs=1e-12)
    assert report["ap"] == pytest.approx(average_precision_score(noisy, scores), abs=1e-12)
    assert report["n"] == 400 and report["n_noisy"] == int(noisy.sum())


def test_auroc_with_ties_is_mann_whitney_by_pair_loop():
    scores = np.array([3, 1, 2, 2, 2, 0, 3, 1], dtype=float)
    noisy = np.array([1, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    pairs = [
        1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
        for i in np.flatnonzero(noisy)
        for j in np.flatnonzero(~noisy)
    ]
    assert detection_report(scores, noisy)["auroc"] == pytest.approx(np.mean(pairs), abs=1e-15)


@pytest.mark.parametrize("ties", [False, True])
def test_precision_recall_at_k_match_plain_loop(ties):
    scores, noisy = _data(5, n=120, ties=ties)
    ks = (1, 7, 30, 120)
    report = detection_report(scores, noisy, ks=ks)
    n_noisy = int(noisy.sum())
    assert report["k_noisy"] == n_noisy
    assert list(report["precision_at_k"]) == [str(k) for k in (n_noisy, *ks)]
    for k in (n_noisy, *ks):
        hits = _loop_hits_at_k(list(scores), list(noisy), k)
        assert report["precision_at_k"][str(k)] == pytest.approx(hits / k, abs=1e-12)
        assert report["recall_at_k"][str(k)] == pytest.approx(hits / n_noisy, abs=1e-12)
    assert report["recall_at_k"]["120"] == 1.0
    assert report["p_at_n_noisy"] == report["precision_at_k"][str(n_noisy)]


def test_tie_at_cutoff_is_expectation_over_all_orderings():
    """Brute force: average precision@k over every ordering of the tied rows."""
    scores = np.array([5.0, 4.0, 4.0, 4.0, 1.0])
    noisy = np.array([True, True, False, False, True])
    k = 2
    tied = [1, 2, 3]
    values = []
    for perm in itertools.permutations(tied):
        order = [0, *perm, 4]
        values.append(sum(noisy[order[:k]]) / k)
    report = detection_report(scores, noisy, ks=(k,))
    assert report["precision_at_k"]["2"] == pytest.approx(np.mean(values), abs=1e-15)  # (1 + 1/3) / 2


def test_top_k_rows_matches_loop_per_row():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(6, 50)), 1)
    pos = rng.random((6, 50)) < 0.3
    k = rng.integers(1, 51, size=6)
    got = top_k_hits_rows(scores, pos, k)
    want = [_loop_hits_at_k(list(scores[i]), list(pos[i]), int(k[i])) for i in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_average_ranks_match_hand_values_and_rows():
    np.testing.assert_allclose(
        average_ranks(np.array([10.0, 20.0, 10.0, 30.0, 20.0, 20.0])), [1.5, 4, 1.5, 6, 4, 4]
    )
    matrix = np.array([[3.0, 3.0, 1.0], [0.0, 2.0, 1.0]])
    np.testing.assert_allclose(average_ranks(matrix), [[2.5, 2.5, 1.0], [1.0, 3.0, 2.0]])


def test_roc_curve_matches_sklearn_and_its_area_is_auroc():
    scores, noisy = _data(7, ties=True)
    fpr, tpr, thresholds = roc_curve(scores, noisy)
    sk_fpr, sk_tpr, _ = sk_roc_curve(noisy, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert thresholds[0] == np.inf
    assert curve_area(fpr, tpr) == pytest.approx(roc_auc_score(noisy, scores), abs=1e-12)


def test_detection_curve_points_and_area_by_loop():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.5])
    noisy = np.array([True, False, False, True, False])
    x, y = detection_curve(scores, noisy)
    # order: .9(N) .8 .5 .3(N) .1
    np.testing.assert_allclose(x, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(y, [0, 0.5, 0.5, 0.5, 1.0, 1.0])
    report = detection_report(scores, noisy)
    assert report["curve_area"] == pytest.approx(0.2 * (0.25 + 0.5 + 0.5 + 0.75 + 1.0), abs=1e-15)


def test_perfect_and_reversed_rankings():
    noisy = np.array([True] * 10 + [False] * 30)
    perfect = detection_report(np.arange(40)[::-1].astype(float), noisy)
    assert perfect["auroc"] == 1.0 and perfect["ap"] == 1.0 and perfect["p_at_n_noisy"] == 1.0
    assert perfect["curve_area"] == pytest.approx(1 - 10 / (2 * 40))
    worst = detection_report(np.arange(40).astype(float), noisy)
    assert worst["auroc"] == 0.0 and worst["p_at_n_noisy"] == 0.0


def test_curves_are_subsampled_for_storage_but_area_uses_full_curve():
    scores, noisy = _data(11, n=3000)
    report = detection_report(scores, noisy, max_curve_points=201)
    x, y = detection_curve(scores, noisy)
    assert len(report["curve"]["x"]) == 201 and len(report["roc"]["fpr"]) == 201
    assert report["curve"]["x"][0] == 0.0 and report["curve"]["x"][-1] == 1.0
    assert report["curve_area"] == pytest.approx(curve_area(x, y), abs=1e-15)
    assert report["curve_area"] != pytest.approx(
        curve_area(report["curve"]["x"], report["curve"]["y"]), abs=1e-9
    )
    short = subsample_curve(np.arange(5), max_points=201)[0]
    np.testing.assert_array_equal(short, np.arange(5))


def test_shuffling_rows_changes_nothing():
    scores, noisy = _data(4, n=200, ties=True)
    perm = np.random.default_rng(0).permutation(200)
    a = detection_report(scores, noisy, ks=(5, 20))
    b = detection_report(scores[perm], noisy[perm], ks=(5, 20))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_per_group_is_group_noise_against_all_clean_by_hand_loop():
    rng = np.random.default_rng(9)
    n = 300
    noisy = rng.random(n) < 0.3
    family = np.where(noisy, rng.choice(["grammar", "label", "semantic"], n), None)
    scores = rng.normal(size=n) + noisy * (family == "label") * 2.0
    report = detection_report(scores, noisy, groups=family, ks=(10,))
    assert sorted(report["groups"]) == ["grammar", "label", "semantic"]
    assert report["group_definition"] == "noisy rows of the group vs all clean rows"
    clean = [i for i in range(n) if not noisy[i]]
    for name, sub in report["groups"].items():
        members = [i for i in range(n) if noisy[i] and family[i] == name]
        pairs = [(scores[i] > scores[j]) + 0.5 * (scores[i] == scores[j]) for i in members for j in clean]
        assert sub["auroc"] == pytest.approx(np.mean(pairs), abs=1e-12)
        keep = members + clean
        assert sub["ap"] == pytest.approx(average_precision_score(noisy[keep], scores[keep]), abs=1e-12)
        assert sub["n_noisy"] == len(members) and sub["n_clean"] == len(clean)
        hits = _loop_hits_at_k(list(scores[keep]), list(noisy[keep]), 10)
        assert sub["precision_at_k"]["10"] == pytest.approx(hits / 10, abs=1e-12)
    assert report["groups"]["label"]["auroc"] > 0.8 > report["groups"]["grammar"]["auroc"]


def test_undefined_metrics_are_none_with_reason_and_json_is_strict():
    scores = np.array([0.3, 0.1, 0.7])
    no_noise = detection_report(scores, np.zeros(3, bool), ks=(2, 5), groups=[None, None, None])
    for key in ("auroc", "ap", "curve", "curve_area", "roc", "p_at_n_noisy"):
        assert no_noise[key] is None
    assert "no noisy rows" in no_noise["undefined"]["auroc"]
    assert no_noise["precision_at_k"]["2"] == 0.0 and no_noise["recall_at_k"]["2"] is None
    assert "exceeds" in no_noise["undefined"]["precision_at_k[5]"]
    assert no_noise["groups"] == {}
    all_noise = detection_report(scores, np.ones(3, bool))
    assert all_noise["auroc"] is None and "no clean rows" in all_noise["undefined"]["auroc"]
    assert all_noise["ap"] == 1.0 and all_noise["roc"] is None
    empty = detection_report(np.zeros(0), np.zeros(0, bool))
    assert empty["n"] == 0 and empty["auroc"] is None
    for report in (no_noise, all_noise, empty):
        json.dumps(report, allow_nan=False)


@pytest.mark.parametrize(
    ("scores", "noisy", "kwargs", "match"),
    [
        ([0.1, np.nan], [True, False], {}, "NaN"),
        ([0.1, 0.2], [True], {}, "one flag per row"),
        ([0.1, 0.2], [2, 0], {}, "True/False"),
        ([0.1, 0.2], [True, False], {"ks": (0,)}, "positive whole number"),
        ([0.1, 0.2], [True, False], {"groups": ["a"]}, "one label per row"),
    ],
)
def test_bad_input_raises_one_line_error(scores, noisy, kwargs, match):
    with pytest.raises(InfscopeError, match=match):
        detection_report(np.array(scores), np.array(noisy), **kwargs)


def _manifest(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.3
    family = np.where(noisy, rng.choice(["grammar", "label"], n), "")
    operator = np.where(noisy, rng.choice(["swap", "typo", "flip"], n), "")
    return pd.DataFrame(
        {"id": [f"r{i}" for i in range(n)], "is_noisy": noisy, "family": family, "operator": operator}
    )


def test_manifest_alignment_by_id_in_any_order():
    manifest = _manifest()
    rng = np.random.default_rng(1)
    scores = rng.normal(size=60) + manifest["is_noisy"].to_numpy()
    expected = detection_report(scores, manifest["is_noisy"].to_numpy(), groups=manifest["family"].to_numpy())
    perm = rng.permutation(60)
    frame = pd.DataFrame({"id": manifest["id"].to_numpy()[perm], "score": scores[perm], "rank": 0})
    for aligned in (
        detection_from_manifest(frame, manifest),
        detection_from_manifest(scores[perm], manifest, ids=list(manifest["id"].to_numpy()[perm])),
        detection_from_manifest(pd.Series(scores, index=manifest["id"]), manifest),
    ):
        assert aligned["auroc"] == pytest.approx(expected["auroc"], abs=1e-15)
        assert aligned["by"]["family"]["label"]["auroc"] == pytest.approx(
            expected["groups"]["label"]["auroc"]
        )
        assert set(aligned["by"]["operator"]) <= {"swap", "typo", "flip"}
        json.dumps(aligned, allow_nan=False)


def test_manifest_mismatch_names_missing_ids():
    manifest = _manifest(10)
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(9)] + ["zzz"], "score": np.arange(10.0)})
    with pytest.raises(InfscopeError, match="r9"):
        detection_from_manifest(frame, manifest)
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(10)] + ["zzz"], "score": np.arange(11.0)})
    with pytest.raises(InfscopeError, match="zzz"):
        detection_from_manifest(frame, manifest)
    with pytest.raises(InfscopeError, match="'family'"):
        detection_from_manifest(frame.iloc[:10], manifest.drop(columns="family"))
    with pytest.raises(InfscopeError, match="ids="):
        detection_from_manifest(np.arange(10.0), manifest)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(flag for _, flag in rows) < len(rows)
    )
)
def test_property_small_tied_inputs_match_sklearn(rows):
    scores = np.array([float(s) for s, _ in rows])
    noisy = np.array([flag for _, flag in rows])
    report = detection_report(scores, noisy, ks=(1,))
    assert report["auroc"] == pytest.approx(roc_auc_score(noisy, scores), abs=1e-12)
    assert auroc(scores, noisy) == pytest.approx(report["auroc"], abs=1e-12)
    assert report["ap"] == pytest.approx(average_precision_score(noisy, scores), abs=1e-12)
    assert average_precision(scores, noisy) == pytest.approx(report["ap"], abs=1e-15)
    assert report["precision_at_k"]["1"] == pytest.approx(
        _loop_hits_at_k(list(scores), list(noisy), 1), abs=1e-12
    )


def test_manifest_with_object_flags_and_summary_row():
    manifest = _manifest(30)
    manifest["is_noisy"] = manifest["is_noisy"].astype(object)  # as read back from JSON
    scores = np.linspace(0, 1, 30)
    report = detection_from_manifest(scores, manifest, ids=manifest["id"].tolist(), by=())
    assert "by" not in report
    noisy = manifest["is_noisy"].to_numpy(dtype=bool)
    assert summary_row(report) == {
        "auroc": pytest.approx(roc_auc_score(noisy, scores)),
        "ap": pytest.approx(average_precision_score(noisy, scores)),
        "p_at_k": report["p_at_n_noisy"],
        "curve_area": report["curve_area"],
        "n": 30,
        "n_noisy": int(noisy.sum()),
    }
    manifest["is_noisy"] = manifest["is_noisy"].map({True: "yes", False: "no"})
    with pytest.raises(InfscopeError, match="is_noisy"):
        detection_from_manifest(scores, manifest, ids=manifest["id"].tolist(), by=())
