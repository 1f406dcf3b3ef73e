"""Per-example LoRA gradient throughput: hooks vs a plain batched forward + backward.

Both methods run the same model, batches and per-example loss in eval mode; the plain pass only
back-propagates the batch mean (what training costs), the hook pass also forms every example's
gradient. Repetitions are interleaved (hooks, plain, hooks, plain, ...) and medians reported,
because the machine is shared and noisy. Peak RSS is sampled during each method's runs.

    python3 benchmarks/grad_throughput.py --models tiny-llama,smollm2-135m --batch-size 8 --rows 32 --seq-len 64

On a shared machine pass ``--threads 1``: two threads on oversubscribed cores made single runs
vary 10x here, while one thread gave stable medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from infscope.grads.hooks import compute_gradients
from infscope.grads.losses import default_loss
from infscope.runs import PeakMemory


def make_batches(
    vocab: int, rows: int, seq_len: int, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Random token batches; every token after the first is a target, lengths vary by row (right padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (rows,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {
            "input_ids": ids[s : s + batch_size],
            "attention_mask": mask[s : s + batch_size],
            "labels": labels[s : s + batch_size],
        }
        for s in range(0, rows, batch_size)
    ]


def run_hooks(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], batch_size: int) -> None:
    compute_gradients(model, batches, batch_size=batch_size, progress=False)


def run_plain(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], batch_size: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for batch in batches:
        default_loss(model, batch).mean().backward()
        for p in params:
            p.grad = None


def timed(fn: Callable[[], None]) -> tuple[float, int]:
    with PeakMemory(interval=0.02) as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak_rss


def bench_model(name: str, args: argparse.Namespace) -> dict:
    from infscope.models.lora import LoraSpec, attach_lora
    from infscope.models.registry import load_model

    loaded = load_model(name)
    model = attach_lora(loaded, LoraSpec(r=args.rank), seed=args.seed)
    vocab = int(model.config.vocab_size)
    batches = make_batches(vocab, args.rows, args.seq_len, args.batch_size, args.seed)
    methods = {
        "hooks": lambda: run_hooks(model, batches, args.batch_size),
        "plain": lambda: run_plain(model, batches, args.batch_size),
    }
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, int] = {m: 0 for m in methods}
    for _ in range(args.reps):
        for method, fn in methods.items():  # interleaved A, B, A, B
            seconds, peak = timed(fn)
            times[method].append(seconds)
            peaks[method] = max(peaks[method], peak)
    speed = {m: args.rows / statistics.median(t) for m, t in times.items()}
    return {
        "model": name,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "hooks_ex_per_s": round(speed["hooks"], 2),
        "plain_ex_per_s": round(speed["plain"], 2),
        "ratio": round(speed["hooks"] / speed["plain"], 3),
        "hooks_peak_rss_mb": round(peaks["hooks"] / 2**20, 1),
        "plain_peak_rss_mb": round(peaks["plain"] / 2**20, 1),
        "seconds": {m: [round(s, 3) for s in t] for m, t in times.items()},
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m", help="comma-separated built-in models")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32, help="examples per repetition")
    parser.add_argument("--seq-len", type=int, default=64, help="maximum tokens per example")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per method")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = bench_model(name, args)
        results.append(result)
        print(
            f"{name:>14}: hooks {result['hooks_ex_per_s']:8.2f} ex/s  plain {result['plain_ex_per_s']:8.2f} ex/s  "
            f"ratio {result['ratio']:.3f}  peak RSS hooks {result['hooks_peak_rss_mb']:.0f} MB / "
            f"plain {result['plain_peak_rss_mb']:.0f} MB",
            flush=True,
        )
    if args.json:
        from infscope.runs import atomic_write_json

        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
