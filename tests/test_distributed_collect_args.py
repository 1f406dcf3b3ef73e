"""``python -m infscope.distributed_collect`` takes ``--query`` and ``--measurement`` as ``infscope score`` does.

The options are parsed and handed to :func:`~infscope.scoring.distributed.score_run_distributed`;
a one-process call (no torchrun) with ``--query FILE --measurement pairing`` saves the scores that
:func:`~infscope.scoring.score_run` saves for the same query and measurement on a copy of the same
tiny-llama instruction run (the reference).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from infscope import distributed_collect
from infscope.estimators.scores import Scores
from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.runs import RunLayout
from infscope.scoring import distributed as scoring_distributed
from infscope.scoring import score_run
from infscope.scoring.inputs import MEASUREMENTS

METHODS = "datainf,hessian_free"


def test_options_are_parsed_with_their_defaults():
    args = distributed_collect.parse_args(["run"])
    assert (args.query, args.measurement, args.checkpoint) == (None, "loss", "best")
    args = distributed_collect.parse_args(["run", "--query", "q.jsonl", "--measurement", "pairing"])
    assert (args.query, args.measurement) == ("q.jsonl", "pairing")
    assert distributed_collect.MEASUREMENTS == MEASUREMENTS


def test_unknown_measurement_is_refused_at_parsing(capsys):
    with pytest.raises(SystemExit) as stop:
        distributed_collect.parse_args(["run", "--measurement", "gap"])
    assert stop.value.code == 2 and "invalid choice: 'gap'" in capsys.readouterr().err


def test_checkpoint_help_mentions_inrun(capsys):
    with pytest.raises(SystemExit):
        distributed_collect.parse_args(["--help"])
    assert "inrun:EPOCH" in capsys.readouterr().out


def test_main_hands_query_and_measurement_on(monkeypatch):
    seen = {}

    def fake(run, methods, **options):
        seen.update(run=run, methods=methods, **options)
        return {}

    monkeypatch.setattr(scoring_distributed, "score_run_distributed", fake)
    argv = [
        "r",
        "--method",
        "tracin",
        "--checkpoint",
        "inrun:2",
        "--query",
        "q.jsonl",
        "--measurement",
        "pairing",
    ]
    assert distributed_collect.main(argv) == 0
    assert seen == {
        "run": "r",
        "methods": "tracin",
        "checkpoint": "inrun:2",
        "stream": False,
        "batch_size": None,
        "query": "q.jsonl",
        "measurement": "pairing",
    }


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny-llama instruction run (built-in data, one epoch) and a query file of 4 of its rows (new ids)."""
    run = tmp_path_factory.mktemp("collect") / "run"
    run_pipeline(
        PipelineConfig(model="tiny-llama", classes=3, train_per_class=6, epochs=1, methods=("loss",)), run
    )
    shutil.rmtree(run / "scoring")  # the pipeline's gradient stores: each side below makes its own
    rows = [json.loads(line) for line in RunLayout(run).train.read_text().splitlines()][:4]
    query = run.parent / "query.jsonl"
    query.write_text("".join(json.dumps({**r, "id": f"q{i}"}) + "\n" for i, r in enumerate(rows)))
    return run, query


def test_one_process_pairing_with_query_equals_score_run(tuned, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run, query = tuned
    ref, got = Path(shutil.copytree(run, tmp_path / "ref")), Path(shutil.copytree(run, tmp_path / "got"))
    expected = score_run(ref, METHODS, query=str(query), measurement="pairing")
    argv = [str(got), "--method", METHODS, "--query", str(query), "--measurement", "pairing"]
    assert distributed_collect.main(argv) == 0
    out = capsys.readouterr().out
    for method in METHODS.split(","):
        name = f"{method}+pairing"
        assert f"{name}: " in out
        want, saved = expected[name], Scores.load(RunLayout(got).scores(name))
        assert saved.train_ids == want.train_ids and saved.query_ids == want.query_ids
        assert saved.query_ids == [f"q{i}" for i in range(4)]
        np.testing.assert_allclose(
            saved.values, want.values, rtol=1e-6, atol=1e-9 * np.abs(want.values).max()
        )
