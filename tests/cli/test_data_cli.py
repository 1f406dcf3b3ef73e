"""The ``infscope data`` and ``infscope cache`` commands: outputs, exit codes, one-line errors."""

from __future__ import annotations

import io
import json
import time

import pytest

from infscope.cli import main
from infscope.data.builtin import make_builtin
from infscope.data.writing import write_rows


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INFSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_data_make_writes_train_and_test(tmp_path, capsys):
    out = tmp_path / "st.jsonl"
    args = ["data", "make", "sentence_transform", "--out", str(out), "--seed", "5", "--classes", "3"]
    assert main([*args, "--per-class", "8", "--test-per-class", "2", "--paraphrase"]) == 0
    expected = make_builtin(
        "sentence_transform", seed=5, n_classes=3, per_class=8, n_test_per_class=2, paraphrase=True
    )
    assert out.read_bytes() == write_rows(expected.train, tmp_path / "ref.jsonl").read_bytes()
    test_file = tmp_path / "st.test.jsonl"
    assert [json.loads(line) for line in test_file.read_text().splitlines()] == expected.test
    printed = capsys.readouterr().out
    assert "18 rows" in printed and "6 rows" in printed


def test_data_make_bad_input_exits_2_without_files(tmp_path, capsys):
    assert main(["data", "make", "nope", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown built-in dataset 'nope'" in _error_line(capsys)
    assert main(["data", "make", "math_reason", "--out", str(tmp_path / "x.txt")]) == 2
    assert "suffix" in _error_line(capsys)
    assert main(["data", "make", "math_reason", "--out", str(tmp_path / "y.csv"), "--classes", "12"]) == 2
    assert "--classes 12" in _error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_data_show_summary_and_mapping(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"q": f"question {i}", "a": str(i), "label": i % 2}) + "\n" for i in range(7))
    )
    assert main(["data", "show", str(path), "--task", "instruction"]) == 2
    err = _error_line(capsys)
    assert "--instruction-col" in err and "--output-col" in err
    assert main(["data", "show", str(path), "--instruction-col", "q", "--output-col", "a", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "instruction" in out and "jsonl" in out and "question 1" in out and "question 2" not in out
    assert "rows" in out and "7" in out


def test_data_show_classification_counts(tmp_path, capsys):
    path = write_rows(
        [{"text": f"t{i}", "label": ["neg", "pos"][i % 3 == 0]} for i in range(6)], tmp_path / "c.csv"
    )
    assert main(["data", "show", str(path), "--n", "0"]) == 0
    out = capsys.readouterr().out
    assert "classification" in out and "neg: 4, pos: 2" in out


def test_data_show_counts_classes_in_numeric_order(tmp_path, capsys):
    path = tmp_path / "mix.jsonl"
    assert (
        main(
            [
                "data",
                "make",
                "instruction_mix",
                "--out",
                str(path),
                "--classes",
                "12",
                "--per-class",
                "3",
                "--test-per-class",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["data", "show", str(path), "--n", "0"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 2, 11: 2" in out


def test_data_show_malformed_and_missing(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": \n')
    assert main(["data", "show", str(path)]) == 2
    assert "line 2" in _error_line(capsys)
    assert main(["data", "show", str(tmp_path / "absent.csv")]) == 2
    assert "not found" in _error_line(capsys)


def _fake_cached(tmp_path):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 0]}),
            "validation": datasets.Dataset.from_dict({"sentence": ["d"], "label": [1]}),
        }
    ).save_to_disk(str(tmp_path / "cache" / "glue__sst2"))


def test_cache_info_and_clear(tmp_path, capsys, monkeypatch):
    assert main(["cache", "info"]) == 0
    assert "no cached datasets" in capsys.readouterr().out
    _fake_cached(tmp_path)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "glue/sst2" in out and "train (3)" in out and "validation (1)" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert main(["cache", "clear"]) == 0
    assert (tmp_path / "cache" / "glue__sst2").exists()
    assert main(["data", "show", "glue/sst2", "--split", "validation"]) == 0
    assert "classification" in capsys.readouterr().out
    assert main(["cache", "clear", "--yes"]) == 0
    assert not any((tmp_path / "cache").iterdir())


def test_cache_refresh_offline_is_fast_one_line(capsys):
    start = time.perf_counter()
    assert main(["cache", "refresh", "gsm8k"]) == 2
    assert time.perf_counter() - start < 5
    err = _error_line(capsys)
    assert "offline" in err and "local file" in err
