"""Manifest, writing, formatting: round trips against independently built expectations."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from infscope.data.formatting import add_text_column, format_prompt, format_text
from infscope.data.loading import load_rows
from infscope.data.manifest import MANIFEST_FIELDS, read_manifest, write_manifest
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError

LONG = "lorem ipsum " * 20000  # 240k characters: beyond csv's default field limit
ROWS = [
    {"id": "a", "instruction": "Übersetze: naïve café", "input": "", "output": "日本語のテキスト 🙂"},
    {"id": "b", "instruction": 'Say "hi", then a comma, and\na newline', "input": "ctx", "output": LONG},
    {"id": "c", "instruction": "line\u2028sep\x1cfs\r\nend", "input": "x", "output": "y", "class": 3},
]


def _manifest_record(row_id: str, noisy: bool) -> dict:
    return {
        "id": row_id,
        "is_noisy": noisy,
        "family": "label" if noisy else None,
        "operator": "flip" if noisy else None,
        "field": "label" if noisy else None,
        "original": "0" if noisy else None,
        "noisy": "1" if noisy else None,
        "label_changed": noisy,
        "severity": 1.0 if noisy else 0.0,
        "seed": 7,
    }


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_round_trip_every_format(tmp_path, suffix):
    path = write_rows(ROWS, tmp_path / f"rows{suffix}")
    loaded = load_rows(path)
    assert loaded.task == "instruction"
    assert loaded.format == suffix[1:]
    assert [r["id"] for r in loaded.rows] == ["a", "b", "c"]
    for got, want in zip(loaded.rows, ROWS, strict=True):
        for key in ("instruction", "input", "output"):
            assert got[key] == want[key]
    assert loaded.rows[1]["output"] == LONG
    assert loaded.rows[2]["class"] == 3


def test_write_is_deterministic_and_keeps_non_ascii(tmp_path):
    for suffix in (".json", ".jsonl", ".csv", ".parquet"):
        one = write_rows(ROWS, tmp_path / f"one{suffix}").read_bytes()
        two = write_rows(ROWS, tmp_path / f"two{suffix}").read_bytes()
        assert one == two, suffix
    text = (tmp_path / "one.json").read_text(encoding="utf-8")
    assert "日本語のテキスト 🙂" in text and "Übersetze" in text and "\\u65e5" not in text
    assert json.loads(text) == ROWS
    jsonl_lines = (tmp_path / "one.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    assert [json.loads(line) for line in jsonl_lines] == ROWS


def test_format_argument_overrides_suffix_and_unknown_suffix_fails(tmp_path):
    path = write_rows(ROWS[:1], tmp_path / "rows.txt", format="jsonl")
    assert json.loads(path.read_text(encoding="utf-8").strip()) == ROWS[0]
    with pytest.raises(InfscopeError, match=r"\.jsonl"):
        write_rows(ROWS, tmp_path / "rows.txt")


def test_csv_rows_with_different_keys_fill_blanks(tmp_path):
    path = write_rows(
        [{"id": "1", "text": "x", "label": 0}, {"id": "2", "label": 1, "text": "y", "extra": "e"}],
        tmp_path / "r.csv",
    )
    assert path.read_text().splitlines() == ["id,text,label,extra", "1,x,0,", "2,y,1,e"]
    loaded = load_rows(path)
    assert [r["label"] for r in loaded.rows] == [0, 1]


def test_format_prompt_alpaca_layout():
    with_input = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    without = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert format_prompt(with_input) == "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert format_prompt(without) == "### Instruction:\nSay hi\n\n### Response:\n"
    assert format_prompt({"instruction": "Say hi"}) == format_prompt(without)
    assert format_text(with_input) == "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n5"


def test_add_text_column_rebuilds_stale_text_and_copies():
    rows = [
        {"id": "1", "instruction": "Add", "input": "", "output": "NOISY", "text": "stale clean text"},
        {"id": "2", "text": "a review", "label": 1},
    ]
    out = add_text_column(rows)
    assert out[0]["text"] == "### Instruction:\nAdd\n\n### Response:\nNOISY"
    assert out[1] == rows[1]
    assert rows[0]["text"] == "stale clean text"  # inputs untouched


def test_manifest_round_trip(tmp_path):
    records = [_manifest_record("r1", True), _manifest_record("r2", False)]
    records[0]["extra_note"] = "ß"
    path = write_manifest(records, tmp_path / "manifest.jsonl")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first)[: len(MANIFEST_FIELDS)] == list(MANIFEST_FIELDS)
    frame = read_manifest(path)
    assert list(frame.columns) == [*MANIFEST_FIELDS, "extra_note"]
    assert frame["id"].tolist() == ["r1", "r2"]
    assert frame["is_noisy"].dtype == bool and frame["is_noisy"].tolist() == [True, False]
    assert frame["label_changed"].tolist() == [True, False]
    assert frame.loc[0, "operator"] == "flip" and pd.isna(frame.loc[1, "operator"])
    assert frame["seed"].tolist() == [7, 7]


def test_manifest_write_requires_all_fields(tmp_path):
    record = _manifest_record("r1", True)
    del record["severity"]
    with pytest.raises(ValueError, match="severity"):
        write_manifest([record], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_read_manifest_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps(_manifest_record("r1", True))
    path.write_text(good + "\n{not json\n")
    with pytest.raises(InfscopeError, match="line 2"):
        read_manifest(path)
    no_id = _manifest_record("r1", True)
    del no_id["id"]
    path.write_text(json.dumps(no_id) + "\n")
    with pytest.raises(InfscopeError, match="lacks 'id'"):
        read_manifest(path)
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(InfscopeError, match="repeats id 'r1'"):
        read_manifest(path)
    bad_flag = _manifest_record("r1", True)
    bad_flag["is_noisy"] = "maybe"
    path.write_text(json.dumps(bad_flag) + "\n")
    with pytest.raises(InfscopeError, match="is_noisy"):
        read_manifest(path)
    with pytest.raises(InfscopeError, match="not found"):
        read_manifest(tmp_path / "absent.jsonl")
