"""Seed aggregation, the t distribution and the leaderboard against textbook values and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from infscope.errors import InfscopeError
from infscope.evaluate.aggregate import aggregate_seeds, leaderboard, render_leaderboard, to_long
from infscope.evaluate.jsonable import to_jsonable
from infscope.evaluate.stats import t_cdf, t_critical, t_quantile

# Textbook two-sided 95% critical values t_{0.975, df}
TEXTBOOK = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize(("df", "value"), sorted(TEXTBOOK.items()))
def test_t_quantile_matches_textbook_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=6e-4)


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 6, 15, 80):
        for p in (0.01, 0.3, 0.9, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-9)
        for t in (-4.0, -0.2, 0.0, 1.5, 30.0):
            assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(0.5, 0)


def test_three_seeds_interval_by_hand():
    values = [0.70, 0.74, 0.78]
    records = [
        {"method": "datainf", "metric": "auroc", "value": v, "seed": s, "group": ""}
        for s, v in enumerate(values)
    ]
    row = aggregate_seeds(records).iloc[0]
    std = math.sqrt(sum((v - 0.74) ** 2 for v in values) / 2)  # 0.04
    assert row["mean"] == pytest.approx(0.74) and row["std"] == pytest.approx(std)
    assert row["ci_half"] == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-6)
    assert row["ci_low"] == pytest.approx(0.74 - row["ci_half"]) and row["n_seeds"] == 3
    assert t_critical(0.95, 3) == pytest.approx(4.302653, abs=1e-6)


def test_wide_dicts_and_frames_and_groups_and_undefined_values():
    per_seed = [
        pd.DataFrame(
            {
                "method": ["loss", "loss"],
                "metric": ["auroc", "auroc"],
                "group": ["grammar", "label"],
                "value": [0.6 + s / 100, None if s == 2 else 0.9],
                "seed": [s, s],
            }
        )
        for s in range(3)
    ]
    result = aggregate_seeds(per_seed).set_index("group")
    assert result.loc["grammar", "mean"] == pytest.approx(0.61) and result.loc["grammar", "n_seeds"] == 3
    assert result.loc["label", "n_seeds"] == 2 and result.loc["label", "std"] == 0.0
    wide = [{"method": "exact", "seed": s, "auroc": 0.5 + s, "ap": 0.1} for s in range(2)]
    long = to_long(wide)
    assert set(long["metric"]) == {"auroc", "ap"} and set(long["group"]) == {""}
    single = aggregate_seeds([{"method": "x", "auroc": 0.8}])
    assert single.iloc[0]["n_seeds"] == 1 and np.isnan(single.iloc[0]["ci_half"])
    assert to_jsonable(single)[0]["ci_half"] is None


def test_duplicate_seed_is_refused():
    rows = [{"method": "m", "seed": 0, "auroc": 0.5}, {"method": "m", "seed": 0, "auroc": 0.6}]
    with pytest.raises(InfscopeError, match="seed 0 appears twice"):
        aggregate_seeds(rows)
    with pytest.raises(InfscopeError, match="'method'"):
        aggregate_seeds([{"auroc": 0.5}])


def _rows():
    rows = []
    for seed in range(3):
        rows.append(
            dict(
                method="loss", seed=seed, auroc=0.70 + 0.01 * seed, ap=0.4, p_at_k=0.3, seconds=1, peak_mb=10
            )
        )
        rows.append(
            dict(
                method="datainf",
                seed=seed,
                auroc=0.80 + 0.02 * seed,
                ap=0.5,
                p_at_k=0.5,
                seconds=9,
                peak_mb=90,
            )
        )
        rows.append(dict(method="broken", seed=seed, auroc=None, ap=None, p_at_k=None, seconds=2, peak_mb=5))
    return rows


def test_leaderboard_sorted_by_auroc_with_seed_statistics():
    board = leaderboard(_rows())
    assert list(board["method"]) == ["datainf", "loss", "broken"]
    datainf = board.iloc[0]
    assert datainf["auroc"] == pytest.approx(0.82) and datainf["n_seeds"] == 3
    assert datainf["auroc_ci"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert np.isnan(board.iloc[2]["auroc"]) and board.iloc[2]["seconds"] == 2
    json.dumps(to_jsonable(board), allow_nan=False)


def test_render_shows_mean_plus_minus_ci_for_several_seeds():
    console = Console(record=True, width=160)
    render_leaderboard(leaderboard(_rows()), console)
    text = console.export_text()
    lines = [line for line in text.splitlines() if "datainf" in line]
    assert "0.820 ± 0.050" in lines[0]
    assert "broken" in text and " - " in text
    single = Console(record=True, width=160)
    render_leaderboard(leaderboard([{"method": "loss", "auroc": 0.7, "ap": 0.3}]), single)
    assert "0.700" in single.export_text() and "±" not in single.export_text()


def test_leaderboard_rejects_non_numbers():
    with pytest.raises(InfscopeError, match="auroc"):
        leaderboard([{"method": "m", "auroc": "high"}])
