"""How well each method finds injected noise on the demo setting, over seeds, with the loss baseline.

Two settings, each over ``--seeds`` (default 0,1,2), every method scored from one fine-tune and
one gradient store per run:

* ``demo``: the ``infscope demo`` setting (built-in sentence transformations, 120 training rows,
  20 % noise: grammar 0.3, semantic 0.2, quality 0.2 and label-changing response swaps 0.3;
  SmolLM2-135M with LoRA r=8, 2 epochs, best-validation-loss checkpoint);
* ``label_flip``: the classification view of the task with MiniLM + LoRA (3 epochs) and 20 % uniform label
  flips (the DataInf paper's GLUE protocol on a built-in dataset).

Prints mean AUROC / AP with a 95 % t interval per setting and method (and per noise family and operator
for ``demo``) as Markdown, and writes the tables under ``--out``. Reruns resume finished runs.

    python3 benchmarks/detection.py --out bench_out/detection
    python3 benchmarks/detection.py --model tiny-llama --seeds 0 --out /tmp/det   # plumbing check
"""

from __future__ import annotations

import argparse
import time

import torch

from infscope.bench.config import parse_spec
from infscope.bench.markdown import bench_markdown
from infscope.bench.runner import run_bench

SPEC = """
name: detection
description: demo-setting detection over seeds, and label flips on the classification view
axes:
  methods: [all]
  seeds: [0, 1, 2]
grids:
  - datasets: [sentence_transform]
    noise:
      - {weights: {grammar: 0.3, semantic: 0.2, quality: 0.2, response_swap: 0.3}, ratio: 0.2, label: demo}
    models: [{name: MODEL}]
  - datasets: [sentence_transform_cls]
    noise:
      - {weights: {label: 1}, ratio: 0.2, label: label_flip}
    models: [{name: CLS_MODEL, max_length: 64, epochs: 3}]
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cls-model", default="minilm")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench_out/detection")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is safest on shared cores)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Model option of the demo setting, e.g. --set epochs=4 --set lora_layers=top:10 (repeatable).",
    )
    parser.add_argument(
        "--cls-set", action="append", default=[], metavar="KEY=VALUE", help="Model option of label_flip."
    )
    parser.add_argument("--only", choices=("demo", "label_flip"), help="Run one setting only.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    yaml = __import__("yaml")
    raw = yaml.safe_load(SPEC.replace("CLS_MODEL", args.cls_model).replace("MODEL", args.model))
    for grid, items in ((0, args.set), (1, args.cls_set)):
        for item in items:
            key, _, value = item.partition("=")
            raw["grids"][grid]["models"][0][key.strip()] = yaml.safe_load(value)
    if args.only:
        raw["grids"] = [g for g in raw["grids"] if g["noise"][0]["label"] == args.only]
    spec = parse_spec(raw)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    start = time.perf_counter()
    result = run_bench(spec, args.out, seeds=seeds)
    print(
        f"\n{len(result.results)} result rows from {len(result.ran)} new and {len(result.skipped)} resumed runs "
        f"in {time.perf_counter() - start:.0f} s; tables in {args.out}/"
    )
    print(bench_markdown(result.aggregate))


if __name__ == "__main__":
    main()
