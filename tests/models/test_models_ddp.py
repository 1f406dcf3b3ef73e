"""Fine-tuning under ``torchrun --nproc-per-node 2`` (CPU, gloo) gives the one-process adapter.

Pure checks first: :func:`shard_batch` against hand-computed slices and factors, and the ranks'
averaged gradients against the one-process gradient of the global batch on a toy linear model
(float64, weighted and not, every batch size up to 7 and worlds of 1 to 4). Then two real torchrun
launches on tiny-llama with 11 training rows and batch size 5 (batches of 5, 5, 1: uneven slices and
a rank with no row in the last batch): ``torchrun -m infscope.cli finetune`` against the same
command in this process, and a weighted library call (``finetune(..., weights=...)``, no gradient
clipping so that Adam's moments show any mis-scaled gradient) against the same call here. Adapters,
AdamW moments, losses and the recorded dynamics must agree to ~1e-5 relative (only the order of
summation differs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.models import ddp
from infscope.models.config import FinetuneConfig, LoraSpec
from infscope.models.finetune import batch_loss, finetune
from infscope.models.registry import load_model

COLORS = ["red", "blue", "green"]
TRAIN = [
    {
        "id": f"r{i}",
        "instruction": f"Name the colors of item {i}.",
        "input": "",
        "output": f"{COLORS[i % 3]} and {COLORS[(i * 7 + 1) % 3]}",
    }
    for i in range(11)
]
VAL = [
    {"id": f"v{i}", "instruction": f"Name the color of thing {i}.", "input": "", "output": COLORS[i]}
    for i in range(3)
]
WEIGHTS = {"r0": 0.0, "r3": 2.5, "r7": 0.5, "r10": 3.0}
CLI_ARGS = ["--model", "tiny-llama", "--epochs", "2", "--batch-size", "5", "--rank", "4", "--seed", "3"]
CLI_ARGS += ["--max-length", "48", "--lr", "5e-3"]
WEIGHTED = FinetuneConfig(
    epochs=2, lr=5e-3, batch_size=5, seed=3, max_length=48, max_grad_norm=None, lora=LoraSpec(r=4)
)
SCRIPT = """
import json, sys
from infscope.models import ddp
from infscope.models.config import FinetuneConfig
from infscope.models.finetune import finetune
from infscope.models.registry import load_model

spec = json.loads(open(sys.argv[1]).read())
config = FinetuneConfig(**spec["config"])
result = finetune(
    load_model("tiny-llama"), spec["train"], spec["val"], config, sys.argv[2],
    weights=spec["weights"], progress=False,
)
# one file per rank: two processes printing to one pipe can interleave their lines
with open(f"{sys.argv[3]}/result-{ddp.rank()}.json", "w") as handle:
    handle.write(json.dumps(result.to_dict(), sort_keys=True))
"""


# ---------------------------------------------------------------- pure sharding and scaling


def test_shard_batch_hand_computed():
    rows = np.array([4, 1, 3, 0, 2])
    first, second = (ddp.shard_batch(rows, None, r, 2) for r in range(2))
    assert first.rows.tolist() == [4, 1, 3] and second.rows.tolist() == [0, 2]
    # one process: every row enters with 1/5; each rank's share is doubled because DDP halves the sum
    assert first.factors.tolist() == pytest.approx([0.4] * 3) and second.factors.tolist() == pytest.approx(
        [0.4] * 2
    )
    assert not first.dummy and not second.dummy

    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 4.0])  # sum 8: one-process factors 1/8, 0, 2/8, 1/8, 4/8
    first, second = (ddp.shard_batch(rows, w, r, 2) for r in range(2))
    assert first.factors.tolist() == pytest.approx([0.25, 0.0, 0.5])
    assert second.factors.tolist() == pytest.approx([0.25, 1.0])

    three = [ddp.shard_batch(np.array([9]), None, r, 3) for r in range(3)]
    assert three[0].rows.tolist() == [9] and three[0].factors.tolist() == [3.0] and not three[0].dummy
    for part in three[1:]:  # no row of this batch: run row 9 with factor 0 so the all-reduce has every rank
        assert part.dummy and part.rows.tolist() == [9] and part.factors.tolist() == [0.0]

    zero = ddp.shard_batch(rows[:2], torch.zeros(2), 0, 2)
    assert zero.factors.tolist() == [
        0.0
    ]  # a batch whose weights are all 0 trains on nothing, as in one process
    with pytest.raises(InfscopeError, match="world of 2"):
        ddp.shard_batch(rows, None, 2, 2)


@pytest.mark.parametrize("weighted", [False, True])
def test_ranks_average_to_the_one_process_gradient(weighted):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(7, generator=gen, dtype=torch.float64)
    w_all = torch.rand(7, generator=gen, dtype=torch.float64) * 3
    w_all[2] = 0.0

    def grad(rows: np.ndarray, scale: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
        theta = torch.linspace(-1, 1, 3, dtype=torch.float64).requires_grad_()
        losses = (x[rows] @ theta - y[rows]) ** 2
        loss = batch_loss(losses, weights) if scale is None else (losses * scale).sum()
        loss.backward()
        return theta.grad

    perm = np.array([5, 2, 6, 0, 3, 1, 4])
    for size in range(1, 8):
        rows = perm[:size]
        weights = w_all[rows] if weighted else None
        expected = grad(rows, None, weights)
        for world in (1, 2, 3, 4):
            shards = [ddp.shard_batch(rows, weights, r, world) for r in range(world)]
            assert sorted(np.concatenate([s.rows for s in shards if not s.dummy]).tolist()) == sorted(
                rows.tolist()
            )
            averaged = sum(grad(s.rows, s.factors, None) for s in shards) / world
            torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-12)


def test_world_of_one_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not ddp.launched() and ddp.init_from_env("cpu") is False
    assert ddp.world_size() == 1 and ddp.rank() == 0 and ddp.is_main()
    assert ddp.sum_over_ranks(2.5) == 2.5 and ddp.gather_to_main({"a": 1}) == [{"a": 1}]
    assert ddp.run_on_main(lambda: 7) == 7
    ddp.barrier()
    assert ddp.train_device(torch.device("cpu")) == torch.device("cpu")


def test_capture_is_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InfscopeError, match="capture in one process"):
        finetune(None, TRAIN, None, FinetuneConfig(capture="last"), tmp_path)  # refused before any work
    with pytest.raises(InfscopeError, match="torchrun"):
        ddp.refuse_capture(None, observer=object())
    monkeypatch.setenv("WORLD_SIZE", "1")
    ddp.refuse_capture("last")  # one process: capture is fine


# ---------------------------------------------------------------- real torchrun launches


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _close(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, rtol: float = 1e-5) -> None:
    """``||a - b|| <= rtol ||b||`` (Frobenius norms; same shape)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.linalg.norm(a - b) <= rtol * max(float(np.linalg.norm(b)), 1e-12)


def _assert_same_training(one: Path, two: Path) -> None:
    """Checkpoints (adapter, AdamW moments, trainer state), summaries and dynamics of two fine-tunes agree."""
    summary_one = json.loads((one / "checkpoints.json").read_text())
    summary_two = json.loads((two / "checkpoints.json").read_text())
    assert [c["step"] for c in summary_two["checkpoints"]] == [c["step"] for c in summary_one["checkpoints"]]
    for c_one, c_two in zip(summary_one["checkpoints"], summary_two["checkpoints"], strict=True):
        _close(c_two["train_loss"], c_one["train_loss"])
        _close(c_two["val_loss"], c_one["val_loss"])
        ckpt_one, ckpt_two = Path(c_one["path"]), Path(c_two["path"])
        assert ckpt_two.parent.parent == two and ckpt_two.name == ckpt_one.name
        adapter_one = load_file(str(ckpt_one / "adapter_model.safetensors"))
        adapter_two = load_file(str(ckpt_two / "adapter_model.safetensors"))
        assert adapter_two.keys() == adapter_one.keys()
        for name, value in adapter_one.items():
            # Adam's first steps move each entry by ~lr * g / (|g| + eps): an entry whose gradient is
            # near eps (1e-8) turns float32 summation noise into ~1e-5 of the matrix; hence 5e-5 here.
            _close(adapter_two[name], value, rtol=5e-5)
        opt_one = torch.load(ckpt_one / "optimizer.pt", weights_only=True)["state"]
        opt_two = torch.load(ckpt_two / "optimizer.pt", weights_only=True)["state"]
        for key, state in opt_one.items():
            assert int(opt_two[key]["step"]) == int(state["step"])
            _close(opt_two[key]["exp_avg"], state["exp_avg"])
            _close(opt_two[key]["exp_avg_sq"], state["exp_avg_sq"])
    dyn_one, dyn_two = pd.read_parquet(one / "dynamics.parquet"), pd.read_parquet(two / "dynamics.parquet")
    assert len(dyn_one) == 2 * len(TRAIN)
    assert dyn_two[["id", "epoch", "step"]].equals(dyn_one[["id", "epoch", "step"]])
    for column in ("loss", "el2n"):
        _close(dyn_two[column], dyn_one[column])
    assert dyn_two["margin"].isna().all() and dyn_two["correct"].isna().all()


@pytest.mark.slow  # ~35 s on a shared 2-core machine: two torchrun processes plus the one-process CLI run
def test_torchrun_cli_finetune_equals_one_process(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", TRAIN)
    val = _write_jsonl(tmp_path / "val.jsonl", VAL)
    common = ["finetune", str(data), "--val", str(val), *CLI_ARGS]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = _torchrun("-m", "infscope.cli", *common, "--out", str(tmp_path / "two"))
    printed = " ".join(done.stdout.split())  # rich wraps lines at the pipe's width
    assert printed.count("best checkpoint") == 1 and "2 processes" in printed  # rank 0 prints alone
    _assert_same_training(tmp_path / "one" / "finetune", tmp_path / "two" / "finetune")
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert "finetune" in record["stages"] and list((tmp_path / "two").glob("**/*.tmp")) == []


def test_torchrun_weighted_finetune_equals_one_process(tmp_path):
    spec = {"config": WEIGHTED.to_dict(), "train": TRAIN, "val": VAL, "weights": WEIGHTS}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "train_ddp.py").write_text(SCRIPT)
    _torchrun(
        str(tmp_path / "train_ddp.py"), str(tmp_path / "spec.json"), str(tmp_path / "two"), str(tmp_path)
    )
    results = {path.name: path.read_text() for path in tmp_path.glob("result-*.json")}
    assert results.keys() == {"result-0.json", "result-1.json"}
    assert results["result-0.json"] == results["result-1.json"]  # every rank returns the summary
    one = finetune(
        load_model("tiny-llama"), TRAIN, VAL, WEIGHTED, tmp_path / "one", weights=WEIGHTS, progress=False
    )
    assert [c.epoch for c in one.checkpoints] == [1, 2]
    _assert_same_training(tmp_path / "one", tmp_path / "two")
