"""noise.analyze and `infscope analyze`: results against hand-built files with known counts."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from infscope.cli import main
from infscope.data.manifest import write_manifest
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError
from infscope.noise import analyze
from infscope.noise.run import run_noise

CLEAN = [{"id": f"r{i}", "instruction": "Say it.", "input": "", "output": "abcd"} for i in range(10)]
# Hand-made noise: r0 grammar (output abcd -> abdc, +0), r1 quality (abcd -> ab, -2),
# r2 semantic on instruction (Say it. -> Say it now please., 7 -> 18 chars, +11).
EDITS = {
    "r0": ("grammar", "typo_transposition", "output", "abcd", "abdc", False),
    "r1": ("quality", "truncate_response", "output", "abcd", "ab", False),
    "r2": ("semantic", "irrelevant_sentence", "instruction", "Say it.", "Say it now please.", False),
}


def hand_made(tmp_path, stem="toy.noisy.balanced.r0.300.s0", edits=EDITS):
    noisy, manifest = [], []
    for row in CLEAN:
        new = dict(row)
        rec = {
            "id": row["id"],
            "is_noisy": False,
            "family": None,
            "operator": None,
            "field": None,
            "original": None,
        }
        rec.update({"noisy": None, "label_changed": False, "severity": 0.0, "seed": 0})
        if row["id"] in edits:
            family, op, field, old, value, changed = edits[row["id"]]
            new[field] = value
            rec.update(is_noisy=True, family=family, operator=op, field=field, original=old, noisy=value)
            rec.update(label_changed=changed, severity=0.5)
        noisy.append(new)
        manifest.append(rec)
    write_rows(CLEAN, tmp_path / "toy.clean.jsonl")
    write_rows(noisy, tmp_path / f"{stem}.jsonl")
    write_manifest(manifest, tmp_path / f"{stem}.manifest.jsonl")
    return tmp_path / f"{stem}.jsonl"


def test_inventory_and_detail_hand_counts(tmp_path):
    path = hand_made(tmp_path)
    inv = analyze.inventory([tmp_path])
    types = {f["name"]: (f["type"], f["rows"], f["ratio"], f["strategy"]) for f in inv["files"]}
    assert types == {
        "toy.clean.jsonl": ("original", 10, None, None),
        "toy.noisy.balanced.r0.300.s0.jsonl": ("noisy", 10, 0.3, "balanced"),
    }
    d = analyze.detail(path)
    assert (d["rows"], d["noisy"], d["changed"], d["mismatches"]) == (10, 3, 3, 0)
    assert d["families"] == {"grammar": 1, "quality": 1, "semantic": 1}
    assert d["fields"] == {"instruction": 1, "output": 2}
    assert d["mean_length_change"] == pytest.approx((0 - 2 + 11) / 3)
    assert d["label_changed"] == 0


def test_detail_detects_manifest_file_mismatch(tmp_path):
    path = hand_made(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["output"] = "tampered"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert analyze.detail(path)["mismatches"] == 1


def test_sample_estimate_exact_when_sampling_everything_and_wilson_matches_scipy(tmp_path):
    path = hand_made(tmp_path)
    full = analyze.sample_estimate(path, sample=100)
    assert full["sampled"] == 10 and full["ratio_estimate"] == pytest.approx(0.3)
    ref = binomtest(3, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert full["ratio_ci95"] == pytest.approx([ref.low, ref.high], abs=1e-6)
    part = analyze.sample_estimate(path, sample=5, seed=1)
    assert part["sampled"] == 5 and part["noisy_in_sample"] == round(part["ratio_estimate"] * 5)
    lo, hi = part["ratio_ci95"]
    assert lo <= part["ratio_estimate"] <= hi


def test_compare_counts_rows_that_differ(tmp_path):
    path = hand_made(tmp_path)
    c = analyze.compare(tmp_path / "toy.clean.jsonl", path)
    assert (c["rows_differ"], c["shared_ids"], c["only_in_a"]) == (3, 10, 0)
    assert c["fields_differ"] == {"instruction": 1, "input": 0, "output": 2}
    assert c["a"]["mean_lengths"]["output"] == 4.0
    assert c["b"]["mean_lengths"]["output"] == pytest.approx((8 * 4 + 4 + 2) / 10)


def test_strategy_effect_and_readiness(tmp_path):
    hand_made(tmp_path)
    hand_made(tmp_path, "toy.noisy.grammar_heavy.r0.300.s0", {"r5": EDITS["r0"]})
    table = analyze.strategy_effect([tmp_path])["ratios"]["0.300"]
    assert [(x["strategy"], x["noisy"]) for x in table] == [("balanced", 3), ("grammar_heavy", 1)]
    assert table[1]["family_share"] == {"grammar": 1.0}
    ready = analyze.readiness([tmp_path])
    assert not ready["ready"] and ready["clean_present"] and ready["noisy_files"] == 2
    assert ready["missing"] == ["at least 2 noise ratios (have 1); add e.g. --ratios 0.1,0.2"]
    hand_made(tmp_path, "toy.noisy.balanced.r0.100.s0", {"r1": EDITS["r1"]})
    assert analyze.readiness([tmp_path])["ready"]


def test_readiness_lists_missing_clean_file(tmp_path):
    src = tmp_path / "src.jsonl"
    write_rows(CLEAN * 1, src)
    out = tmp_path / "out"
    run_noise(src, ratios=[0.2, 0.5], seed=0, out_dir=out)
    assert analyze.readiness([out])["ready"]
    (out / "src.clean.jsonl").unlink()
    assert analyze.readiness([out])["missing"][0].startswith("clean original")


def test_analyze_on_real_run_reports_manifest_counts(tmp_path):
    src = tmp_path / "d.jsonl"
    rows = [
        {
            "instruction": f"Tell me about item {i}.",
            "input": "",
            "output": "It is a fine item. People like it.",
        }
        for i in range(40)
    ]
    write_rows(rows, src)
    out = run_noise(src, ratios=0.25, seed=5, out_dir=tmp_path / "o")[0]
    d = analyze.detail(out.data_path)
    assert d["noisy"] == 10 and d["targeted"] == 10 and d["mismatches"] == 0
    assert d["families"] == {f: c["actual"] for f, c in out.summary["families"].items()}


def test_cli_analyze_json_and_errors(tmp_path, capsys):
    path = hand_made(tmp_path)
    assert main(["analyze", str(tmp_path), "--mode", "detail", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed[0]["noisy"] == 3 and parsed[0]["families"] == {"grammar": 1, "quality": 1, "semantic": 1}
    assert main(["analyze", str(tmp_path), "--mode", "all", "--sample", "5"]) == 0
    assert "not ready" in capsys.readouterr().out
    assert main(["analyze", str(path), "--mode", "compare"]) == 2
    assert "exactly two" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing"), "--mode", "inventory"]) == 2
    assert main(["analyze", str(tmp_path), "--mode", "bogus"]) == 2


def test_detail_without_manifest_is_an_error(tmp_path):
    hand_made(tmp_path)
    with pytest.raises(InfscopeError, match="no manifest"):
        analyze.detail(tmp_path / "toy.clean.jsonl")
