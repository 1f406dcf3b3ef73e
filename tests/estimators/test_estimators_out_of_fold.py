"""Out-of-fold loss and confident learning: hand-computed values, a per-row reference on K-fold models, cleanlab."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_bert_cli_run
from infscope.estimators.out_of_fold import confident_joint_issues, fold_of, self_confidence_scores


def test_confident_joint_and_self_confidence_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 0, 1, 1, 0])
    # thresholds: class 0 = mean(0.9, 0.8, 0.2) = 0.633; class 1 = mean(0.7, 0.4) = 0.55
    np.testing.assert_allclose(self_confidence_scores(probs, labels), [0.1, 0.2, 0.3, 0.6, 0.8])
    assert confident_joint_issues(probs, labels).tolist() == [False, False, False, False, True]


def test_folds_are_seeded_balanced_and_checked():
    ids = [str(i) for i in range(10)]
    a, b = fold_of(ids, 3, 1), fold_of(ids, 3, 1)
    assert a.tolist() == b.tolist() and sorted(np.bincount(a).tolist()) == [3, 3, 4]
    with pytest.raises(Exception, match="folds"):
        fold_of(ids, 1, 0)


def test_oof_loss_equals_each_fold_models_loss_on_its_held_out_rows(tmp_path):
    from infscope.models.config import FinetuneConfig
    from infscope.models.finetune import finetune
    from infscope.models.registry import load_spec
    from infscope.scoring import open_run, score_run

    run = tiny_bert_cli_run(tmp_path, 16)
    scored = score_run(run, ["oof_loss", "cleanlab"], options={"oof_loss": {"k": 2}, "cleanlab": {"k": 2}})
    opened = open_run(run)
    config = FinetuneConfig(**opened.record.finetune)
    folds = fold_of([str(r["id"]) for r in opened.train], 2, opened.spec.seed)
    expected = {}
    for fold in range(2):
        loaded = load_spec(opened.spec)
        kept = [r for r, f in zip(opened.train, folds, strict=True) if f != fold]
        finetune(
            loaded,
            kept,
            opened.val,
            config,
            tmp_path / f"ref-{fold}",
            label_names=opened.spec.label_names,
            progress=False,
        )
        model = loaded.model.eval()
        for row, f in zip(opened.train, folds, strict=True):
            if f != fold:
                continue
            enc = loaded.tokenizer(
                row["text"], return_tensors="pt", truncation=True, max_length=opened.spec.max_length
            )
            with torch.no_grad():
                logits = model(**enc).logits[0].double()
            expected[row["id"]] = (
                float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([row["label"]]))),
                torch.softmax(logits, 0).numpy(),
            )
    oof = scored["oof_loss"]
    np.testing.assert_allclose(oof.values, [expected[i][0] for i in oof.train_ids], rtol=1e-4, atol=1e-6)
    clean = scored["cleanlab"]
    labels = {r["id"]: r["label"] for r in opened.train}
    np.testing.assert_allclose(
        clean.values, [1 - expected[i][1][labels[i]] for i in clean.train_ids], rtol=1e-4, atol=1e-6
    )


@pytest.mark.peers
def test_self_confidence_matches_cleanlab():
    cleanlab_rank = pytest.importorskip("cleanlab.rank")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40)
    labels = rng.integers(0, 3, size=40)
    quality = cleanlab_rank.get_label_quality_scores(labels, probs, method="self_confidence")
    np.testing.assert_allclose(self_confidence_scores(probs, labels), 1 - quality, rtol=1e-12)
