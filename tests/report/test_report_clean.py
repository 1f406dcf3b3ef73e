"""The cleaning report page: a clean_report.json made by the loop's own clean_report() (so the schema is
the real one) from hand-made rounds and changes, rendered and checked against those numbers: the SVG
curve is an affine image of the per-round metric with the baselines on the same scale, the kept round
is marked, row text with markup stays text, diffs turn before into after, the changes list is capped,
and both CLI entries (`infscope report DIR`, the end of `infscope clean`) write the page."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

import infscope.actions.loop as loop_module
from infscope.actions.changes import Change
from infscope.actions.layout import CleanLayout
from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.evaluate.jsonable import to_jsonable
from infscope.report.clean import _ticks, render_clean_html, write_clean_report
from infscope.runs import atomic_write_json

EVIL = '<script>alert("x")</script> & <b>bold</b> café'
ACCURACY = [0.5, 0.625, 0.75, 0.6875]
LOSS = [1.2, 1.05, 0.9, 0.95]
BASELINES = {
    "noisy": {"rows_changed": 0, "accuracy": 0.5, "loss": 1.2},
    "random": {"rows_changed": 8, "accuracy": 0.4375, "loss": 1.31},
    "oracle": {"rows_changed": 6, "accuracy": 0.875, "loss": 0.7},
}
BEST = 2


def _table(metric_values, loss_values, changed=(0, 4, 4, 4)) -> list[dict]:
    table, cumulative = [], 0
    for r, (value, loss) in enumerate(zip(metric_values, loss_values, strict=True)):
        cumulative += changed[r]
        gain = None if r == 0 else metric_values[r] - metric_values[r - 1]
        table.append({"round": r, "rows": 30 - cumulative, "changed": changed[r], "review": 0,
                      "cumulative": cumulative, "loss": loss, "accuracy": value, "gain": gain})  # fmt: skip
    best = int(np.argmax(metric_values))
    for row in table:
        row["kept"] = row["round"] == best
    return table


def _drops(n: int) -> list[Change]:
    return [
        Change(
            1 + i % 2,
            f"r{i:03d}",
            "drop",
            {"id": f"r{i:03d}", "text": f"row {i} {EVIL}", "label": i % 2},
            None,
            2.0 - i / 100,
            "loss",
            f"among the most harmful rows <i>{i}</i>",
        )  # fmt: skip
        for i in range(n)
    ]


def _write(
    out: Path, changes: list[Change], *, action="drop", table=None, baselines=None, record=None
) -> Path:
    """A cleaning directory holding what run_clean writes at its end (report via the real clean_report)."""
    table = table or _table(ACCURACY, LOSS)
    best = next(row["round"] for row in table if row["kept"])
    cfg = loop_module.CleanConfig(data="d.csv", val="v.csv", test="t.csv", action=action, k="4")
    report = loop_module.clean_report(
        cfg, None, table, best, "accuracy", True, BASELINES if baselines is None else baselines,
        changes, "ran all 3 rounds", out / "cleaned.csv", out / "audit.jsonl",
    )  # fmt: skip
    layout = CleanLayout(out)
    atomic_write_json(layout.report, to_jsonable(report))
    if record is not None:
        atomic_write_json(layout.record, record)
    return out


@pytest.fixture
def page(tmp_path) -> str:
    out = _write(tmp_path / "clean", _drops(12))
    path = write_clean_report(out)
    assert path == out / "clean_report.html"
    return path.read_text(encoding="utf-8")


def _attrs(tag: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def _polyline(page: str) -> np.ndarray:
    tag = re.search(r'<polyline class="gain-curve"[^>]*>', page).group(0)
    return np.array([[float(v) for v in p.split(",")] for p in _attrs(tag)["points"].split()])


def test_row_text_with_markup_stays_text(page):
    # the only script elements are the page's own (data + behaviour); row text, ids and reasons are escaped
    assert page.count("<script") == 2 and "<script>alert" not in page
    assert html.escape(f"text: row 3 {EVIL}") in page  # a dropped row: its whole text struck out
    assert f"<del>label: 1\n{html.escape(f'text: row 3 {EVIL}')}</del>" in page  # id in its own column
    assert html.escape("among the most harmful rows <i>3</i>") in page and "<i>3</i>" not in page
    data = json.loads(re.search(r'id="infscope-data">(.*?)</script>', page).group(1))
    assert data["best_round"] == BEST and data["curve"]["accuracy"] == ACCURACY


def test_curve_is_an_affine_image_of_the_round_metrics(page):
    points = _polyline(page)
    assert len(points) == len(ACCURACY)
    xs, ys = points[:, 0], points[:, 1]
    assert np.allclose(np.diff(xs), np.diff(xs)[0], atol=0.02) and np.diff(xs)[0] > 0  # one step per round
    # y = a + b * accuracy with b < 0 (higher is drawn higher), exact up to the 2-decimal rounding
    design = np.stack([np.ones(len(ACCURACY)), np.array(ACCURACY)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    assert b < 0 and np.abs(design @ [a, b] - ys).max() < 0.011
    # the baselines are horizontal lines on the same scale, and their values are printed
    lines = {_attrs(t)["data-baseline"]: _attrs(t) for t in re.findall(r'<line class="baseline"[^>]*>', page)}
    assert set(lines) == set(BASELINES)
    for name, attrs in lines.items():
        value = BASELINES[name]["accuracy"]
        assert float(attrs["y1"]) == float(attrs["y2"]) and abs(float(attrs["y1"]) - (a + b * value)) < 0.011
        assert float(attrs["data-value"]) == value
    assert (
        ">no cleaning 0.5<" in page
        and ">random rows 0.438<" in page
        and ">oracle (injected noise) 0.875<" in page
    )
    # each round's point carries its value and sits on the line
    dots = [_attrs(t) for t in re.findall(r'<circle class="round-point"[^>]*>', page)]
    assert [float(d["data-value"]) for d in dots] == ACCURACY
    assert np.allclose([[float(d["cx"]), float(d["cy"])] for d in dots], points, atol=0.011)


def test_kept_round_is_marked_in_chart_and_tables(page):
    points = _polyline(page)
    kept = [_attrs(t) for t in re.findall(r'<circle class="kept-round"[^>]*>', page)]
    assert len(kept) == 1 and kept[0]["data-round"] == str(BEST)
    assert np.allclose([float(kept[0]["cx"]), float(kept[0]["cy"])], points[BEST], atol=0.011)
    rounds = re.search(r'<table id="rounds-table".*?</table>', page, re.S).group(0)
    assert re.findall(r'<tr class="kept-row" data-round="(\d+)"', rounds) == [str(BEST)]
    assert rounds.count("<tr ") == len(ACCURACY)
    for value, loss in zip(ACCURACY, LOSS, strict=True):
        assert f">{value:.4f}<" in rounds and f">{loss:.4f}<" in rounds
    baselines = re.search(r'<table id="baselines-table".*?</table>', page, re.S).group(0)
    for name, base in BASELINES.items():
        row = re.search(rf'<tr data-baseline="{name}">.*?</tr>', baselines).group(0)
        gain = base["accuracy"] - BASELINES["noisy"]["accuracy"]
        assert (
            f">{base['accuracy']:.4f}<" in row
            and f">{gain:.4f}<" in row
            and f">{base['rows_changed']}<" in row
        )
    kept_row = re.search(r'<tr data-baseline="kept">.*?</tr>', baselines).group(0)
    assert f">{ACCURACY[BEST]:.4f}<" in kept_row and f">{ACCURACY[BEST] - ACCURACY[0]:.4f}<" in kept_row


def _changes_table(page: str) -> str:
    return re.search(r'<table id="changes-table".*?</table>', page, re.S).group(0)


def test_changes_table_lists_kept_changes_and_caps(tmp_path):
    out = _write(tmp_path / "many", _drops(250))
    page = write_clean_report(out).read_text(encoding="utf-8")
    table = _changes_table(page)
    assert table.count('<tr data-action="drop">') == loop_module.REPORT_CHANGES == 200
    assert "200 of 250 changes shown" in page
    ids = re.findall(r'<tr data-action="drop"><td class="num" data-sort="\d">\d</td><td>(r\d+)</td>', table)
    assert ids == [f"r{i:03d}" for i in range(200)]
    data = json.loads((out / "clean_report.json").read_text())
    small = render_clean_html(data, max_changes=5)
    assert _changes_table(small).count("<tr data-action") == 5 and "5 of 250 changes shown" in small
    first = data["changes"][0]
    row = re.search(r'<tr data-action="drop">.*?</tr>', table, re.S).group(0)
    assert f">{first['score']:.4f}<" in row and f">{first['round']}<" in row


def test_repair_diff_turns_before_into_after(tmp_path):
    before, after = "The answer is <b>4</b> & done.", "The answer is 5 </script> & done."
    changes = [Change(1, "q<1>", "repair", before, after, 0.9, "loss", "local:x rewrite"),
               Change(1, "q2", "review", "left <alone>", None, 0.8, "loss", "check by hand")]  # fmt: skip
    page = write_clean_report(_write(tmp_path / "rep", changes, action="repair")).read_text(encoding="utf-8")
    cell = re.search(r'<tr data-action="repair">.*?</tr>', page, re.S).group(0)
    diff = re.findall(r'<div class="cell-text">(.*?)</div>', cell, re.S)[-1]
    assert "<del>" in diff and "<ins>" in diff and "</script>" not in diff
    assert (
        html.unescape(re.sub(r"<ins>.*?</ins>", "", diff).replace("<del>", "").replace("</del>", ""))
        == before
    )
    assert (
        html.unescape(re.sub(r"<del>.*?</del>", "", diff).replace("<ins>", "").replace("</ins>", "")) == after
    )
    assert "<td>q&lt;1&gt;</td>" in cell
    review = re.search(r'<tr data-action="review">.*?</tr>', page, re.S).group(0)
    assert "unchanged, left for review" in review and "left &lt;alone&gt;" in review and "<ins>" not in review


def test_relabel_and_reweight_show_names_and_weights(tmp_path):
    record = {"kind": "clean", "model": {"label_names": ["negative", "pos<itive>"]}}
    changes = [Change(1, "a", "relabel", 0, 1, 1.5, "loss", "margin 0.7 >= 0.5")]
    page = write_clean_report(_write(tmp_path / "rel", changes, action="relabel", record=record)).read_text()
    cell = re.search(r'<tr data-action="relabel">.*?</tr>', page, re.S).group(0)
    assert "<del>negative</del><ins>pos&lt;itive&gt;</ins>" in cell
    changes = [Change(1, "b", "reweight", 1.0, 0.25, 1.1, "loss", "keep probability")]
    page = write_clean_report(_write(tmp_path / "rw", changes, action="reweight")).read_text()
    cell = re.search(r'<tr data-action="reweight">.*?</tr>', page, re.S).group(0)
    assert "<del>1</del><ins>0.25</ins>" in cell


def test_kept_round_zero_and_no_oracle_are_said(tmp_path):
    table = _table([0.7, 0.6], [1.0, 1.1], changed=(0, 4))
    baselines = {k: v for k, v in BASELINES.items() if k != "oracle"}
    page = write_clean_report(_write(tmp_path / "z", [], table=table, baselines=baselines)).read_text()
    assert "No cleaning round improved the test metric" in page and "there is no oracle baseline" in page
    assert re.findall(r'<circle class="kept-round" data-round="(\d+)"', page) == ["0"]
    assert "No row was changed in the kept rounds." in page


def test_bad_directories_fail_with_one_line(tmp_path):
    with pytest.raises(InfscopeError, match="no clean_report.json"):
        write_clean_report(tmp_path)
    (tmp_path / "clean_report.json").write_text('{"kind": "run"}')
    with pytest.raises(InfscopeError, match="is not a clean report"):
        write_clean_report(tmp_path)
    out = _write(tmp_path / "ok", _drops(1))
    with pytest.raises(InfscopeError, match="should end in .html"):
        write_clean_report(out, out / "page.txt")
    assert not (out / "clean_report.html").exists() and not (out / "page.txt").exists()


def test_report_command_on_a_cleaning_directory(tmp_path, capsys):
    out = _write(tmp_path / "cli", _drops(3), record={"kind": "clean", "model": {"label_names": None}})
    assert main(["report", str(out)]) == 0
    page = (out / "clean_report.html").read_text()
    assert 'class="gain-curve"' in page and not (out / "report.html").exists()
    assert main(["report", str(out), "--out", str(tmp_path / "elsewhere.html")]) == 0
    assert (tmp_path / "elsewhere.html").read_text() == page
    # an interrupted loop (record, no clean_report.json): exit 2 saying how to resume, nothing written
    half = tmp_path / "half"
    atomic_write_json(CleanLayout(half).record, {"kind": "clean"})
    capsys.readouterr()
    assert main(["report", str(half)]) == 2
    assert "rerun `infscope clean`" in capsys.readouterr().err and not (half / "clean_report.html").exists()


def test_clean_command_writes_the_page(tmp_path, monkeypatch):
    out = tmp_path / "loop"

    def fake_run_clean(cfg, target, **kwargs):  # the loop itself is tested in tests/actions
        _write(Path(target), _drops(2))
        table = _table(ACCURACY, LOSS)
        return loop_module.CleanResult(table, BEST, "accuracy", True, BASELINES, "ran all 3 rounds",
                                       Path(target) / "cleaned.csv", Path(target) / "audit.jsonl")  # fmt: skip

    monkeypatch.setattr(loop_module, "run_clean", fake_run_clean)
    argv = ["clean", "d.csv", "--val", "v.csv", "--test", "t.csv", "--out", str(out)]
    assert main(argv) == 0
    page = (out / "clean_report.html").read_text()
    assert [
        float(v) for v in re.findall(r'class="round-point" data-round="\d" data-value="([^"]+)"', page)
    ] == ACCURACY


@pytest.mark.parametrize("lo,hi", [(0.402, 0.91), (1.19, 1.21), (-0.05, 0.05), (12.3, 987.0), (0.95, 1.05)])
def test_axis_ticks_are_round_and_inside(lo, hi):
    ticks = _ticks(lo, hi)
    assert 3 <= len(ticks) <= 7 and lo <= ticks[0] and ticks[-1] <= hi
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10.0 ** np.floor(np.log10(steps[0]))
    assert any(np.isclose(mantissa, m) for m in (1.0, 2.0, 2.5, 5.0))


def test_labels_of_close_baselines_do_not_overlap(tmp_path):
    baselines = {"noisy": {"rows_changed": 0, "accuracy": 0.5}, "random": {"rows_changed": 4, "accuracy": 0.5},
                 "oracle": {"rows_changed": 6, "accuracy": 0.505}}  # fmt: skip
    page = write_clean_report(_write(tmp_path / "close", _drops(1), baselines=baselines)).read_text()
    ys = sorted(
        float(y)
        for y in re.findall(
            r'<text x="[^"]+" y="([^"]+)"[^>]*>(?:no cleaning|random rows|oracle \(injected noise\)) 0\.5',
            page,
        )
    )
    assert len(ys) == 3 and min(np.diff(ys)) >= 13 - 0.011
