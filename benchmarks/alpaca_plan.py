"""The "At Alpaca scale" table of README: `infscope plan` for Llama-2-7B and Llama-3-8B on 52,002 rows.

Sizes are exact (from the architectures); times on GPUs are extrapolated from FLOPs per row under the
assumptions `infscope plan` prints (125 TFLOP/s effective per GPU, perfect data-parallel scaling).

    python3 benchmarks/alpaca_plan.py
"""

from __future__ import annotations

import sys

from infscope.cli import main

MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B")

if __name__ == "__main__":
    for model in MODELS:
        code = main(["plan", "--model", model, "--rows", "52002", "--project", "8192", "--no-probe"])
        if code:
            sys.exit(code)
