"""Normalised (grad_cos, datainf_cos) and optimizer-aware (LESS, TrackStar) estimators, and reading
Adam moments from checkpoints: against direct float64 formulas, per-row loops and a hand-made AdamW step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from infscope.errors import InfscopeError
from infscope.estimators.cosine import DataInfCosine, GradCosine
from infscope.estimators.less import LESS, TrackStar, split_dim
from infscope.grads.base import InMemoryGradients
from infscope.models.optimizer_state import (
    BlockMoments,
    adam_hyperparams,
    adam_moments,
    block_members,
    block_moments,
    checkpoint_block_moments,
)

BLOCKS = {"layer0.A": 5, "layer0.B": 12, "layer1.A": 3}


def _grads(n: int, seed: int, prefix: str, blocks: dict[str, int] = BLOCKS) -> InMemoryGradients:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: (1 + i) * torch.randn(n, d, generator=gen, dtype=torch.float64)
        for i, (name, d) in enumerate(blocks.items())
    }
    return InMemoryGradients([f"{prefix}{i}" for i in range(n)], tensors)


def _flat(grads: InMemoryGradients) -> np.ndarray:
    return np.concatenate([grads.load_block(b, torch.float64).numpy() for b in grads.block_names], axis=1)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cos_matrix(Q: np.ndarray, T: np.ndarray) -> np.ndarray:
    return np.array([[_cos(q, t) for t in T] for q in Q])


# ---------------------------------------------------------------- grad_cos, datainf_cos


def test_grad_cos_matches_direct_cosine_in_every_mode():
    train, query = _grads(7, 0, "t"), _grads(4, 1, "q")
    T, Q = _flat(train), _flat(query)
    est = GradCosine(dtype="float64").fit(train)
    matrix = est.score(query, aggregate=False)
    np.testing.assert_allclose(matrix.values, -_cos_matrix(Q, T), rtol=1e-12, atol=1e-14)
    vec = est.score(query)
    np.testing.assert_allclose(vec.values, -_cos_matrix(Q.mean(0, keepdims=True), T)[0], rtol=1e-12)
    by_cos = GradCosine(query_mean="cosine", dtype="float64").fit(train).score(query)
    np.testing.assert_allclose(by_cos.values, matrix.vector(), rtol=1e-12)
    assert vec.method == "grad_cos" and vec.meta["normalised"] and vec.meta["query_mean"] == "gradient"
    # sign: a training row along the mean query gradient is the most helpful; flipping it the most harmful
    along = InMemoryGradients(
        ["along", "against"],
        {
            b: torch.cat([query.mean().load_block(b, torch.float64)] * 2) * torch.tensor([[3.0], [-0.5]])
            for b in BLOCKS
        },
    )
    s = GradCosine(dtype="float64").fit(along).score(query).values
    np.testing.assert_allclose(s, [-1.0, 1.0], atol=1e-12)


def test_grad_cos_ignores_gradient_length_and_zero_rows_score_zero():
    train = _grads(5, 2, "t")
    scaled = InMemoryGradients(
        train.ids,
        {
            b: train.load_block(b, torch.float64) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [0.0]])
            for b in BLOCKS
        },
    )
    query = _grads(3, 3, "q")
    a = GradCosine(dtype="float64").fit(train).score(query).values
    b = GradCosine(dtype="float64").fit(scaled).score(query).values
    np.testing.assert_allclose(b[:4], a[:4], rtol=1e-12)
    assert b[4] == 0.0


def _datainf_direction(train: InMemoryGradients, v: dict[str, np.ndarray], scale: float = 0.1) -> np.ndarray:
    """Per block: lam = scale mean||g||^2/d and (1/n) sum_i (g_i g_i^T + lam I)^{-1} v by dense inverses."""
    parts = []
    for name in train.block_names:
        G = train.load_block(name, torch.float64).numpy()
        n, d = G.shape
        lam = scale * float((G**2).sum()) / (n * d)
        A = sum(np.linalg.inv(np.outer(g, g) + lam * np.eye(d)) for g in G) / n
        parts.append(v[name] @ A)
    return np.concatenate(parts, axis=-1)


def test_datainf_cos_matches_dense_inverse_direction():
    train, query = _grads(9, 4, "t"), _grads(3, 5, "q")
    T = _flat(train)
    V = {b: query.load_block(b, torch.float64).numpy() for b in BLOCKS}
    est = DataInfCosine(dtype="float64").fit(train)
    x_mean = _datainf_direction(train, {b: v.mean(0) for b, v in V.items()})
    np.testing.assert_allclose(est.score(query).values, [-_cos(x_mean, t) for t in T], rtol=1e-9)
    X = _datainf_direction(train, V)
    matrix = est.score(query, aggregate=False)
    np.testing.assert_allclose(matrix.values, -_cos_matrix(X, T), rtol=1e-9)
    by_cos = DataInfCosine(dtype="float64", query_mean="cosine").fit(train).score(query)
    np.testing.assert_allclose(by_cos.values, matrix.vector(), rtol=1e-12)
    assert set(by_cos.meta["damping"]) == set(BLOCKS)


def test_normalised_methods_refuse_self_influence_and_bad_options():
    train = _grads(4, 6, "t")
    for est in (GradCosine().fit(train), DataInfCosine().fit(train)):
        with pytest.raises(InfscopeError, match="no self-influence"):
            est.self_score()
    with pytest.raises(InfscopeError, match="query_mean"):
        GradCosine(query_mean="max")
    with pytest.raises(InfscopeError, match="not fitted"):
        GradCosine().score(train)


# ---------------------------------------------------------------- LESS, TrackStar


def _moments(seed: int, blocks: dict[str, int] = BLOCKS, step: int = 7) -> dict[str, BlockMoments]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: BlockMoments(
            exp_avg=0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
            exp_avg_sq=0.01 * torch.rand(d, generator=gen, dtype=torch.float64) + 1e-4,
            step=step,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
        )
        for name, d in blocks.items()
    }


def _flat_moments(m: dict[str, BlockMoments], field: str) -> np.ndarray:
    return np.concatenate([getattr(m[b], field).numpy() for b in m])


def _less_loop(ckpts) -> np.ndarray:
    """-sum_c lr_c cos(v_j, Gamma(g_i)) one pair at a time, Gamma the LESS Adam update."""
    out = 0.0
    for train, query, m, lr in ckpts:
        T, Q = _flat(train), _flat(query)
        m1, m2 = _flat_moments(m, "exp_avg"), _flat_moments(m, "exp_avg_sq")
        first = next(iter(m.values()))
        cos = np.zeros((len(Q), len(T)))
        for i, g in enumerate(T):
            gamma = (first.beta1 * m1 + (1 - first.beta1) * g) / (
                np.sqrt(first.beta2 * m2 + (1 - first.beta2) * g**2) + first.eps
            )
            for j, v in enumerate(Q):
                cos[j, i] = _cos(v, gamma)
        out = out - lr * cos
    return out


def _trackstar_loop(ckpts) -> np.ndarray:
    out = 0.0
    for train, query, m, lr in ckpts:
        T, Q = _flat(train), _flat(query)
        first = next(iter(m.values()))
        v_hat = _flat_moments(m, "exp_avg_sq") / (1 - first.beta2**first.step)
        scale = 1 / (np.sqrt(v_hat) + first.eps)
        out = out - lr * _cos_matrix(Q * scale, T * scale)
    return out


def _checkpoints(blocks: dict[str, int] = BLOCKS, n: int = 6, q: int = 3):
    return [
        (_grads(n, 10, "t", blocks), _grads(q, 11, "q", blocks), _moments(12, blocks, step=3), 2e-3),
        (_grads(n, 13, "t", blocks), _grads(q, 14, "q", blocks), _moments(15, blocks, step=9), 5e-4),
    ]


@pytest.mark.parametrize(("cls", "loop"), [(LESS, _less_loop), (TrackStar, _trackstar_loop)])
@pytest.mark.parametrize("proj_dim", [None, sum(BLOCKS.values())])
def test_adam_cosines_without_projection_match_per_row_loop(cls, loop, proj_dim):
    ckpts = _checkpoints()
    est = cls(proj_dim=proj_dim, dtype="float64").fit(ckpts)
    ref = loop(ckpts)
    matrix = est.score(aggregate=False)
    np.testing.assert_allclose(matrix.values, ref, rtol=1e-10, atol=1e-15)
    # default aggregation: mean of per-query cosines (the matrix's row mean)
    np.testing.assert_allclose(est.score().values, ref.mean(axis=0), rtol=1e-10)
    assert est.score().meta["projection"]["projected_blocks"] == 0
    assert est.score().meta["checkpoint_lrs"] == [2e-3, 5e-4]
    # same numbers with queries passed to score() and 3-tuples given to fit()
    again = cls(proj_dim=proj_dim, dtype="float64").fit([(t, m, lr) for t, _, m, lr in ckpts])
    np.testing.assert_allclose(again.score([c[1] for c in ckpts], aggregate=False).values, ref, rtol=1e-12)
    # mean query gradient mode: cosine with the mean query row (linear query features)
    by_grad = cls(proj_dim=proj_dim, dtype="float64", query_mean="gradient").fit(ckpts).score()
    mean_ckpts = [(t, qs.mean(), m, lr) for t, qs, m, lr in ckpts]
    np.testing.assert_allclose(by_grad.values, loop(mean_ckpts)[0], rtol=1e-10)


def _correlated(n: int, seed: int, prefix: str, blocks: dict[str, int], shared: dict[str, torch.Tensor]):
    """Rows ``a_i * shared + noise`` so cosines spread over (-1, 1) instead of sitting near 0."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.linspace(-2, 2, n, dtype=torch.float64)[:, None]
    return InMemoryGradients(
        [f"{prefix}{i}" for i in range(n)],
        {b: a * shared[b] + torch.randn(n, d, generator=gen, dtype=torch.float64) for b, d in blocks.items()},
    )


@pytest.mark.parametrize("cls", [LESS, TrackStar])
def test_projected_cosines_within_johnson_lindenstrauss_bound(cls):
    """Each projected cosine has standard deviation <= ~1/sqrt(k) for k total projected dims (blocks get
    k in proportion to their size, so the block sum behaves like one k-dim projection); the test bound
    3 sqrt(2/k) = 4.2/sqrt(k) is over four standard deviations for every one of the 100 pairs."""
    blocks = {"a": 300, "b": 500, "c": 700}
    gen = torch.Generator().manual_seed(0)
    shared = {b: torch.randn(d, generator=gen, dtype=torch.float64) for b, d in blocks.items()}
    train = _correlated(20, 1, "t", blocks, shared)
    query = _correlated(5, 2, "q", blocks, shared)
    ckpt = [(train, query, _moments(3, blocks), 1.0)]
    exact = cls(proj_dim=None, dtype="float64").fit(ckpt).score(aggregate=False).values
    assert np.ptp(exact) > 0.8  # cosines spread out, so the test is not only about near-zero values
    for proj_dim, per_block, k in [(512, False, 512), (128, True, 128)]:
        est = cls(proj_dim=proj_dim, per_block=per_block, seed=7, dtype="float64").fit(ckpt)
        got = est.score(aggregate=False)
        assert got.meta["projection"]["projected_blocks"] == 3
        assert got.meta["projection"]["total_dim"] == (512 if not per_block else 384)
        err = np.abs(got.values - exact)
        assert err.max() < 3 * math.sqrt(2 / k)
        assert err.max() > 1e-6  # really projected
        # same seed, same projection; another seed, other numbers
        again = cls(proj_dim=proj_dim, per_block=per_block, seed=7, dtype="float64").fit(ckpt)
        np.testing.assert_array_equal(again.score(aggregate=False).values, got.values)
        other = cls(proj_dim=proj_dim, per_block=per_block, seed=8, dtype="float64").fit(ckpt)
        assert not np.allclose(other.score(aggregate=False).values, got.values)


def test_split_dim_is_proportional_and_sums_to_total():
    dims = {"a": 300, "b": 500, "c": 700}
    assert split_dim(512, dims) == {"a": 102, "b": 171, "c": 239}
    assert sum(split_dim(1000, dims).values()) == 1000
    assert split_dim(5000, dims) == dims


def test_adam_cosines_refuse_bad_inputs():
    ckpts = _checkpoints()
    train, query, m, lr = ckpts[0]
    with pytest.raises(InfscopeError, match="no Adam moments"):
        LESS().fit([(train, query, {k: v for k, v in m.items() if k != "layer0.B"}, lr)])
    small = {**m, "layer0.B": BlockMoments(torch.zeros(4), torch.ones(4), 1)}
    with pytest.raises(InfscopeError, match="unprojected"):
        LESS().fit([(train, query, small, lr)])
    with pytest.raises(InfscopeError, match="learning rate"):
        LESS().fit([(train, query, m, -1.0)])
    with pytest.raises(InfscopeError, match="needs query gradients"):
        LESS().fit([(train, m, lr)]).score()
    with pytest.raises(InfscopeError, match="one query GradientSet per checkpoint"):
        TrackStar().fit(ckpts).score(query)
    with pytest.raises(InfscopeError, match="no self-influence"):
        TrackStar().fit(ckpts).self_score()
    with pytest.raises(InfscopeError, match="step 0"):
        TrackStar().fit(
            [(train, query, {k: BlockMoments(v.exp_avg, v.exp_avg_sq, 0) for k, v in m.items()}, lr)]
        ).score()


# ---------------------------------------------------------------- optimizer state


def test_adam_moments_follow_param_groups_of_a_trainer_style_optimizer(tmp_path):
    """Two groups (decay weights, then biases and norms) as Hugging Face Trainer builds them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    named = dict(model.named_parameters())
    decay = ["0.weight", "2.weight"]
    no_decay = [n for n in named if n not in decay]
    opt = torch.optim.AdamW(
        [
            {"params": [named[n] for n in decay]},
            {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
        ],
        lr=0.01,
        betas=(0.8, 0.95),
        eps=1e-6,
    )
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    shapes = {n: p.shape for n, p in named.items()}
    got = adam_moments(tmp_path, [decay, no_decay], shapes=shapes)
    assert list(got) == decay + no_decay
    for name, (m1, m2, step) in got.items():
        state = opt.state[named[name]]
        assert torch.equal(m1, state["exp_avg"]) and torch.equal(m2, state["exp_avg_sq"]) and step == 3
    hyper = adam_hyperparams(tmp_path / "optimizer.pt", [decay, no_decay])
    assert hyper["2.bias"].beta1 == 0.8 and hyper["2.bias"].weight_decay == 0.0
    assert hyper["0.weight"].weight_decay == 0.01 and hyper["0.weight"].eps == 1e-6
    # named_parameters order is not this optimizer's order: the shapes catch it
    with pytest.raises(InfscopeError, match="order"):
        adam_moments(tmp_path, list(named), shapes=shapes)
    with pytest.raises(InfscopeError, match="6 parameters but 2 names"):
        adam_moments(tmp_path, decay)
    # a block made of module "2": weight then bias, flattened row-major (weight decay differs between
    # the two groups, but the moments of decoupled AdamW do not depend on it)
    blocks = block_moments(got, {"2": 10, "0": 16}, hyper=hyper)
    assert block_members(list(got), "2") == ["2.weight", "2.bias"]
    expected = torch.cat(
        [opt.state[named["2.weight"]]["exp_avg_sq"].flatten(), opt.state[named["2.bias"]]["exp_avg_sq"]]
    )
    assert torch.equal(blocks["2"].exp_avg_sq, expected)
    with pytest.raises(InfscopeError, match="different Adam steps or settings"):
        block_moments({**got, "0.bias": got["0.bias"]._replace(step=2)}, {"0": 16}, hyper=hyper)
    with pytest.raises(InfscopeError, match="unprojected"):
        block_moments(got, {"2": 8}, hyper=hyper)
    with pytest.raises(InfscopeError, match="no optimizer state"):
        adam_moments(tmp_path / "missing", decay)


ROWS = [
    {"id": f"r{i}", "instruction": f"Name the color of item {i}.", "input": "", "output": color}
    for i, color in enumerate(["red", "blue", "green", "red", "blue", "green", "red", "blue"])
]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    from infscope.models.finetune import FinetuneConfig, finetune
    from infscope.models.lora import LoraSpec
    from infscope.models.registry import load_model

    config = FinetuneConfig(epochs=1, lr=5e-3, batch_size=8, max_grad_norm=None, lora=LoraSpec(r=4))
    out = tmp_path_factory.mktemp("ft1")
    loaded = load_model("tiny-llama")
    result = finetune(loaded, ROWS, None, config, out, progress=False)
    return {"config": config, "loaded": loaded, "ckpt": result.checkpoints[-1]}


def test_finetune_checkpoint_moments_equal_one_hand_made_adamw_step(one_step):
    """One full-batch AdamW step from zero state: exp_avg = (1-b1) g and exp_avg_sq = (1-b2) g^2."""
    from infscope.models.encode import batch_order, collate, encode_rows
    from infscope.models.lora import attach_lora, trainable_parameters
    from infscope.models.loss import forward_losses
    from infscope.models.registry import load_model

    config = one_step["config"]
    names = list(trainable_parameters(one_step["loaded"].model))
    shapes = {n: p.shape for n, p in trainable_parameters(one_step["loaded"].model).items()}
    moments = adam_moments(one_step["ckpt"].path, names, shapes=shapes)
    assert list(moments) == names and all(m.step == 1 for m in moments.values())

    fresh = load_model("tiny-llama")
    attach_lora(fresh, config.lora, seed=config.seed)
    model = fresh.model
    model.train()
    enc = encode_rows(ROWS, fresh.tokenizer, task="causal", max_length=config.max_length)
    rows = batch_order(len(ROWS), config.batch_size, shuffle=True, seed=config.seed * 100_003 + 1)[0]
    forward_losses(model, collate(enc, rows), torch.device("cpu")).mean().backward()
    params = trainable_parameters(model)
    assert list(params) == names
    for name, param in params.items():
        g = param.grad
        m1, m2, _ = moments[name]
        if ".lora_A." in name:  # B starts at zero, so A gets no gradient on the first step
            assert torch.count_nonzero(m1) == 0
        else:
            assert torch.count_nonzero(g) > 0
        torch.testing.assert_close(m1, 0.1 * g, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(m2, 0.001 * g.square(), rtol=1e-4, atol=1e-12)


def test_checkpoint_moments_align_with_gradient_blocks_and_feed_less(one_step):
    from infscope.grads.hooks import PerExampleGradients, compute_gradients
    from infscope.models.encode import encode_rows
    from infscope.models.lora import trainable_parameters

    model = one_step["loaded"].model
    names = list(trainable_parameters(model))
    moments = adam_moments(one_step["ckpt"].path, names)
    enc = encode_rows(ROWS, one_step["loaded"].tokenizer, task="causal")
    for block_by in ("matrix", "module", "layer"):
        grads = compute_gradients(model, enc, block_by=block_by, dtype=torch.float64, progress=False)
        blocks = checkpoint_block_moments(one_step["ckpt"].path, names, grads)
        assert list(blocks) == grads.block_names
        for block, bm in blocks.items():
            members = [
                f"{module}.weight" for module in PerExampleGradients(model).layout(block_by).members[block]
            ]
            assert torch.equal(bm.exp_avg_sq, torch.cat([moments[n].exp_avg_sq.flatten() for n in members]))
            assert bm.step == 1 and bm.beta2 == 0.999
        if block_by == "module":
            assert all(not b.endswith(".default") for b in grads.block_names)
    # LESS on real gradients and moments equals the per-row formula
    grads = compute_gradients(model, enc, dtype=torch.float64, progress=False)
    train, query = grads.subset(range(6)), grads.subset([6, 7])
    blocks = checkpoint_block_moments(one_step["ckpt"].path, names, grads)
    ckpt = [(train, query, blocks, 1.0)]
    got = LESS(proj_dim=None, dtype="float64").fit(ckpt).score(aggregate=False).values
    np.testing.assert_allclose(got, _less_loop(ckpt), rtol=1e-8, atol=1e-12)
