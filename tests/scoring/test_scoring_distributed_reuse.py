"""Scoring again, or with more processes, reuses the gradient stores an earlier scoring wrote.

A tiny-llama run is scored once by ``score_run`` in this process (one store shard of 256 rows).
``python -m infscope.distributed_collect RUN`` on a copy, with one process and with two torchrun
processes (which would cut the rows into two shards), must give the same scores (1e-6) without
rewriting any store file (same mtimes). A store with a shard file deleted is finished (only that
shard written again, same numbers); one of another adapter is refused with exit 2 and one line.
The unit tests check the same rules on :func:`collect_to_store_sharded` against a plain per-row
gradient reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import distributed_collect, tiny_peft_llama, token_rows, unscored_tiny_llama_run
from infscope.errors import InfscopeError
from infscope.estimators.scores import Scores
from infscope.grads.losses import default_loss
from infscope.grads.sharded import collect_to_store_sharded
from infscope.grads.store import GradientStore, collect_to_store
from infscope.runs import RunLayout
from infscope.scoring import open_run, score_run

METHODS = "datainf,hessian_free"
VOCAB = 40


# -- unit level: collect_to_store_sharded in a world of one -----------------------------------------


def _per_row_reference(
    model: torch.nn.Module, data: dict[str, list], names: list[str]
) -> dict[str, np.ndarray]:
    """Each row's LoRA gradient from its own backward pass (no hooks, no batching), per store block."""
    params = dict(model.named_parameters())
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for i in range(len(data["ids"])):
        batch = {k: torch.tensor([data[k][i]]) for k in ("input_ids", "attention_mask", "labels")}
        model.zero_grad()
        default_loss(model, batch).sum().backward()
        for name in names:  # a block is one LoRA matrix, named by its module; weight flattened row-major
            out[name].append(params[f"{name}.weight"].grad.detach().flatten().double().numpy())
    return {name: np.stack(rows) for name, rows in out.items()}


def _mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_sharded_collection_keeps_an_existing_store_layout_and_resumes_only_lost_shards(tmp_path):
    model = tiny_peft_llama(VOCAB)
    data = token_rows(10, VOCAB, seed=3)
    path = tmp_path / "grads"
    first = collect_to_store(model, data, path, batch_size=3, shard_rows=4, progress=False)  # 3 shards
    assert first.n_shards == 3
    reference = _per_row_reference(model, data, first.block_names)
    for name in first.block_names:
        np.testing.assert_allclose(
            first.load_block(name, torch.float64), reference[name], rtol=1e-4, atol=1e-7
        )

    before = _mtimes(path)
    # shard_rows_for(10, 1) would cut 10 rows a shard; the existing store keeps its 4
    reused = collect_to_store_sharded(model, data, path, batch_size=3, progress=False)
    assert reused.shard_rows == 4 and _mtimes(path) == before  # complete: nothing written, not even the index

    lost = path / "shards" / "b0001-s00001.npy"
    lost.unlink()
    assert GradientStore.open(path).is_complete  # the index alone does not know
    resumed = collect_to_store_sharded(model, data, path, batch_size=3, progress=False)
    after = _mtimes(path)
    assert resumed.is_complete and resumed.shard_rows == 4 and lost.is_file()
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"index.json", *(f"shards/{f.name}" for f in (path / "shards").glob("*-s00001*.npy"))}
    for name in first.block_names:
        np.testing.assert_allclose(
            resumed.load_block(name, torch.float64), reference[name], rtol=1e-4, atol=1e-7
        )


def test_sharded_collection_refuses_a_store_of_another_adapter_with_the_fix(tmp_path):
    model = tiny_peft_llama(VOCAB)
    data = token_rows(6, VOCAB, seed=3)
    path = tmp_path / "grads"
    collect_to_store(model, data, path, batch_size=3, shard_rows=4, progress=False)
    (path / "shards" / "b0000-s00001.npy").unlink()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)  # another adapter
    with pytest.raises(InfscopeError, match=r"made with other meta; delete it") as err:
        collect_to_store_sharded(model, data, path, batch_size=3, progress=False)
    assert "\n" not in str(err.value)


# -- run level: infscope.distributed_collect after score_run -----------------------------------------


def _collect(run: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    return distributed_collect(run, "--method", METHODS, *extra, processes=processes)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A run scored once in this process, and the one-process scores."""
    root = tmp_path_factory.mktemp("reuse")
    base = unscored_tiny_llama_run(root / "base")
    score_run(base, METHODS)
    scores = {m: Scores.load(RunLayout(base).scores(m)) for m in METHODS.split(",")}
    return root, base, scores


def _copy(scored, name: str) -> tuple[Path, Path]:
    root, base, _ = scored
    run = root / name
    shutil.copytree(base, run)
    tag = Path(open_run(run).best.path).name
    return run, RunLayout(run).grads(tag, "train").parent


def _assert_same_scores(run: Path, scored) -> None:
    for method, one in scored[2].items():
        again = Scores.load(RunLayout(run).scores(method))
        assert again.train_ids == one.train_ids
        np.testing.assert_allclose(again.values, one.values, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("processes", [1, 2])
def test_distributed_collect_reuses_the_store_score_run_wrote(scored, processes):
    run, grads = _copy(scored, f"again-{processes}")
    before = _mtimes(grads)
    assert GradientStore.open(grads / "train").shard_rows == 256  # two processes would cut 12 rows a shard
    done = _collect(run, processes)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rows scored") == 2  # rank 0 prints one line per method
    assert _mtimes(grads) == before  # no store file (nor index) was written again
    assert list(grads.parent.glob("*.rank-*")) == [] and list(grads.glob("*.rank-*")) == []
    _assert_same_scores(run, scored)


def test_two_processes_finish_a_store_with_a_deleted_shard_file(scored):
    run, grads = _copy(scored, "lost")
    before = _mtimes(grads)
    lost = grads / "train" / "shards" / "b0001-s00000.npy"
    lost.unlink()
    done = _collect(run, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _mtimes(grads)
    assert lost.is_file() and GradientStore.open(grads / "train").is_complete
    assert {k: v for k, v in after.items() if k.startswith("val/")} == {
        k: v for k, v in before.items() if k.startswith("val/")
    }  # the complete query store is untouched
    assert list(grads.glob("*.rank-*")) == []
    _assert_same_scores(run, scored)


def test_a_lost_shard_of_another_adapter_is_refused_in_one_line(scored):
    run, grads = _copy(scored, "other")
    index = grads / "train" / "index.json"
    record = json.loads(index.read_text())
    record["meta"]["fingerprint"] = "0" * 16  # as if the adapter was trained again into this run
    index.write_text(json.dumps(record))
    (grads / "train" / "shards" / "b0000-s00000.npy").unlink()
    done = _collect(run, 1)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gradient store") and "made with other meta; delete it" in last
    assert str(grads / "train") in last
