"""RepSim on tiny-llama against a per-row loop (each row alone, unpadded, its last token's final hidden
state, cosines with each query), and the three forward methods (mirrored, tracin_we, repsim) scored by
score_run on a tiny pipeline run, checked against direct calls on the independently reloaded checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FakeInputs
from infscope.errors import InfscopeError
from infscope.estimators.mirrored import mirrored_values
from infscope.estimators.registry import get_method
from infscope.estimators.repsim import cosine_matrix, repsim_values
from infscope.estimators.tracin_we import tracin_we_values
from infscope.models.encode import encode_rows
from infscope.models.lora import load_adapter
from infscope.models.registry import load_model
from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.scoring import score_run

MAX_LEN = 64
ENCODE = {"task": "causal", "max_length": MAX_LEN, "batch_size": 4, "response_only": True}


def loop_repsim(model, tokenizer, rows, queries) -> np.ndarray:
    """-(cosine of last-token states), (n_query, n_train), one unpadded row at a time."""

    def state(row):
        ids = encode_rows([row], tokenizer, task="causal", max_length=MAX_LEN).input_ids[0]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[-1][0, -1].double()

    train, query = [state(r) for r in rows], [state(q) for q in queries]
    return np.array(
        [[-float(torch.nn.functional.cosine_similarity(q, z, dim=0)) for z in train] for q in query]
    )


def test_scores_match_a_per_row_loop(tuned_llama):
    loaded, rows, queries = tuned_llama
    want = loop_repsim(loaded.model, loaded.tokenizer, rows, queries)
    matrix = repsim_values(loaded.model, loaded.tokenizer, rows, queries, aggregate=False, **ENCODE)
    np.testing.assert_allclose(matrix, want, atol=1e-5)
    vector = repsim_values(loaded.model, loaded.tokenizer, rows, queries, **ENCODE)
    np.testing.assert_allclose(vector, want.mean(axis=0), atol=1e-5)
    assert np.ptp(vector) > 1e-3  # rows differ


def test_cosine_matrix_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 0.0]])
    t = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    np.testing.assert_allclose(cosine_matrix(q, t), [[1.0, 2**-0.5, 0.0], [0.0, 0.0, 0.0]])


def test_registered_method(tuned_llama):
    loaded, rows, queries = tuned_llama
    want = loop_repsim(loaded.model, loaded.tokenizer, rows, queries)
    scores = get_method("repsim").compute(FakeInputs(loaded, rows, queries, ENCODE), {})
    np.testing.assert_allclose(scores.values, want.mean(axis=0), atol=1e-5)
    matrix = get_method("repsim").compute(FakeInputs(loaded, rows, queries, ENCODE, aggregate=False), {})
    np.testing.assert_allclose(matrix.values, want, atol=1e-5)
    with pytest.raises(InfscopeError, match="no option"):
        get_method("repsim").compute(FakeInputs(loaded, rows, queries, ENCODE), {"pool": "mean"})
    with pytest.raises(InfscopeError, match="no query rows"):
        repsim_values(loaded.model, loaded.tokenizer, rows, [], **ENCODE)


# ---------------------------------------------------------------- the three methods on a tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("forward") / "run"
    config = PipelineConfig(
        model="tiny-llama",
        classes=3,
        train_per_class=6,
        val_per_class=2,
        epochs=1,
        max_length=MAX_LEN,
        noise_ratio=0.25,
        methods=("loss",),
    )
    return out, run_pipeline(config, out)


def test_score_run_scores_the_forward_methods_as_direct_calls_do(run):
    out, result = run
    scored = score_run(out, ["mirrored", "tracin_we", "repsim"], options={"mirrored": {"lr": 0.01}})
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "data" / "val.jsonl").read_text().splitlines()]
    loaded = load_model("tiny-llama", seed=0)
    load_adapter(loaded, result.evaluation["checkpoint"]["checkpoint"])
    loaded.model.requires_grad_(False)
    encode = {"task": "causal", "max_length": MAX_LEN, "batch_size": 8, "response_only": True}
    ids = [r["id"] for r in rows]
    for name in ("mirrored", "tracin_we", "repsim"):
        assert scored[name].train_ids == ids and np.isfinite(scored[name].values).all()
        assert (out / "results" / f"{name}.parquet").is_file()
    want = loop_repsim(loaded.model, loaded.tokenizer, rows, val).mean(axis=0)
    np.testing.assert_allclose(scored["repsim"].values, want, atol=1e-5)
    tracin, _ = tracin_we_values(loaded.model, loaded.tokenizer, rows, val, **encode)
    np.testing.assert_allclose(
        scored["tracin_we"].values, tracin, rtol=1e-4, atol=1e-6 * np.abs(tracin).max()
    )
    mirrored, _ = mirrored_values(loaded.model, loaded.tokenizer, rows, val, lr=0.01, **encode)
    np.testing.assert_allclose(scored["mirrored"].values, mirrored, rtol=1e-3, atol=1e-6)
    assert scored["mirrored"].meta["seconds"] >= 0 and scored["mirrored"].meta["lr"] == 0.01
