"""When does DataInf find swapped responses better than the training loss? Checkpoints and blocks, over seeds.

Response swaps (20 % of rows get another row's answer) are the label-changing noise of instruction data.
For each built-in task in ``--datasets`` and each seed, this script fine-tunes SmolLM2-135M with LoRA
through ``infscope bench`` (the demo's model settings, resumable), then scores the training rows at
**every epoch's checkpoint**, not only the best one, with:

* DataInf with the paper's blocks (one per LoRA A or B matrix) and with one block per decoder layer
  (the same gradients concatenated: DataInf's inverse approximation is per block, so the grouping
  changes its scores; hessian-free does not change);
* hessian-free (TracIn at one checkpoint), LiSSA, exact, and the training loss at that checkpoint.

It prints, per task and epoch, the validation loss and the mean AUROC (swapped vs clean rows) with a 95 %
t interval over seeds, as Markdown, and writes ``swap_study.csv`` under ``--out``. Gradients of
checkpoints other than the one the bench run scored go to ``RUN/scoring/epoch-N`` (reused on reruns,
and by ``infscope score``); the bench run's own results are left untouched.

    python3 benchmarks/swap_study.py --out bench_out/swap_study
    python3 benchmarks/swap_study.py --model tiny-llama --seeds 0 --out /tmp/swap   # plumbing check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infscope.bench.config import parse_spec
from infscope.bench.runner import run_bench
from infscope.evaluate.metrics import auroc
from infscope.evaluate.stats import t_critical
from infscope.grads.base import InMemoryGradients
from infscope.grads.blocks import block_key
from infscope.grads.store import GradientStore
from infscope.scoring import checkpoint_gradients, open_finetuned_run, score_methods

SPEC = """
name: swap_study
description: 20% response swaps per built-in task; every epoch scored by benchmarks/swap_study.py
axes:
  noise:
    - {weights: {response_swap: 1}, ratio: 0.2, label: swap}
  methods: [datainf, hessian_free, loss]
"""
MATRIX_METHODS = ("datainf", "hessian_free", "lissa", "exact", "loss")
COLUMNS = ("datainf", "datainf_per_layer", "hessian_free", "lissa", "exact", "loss")


def regroup(grads, block_by: str) -> InMemoryGradients:
    """The same per-example gradients with blocks concatenated by ``block_key(name, block_by)``."""
    groups: dict[str, list[str]] = {}
    for name in grads.block_names:
        groups.setdefault(block_key(name, block_by), []).append(name)
    blocks = {key: torch.cat([grads.load_block(n) for n in names], dim=1) for key, names in groups.items()}
    return InMemoryGradients(grads.ids, blocks)


def gradients_at(run, checkpoint, scored_path: str) -> tuple:
    """Train and validation gradient stores and per-row losses at ``checkpoint``.

    The bench run's own gradients for the checkpoint it scored; the others are collected (once) in
    ``RUN/scoring/epoch-N`` as ``infscope score --checkpoint epoch-N`` does, without touching the
    run's results.
    """
    if str(checkpoint.path) == scored_path:
        stores = (GradientStore.open(run.path / "grads" / name) for name in ("train", "val"))
        return (*stores, pd.read_parquet(run.path / "losses.parquet"))
    return checkpoint_gradients(run, checkpoint, run.val, "val", "float32", "matrix")


def score_checkpoint(train, query, losses: pd.DataFrame, noisy: pd.Series) -> dict[str, float]:
    """AUROC of every column of :data:`COLUMNS` on the rows of ``noisy`` (True = swapped)."""
    scored = score_methods(MATRIX_METHODS, train, query, losses)
    scored["datainf_per_layer"] = score_methods(
        ["datainf"], regroup(train, "layer"), regroup(query, "layer"), None
    )["datainf"]
    truth = noisy.loc[train.ids].to_numpy()
    return {name: auroc(np.asarray(scored[name].values), truth) for name in COLUMNS}


def interval(values: list[float]) -> str:
    """``mean ± half-width`` of a 95 % t interval (just the mean for one value)."""
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return f"{arr.mean():.3f}"
    half = t_critical(0.95, len(arr)) * arr.std(ddof=1) / np.sqrt(len(arr))
    return f"{arr.mean():.3f} ± {half:.2f}"


def markdown(frame: pd.DataFrame) -> str:
    """One row per (task, epoch): validation loss and mean AUROC ± interval of every column."""
    head = "| task | epoch | val loss | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for (dataset, epoch), group in frame.groupby(["dataset", "epoch"], sort=True):
        cells = [interval(group[c].tolist()) for c in COLUMNS]
        best = " (best)" if group["is_best"].all() else ""
        lines.append(
            f"| {dataset} | {epoch}{best} | {group['val_loss'].mean():.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="sentence_transform,instruction_mix,math_reason")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench_out/swap_study")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is safest on shared cores)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = __import__("yaml").safe_load(SPEC)
    raw["axes"]["datasets"] = args.datasets.split(",")
    raw["axes"]["models"] = [{"name": args.model, "epochs": args.epochs}]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    start = time.perf_counter()
    run_bench(parse_spec(raw), args.out, seeds=seeds, show_progress=False)
    records = []
    for dataset in args.datasets.split(","):
        for seed in seeds:
            run = open_finetuned_run(Path(args.out) / dataset / "swap" / args.model / f"seed-{seed}")
            manifest = pd.read_json(run.path / "data" / "manifest.jsonl", lines=True).set_index("id")
            scored_path = json.loads((run.path / "evaluation.json").read_text())["checkpoint"]["checkpoint"]
            for checkpoint in run.checkpoints:
                gradients = gradients_at(run, checkpoint, scored_path)
                records.append(
                    {
                        "dataset": dataset,
                        "seed": seed,
                        "epoch": checkpoint.epoch,
                        "val_loss": checkpoint.val_loss,
                        "is_best": str(checkpoint.path) == str(run.best.path),
                        **score_checkpoint(*gradients, manifest["is_noisy"]),
                    }
                )
    frame = pd.DataFrame(records)
    frame.to_csv(Path(args.out) / "swap_study.csv", index=False)
    print(
        f"{len(frame)} scored checkpoints in {time.perf_counter() - start:.0f} s; table in {args.out}/swap_study.csv"
    )
    print(markdown(frame))


if __name__ == "__main__":
    main()
