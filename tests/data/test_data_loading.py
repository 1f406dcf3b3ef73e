"""load_rows: every source kind, normalisation rules and one-line errors."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from infscope.data.columns import ColumnMap, column_map_from_options
from infscope.data.loading import load_rows
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INFSCOPE_CACHE", str(tmp_path / "hub-cache"))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_malformed_jsonl_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(InfscopeError, match=r"line 3 of .*bad\.jsonl") as info:
        load_rows(path)
    assert "\n" not in str(info.value)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(InfscopeError, match="line 2"):
        load_rows(path)


def test_missing_columns_name_the_flag(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "answer": "b"}])
    with pytest.raises(InfscopeError, match="--output-col") as info:
        load_rows(path, task="instruction")
    assert "output" in str(info.value) and "answer" in str(info.value)
    with pytest.raises(InfscopeError, match="--text-col/--label-col"):
        load_rows(path)
    loaded = load_rows(path, columns=ColumnMap(output="answer"))
    assert loaded.rows == [{"id": "row-00000", "instruction": "a", "input": "", "output": "b"}]
    assert list(loaded.rows[0]) == ["id", "instruction", "input", "output"]
    with pytest.raises(InfscopeError, match="'resp' given by --output-col"):
        load_rows(path, columns=ColumnMap(output="resp"))


def test_classification_missing_label_flag(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "x", "y": 1}])
    with pytest.raises(InfscopeError, match="--label-col"):
        load_rows(path, task="classification")


@pytest.mark.parametrize("content", ["", "\n\n", "[]", '{"data": []}'])
def test_empty_dataset_is_an_error(tmp_path, content):
    suffix = ".jsonl" if not content.startswith(("[", "{")) else ".json"
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(InfscopeError, match="no rows"):
        load_rows(path)


def test_empty_csv_is_an_error(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("instruction,output\n")
    with pytest.raises(InfscopeError, match="no rows"):
        load_rows(path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(InfscopeError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")
    odd = tmp_path / "rows.xml"
    odd.write_text("<x/>")
    with pytest.raises(InfscopeError, match="suffix"):
        load_rows(odd)
    folder = tmp_path / "plain_dir"
    folder.mkdir()
    with pytest.raises(InfscopeError, match="not a saved datasets folder"):
        load_rows(folder)


def test_unreadable_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(InfscopeError, match="UTF-8"):
        load_rows(path)


def test_duplicate_ids_are_an_error(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"id": 1, "text": "a", "label": 0}, {"id": "1", "text": "b", "label": 1}]
    )
    with pytest.raises(InfscopeError, match="duplicate ids.*'1'"):
        load_rows(path)


def test_ids_from_position_column_or_flag(tmp_path):
    records = [{"key": f"k{i}", "text": f"t{i}", "label": i % 2} for i in range(12)]
    path = _jsonl(tmp_path / "d.jsonl", records)
    assert [r["id"] for r in load_rows(path).rows][:2] == ["row-00000", "row-00001"]
    assert load_rows(path).rows[11]["id"] == "row-00011"
    by_key = load_rows(path, columns=ColumnMap(id="key"))
    assert [r["id"] for r in by_key.rows] == [f"k{i}" for i in range(12)]
    assert "key" not in by_key.rows[0]
    with_id = _jsonl(tmp_path / "i.jsonl", [{"id": 7, "text": "a", "label": 0}])
    assert load_rows(with_id).rows[0]["id"] == "7"


def test_string_labels_map_to_sorted_names(tmp_path):
    path = _jsonl(
        tmp_path / "s.jsonl",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "pos"}],
    )
    loaded = load_rows(path)
    assert loaded.task == "classification"
    assert loaded.label_names == ["neg", "pos"]
    assert [r["label"] for r in loaded.rows] == [1, 0, 1]
    ints = _jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": "10"}])
    assert [r["label"] for r in load_rows(ints).rows] == [2, 10]
    missing = _jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": None}])
    with pytest.raises(InfscopeError, match="no label"):
        load_rows(missing)


def test_json_data_wrapper_limit_and_fingerprint(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"data": [{"instruction": f"i{k}", "output": "o"} for k in range(5)]}))
    loaded = load_rows(path, limit=2)
    assert [r["instruction"] for r in loaded.rows] == ["i0", "i1"]
    assert loaded.format == "json"
    assert loaded.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with pytest.raises(InfscopeError, match="limit"):
        load_rows(path, limit=0)


def test_column_map_swap_and_from_options(tmp_path):
    assert column_map_from_options() is None
    cmap = column_map_from_options(text_col="sentence", label_col="y")
    assert cmap == ColumnMap(text="sentence", label="y")
    path = _jsonl(tmp_path / "x.jsonl", [{"sentence": "hello", "y": "b", "text": "ignored"}])
    loaded = load_rows(path, columns=cmap)
    assert loaded.rows == [{"id": "row-00000", "text": "hello", "label": 0}]
    assert loaded.label_names == ["b"]


def test_saved_datasets_dict_picks_split(tmp_path):
    import datasets

    ddict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": ["good", "bad"], "label": [1, 0]},
                features=datasets.Features(
                    {
                        "sentence": datasets.Value("string"),
                        "label": datasets.ClassLabel(names=["negative", "positive"]),
                    }
                ),
            ),
            "validation": datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]}),
        }
    )
    ddict.save_to_disk(str(tmp_path / "saved"))
    loaded = load_rows(tmp_path / "saved", columns=ColumnMap(text="sentence"))
    assert loaded.format == "hf_disk"
    assert [(r["text"], r["label"]) for r in loaded.rows] == [("good", 1), ("bad", 0)]
    assert loaded.label_names == ["negative", "positive"]
    val = load_rows(tmp_path / "saved", columns=ColumnMap(text="sentence"), split="validation")
    assert [r["text"] for r in val.rows] == ["meh"]
    with pytest.raises(InfscopeError, match="no split 'test'.*train, validation"):
        load_rows(tmp_path / "saved", split="test")


def test_hub_name_offline_fails_fast_in_one_line():
    start = time.perf_counter()
    with pytest.raises(InfscopeError) as info:
        load_rows("glue/sst2")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "local file" in message


def test_hub_name_reads_cache_with_its_column_mapping(tmp_path):
    import datasets

    cache = tmp_path / "hub-cache"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"question": ["1+1?", "2+2?"], "answer": ["2", "4"]})}
    ).save_to_disk(str(cache / "gsm8k"))
    loaded = load_rows("gsm8k")
    assert loaded.format == "hub" and loaded.task == "instruction"
    assert [(r["instruction"], r["output"]) for r in loaded.rows] == [("1+1?", "2"), ("2+2?", "4")]
    datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [1]}).save_to_disk(
        str(cache / "glue__mrpc")
    )
    mrpc = load_rows("glue/mrpc")
    assert mrpc.task == "classification"
    assert mrpc.rows == [{"id": "row-00000", "text": "a", "text_b": "b", "label": 1}]


def test_builtin_source_and_split():
    train = load_rows("builtin:sentence_transform")
    test = load_rows("builtin:sentence_transform", split="test")
    assert (len(train), len(test)) == (900, 100)
    assert train.format == "builtin" and train.task == "instruction"
    assert train.label_names[0] == "reverse_words"
    assert not {r["id"] for r in train.rows} & {r["id"] for r in test.rows}
    assert load_rows("builtin:sentence_transform").fingerprint == train.fingerprint
    with pytest.raises(InfscopeError, match="unknown built-in"):
        load_rows("builtin:nope")


def test_parquet_and_csv_labels_round_trip(tmp_path):
    rows = [{"id": f"r{i}", "text": f"t{i}", "label": i % 3} for i in range(6)]
    for suffix in (".csv", ".parquet"):
        loaded = load_rows(write_rows(rows, tmp_path / f"c{suffix}"))
        assert [(r["id"], r["text"], r["label"]) for r in loaded.rows] == [
            (r["id"], r["text"], r["label"]) for r in rows
        ]


def test_download_saves_to_cache_then_loads_offline(tmp_path, monkeypatch):
    """Simulate a reachable Hub (no network): the fake load_dataset is called once, then the cache serves."""
    import datasets

    from infscope.data import hub

    calls = []

    def fake_load_dataset(path, name=None, cache_dir=None):
        calls.append((path, name))
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict(
                    {"instruction": ["i"], "input": [""], "output": ["o"], "text": ["t"]}
                )
            }
        )

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    first = load_rows("tatsu-lab/alpaca")
    assert calls == [("tatsu-lab/alpaca", None)]
    assert (tmp_path / "hub-cache" / "tatsu-lab__alpaca" / "dataset_dict.json").exists()
    assert [(r["instruction"], r["output"]) for r in first.rows] == [("i", "o")]
    monkeypatch.setattr(hub, "offline_reason", lambda: "HF_HUB_OFFLINE is set")
    again = load_rows("tatsu-lab/alpaca")
    assert calls == [("tatsu-lab/alpaca", None)] and again.fingerprint == first.fingerprint
    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    hub.download("glue/sst2")
    assert calls[-1] == ("nyu-mll/glue", "sst2")
    assert [c.name for c in hub.list_cached()] == ["glue/sst2", "tatsu-lab/alpaca"]
    assert hub.list_cached()[1].splits == {"train": 1}
