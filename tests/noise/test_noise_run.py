"""run_noise and `infscope noise`: files, names, byte-identical reruns, manifest vs files, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infscope.cli import main
from infscope.data.loading import load_rows
from infscope.data.manifest import read_manifest
from infscope.errors import InfscopeError
from infscope.noise.run import run_noise


def write_source(path: Path, n: int = 60) -> Path:
    rows = [
        {
            "instruction": f"Describe item {i} in a sentence.",
            "input": "" if i % 2 else "It is a red box.",
            "output": f"Item {i} is a small red box. It was made with care and people like it.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_files_names_and_metadata(tmp_path):
    src = write_source(tmp_path / "alpaca.jsonl")
    outs = run_noise(
        src, ratios="0.1,0.2", strategies="balanced,grammar_heavy", seed=42, out_dir=tmp_path / "out"
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "alpaca.clean.jsonl" in names
    for strategy in ("balanced", "grammar_heavy"):
        for ratio in ("0.100", "0.200"):
            stem = f"alpaca.noisy.{strategy}.r{ratio}.s42"
            assert {f"{stem}.jsonl", f"{stem}.manifest.jsonl", f"{stem}.meta.json"} <= set(names)
    assert len(outs) == 4
    meta = json.loads(outs[0].meta_path.read_text())
    assert meta["seed"] == 42 and meta["rows"] == 60 and meta["summary"]["target_noisy"] == 6
    assert meta["source_fingerprint"] == load_rows(src).fingerprint and "numpy" in meta["versions"]


def test_same_seed_gives_identical_bytes_whatever_ratio_order(tmp_path):
    src = write_source(tmp_path / "alpaca.jsonl")
    run_noise(src, ratios=[0.1, 0.2], seed=7, out_dir=tmp_path / "a")
    run_noise(src, ratios=[0.2, 0.1], seed=7, out_dir=tmp_path / "b")
    run_noise(src, ratios=[0.2], seed=7, out_dir=tmp_path / "c")
    for name in ("alpaca.noisy.balanced.r0.200.s7.jsonl", "alpaca.noisy.balanced.r0.200.s7.manifest.jsonl"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    assert (tmp_path / "a" / "alpaca.clean.jsonl").read_bytes() == (
        tmp_path / "b" / "alpaca.clean.jsonl"
    ).read_bytes()


def test_manifest_matches_clean_and_noisy_files(tmp_path):
    src = write_source(tmp_path / "alpaca.jsonl")
    out = run_noise(src, ratios=0.3, strategies="all", seed=1, out_dir=tmp_path / "out")[0]
    clean = {r["id"]: r for r in load_rows(tmp_path / "out" / "alpaca.clean.jsonl").rows}
    noisy = {r["id"]: r for r in load_rows(out.data_path).rows}
    manifest = read_manifest(out.manifest_path)
    assert len(manifest) == 60 and int(manifest["is_noisy"].sum()) == 18
    for rec in manifest.itertuples(index=False):
        if rec.is_noisy:
            assert clean[rec.id][rec.field] == rec.original and noisy[rec.id][rec.field] == rec.noisy
        else:
            assert clean[rec.id] == noisy[rec.id]


def test_parquet_output_and_custom_names(tmp_path):
    src = write_source(tmp_path / "data.jsonl")
    out = run_noise(
        src, ratios=0.5, weights="grammar=1", seed=0, out_dir=tmp_path, format="parquet", sampling="length"
    )[0]
    assert out.data_path.name.startswith("data.noisy-length.custom-") and out.data_path.suffix == ".parquet"
    assert len(load_rows(out.data_path).rows) == 60 and (tmp_path / "data.clean.parquet").exists()


def test_never_overwrites_the_input(tmp_path):
    src = write_source(tmp_path / "alpaca.clean.jsonl")
    before = src.read_bytes()
    with pytest.raises(InfscopeError, match="overwrite the input"):
        run_noise(src, ratios=0.2, seed=0, out_dir=tmp_path)
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.clean.jsonl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "0"], "ratio must be in (0, 1]"),
        (["--ratios", "0.1,1.2"], "ratio must be in (0, 1]"),
        (["--ratio", "0.001"], "rounds to zero"),
        (["--strategy", "balanced,nope"], "unknown noise strategy"),
        (["--weights", "grammar=0,semantic=0"], "positive number"),
        (["--weights", "typo_fancy=1"], "unknown noise family or operator"),
        (["--sampling", "weird"], "unknown sampling"),
        (["--out", "/proc/forbidden"], "not writable"),
    ],
)
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    src = write_source(tmp_path / "alpaca.jsonl")
    out_default = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    assert main(["noise", str(src), *out_default, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_empty_dataset_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["noise", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_noise_and_demo(tmp_path, capsys):
    src = write_source(tmp_path / "alpaca.jsonl")
    assert (
        main(["noise", str(src), "--ratios", "0.1,0.2", "--seed", "3", "--out", str(tmp_path / "o"), "--yes"])
        == 0
    )
    assert (tmp_path / "o" / "alpaca.noisy.balanced.r0.200.s3.jsonl").exists()
    assert main(["noise", "demo", "--out", str(tmp_path / "demo"), "--seed", "1"]) == 0
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert "sentence_transform.noisy.grammar_heavy.r0.200.s1.manifest.jsonl" in names
    manifest = read_manifest(tmp_path / "demo" / "sentence_transform.noisy.balanced.r0.200.s1.manifest.jsonl")
    assert len(manifest) == 500 and int(manifest["is_noisy"].sum()) == 100
    assert "noise written" in capsys.readouterr().out
