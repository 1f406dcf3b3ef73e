"""The report marks TracIn-WE's tokens in flagged rows: against token_scores and the tokenizer's own offsets.

A tiny-llama LoRA model scores a few rows (one holds ``<script>`` markup) with the registered
``tracin_we`` method; the Scores go into a run laid out as ``infscope demo`` leaves it, and the
report is rendered. The reference for *which* tokens: :func:`token_scores` (positive shares, top 3).
The reference for *where*: the fast tokenizer's offset mapping of the prompt and the response,
tokenised the way rows are encoded (independent of the decoding the method uses).
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import FakeInputs, tuned_tiny_llama
from infscope.data.builtin import make_builtin
from infscope.data.formatting import INSTRUCTION_HEADER, format_prompt
from infscope.estimators.registry import get_method
from infscope.estimators.scores import Scores
from infscope.estimators.tracin_we import locate_field, token_scores
from infscope.report import collect, render_html
from infscope.report.collect import row_token_marks
from infscope.report.html import marked_html
from infscope.runs import ModelSpec, RunDir, RunRecord

TOP = 3
ENCODE = {"task": "causal", "max_length": 160, "batch_size": 4, "response_only": True}
EVIL = '<script>alert("x")</script> & "done"'
FIELDS = ("instruction", "input", "output")


@pytest.fixture(scope="module")
def scored():
    loaded = tuned_tiny_llama()
    split = make_builtin("sentence_transform", seed=0, n_classes=3, per_class=3, n_test_per_class=1)
    rows = [dict(r) for r in split.train]
    rows[1]["output"] = f"{rows[1]['output']} {EVIL}"
    scores = get_method("tracin_we").compute(FakeInputs(loaded, rows, split.test, ENCODE), {"top": TOP})
    return loaded, rows, split.test, scores


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_run(root: Path, rows: list[dict], scores: Scores) -> Path:
    """A finished demo run of ``rows`` whose only scores are ``scores`` and a loss-like baseline."""
    record = RunRecord(
        kind="demo",
        model=ModelSpec(name="tiny-llama", task="instruction"),
        manifest="data/manifest.jsonl",
        stages={"finetune": {"order": 1, "seconds": 1.0, "peak_rss_mb": 1.0, "info": {}}},
    )
    layout = RunDir.create(root / "run", record).layout
    _jsonl(layout.train, rows)
    _jsonl(layout.val, rows[:1])
    _jsonl(layout.train_clean, rows)
    empty = {"family": None, "operator": None, "field": None, "original": None, "noisy": None}
    manifest = [
        {"id": r["id"], "is_noisy": False, **empty, "label_changed": False, "severity": 0.0, "seed": 0}
        for r in rows
    ]
    _jsonl(layout.manifest, manifest)
    checkpoint = layout.finetune / "checkpoints" / "epoch-1"
    checkpoint.mkdir(parents=True)
    info = {"path": str(checkpoint), "epoch": 1, "step": 1, "lr": 0.0, "val_loss": 1.0, "train_loss": 1.0}
    (layout.finetune / "checkpoints.json").write_text(json.dumps({"checkpoints": [info]}))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"config": {"lr": 1e-3}}))
    layout.results_dir.mkdir(exist_ok=True)
    scores.save(layout.scores("tracin_we"))
    scores.write_table(layout.results("tracin_we", "parquet"))
    baseline = Scores(np.arange(len(rows), dtype=float), scores.train_ids, method="loss")
    baseline.write_table(layout.results("loss", "parquet"))
    return layout.root


class CellParser(HTMLParser):
    """Rows of the flagged table: per ``<tr data-method>``, each cell's text and its ``<mark>`` spans."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[tuple[str, list[tuple[int, int, str]]]]]] = []
        self._cell: list | None = None
        self._mark: tuple[int, str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-method" in attrs:
            self.rows.append((attrs["data-method"], []))
        elif tag == "td" and self.rows:
            self._cell = ["", []]
        elif tag == "mark" and self._cell is not None:
            self._mark = (len(self._cell[0]), attrs.get("class", ""))

    def handle_endtag(self, tag):
        if tag == "mark" and self._mark is not None:
            start, cls = self._mark
            self._cell[1].append((start, len(self._cell[0]), cls))
            self._mark = None
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append((self._cell[0], self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def reference_spans(tokenizer, row: dict, wanted: set[int]) -> dict[str, list[tuple[int, int]]]:
    """Spans of the ``wanted`` token ids in the instruction and output, from the tokenizer's offsets.

    Rows encode as ``tokenize(prompt) + tokenize(output)``; a token's span is its offsets with the
    surrounding blanks left out, clipped to the field it overlaps.
    """
    prompt = tokenizer(format_prompt(row), add_special_tokens=True, return_offsets_mapping=True)
    response = tokenizer(row["output"], add_special_tokens=False, return_offsets_mapping=True)
    lo = len(INSTRUCTION_HEADER)
    parts = (
        ("instruction", prompt, format_prompt(row), lo, lo + len(row["instruction"])),
        ("output", response, row["output"], 0, len(row["output"])),
    )
    out: dict[str, list[tuple[int, int]]] = {"instruction": [], "output": []}
    for field, enc, text, start_f, end_f in parts:
        for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            while s < e and text[s].isspace():
                s += 1
            while e > s and text[e - 1].isspace():
                e -= 1
            if token in wanted and s < e and s < end_f and e > start_f:
                out[field].append((max(s, start_f) - start_f, min(e, end_f) - start_f))
    return out


def test_report_marks_the_tokens_token_scores_ranks_highest(scored, tmp_path):
    loaded, rows, queries, scores = scored
    run = make_run(tmp_path, rows, scores)
    data = collect(run, top_k=len(rows))
    page = render_html(data)
    parser = CellParser()
    parser.feed(page)
    by_row = {cells[3][0]: cells for method, cells in parser.rows if method == "tracin_we"}
    assert set(by_row) == {r["id"] for r in rows}
    flagged = {r["id"]: r for r in data["flagged"] if r["method"] == "tracin_we"}
    n_marks = 0
    for row in rows:
        table = token_scores(loaded.model, loaded.tokenizer, row, queries, **ENCODE)
        want = table[table["score"] > 0].head(TOP)
        got = flagged[row["id"]]["tokens"]
        assert [t["token"] for t in got] == list(want["token"])
        np.testing.assert_allclose([t["score"] for t in got], want["score"], rtol=1e-4)
        if got:
            assert got[0]["level"] == 5 and all(1 <= t["level"] <= 5 for t in got)
        cells = by_row[row["id"]]
        for field, spans in reference_spans(loaded.tokenizer, row, set(want["token_id"])).items():
            text, marks = cells[5 + FIELDS.index(field)]
            assert text == row[field]  # every character shown as it is: escaped, then read back
            assert [(s, e) for s, e, _ in marks] == spans
            assert all(cls.startswith("tok tok-") for *_, cls in marks)
            n_marks += len(spans)
        tokens_text = cells[-1][0]
        for token in want["token"]:
            assert token.strip() in tokens_text
    assert n_marks >= 5  # the check above compared real highlights, not only empty lists
    assert EVIL not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;done&quot;" in page
    loss_cells = [cells for method, cells in parser.rows if method == "loss"]
    assert loss_cells and all(not c[-1][0].strip() and not any(m for _, m in c) for c in loss_cells)


def test_marked_html_escapes_every_piece():
    text = 'a <b>"x"</b> & c'
    html = marked_html(text, [[2, 5, 3], [13, 14, 1]])
    assert (
        html
        == 'a <mark class="tok tok-3">&lt;b&gt;</mark>&quot;x&quot;&lt;/b&gt; <mark class="tok tok-1">&amp;</mark> c'
    )
    assert marked_html("<i>", []) == "&lt;i&gt;"


def test_row_token_marks_levels_and_bad_spans():
    entry = {
        "tokens": [["ab", 0.8, 1], ["c", 0.39, 2], ["d", 0.05, 3]],
        "spans": {"output": [[4, 5, 1], [0, 2, 0], [1, 3, 2], [3, 99, 0]], "nope": [[0, 1, 0]]},
    }
    got = row_token_marks(entry, {"output": "ab c d", "instruction": "x"})
    assert [t["level"] for t in got["tokens"]] == [5, 3, 1]  # ceil(5 * share of the top token)
    # sorted; the overlapping [1, 3) and the out-of-text [3, 99) dropped; unknown fields ignored
    assert got["marks"] == {"output": [[0, 2, 5], [4, 5, 3]]}
    assert row_token_marks(None, {}) == {"tokens": [], "marks": {}}
    assert row_token_marks({"tokens": [["a", -1.0, 1]]}, {}) == {"tokens": [], "marks": {}}


def test_locate_field_finds_whole_and_truncated_fields():
    full = "<s>vex method, transform: the cat\n\n### Response:\nthe cat sat"
    assert locate_field(full, "the cat sat") == (49, 60, 0)
    # the prompt lost its beginning, the response its end
    assert locate_field(full, "Using the Blorvex method, transform: the cat") == (3, 33, 14)
    assert locate_field(full, "the cat sat on the mat", 40) == (49, 60, 0)
    assert locate_field(full, "nothing like it") is None
