"""Streamed aggregate scores equal the store-based estimators; the gradient pass survives out-of-memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscope.errors import InfscopeError
from infscope.estimators.cosine import DataInfCosine, GradCosine
from infscope.estimators.datainf import DataInf
from infscope.estimators.hessian_free import HessianFree
from infscope.grads import GradientStore, InMemoryGradients, collect_to_store, compute_gradients
from infscope.grads.hooks import BatchSizer, is_out_of_memory
from infscope.grads.streaming import METHODS, stream_scores
from infscope.models.config import LoraSpec
from infscope.models.encode import encode_rows
from infscope.models.lora import attach_lora
from infscope.models.registry import load_model

ROWS = [
    {"id": f"r{i}", "instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} ."}
    for i, w in enumerate(
        [
            "apple",
            "river",
            "stone",
            "cloud",
            "green",
            "house",
            "bird",
            "music",
            "paper",
            "light",
            "water",
            "table",
            "horse",
            "glass",
            "night",
            "sound",
        ]
    )
]


@pytest.fixture(scope="module")
def run():
    """A float64 tiny-llama with LoRA on q,v (non-zero B so every block has gradients), 16 train rows."""
    loaded = load_model("tiny-llama", seed=0)
    model = attach_lora(loaded, LoraSpec(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.double()
    train = encode_rows(ROWS[:12], loaded.tokenizer, task="causal", max_length=32)
    query = encode_rows(ROWS[12:], loaded.tokenizer, task="causal", max_length=32)
    q = compute_gradients(model, query, batch_size=4, dtype=torch.float64, progress=False)
    v = {name: q.load_block(name, torch.float64).mean(dim=0) for name in q.block_names}
    return model, train, q, v


def reference(train: InMemoryGradients, query: InMemoryGradients, **kw) -> dict[str, np.ndarray]:
    """Aggregate scores of the four store-based estimators in float64."""
    ests = {
        "datainf": DataInf(dtype="float64", **kw),
        "hessian_free": HessianFree(dtype="float64"),
        "grad_cos": GradCosine(dtype="float64"),
        "datainf_cos": DataInfCosine(dtype="float64", **kw),
    }
    return {name: est.fit(train).score(query).values for name, est in ests.items()}


def test_streamed_scores_equal_estimators_in_float64(run):
    model, train, query, v = run
    grads = compute_gradients(model, train, batch_size=4, dtype=torch.float64, progress=False)
    expected = reference(grads, query)
    passes = []
    got = stream_scores(model, train, v, batch_size=5, block_by="matrix", on_pass=passes.append)
    assert list(got.scores) == list(METHODS) and got.ids == grads.ids
    assert got.passes == 3 and passes == [1, 2, 3]
    for method in METHODS:
        np.testing.assert_allclose(got[method], expected[method], rtol=1e-8, atol=1e-12, err_msg=method)
    lam = DataInf(dtype="float64").fit(grads).lams
    assert got.damping == pytest.approx(lam, rel=1e-12)


def test_datainf_against_dense_average_of_inverses(run):
    """Independent reference: -v^T [(1/n) sum_i (g_i g_i^T + lam I)^-1] g_z per block, by explicit inverses."""
    model, train, _, v = run
    grads = compute_gradients(model, train, batch_size=4, dtype=torch.float64, progress=False)
    total = torch.zeros(len(grads.ids), dtype=torch.float64)
    for name in grads.block_names:
        G = grads.load_block(name, torch.float64)
        n, d = G.shape
        lam = 0.1 * float((G**2).sum(dim=1).mean()) / d
        A = sum(torch.linalg.inv(torch.outer(g, g) + lam * torch.eye(d, dtype=torch.float64)) for g in G) / n
        total -= G @ (A @ v[name])
    got = stream_scores(model, train, v, batch_size=3, methods=["datainf"])
    np.testing.assert_allclose(got["datainf"], total.numpy(), rtol=1e-8)


def test_given_damping_merges_passes_and_cheap_methods_take_one(run):
    model, train, query, v = run
    grads = compute_gradients(model, train, batch_size=4, dtype=torch.float64, progress=False)
    lams = {name: 1e-3 * (i + 1) for i, name in enumerate(grads.block_names)}
    got = stream_scores(model, train, v, batch_size=4, methods=["datainf", "datainf_cos"], damping=lams)
    assert got.passes == 2
    expected = reference(grads, query, damping=lams)
    for method in ("datainf", "datainf_cos"):
        np.testing.assert_allclose(got[method], expected[method], rtol=1e-8, err_msg=method)
    cheap = stream_scores(model, train, v, batch_size=4, methods=["hessian_free", "grad_cos"])
    assert cheap.passes == 1 and list(cheap.scores) == ["hessian_free", "grad_cos"]
    with pytest.raises(InfscopeError, match="no streamed scores for 'datainf'"):
        cheap["datainf"]


def test_streamed_scores_match_a_float32_store(run, tmp_path):
    model, train, query, v = run
    store = collect_to_store(model, train, tmp_path / "store", batch_size=4, shard_rows=5, progress=False)
    expected = reference(store, query)
    got = stream_scores(model, train, v, batch_size=4)
    for method in METHODS:  # the store rounds gradients to float32
        np.testing.assert_allclose(got[method], expected[method], rtol=2e-5, atol=1e-9, err_msg=method)


def test_bad_inputs_are_one_line_errors(run):
    model, train, _, v = run
    with pytest.raises(InfscopeError, match="cannot be streamed"):
        stream_scores(model, train, v, methods=["lissa"])
    with pytest.raises(InfscopeError, match="query vector lacks block"):
        stream_scores(model, train, dict(list(v.items())[1:]))
    wrong = {k: t[:-1] for k, t in v.items()}
    with pytest.raises(InfscopeError, match="expected"):
        stream_scores(model, train, wrong)
    with pytest.raises(InfscopeError, match="not an iterator of batches"):
        stream_scores(model, iter([{"input_ids": torch.zeros(1, 3, dtype=torch.long)}]), v)


# -- out of memory ------------------------------------------------------------------------------


def fail_above(model, monkeypatch, limit: int, message: str) -> list[int]:
    """Make the model's forward raise ``RuntimeError(message)`` on batches of more than ``limit`` rows."""
    seen: list[int] = []
    original = model.forward

    def forward(*args, **kwargs):
        rows = int(kwargs["input_ids"].shape[0])
        seen.append(rows)
        if rows > limit:
            raise RuntimeError(message)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return seen


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes",
    ],
)
def test_oom_halves_the_batch_and_records_it(run, tmp_path, monkeypatch, message):
    model, train, _, _ = run
    reference_grads = compute_gradients(model, train, batch_size=8, dtype=torch.float64, progress=False)
    seen = fail_above(model, monkeypatch, 2, message)
    with pytest.warns(UserWarning, match="retrying with batch size"):
        store = collect_to_store(model, train, tmp_path / "s", batch_size=8, shard_rows=8, progress=False)
    assert store.meta["batch_size_used"] == 2
    assert seen[:3] == [8, 4, 2]  # halved twice, then kept
    assert max(seen[3:]) == 2
    for name in store.block_names:
        np.testing.assert_allclose(
            store.load_block(name).double().numpy(),
            reference_grads.load_block(name, torch.float64).numpy(),
            rtol=1e-5,
            atol=1e-7,
        )
    # Resuming the complete store with the same arguments is not a meta mismatch.
    again = collect_to_store(model, train, tmp_path / "s", batch_size=8, shard_rows=8, progress=False)
    assert GradientStore.open(again.path).meta["batch_size_used"] == 2


def test_oom_at_batch_size_one_is_a_one_line_error(run, tmp_path, monkeypatch):
    model, train, _, _ = run
    fail_above(model, monkeypatch, 0, "CUDA out of memory. Tried to allocate 9.00 GiB")
    with pytest.warns(UserWarning), pytest.raises(InfscopeError) as info:
        collect_to_store(model, train, tmp_path / "s", batch_size=4, progress=False)
    assert "even with batch size 1" in str(info.value) and "\n" not in str(info.value)


def test_other_errors_are_not_retried(run, tmp_path, monkeypatch):
    model, train, _, _ = run
    seen = fail_above(model, monkeypatch, 0, "mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        collect_to_store(model, train, tmp_path / "s", batch_size=4, progress=False)
    assert seen == [4]


def test_oom_detection_and_sizer():
    assert is_out_of_memory(RuntimeError("CUDA out of memory."))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))
    sizer = BatchSizer(5)
    with pytest.warns(UserWarning):
        sizer.shrink(RuntimeError("out of memory"))
        sizer.shrink(RuntimeError("out of memory"))
    assert sizer.size == 1 and sizer.requested == 5
    with pytest.raises(InfscopeError, match="batch size 1"):
        sizer.shrink(RuntimeError("out of memory"))
