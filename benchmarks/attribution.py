"""The DataInf paper's attribution experiment on the three built-in synthetic tasks.

For each task (sentence transformations, math word problems without and with reasoning) a LoRA
adapter is tuned on clean data; every validation query is scored against every training row, and
we measure, per query, the class-detection AUC and the recall of its class among the top-s most
helpful training rows (s = training rows of that class), averaged over queries. The paper reports
DataInf AUC 1.000 on all three with Llama-2-13B, and hessian-free 0.77 on the math tasks.

    python3 benchmarks/attribution.py --out bench_out/attribution
    python3 benchmarks/attribution.py --model tiny-llama --train-per-class 6 --out /tmp/attr   # quick check
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from infscope.bench.config import parse_spec
from infscope.bench.runner import run_bench

SPEC = """
name: attribution
description: class attribution on the DataInf paper's three synthetic tasks
axes:
  datasets:
    - {name: sentence_transform, train_per_class: TRAIN, val_per_class: VAL}
    - {name: math_no_reason, train_per_class: TRAIN, val_per_class: VAL}
    - {name: math_reason, train_per_class: TRAIN, val_per_class: VAL}
  noise: [{ratio: 0}]
  models: [{name: MODEL}]
  methods: [datainf, hessian_free, exact, lissa]
  attribution: true
  seeds: [0]
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-per-class", type=int, default=24)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="bench_out/attribution")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is safest on shared cores)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = (
        SPEC.replace("TRAIN", str(args.train_per_class))
        .replace("VAL", str(args.val_per_class))
        .replace("MODEL", args.model)
    )
    start = time.perf_counter()
    result = run_bench(
        parse_spec(yaml.safe_load(text)), args.out, seeds=tuple(int(s) for s in args.seeds.split(","))
    )
    agg = result.aggregate
    part = agg[(agg["group"] == "attribution") & agg["metric"].isin(["auc", "recall"])]
    print(
        f"\n{len(result.ran)} new and {len(result.skipped)} resumed runs in {time.perf_counter() - start:.0f} s "
        f"({args.model}, {args.train_per_class} train / {args.val_per_class} query rows per class, 10 classes)\n"
    )
    print("| task | method | AUC | recall |")
    print("|---|---|---|---|")
    for (dataset, method), block in part.groupby(["dataset", "method"], sort=False):
        values = dict(zip(block["metric"], block["mean"], strict=True))
        print(
            f"| {dataset} | {method} | {values.get('auc', float('nan')):.3f} | {values.get('recall', float('nan')):.3f} |"
        )


if __name__ == "__main__":
    main()
