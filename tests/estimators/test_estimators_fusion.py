"""Fusion on canaries against a brute-force loop over every candidate, with sklearn's AUROC as reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from infscope.errors import InfscopeError
from infscope.estimators.fusion import (
    apply_fusion,
    checkpoint_choice,
    choose_fusion,
    drop_canaries,
    fusion_scores,
    percentile_ranks,
)
from infscope.estimators.scores import Scores

PAIR_WEIGHTS = [(0.5, 0.5), (0.75, 0.25), (0.25, 0.75)]
TRIPLE_WEIGHTS = [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5)]


def table(
    seed: int, n: int = 40, n_canaries: int = 6, coarse: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """5 methods with integer scores (many ties): one at chance, the others with growing signal.

    ``coarse`` keeps three score levels, so that several candidates tie for the best AUROC.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, n_canaries, replace=False)] = True
    scores = {
        f"m{i}": np.round(rng.normal(size=n) * 2 + mask * strength).astype(float)
        for i, strength in enumerate([0.0, 1.0, 2.0, 2.5, 1.5])
    }
    if coarse:
        scores = {name: np.clip(np.round(values / 3), -1, 1) for name, values in scores.items()}
    return scores, mask


def plain_percentile(x: np.ndarray) -> list[float]:
    """Average rank / n of every value, by counting (an independent reference)."""
    n = len(x)
    return [(sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2) / n for xi in x]


def plain_fuse(pct: list[list[float]], members, weights) -> list[float]:
    return [sum(w * pct[m][i] for m, w in zip(members, weights, strict=True)) for i in range(len(pct[0]))]


def brute_force(scores, mask, *, top: int, max_members: int, rows=None):
    """Every candidate's sklearn AUROC on the canaries in ``rows`` vs the non-canaries; the winner by the rule."""
    names = list(scores)
    pct = [plain_percentile(scores[name]) for name in names]
    rows = np.arange(len(mask)) if rows is None else rows

    def auroc(values):
        return roc_auc_score(mask[rows], np.asarray(values)[rows])

    singles = [auroc(pct[i]) for i in range(len(names))]
    best_singles = sorted(range(len(names)), key=lambda i: (-round(singles[i], 9), i))[:top]
    candidates = [((i,), (1.0,)) for i in range(len(names))]
    for size, grid in ((2, PAIR_WEIGHTS), (3, TRIPLE_WEIGHTS)):
        if size <= max_members:
            for members in itertools.combinations(sorted(best_singles), size):
                candidates += [(members, w) for w in grid]
    results = []
    for members, weights in candidates:
        value = auroc(plain_fuse(pct, members, weights))
        key = (-round(value, 9), len(members), members, max(weights), tuple(-w for w in weights))
        results.append((key, members, weights, value))
    results.sort(key=lambda item: item[0])
    return names, pct, results


CASES = [(seed, False, top, size) for seed in range(6) for top, size in [(6, 3), (3, 3), (4, 2), (6, 1)]]
CASES += [(seed, True, top, size) for seed in (2, 4, 5) for top, size in [(6, 3), (3, 3), (4, 2)]]


@pytest.mark.parametrize(("seed", "coarse", "top", "max_members"), CASES)
def test_choice_matches_brute_force_over_every_candidate(seed, coarse, top, max_members):
    scores, mask = table(seed, coarse=coarse)
    choice = choose_fusion(scores, mask, top=top, max_members=max_members, grid=0.25)
    names, _, results = brute_force(scores, mask, top=top, max_members=max_members)
    _, members, weights, value = results[0]
    assert choice.members == tuple(names[i] for i in members)
    assert choice.weights == pytest.approx(weights)
    assert choice.canary_auroc == pytest.approx(value, abs=1e-12)
    assert len(choice.table) == len(results)
    expected = {(tuple(names[i] for i in m), tuple(round(x, 4) for x in w)): v for _, m, w, v in results}
    got = {
        (
            tuple(row.members.split("+")),
            tuple(round(float(x), 4) for x in row.weights.split(",")),
        ): row.canary_auroc
        for row in choice.table.itertuples()
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12)
    assert choice.table["selected"].tolist() == [True] + [False] * (len(results) - 1)
    assert choice.table["canary_auroc"].is_monotonic_decreasing


@pytest.mark.parametrize(("seed", "coarse"), [(0, False), (1, False), (3, False), (2, True), (5, True)])
def test_leave_one_canary_out_redoes_the_whole_choice(seed, coarse):
    scores, mask = table(seed, coarse=coarse)
    choice = choose_fusion(scores, mask, top=3, max_members=3)
    canaries, negatives = np.flatnonzero(mask), np.flatnonzero(~mask)
    held = []
    for p in canaries:
        rows = np.concatenate([np.setdiff1d(canaries, [p]), negatives])
        names, pct, results = brute_force(scores, mask, top=3, max_members=3, rows=rows)
        _, members, weights, _ = results[0]
        fused = np.asarray(plain_fuse(pct, members, weights))
        held.append(roc_auc_score(mask[np.r_[p, negatives]], fused[np.r_[p, negatives]]))
    assert choice.loo_auroc == pytest.approx(np.mean(held), abs=1e-12)
    assert choice.estimate == "nested leave-one-canary-out"
    assert choice.loo_auroc <= choice.canary_auroc + 1e-12


def test_single_method_aurocs_equal_sklearn_on_raw_scores():
    scores, mask = table(11, n=200, n_canaries=17)
    choice = choose_fusion(scores, mask, max_members=1)
    singles = choice.table.set_index("candidate")["canary_auroc"]
    for name, values in scores.items():
        assert singles[name] == pytest.approx(roc_auc_score(mask, values), abs=1e-12)


def test_a_method_at_chance_gets_weight_zero():
    rng = np.random.default_rng(0)
    mask = np.zeros(120, dtype=bool)
    mask[:12] = True
    scores = {"chance": rng.normal(size=120), "good": rng.normal(size=120) * 0.1 + mask * 3.0}
    choice = choose_fusion(scores, mask)
    assert choice.members == ("good",) and choice.weights == (1.0,)
    assert choice.weight("chance") == 0.0 and choice.weight("good") == 1.0
    assert choice.canary_auroc == 1.0 and choice.loo_auroc == 1.0
    chance_rows = choice.table[choice.table["members"].str.contains("chance")]
    assert (chance_rows["canary_auroc"] <= 1.0).all() and not chance_rows["selected"].any()


def test_ties_go_to_fewer_members_then_earlier_methods():
    mask = np.array([True, True, False, False, False, False])
    same = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    choice = choose_fusion({"b": same, "a": same.copy(), "c": same[::-1].copy()}, mask)
    assert choice.members == ("b",)
    assert choice.table.iloc[1]["candidate"] == "a"


def test_apply_fusion_is_the_weighted_percentile_sum():
    scores, mask = table(2)
    choice = choose_fusion(scores, mask, top=6)
    pct = {name: plain_percentile(values) for name, values in scores.items()}
    expected = [
        sum(w * pct[m][i] for m, w in zip(choice.members, choice.weights, strict=True)) for i in range(40)
    ]
    np.testing.assert_allclose(apply_fusion(choice, scores), expected, rtol=0, atol=1e-12)
    assert roc_auc_score(mask, apply_fusion(choice, scores)) == pytest.approx(choice.canary_auroc, abs=1e-12)
    ids = [f"r{i}" for i in range(40)]
    wrapped = {name: Scores(values, ids, method=name) for name, values in scores.items()}
    fused = fusion_scores(choice, wrapped)
    assert fused.method == "fusion" and fused.train_ids == ids
    assert fused.meta["fusion"]["members"] == list(choice.members)
    np.testing.assert_allclose(fused.values, expected, rtol=0, atol=1e-12)


def test_percentile_ranks_put_non_finite_scores_last():
    values = np.array([3.0, np.nan, 1.0, np.inf, 3.0])
    np.testing.assert_allclose(percentile_ranks(values), [4.5 / 5, 1.5 / 5, 3 / 5, 1.5 / 5, 4.5 / 5])


def test_checkpoint_choice_matches_a_plain_loop():
    scores, mask = table(4)
    per_checkpoint = {
        "checkpoint-10": {"m0": scores["m0"], "m1": scores["m1"]},
        "checkpoint-20": {"m0": scores["m3"], "m1": scores["m2"]},
        "checkpoint-30": {"m0": scores["m3"].copy(), "m1": scores["m4"]},
    }
    choice = checkpoint_choice(per_checkpoint, mask)
    flat = [(c, m, roc_auc_score(mask, v)) for c, inner in per_checkpoint.items() for m, v in inner.items()]
    best = sorted(range(len(flat)), key=lambda j: (-round(flat[j][2], 9), j))[0]
    assert (choice.checkpoint, choice.method) == flat[best][:2] == ("checkpoint-20", "m0")
    assert choice.canary_auroc == pytest.approx(flat[best][2], abs=1e-12)
    assert len(choice.table) == 6 and choice.table.iloc[0]["selected"]
    held = []
    for p in np.flatnonzero(mask):
        keep = mask.copy()
        keep[p] = False
        rows = np.flatnonzero(keep | ~mask)
        fold = [
            roc_auc_score(mask[rows], v[rows]) for inner in per_checkpoint.values() for v in inner.values()
        ]
        j = sorted(range(len(fold)), key=lambda j: (-round(fold[j], 9), j))[0]
        vector = [v for inner in per_checkpoint.values() for v in inner.values()][j]
        rows_p = np.r_[p, np.flatnonzero(~mask)]
        held.append(roc_auc_score(mask[rows_p], vector[rows_p]))
    assert choice.loo_auroc == pytest.approx(np.mean(held), abs=1e-12)


def test_drop_canaries_removes_exactly_the_canary_rows_in_order():
    ids = ["a", "canary-1-a", "b", "c", "canary-2-c"]
    vector = Scores(np.arange(5.0), ids, method="datainf", meta={"lambda": [0.1], "note": {"x": 1}})
    dropped = drop_canaries(vector, ["canary-2-c", "canary-1-a"])
    assert dropped.train_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(dropped.values, [0.0, 2.0, 3.0])
    assert dropped.method == "datainf" and dropped.meta == vector.meta and dropped.meta is not vector.meta
    matrix = Scores(np.arange(10.0).reshape(2, 5), ids, query_ids=["q1", "q2"], method="exact")
    dropped = drop_canaries(matrix, ["canary-1-a", "canary-2-c"])
    np.testing.assert_array_equal(dropped.values, [[0.0, 2.0, 3.0], [5.0, 7.0, 8.0]])
    assert dropped.query_ids == ["q1", "q2"] and dropped.train_ids == ["a", "b", "c"]
    assert drop_canaries(vector, []).train_ids == ids


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, m: choose_fusion(s, np.zeros(40, dtype=bool)), "marks 0 of 40 rows"),
        (lambda s, m: choose_fusion(s, np.ones(40, dtype=bool)), "marks 40 of 40 rows"),
        (lambda s, m: choose_fusion(s, m[:30]), "canary mask has shape"),
        (lambda s, m: choose_fusion({**s, "short": np.zeros(30)}, m), "different row counts"),
        (lambda s, m: choose_fusion({}, m), "no method scores"),
        (lambda s, m: choose_fusion(s, m, grid=0.3), "grid step must divide 1"),
        (lambda s, m: choose_fusion(s, m, max_members=0), "max_members must be"),
        (lambda s, m: choose_fusion(s, m, top=0), "top must be"),
        (lambda s, m: apply_fusion(choose_fusion(s, m), {"m0": s["m0"]}), "scores lack the chosen"),
        (lambda s, m: checkpoint_choice({}, m), "no checkpoint scores"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message):
    scores, mask = table(0)
    with pytest.raises(InfscopeError, match=message) as info:
        call(scores, mask)
    assert "\n" not in str(info.value)
