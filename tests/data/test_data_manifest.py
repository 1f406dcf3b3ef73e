"""Manifests a user writes by hand: id + is_noisy JSONL, a JSON array, or noisy ids one a line.

Each form is read into the full schema (optional fields filled), lined up with the training ids
(unlisted rows clean, other ids left out), and scored against sklearn on a truth vector built by a
plain loop.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from infscope.data.manifest import (
    MANIFEST_FIELDS,
    NOT_IN_TRAINING,
    manifest_for_ids,
    read_manifest,
    write_manifest,
)
from infscope.errors import InfscopeError
from infscope.evaluate.detection import detection_from_manifest

TRAIN_IDS = [f"r{i}" for i in range(12)]
BAD = ["r1", "r4", "r9"]


def _truth(noisy_ids) -> np.ndarray:
    """The noisy flag of every training row, by a plain loop (the independent reference)."""
    return np.array([row_id in noisy_ids for row_id in TRAIN_IDS])


def test_jsonl_with_id_and_is_noisy_only_fills_every_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    records = [{"id": "r1", "is_noisy": True}, {"id": "r2", "is_noisy": "false"}, {"id": 7, "is_noisy": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    frame = read_manifest(path)
    assert list(frame.columns) == list(MANIFEST_FIELDS)
    assert frame["id"].tolist() == ["r1", "r2", "7"]
    assert frame["is_noisy"].dtype == bool and frame["is_noisy"].tolist() == [True, False, True]
    assert frame["label_changed"].dtype == bool and not frame["label_changed"].any()
    for name in ("family", "operator", "field", "original", "noisy", "seed"):
        assert frame[name].tolist() == [None, None, None], name
    severity = frame["severity"].tolist()  # 0 for the clean row, unknown for the noisy ones
    assert severity[1] == 0.0 and math.isnan(severity[0]) and math.isnan(severity[2])


def test_json_array_keeps_given_fields_and_groups_only_rows_with_a_family(tmp_path):
    path = tmp_path / "bad.json"
    records = [
        {"id": "r1", "is_noisy": True, "family": "grammar", "severity": 0.5},
        {"id": "r4", "is_noisy": True, "family": "label", "label_changed": True},
        {"id": "r9", "is_noisy": True},
        {"id": "r3", "is_noisy": False, "note": "checked by hand"},
    ]
    path.write_text(json.dumps(records, indent=2))
    frame = read_manifest(path, train_ids=TRAIN_IDS)
    assert frame["id"].tolist() == TRAIN_IDS and frame["is_noisy"].tolist() == _truth(BAD).tolist()
    by_id = frame.set_index("id")
    assert by_id.loc["r1", "severity"] == 0.5 and by_id.loc["r4", "label_changed"]
    assert by_id.loc["r3", "note"] == "checked by hand" and by_id.loc["r0", "note"] is None
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(TRAIN_IDS)) + 2 * _truth(BAD)
    report = detection_from_manifest(scores, frame, ids=TRAIN_IDS)
    assert report["auroc"] == pytest.approx(roc_auc_score(_truth(BAD), scores), abs=1e-12)
    families = report["by"]["family"]
    assert sorted(families) == ["grammar", "label"]  # r9 has no family: counted only overall
    keep = ~_truth(BAD) | (np.array(TRAIN_IDS) == "r1")
    assert families["grammar"]["auroc"] == pytest.approx(roc_auc_score(_truth(BAD)[keep], scores[keep]))
    assert report["by"]["operator"] == {}


def test_plain_ids_file_makes_every_other_training_row_clean(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("r9\n\n  r1  \nr4\nval-3\n")  # val-3 went to the validation split
    frame = read_manifest(path)
    assert frame["id"].tolist() == ["r9", "r1", "r4", "val-3"] and frame["is_noisy"].all()
    lined = manifest_for_ids(frame, TRAIN_IDS)
    assert lined["id"].tolist() == TRAIN_IDS
    assert lined["is_noisy"].tolist() == _truth(BAD).tolist()
    assert lined.attrs[NOT_IN_TRAINING] == 1
    clean = lined[~lined["is_noisy"]]
    assert (clean["severity"] == 0.0).all() and not clean["label_changed"].any()
    assert clean["family"].isna().all()
    scores = np.linspace(1.0, -1.0, len(TRAIN_IDS))
    report = detection_from_manifest(scores, lined, ids=TRAIN_IDS)
    assert report["auroc"] == pytest.approx(roc_auc_score(_truth(BAD), scores), abs=1e-12)
    assert report["n_noisy"] == 3 and report["by"]["family"] == {}


def test_short_manifest_is_an_error_for_detection_until_lined_up():
    short = pd.DataFrame({"id": BAD, "is_noisy": [True] * 3, "family": [None] * 3, "operator": [None] * 3})
    scores = pd.DataFrame({"id": TRAIN_IDS, "score": np.arange(len(TRAIN_IDS), dtype=float)})
    with pytest.raises(InfscopeError, match="not in the manifest"):
        detection_from_manifest(scores, short)
    report = detection_from_manifest(scores, manifest_for_ids(short, TRAIN_IDS[::-1]))  # any order
    assert report["auroc"] == pytest.approx(roc_auc_score(_truth(BAD), scores["score"]), abs=1e-12)


def test_no_manifest_means_every_row_clean():
    frame = manifest_for_ids(None, TRAIN_IDS)
    assert frame["id"].tolist() == TRAIN_IDS and not frame["is_noisy"].any()
    assert list(frame.columns) == list(MANIFEST_FIELDS)


def test_generated_manifest_reads_back_unchanged(tmp_path):
    records = [
        {
            "id": f"r{i}",
            "is_noisy": i == 2,
            "family": "grammar" if i == 2 else None,
            "operator": "typo" if i == 2 else None,
            "field": "output" if i == 2 else None,
            "original": "a cat" if i == 2 else None,
            "noisy": "a cta" if i == 2 else None,
            "label_changed": False,
            "severity": 0.3 if i == 2 else 0.0,
            "seed": 5,
        }
        for i in range(4)
    ]
    frame = read_manifest(write_manifest(records, tmp_path / "m.jsonl"))
    assert frame.to_dict("records") == records
    lined = manifest_for_ids(frame, ["r3", "r2", "r1", "r0"])
    assert lined.to_dict("records") == records[::-1]


def test_is_noisy_may_be_left_out_of_every_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "r1"}\n{"id": "r4", "family": "grammar"}\n')
    frame = read_manifest(path)
    assert frame["is_noisy"].tolist() == [True, True] and frame["family"].tolist() == [None, "grammar"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "r1", "is_noisy": true}\n{"is_noisy": true}\n', "record 2 .* lacks 'id'"),
        ('{"id": "r1", "is_noisy": true}\n{"id": "r2"}\n', "record 2 .* lacks 'is_noisy'"),
        ('[{"id": "r1"}, "r2"]', "item 2 .* not an object"),
        ('[{"id": "r1"},', "not valid JSON"),
        ('{"id": "r1"}\n{not json\n', "line 2"),
        ("r1\nr2\nr1\n", "repeats id 'r1'"),
        ('{"id": "r1", "is_noisy": "maybe"}\n', "is_noisy"),
    ],
)
def test_bad_manifests_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InfscopeError, match=message):
        read_manifest(path)


def test_manifest_of_other_data_and_absent_file_are_refused(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("x1\nx2\n")
    with pytest.raises(InfscopeError, match="none of the 2 manifest ids is a training row id"):
        read_manifest(path, train_ids=TRAIN_IDS)
    with pytest.raises(InfscopeError, match="not found"):
        read_manifest(tmp_path / "absent.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    lined = read_manifest(empty, train_ids=TRAIN_IDS)
    assert lined["id"].tolist() == TRAIN_IDS and not lined["is_noisy"].any()


def test_write_manifest_stays_strict(tmp_path):
    with pytest.raises(ValueError, match="lacks fields"):
        write_manifest([{"id": "r1", "is_noisy": True}], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
