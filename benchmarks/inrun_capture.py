"""In-run gradient capture: fine-tune time with ``capture="last"`` vs without, and how in-run DataInf
ranks the training rows compared with DataInf from a separate gradient pass at the final checkpoint.

In-run gradients are each row's gradient at the weights it was trained with in the last epoch (and
the query gradient at the weights entering that epoch); the separate pass takes both at the final
checkpoint. Both use the same DataInf closed form (per block ``lam = 0.1 mean ||g||^2 / d``) on
float64 copies of the stores, so the Spearman measures the gradients only.

    python3 benchmarks/inrun_capture.py                       # tiny-llama, quick
    python3 benchmarks/inrun_capture.py --model smollm2-135m  # the real model
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from infscope.grads.base import GradientSet
from infscope.grads.hooks import compute_gradients
from infscope.grads.inrun import finetune_with_capture
from infscope.grads.store import GradientStore
from infscope.models.config import FinetuneConfig
from infscope.models.encode import encode_rows
from infscope.models.finetune import finetune
from infscope.models.lora import LoraSpec
from infscope.models.registry import load_model
from infscope.runs import RunLayout


def datainf(train: GradientSet, query: GradientSet, scale: float = 0.1) -> torch.Tensor:
    """DataInf aggregate scores (higher = more harmful) from two gradient sets, block by block."""
    total = torch.zeros(len(train.ids), dtype=torch.float64)
    for name in train.block_names:
        G, v = train.load_block(name, torch.float64), query.load_block(name, torch.float64).mean(dim=0)
        q = G.square().sum(dim=1)
        lam = scale * float(q.mean()) / G.shape[1]
        if lam <= 0:
            continue
        u = (v - ((G @ v) / (lam + q)) @ G / len(G)) / lam
        total -= G @ u
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inrun_capture.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = _rows(args.rows + 16)
    train, val = data[: args.rows], data[args.rows :]
    config = dict(epochs=args.epochs, lr=2e-3, batch_size=8, max_length=64, lora=LoraSpec(r=8))
    work = Path(tempfile.mkdtemp(prefix="inrun-"))
    seconds = {}
    for name, cfg, fn in (
        ("plain", FinetuneConfig(**config), finetune),
        ("capture", FinetuneConfig(**config, capture="last"), finetune_with_capture),
    ):
        loaded = load_model(args.model, seed=0)
        start = time.perf_counter()
        result = fn(loaded, train, val, cfg, work / name / "finetune", progress=False)
        seconds[name] = time.perf_counter() - start
    layout = RunLayout(work / "capture")
    inrun_train = GradientStore.open(layout.inrun(args.epochs) / "grads" / "train")
    inrun_val = GradientStore.open(layout.inrun(args.epochs) / "grads" / "val")
    model = loaded.model  # the captured run's final weights (epoch == last checkpoint)
    enc = {
        k: encode_rows(r, loaded.tokenizer, task=loaded.task, max_length=64)
        for k, r in (("t", train), ("v", val))
    }
    start = time.perf_counter()
    sep_train = compute_gradients(model, enc["t"], batch_size=8, progress=False)
    sep_val = compute_gradients(model, enc["v"], batch_size=8, progress=False)
    separate_s = time.perf_counter() - start
    rho = spearmanr(datainf(inrun_train, inrun_val).numpy(), datainf(sep_train, sep_val).numpy()).statistic
    out = {
        "model": args.model,
        "rows": len(train),
        "epochs": args.epochs,
        "finetune_s": seconds["plain"],
        "finetune_capture_s": seconds["capture"],
        "capture_ratio": seconds["capture"] / seconds["plain"],
        "separate_gradient_pass_s": separate_s,
        "spearman_inrun_vs_separate_datainf": float(rho),
        "best_checkpoint": result.best.path,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def _rows(n: int) -> list[dict]:
    """``n`` small instruction rows (a label-like answer per item), enough to train on quickly."""
    colors = ["red", "blue", "green", "yellow"]
    return [
        {
            "id": f"r{i}",
            "instruction": f"Name the color of item {i}.",
            "input": "",
            "output": colors[(i * 7) % 4],
        }
        for i in range(n)
    ]


if __name__ == "__main__":
    main()
