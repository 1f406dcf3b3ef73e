"""text_oof / oof_fusion against independent references: a dict-based TF-IDF loop and scikit-learn."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from conftest import tiny_bert_cli_run
from infscope.errors import InfscopeError
from infscope.estimators import text_proxy
from infscope.estimators.baselines import from_values
from infscope.estimators.registry import get_method
from infscope.noise.rng import stable_hash

TOPICS = {
    0: ["libfoo shared library for parsing", "libbar runtime library files", "libzip compression library"],
    1: ["python3 module for http requests", "python3 bindings for yaml", "python3 test runner plugin"],
    2: ["arcade game with levels", "puzzle game for children", "space shooter game"],
}


def _rows(copies: int = 3) -> list[dict]:
    rows = []
    for label, texts in TOPICS.items():
        for c in range(copies):
            for t, text in enumerate(texts):
                rows.append({"id": f"r{label}-{c}-{t}", "text": f"{text} variant {c}", "label": label})
    return rows


def _reference_tfidf(texts: list[str], dims: int) -> np.ndarray:
    """The documented formula, one row and one gram at a time."""
    grams = []
    for text in texts:
        words = ["w:" + w for w in re.findall(r"\w\w+", text.lower())]  # words of 2+ word characters
        chars = []
        for word in text.lower().split():
            padded = f" {word} "
            for n in range(2, 6):
                chars += ["c:" + padded[i : i + n] for i in range(max(len(padded) - n + 1, 1))]
        grams.append(words + chars)
    n = len(texts)
    tf = np.zeros((n, dims))
    for i, gs in enumerate(grams):
        for g in gs:
            tf[i, stable_hash(0, g, "tfidf") % dims] += 1
    df = (tf > 0).sum(axis=0)
    out = np.zeros_like(tf)
    for i in range(n):
        for j in np.flatnonzero(tf[i]):
            out[i, j] = (1 + math.log(tf[i, j])) * (math.log((1 + n) / (1 + df[j])) + 1)
        out[i] /= np.linalg.norm(out[i])
    return out


def test_tfidf_matches_a_plain_loop() -> None:
    texts = [r["text"] for r in _rows(1)] + ["Mixed CASE words, words!"]
    got = text_proxy.tfidf_features(texts, dims=4096).to_dense().numpy()
    np.testing.assert_allclose(got, _reference_tfidf(texts, 4096), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dual", [True, False])
def test_logistic_fit_matches_sklearn(dual: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_proxy, "DUAL_MAX_ROWS", 10_000 if dual else 0)
    rows = _rows()
    x = text_proxy.tfidf_features([r["text"] for r in rows], dims=2048)
    y = np.array([r["label"] for r in rows])
    coef = text_proxy.fit_logistic(x, y, 3, c=10.0, tolerance=1e-10, max_iter=2000)
    dense = x.to_dense().numpy()
    ref = LogisticRegression(C=10.0, max_iter=20000, tol=1e-12).fit(dense, y)
    np.testing.assert_allclose(text_proxy.predict_proba(x, coef), ref.predict_proba(dense), atol=1e-5)


def test_text_oof_is_one_minus_the_held_out_probability() -> None:
    rows = _rows()
    rows[0]["label"] = 2  # a flipped label: its held-out probability of label 2 should be low
    got = text_proxy.text_oof_scores(rows, None, k=3, c=10.0, seed=7)
    x = text_proxy.tfidf_features([r["text"] for r in rows]).to_dense().numpy()
    x = x[:, np.flatnonzero(np.abs(x).sum(axis=0))]
    y = np.array([r["label"] for r in rows])
    folds = text_proxy.grouped_folds([r["text"] for r in rows], 3, 7)
    ref = np.zeros(len(rows))
    for f in range(3):
        held = folds == f
        model = LogisticRegression(C=10.0, max_iter=20000, tol=1e-12).fit(x[~held], y[~held])
        proba = model.predict_proba(x[held])
        ref[held] = 1 - proba[np.arange(held.sum()), np.searchsorted(model.classes_, y[held])]
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert got[0] == got.max()  # the flipped row ranks first


def test_label_names_map_string_labels() -> None:
    rows = [{**r, "label": ["libs", "python", "games"][r["label"]]} for r in _rows()]
    by_name = text_proxy.text_oof_scores(rows, ["libs", "python", "games"], k=3, c=10.0, seed=0)
    by_index = text_proxy.text_oof_scores(_rows(), None, k=3, c=10.0, seed=0)
    np.testing.assert_allclose(by_name, by_index, atol=1e-8)
    # integer labels with named classes (how built-in classification data comes): indices as given
    named_ints = text_proxy.text_oof_scores(_rows(), ["libs", "python", "games"], k=3, c=10.0, seed=0)
    np.testing.assert_allclose(named_ints, by_index, atol=1e-8)


def test_bad_input_is_one_line() -> None:
    with pytest.raises(InfscopeError, match="k=50 folds") as err:
        text_proxy.text_oof_scores(_rows(1), None, k=50, c=1.0, seed=0)
    assert "\n" not in str(err.value)
    rows = _rows(1)
    del rows[2]["label"]
    with pytest.raises(InfscopeError, match="no valid label"):
        text_proxy.text_oof_scores(rows, None, k=2, c=1.0, seed=0)
    with pytest.raises(InfscopeError, match="positive"):
        text_proxy.text_oof_scores(_rows(1), None, k=2, c=0.0, seed=0)


class _Stub:
    """Just enough of MethodInputs for oof_fusion: two score vectors by name."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.train_ids = [f"r{i}" for i in range(len(a))]
        self._scores = {
            "oof_loss": from_values(a, self.train_ids, "oof_loss", {}),
            "text_oof": from_values(b, self.train_ids, "text_oof", {}),
        }

    def scores_of(self, names: list[str]) -> dict:
        return {n: self._scores[n] for n in names}


def test_oof_fusion_is_the_mean_percentile_rank() -> None:
    a = np.array([0.1, 3.0, 2.0, 2.0, -1.0])
    b = np.array([5.0, 1.0, 0.0, 4.0, 2.0])
    fused = get_method("oof_fusion").compute(_Stub(a, b), {}).vector()
    n = len(a)
    ref = (pd.Series(a).rank().to_numpy() / n + pd.Series(b).rank().to_numpy() / n) / 2
    np.testing.assert_allclose(fused, ref, rtol=1e-12)
    assert get_method("text_oof").tasks == ("classification",)


def test_embeddings_join_the_features_as_unit_rows() -> None:
    rows = _rows()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(rows), 4)) + np.array([r["label"] for r in rows])[:, None]
    got = text_proxy.text_oof_scores(rows, None, k=3, c=10.0, seed=1, embeddings=emb)
    x = text_proxy.tfidf_features([r["text"] for r in rows]).to_dense().numpy()
    x = np.hstack(
        [x[:, np.flatnonzero(np.abs(x).sum(axis=0))], emb / np.linalg.norm(emb, axis=1, keepdims=True)]
    )
    y = np.array([r["label"] for r in rows])
    folds = text_proxy.grouped_folds([r["text"] for r in rows], 3, 1)
    ref = np.zeros(len(rows))
    for f in range(3):
        held = folds == f
        model = LogisticRegression(C=10.0, max_iter=20000, tol=1e-12).fit(x[~held], y[~held])
        ref[held] = 1 - model.predict_proba(x[held])[np.arange(held.sum()), y[held]]
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_registry_text_oof_uses_the_base_models_embeddings(tmp_path) -> None:
    import torch

    from infscope.models.registry import load_model
    from infscope.scoring import open_run, score_run

    run = tiny_bert_cli_run(tmp_path, 12)
    scored = score_run(run, ["text_oof"], options={"text_oof": {"k": 3}})["text_oof"]
    opened = open_run(run)
    base = load_model("tiny-bert", task="classification", num_labels=2, seed=opened.spec.seed).model.eval()
    tok = load_model("tiny-bert", task="classification", num_labels=2, seed=opened.spec.seed).tokenizer
    emb = []
    for row in opened.train:  # one row at a time, no padding: the reference mean hidden state
        enc = tok(row["text"], return_tensors="pt", truncation=True, max_length=opened.spec.max_length)
        with torch.no_grad():
            emb.append(base(**enc, output_hidden_states=True).hidden_states[-1][0].mean(0).double().numpy())
    expected = text_proxy.text_oof_scores(
        opened.train, None, k=3, c=100.0, seed=opened.spec.seed, embeddings=np.stack(emb)
    )
    np.testing.assert_allclose(scored.vector(), expected, atol=1e-5)
    assert scored.meta["features"] == "text+base"
    with pytest.raises(InfscopeError, match="features='words' is unknown"):
        score_run(run, ["text_oof"], options={"text_oof": {"features": "words"}})


def test_rows_with_the_same_text_share_a_fold() -> None:
    texts = ["alpha beta", "Alpha  beta", "gamma", "delta", "gamma", "eps", "zeta", "eta"]
    folds = text_proxy.grouped_folds(texts, 3, 0)
    assert folds[0] == folds[1] and folds[2] == folds[4]
    assert sorted(set(folds.tolist())) == [0, 1, 2]
    # a canary: a copy of a row with its label changed; it must not teach the probe its wrong label
    rows = _rows()
    canary = {**rows[0], "id": "canary", "label": 2}
    scores = text_proxy.text_oof_scores([*rows, canary], None, k=3, c=10.0, seed=0)
    assert scores[-1] > np.median(scores)  # the canary is found ...
    clean = text_proxy.text_oof_scores(rows, None, k=3, c=10.0, seed=0)
    # ... and its source row keeps its score: the copy shares its fold, so no probe reads the copy's
    # label for it (only the IDF weights move a little, since they count the copy's words)
    assert abs(scores[0] - clean[0]) < 0.01
    assert np.abs(scores[:-1] - clean).max() < 0.1
    with pytest.raises(InfscopeError, match="distinct texts"):
        text_proxy.grouped_folds(["a", "a", "a"], 2, 0)
