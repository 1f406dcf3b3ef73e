"""K-FAC / EK-FAC: factors against a per-token loop, scores against dense float64 Kronecker solves.

The tiny LoRA Llama runs in float64 on rows of different lengths (batches are padded). References
build everything explicitly: per-token ``x`` and ``ds`` from one row at a time, the full
``S (x) A`` matrix and the eigen-corrected ``Q diag(Lambda) Q^T`` with ``torch.kron``, solved densely.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from infscope.errors import InfscopeError
from infscope.estimators.ekfac import KroneckerInfluence
from infscope.grads.hooks import compute_gradients, lora_linear_names
from infscope.grads.kfac import KFACFactors, collect_kfac_factors, rotated_square_sum
from infscope.models.encode import Encoded

VOCAB = 30


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(cfg), lora).double()
    model.eval()
    return model


def rows(n: int, seed: int, prefix: str) -> Encoded:
    gen = torch.Generator().manual_seed(seed)
    ids, inputs, labels = [], [], []
    for i in range(n):
        seq = torch.randint(1, VOCAB, (5 + i % 4,), generator=gen).tolist()
        ids.append(f"{prefix}{i}")
        inputs.append(seq)
        labels.append([-100, -100, *seq[2:]])
    return Encoded(ids, inputs, labels, "causal", 0, [])


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    train, query = rows(7, 1, "t"), rows(3, 2, "q")
    factors = collect_kfac_factors(model, train, batch_size=3)
    kw = {"batch_size": 3, "dtype": torch.float64, "progress": False}
    g_train = compute_gradients(model, train, **kw)
    g_query = compute_gradients(model, query, **kw)
    return model, train, factors, g_train, g_query


def per_token_reference(model: nn.Module, enc: Encoded) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(A, S)`` per LoRA layer from one row at a time: A = mean_tokens x x^T, S = sum_tokens ds ds^T / rows."""
    names = lora_linear_names(model)
    modules = dict(model.named_modules())
    A = {m: 0.0 for m in names}
    S = {m: 0.0 for m in names}
    tokens = 0
    for seq, lab in zip(enc.input_ids, enc.labels, strict=True):
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name, seen=seen):
            def hook(module, inputs, output):
                output.retain_grad()
                seen[name] = (inputs[0].detach()[0], output)

            return hook

        handles = [modules[m].register_forward_hook(keep(m)) for m in names]
        for m in names:
            modules[m].weight.requires_grad_(True)
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
        target = torch.tensor(lab[1:])
        ok = target != -100
        F.cross_entropy(logits[ok], target[ok]).backward()
        for h in handles:
            h.remove()
        for m in names:
            x, y = seen[m]
            ds = y.grad[0]
            for t in range(len(seq)):  # the plain per-token loop
                A[m] = A[m] + torch.outer(x[t], x[t])
                S[m] = S[m] + torch.outer(ds[t], ds[t])
        tokens += len(seq)
    model.zero_grad(set_to_none=True)
    return {m: (A[m] / tokens, S[m] / len(enc.ids)) for m in names}


def test_factors_equal_a_per_token_loop(setup):
    model, train, factors, _, _ = setup
    ref = per_token_reference(model, train)
    assert list(factors.layers) == list(ref)
    for name, (A, S) in ref.items():
        torch.testing.assert_close(factors.layers[name].A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors.layers[name].S, S, rtol=1e-10, atol=1e-14)
    assert factors.n_examples == 7 and set(factors.n_tokens.values()) == {sum(map(len, train.input_ids))}


def dense_scores(G: dict, V: dict, curvature: dict, scale: float = 0.1) -> np.ndarray:
    """``-sum_layers V (C + lam I)^{-1} G^T`` with ``lam = scale * trace(C) / d``, dense float64 solves."""
    total = 0
    for m, C in curvature.items():
        lam = scale * torch.trace(C) / C.shape[0]
        X = torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=C.dtype), V[m].T)
        total = total - X.T @ G[m].T
    return total.numpy()


def blocks(grads) -> dict:
    return {b: grads.load_block(b, torch.float64) for b in grads.block_names}


def test_kfac_equals_dense_kronecker_solve(setup):
    _, _, factors, g_train, g_query = setup
    # row-major vec(dW): vec(S X A) = (S kron A) vec(X)
    curvature = {m: torch.kron(f.S, f.A) for m, f in factors.layers.items()}
    expected = dense_scores(blocks(g_train), blocks(g_query), curvature)
    est = KroneckerInfluence(factors, strategy="kfac", dtype="float64").fit(g_train)
    got = est.score(g_query, aggregate=False)
    np.testing.assert_allclose(got.values, expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(est.score(g_query).values, expected.mean(axis=0), rtol=1e-8, atol=1e-12)


def eigen_corrected(f, G: torch.Tensor) -> torch.Tensor:
    """``Q diag(Lambda) Q^T`` with ``Q = Q_S kron Q_A`` and ``Lambda = diag(Q^T (G^T G / n) Q)``, all dense."""
    _, QA = torch.linalg.eigh(f.A)
    _, QS = torch.linalg.eigh(f.S)
    Q = torch.kron(QS, QA)
    fisher = G.T @ G / G.shape[0]
    lam = torch.diagonal(Q.T @ fisher @ Q)
    return Q @ torch.diag(lam) @ Q.T


def test_ekfac_equals_dense_eigen_corrected_inverse(setup):
    _, _, factors, g_train, g_query = setup
    G = blocks(g_train)
    curvature = {m: eigen_corrected(f, G[m]) for m, f in factors.layers.items()}
    expected = dense_scores(G, blocks(g_query), curvature)
    est = KroneckerInfluence(factors, strategy="ekfac", dtype="float64").fit(g_train)
    np.testing.assert_allclose(est.score(g_query, aggregate=False).values, expected, rtol=1e-8, atol=1e-12)
    # self-influence g^T (H + lam I)^{-1} g, dense
    self_expected = 0
    for m, C in curvature.items():
        lam = 0.1 * torch.trace(C) / C.shape[0]
        X = torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=C.dtype), G[m].T)
        self_expected = self_expected + (X.T * G[m]).sum(dim=1)
    np.testing.assert_allclose(est.self_score().values, self_expected.numpy(), rtol=1e-8)


def test_ekfac_with_exact_statistics_is_exact_when_the_basis_diagonalises_the_fisher(setup):
    """Training gradients along Kronecker eigenvectors: the per-example Fisher is diagonal in that basis,
    so EK-FAC's corrected matrix is the Fisher itself and its scores equal the exact damped solve."""
    _, _, factors, _, g_query = setup
    G = {}
    for m, f in factors.layers.items():
        _, QA = torch.linalg.eigh(f.A)
        _, QS = torch.linalg.eigh(f.S)
        Q = torch.kron(QS, QA)
        G[m] = (Q[:, :5] * torch.arange(1.0, 6.0, dtype=torch.float64)).T  # 5 rows, orthogonal
    from infscope.grads.base import InMemoryGradients

    train = InMemoryGradients([f"r{i}" for i in range(5)], G)
    est = KroneckerInfluence(factors, strategy="ekfac", dtype="float64", damping=1e-3).fit(train)
    total = 0
    V = blocks(g_query)
    for m in G:
        fisher = G[m].T @ G[m] / 5
        X = torch.linalg.solve(fisher + 1e-3 * torch.eye(fisher.shape[0], dtype=torch.float64), V[m].T)
        total = total - X.T @ G[m].T
    np.testing.assert_allclose(est.score(g_query, aggregate=False).values, total.numpy(), rtol=1e-8)


def test_eigen_correction_pass_equals_store_statistics(setup):
    model, train, factors, g_train, _ = setup
    again = collect_kfac_factors(model, train, batch_size=4, eigen_correction=True)
    for m, f in again.layers.items():
        torch.testing.assert_close(f.A, factors.layers[m].A)
        expected = rotated_square_sum(g_train.load_block(m, torch.float64), f, torch.float64) / 7
        torch.testing.assert_close(f.lambdas, expected, rtol=1e-9, atol=1e-15)
    # lambdas from the pass and from the store give the same EK-FAC scores
    a = KroneckerInfluence(again, dtype="float64").fit(g_train).self_score().values
    b = KroneckerInfluence(factors, dtype="float64").fit(g_train).self_score().values
    np.testing.assert_allclose(a, b, rtol=1e-8)


def test_grouped_blocks_split_back_into_layers(setup, tmp_path):
    model, train, factors, g_train, g_query = setup
    kw = {"batch_size": 3, "dtype": torch.float64, "progress": False, "block_by": "layer"}
    gl_train, gl_query = (
        compute_gradients(model, train, **kw),
        compute_gradients(model, rows(3, 2, "q"), **kw),
    )
    assert len(gl_train.block_names) == 2
    loaded = KFACFactors.load(factors.save(tmp_path / "f"))
    for strategy in ("ekfac", "kfac"):
        per_matrix = (
            KroneckerInfluence(factors, strategy=strategy, dtype="float64").fit(g_train).score(g_query)
        )
        per_layer = (
            KroneckerInfluence(loaded, strategy=strategy, dtype="float64").fit(gl_train).score(gl_query)
        )
        np.testing.assert_allclose(per_layer.values, per_matrix.values, rtol=1e-9)


def test_true_fisher_matches_the_softmax_gauss_newton_on_average():
    """Sampled labels: E[ds ds^T] = diag(p) - p p^T for a linear softmax classifier (bias augments A)."""
    torch.manual_seed(0)
    fc = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    copies = 4000
    data = {"inputs": x.repeat(copies, 1), "labels": y.repeat(copies)}
    true = collect_kfac_factors(fc, data, layers=[""], batch_size=len(y) * copies, fisher="true", seed=3)
    emp = collect_kfac_factors(fc, data, layers=[""], batch_size=len(y) * copies)
    p = torch.softmax(fc(x), dim=1).detach()
    gauss_newton = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(dim=0)
    r = p - F.one_hot(y, 4).double()
    xa = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(emp.layers[""].S, r.T @ r / 5)
    torch.testing.assert_close(emp.layers[""].A, xa.T @ xa / 5)
    assert emp.layers[""].has_bias and emp.layers[""].dim == 4 * 4
    assert (true.layers[""].S - gauss_newton).abs().max() < 0.01  # Monte-Carlo error ~ 1/sqrt(20000)
    again = collect_kfac_factors(fc, data, layers=[""], batch_size=len(y) * copies, fisher="true", seed=3)
    torch.testing.assert_close(again.layers[""].S, true.layers[""].S)


def test_bias_layers_follow_the_store_layout():
    """A layer with a bias: store rows are [vec(dW), db]; the dense reference permutes to [dW | db]."""
    torch.manual_seed(1)
    fc = nn.Linear(3, 2).double()
    data = {"inputs": torch.randn(9, 3, dtype=torch.float64), "labels": torch.randint(0, 2, (9,))}
    query = {"inputs": torch.randn(2, 3, dtype=torch.float64), "labels": torch.tensor([0, 1])}
    factors = collect_kfac_factors(fc, data, layers=[""], batch_size=4)
    g = compute_gradients(fc, data, layers=[""], dtype=torch.float64, progress=False)
    v = compute_gradients(fc, query, layers=[""], dtype=torch.float64, progress=False)
    f = factors.layers[""]
    perm = torch.tensor([0, 1, 2, 6, 3, 4, 5, 7])  # [w00 w01 w02 b0 w10 w11 w12 b1] from [w.., b0 b1]
    C = torch.kron(f.S, f.A)
    G, V = g.load_block("", torch.float64)[:, perm], v.load_block("", torch.float64)[:, perm]
    expected = dense_scores({"": G}, {"": V}, {"": C})
    got = KroneckerInfluence(factors, strategy="kfac", dtype="float64").fit(g).score(v, aggregate=False)
    np.testing.assert_allclose(got.values, expected, rtol=1e-9)


def test_bad_inputs_raise_one_line_errors(setup):
    model, train, factors, g_train, _ = setup
    with pytest.raises(InfscopeError, match="fisher"):
        collect_kfac_factors(model, train, fisher="sampled")
    with pytest.raises(InfscopeError, match="strategy"):
        KroneckerInfluence(factors, strategy="shampoo")
    from infscope.grads.base import InMemoryGradients

    wrong = InMemoryGradients(g_train.ids, {"other": torch.zeros(7, 3)})
    with pytest.raises(InfscopeError, match="do not match gradient block"):
        KroneckerInfluence(factors).fit(wrong)


def test_true_fisher_on_a_causal_model(setup):
    """Sampled labels change S but not A; the draw is fixed by the seed; EK-FAC lambdas come with it."""
    model, train, factors, g_train, g_query = setup
    true = collect_kfac_factors(model, train, batch_size=3, fisher="true", seed=5, eigen_correction=True)
    again = collect_kfac_factors(model, train, batch_size=3, fisher="true", seed=5)
    other = collect_kfac_factors(model, train, batch_size=3, fisher="true", seed=6)
    for m, f in true.layers.items():
        torch.testing.assert_close(f.A, factors.layers[m].A)
        torch.testing.assert_close(f.S, again.layers[m].S)
        assert not torch.allclose(f.S, factors.layers[m].S) and not torch.allclose(f.S, other.layers[m].S)
    assert true.has_lambdas and not again.has_lambdas
    est = KroneckerInfluence(true, dtype="float64").fit(g_train)
    assert est.lambda_source == "factors" and np.isfinite(est.score(g_query).values).all()


def test_registry_scores_a_pipeline_run_and_caches_the_factors(tmp_path, monkeypatch):
    from infscope.grads.store import GradientStore
    from infscope.models.lora import load_adapter
    from infscope.models.registry import load_model
    from infscope.pipeline import PipelineConfig, run_pipeline
    from infscope.runs import RunLayout
    from infscope.scoring import score_run
    from infscope.scoring.gradients import encode_for
    from infscope.scoring.run import open_run

    out = tmp_path / "run"
    config = dict(model="tiny-llama", classes=3, train_per_class=6, val_per_class=2, epochs=1, max_length=48)
    result = run_pipeline(PipelineConfig(**config, methods=("loss",)), out)
    scored = score_run(out, ["ekfac", "kfac"])
    ckpt = result.evaluation["checkpoint"]["checkpoint"]
    layout = RunLayout(out)
    cached = KFACFactors.load(layout.kfac(ckpt) / "empirical")
    # the cache holds the factors of the run's training rows at the scored checkpoint
    run = open_run(out)
    loaded = load_model("tiny-llama", seed=0)
    model = load_adapter(loaded, ckpt)
    fresh = collect_kfac_factors(model, encode_for(run.spec, run.train, loaded.tokenizer), batch_size=5)
    assert cached.ids == fresh.ids == scored["ekfac"].train_ids
    for m, f in fresh.layers.items():
        torch.testing.assert_close(cached.layers[m].A, f.A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cached.layers[m].S, f.S, rtol=1e-4, atol=1e-10)
    train = GradientStore.open(layout.grads(ckpt, "train"))
    query = GradientStore.open(layout.grads(ckpt, "val"))
    for strategy in ("ekfac", "kfac"):
        direct = KroneckerInfluence(cached, strategy=strategy).fit(train).score(query)
        np.testing.assert_allclose(scored[strategy].values, direct.values, rtol=1e-6)
        assert scored[strategy].meta["fisher"] == "empirical"
    assert (out / "results" / "ekfac.parquet").is_file()
    import infscope.scoring.inputs as scoring_inputs

    monkeypatch.setattr(scoring_inputs, "collect_kfac_factors", lambda *a, **k: pytest.fail("recollected"))
    again = score_run(out, ["ekfac"])
    np.testing.assert_allclose(again["ekfac"].values, scored["ekfac"].values, rtol=1e-12)


def test_sampled_loss_draws_targets_at_the_rows_target_positions(setup):
    """Reference: full logits, one draw per target position in row-major order, mean CE per row."""
    from infscope.grads.batching import as_row_source
    from infscope.grads.kfac import sampled_loss

    model, train, *_ = setup
    batch = as_row_source(train).batch(0, 4)
    got = sampled_loss(11)(model, batch)
    gen = torch.Generator().manual_seed(11)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != -100
    pred = logits[:, :-1][keep]
    drawn = torch.multinomial(torch.softmax(pred.float(), dim=-1), 1, generator=gen).squeeze(1)
    token = F.cross_entropy(pred, drawn, reduction="none")
    rows_of = torch.nonzero(keep)[:, 0]
    expected = torch.zeros(4, dtype=token.dtype).index_add(0, rows_of, token) / keep.sum(dim=1)
    torch.testing.assert_close(got, expected)
