"""Benchmark: noise injection end to end on an Alpaca-sized synthetic dataset.

Generates a seeded, Alpaca-shaped dataset (52,002 rows by default: instruction, optional input,
multi-sentence output with Alpaca-like lengths), writes it as JSONL, then runs
:func:`infscope.noise.run.run_noise` (20 % balanced noise, clean copy, noisy file, manifest,
metadata) and prints rows/s, seconds and peak memory. Target: < 30 s on 2 CPU cores.

    python3 benchmarks/noise_speed.py [--rows 52002] [--ratio 0.2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from infscope.noise.run import run_noise
from infscope.runs import PeakMemory

VERBS = (
    "Explain",
    "Describe",
    "List",
    "Summarize",
    "Write",
    "Rewrite",
    "Classify",
    "Compare",
    "Suggest",
    "Give",
)
TOPICS = (
    "the water cycle", "a healthy breakfast", "renewable energy", "the French revolution", "machine learning",
    "a job interview", "climate change", "the human heart", "a good password", "photosynthesis",
    "time management", "the stock market", "a short poem about autumn", "remote work", "the solar system",
)  # fmt: skip
WORDS = (
    "the", "a", "is", "are", "of", "and", "to", "in", "that", "it", "for", "with", "as", "was", "on", "this",
    "people", "important", "different", "system", "energy", "because", "which", "their", "process", "example",
    "water", "change", "time", "work", "use", "make", "good", "new", "first", "information", "should", "world",
)  # fmt: skip


def _sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 2024)))
    return " ".join(words).capitalize() + rng.choice((".", ".", ".", "!", "?"))


def synthetic_alpaca(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-shaped rows: ~40 % with an input, outputs of 1-8 sentences (about 270 chars mean)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction = f"{rng.choice(VERBS)} {rng.choice(TOPICS)}."
        extra = _sentence(rng, 6, 25) if rng.random() < 0.4 else ""
        output = " ".join(_sentence(rng, 5, 18) for _ in range(rng.randint(1, 8)))
        rows.append({"instruction": instruction, "input": extra, "output": output})
    return rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print (and return) rows/s, seconds and peak memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=52_002, help="rows of synthetic data")
    parser.add_argument("--ratio", type=float, default=0.2, help="noise ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and noise")
    parser.add_argument("--out", type=Path, default=None, help="output folder [default: a temporary one]")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        source = Path(tmp) / "alpaca_synth.jsonl"
        rows = synthetic_alpaca(args.rows, args.seed)
        source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        del rows
        with PeakMemory() as memory:  # entering imports torch (for CUDA stats): keep it out of the timing
            start = time.perf_counter()
            outputs = run_noise(
                source, ratios=[args.ratio], strategies=["balanced"], seed=args.seed, out_dir=out
            )
        seconds = time.perf_counter() - start
    summary = outputs[0].summary
    result = {
        "rows": args.rows,
        "noisy": summary["actual_noisy"],
        "failures": summary["failures"]["count"],
        "seconds": seconds,
        "inject_and_write_seconds": outputs[0].seconds,
        "rows_per_s": args.rows / seconds,
        "peak_rss_mb": memory.peak_rss / 2**20,
    }
    print(
        f"noise_speed: {result['rows']} rows, {result['noisy']} noisy ({result['failures']} failed), "
        f"{seconds:.2f} s end to end (load + clean copy + noise + write), {result['rows_per_s']:.0f} rows/s, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


if __name__ == "__main__":
    main()
