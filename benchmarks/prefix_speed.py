"""What LoRA on the top layers only, plus the frozen-prefix cache, buys per training step and gradient pass.

Three set-ups on the same model and the demo's own rows (prompt tokens masked, right-padded batches), timed side by side with interleaved repetitions
(medians; the machine is shared and noisy):

* ``all``: LoRA on every decoder layer (the usual set-up), full forward + backward;
* ``top``: LoRA on the top N layers only, full forward (backward stops at the lowest tuned layer);
* ``top+cache``: the same adapters run through :func:`infscope.models.prefix.frozen_prefix`, so the
  frozen bottom layers run once per row (the first pass fills the cache; timed passes hit it, as
  every epoch after the first, the validation passes and the gradient passes do).

For each it times an AdamW training step over all batches and a per-example gradient pass
(hooks), and reports ratios against ``all``. Peak RSS is that of the whole process (all set-ups stay
loaded), so it shows the cache's memory only as a difference between runs.

    python3 benchmarks/prefix_speed.py --model smollm2-135m --top 10 --rows 32 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from infscope.grads.hooks import compute_gradients
from infscope.grads.losses import default_loss
from infscope.runs import PeakMemory


def demo_batches(
    tokenizer, rows: int, batch_size: int, max_length: int, seed: int
) -> tuple[list[dict], float]:
    """Batches of the demo's own rows (built-in sentence transformations, prompt masked), as training sees them."""
    from infscope.data.builtin import make_builtin
    from infscope.models.encode import batches, encode_rows

    split = make_builtin(
        "sentence_transform", seed=seed, n_classes=10, per_class=rows // 10 + 2, n_test_per_class=1
    )
    encoded = encode_rows(split.train[:rows], tokenizer, task="causal", max_length=max_length)
    mean_len = sum(len(s) for s in encoded.input_ids) / len(encoded)
    return list(batches(encoded, batch_size, shuffle=True, seed=seed)), mean_len


def train_pass(model: torch.nn.Module, batches: list[dict], optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for batch in batches:
        default_loss(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def grad_pass(model: torch.nn.Module, batches: list[dict], batch_size: int) -> None:
    compute_gradients(model, batches, batch_size=batch_size, progress=False)


def build(name: str, rank: int, layers: str | None, seed: int):
    from infscope.models.lora import LoraSpec, attach_lora
    from infscope.models.registry import load_model

    loaded = load_model(name)
    return attach_lora(loaded, LoraSpec(r=rank, layers=layers), seed=seed), loaded.tokenizer


def main() -> None:
    from infscope.models.prefix import frozen_prefix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--top", type=int, default=10, help="LoRA on the last N decoder layers.")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    all_layers, tokenizer = build(args.model, args.rank, None, args.seed)
    top_layers, _ = build(args.model, args.rank, f"top:{args.top}", args.seed)
    models = {"all": all_layers, "top": top_layers, "top+cache": top_layers}
    batches, mean_len = demo_batches(tokenizer, args.rows, args.batch_size, args.max_length, args.seed)
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for k, m in models.items()
    }
    with frozen_prefix(models["top+cache"]) as warm:  # the first pass fills the cache (not timed)
        start = time.perf_counter()
        train_pass(models["top+cache"], batches, optimizers["top+cache"])
        fill_seconds = time.perf_counter() - start
    prefix_cache = warm

    def context(setup: str):
        return (
            frozen_prefix(models[setup], prefix_cache) if setup == "top+cache" else contextlib.nullcontext()
        )

    times: dict[tuple[str, str], list[float]] = {}
    peaks: dict[str, int] = {}
    for _ in range(args.repeats):
        for setup, model in models.items():
            for stage in ("train", "grads"):
                with context(setup), PeakMemory(interval=0.02) as mem:
                    start = time.perf_counter()
                    if stage == "train":
                        train_pass(model, batches, optimizers[setup])
                    else:
                        grad_pass(model, batches, args.batch_size)
                    times.setdefault((setup, stage), []).append(time.perf_counter() - start)
                peaks[setup] = max(peaks.get(setup, 0), mem.peak_rss)

    n_layers = int(models["all"].config.num_hidden_layers)
    print(
        f"model {args.model} ({n_layers} layers), LoRA r={args.rank} q/v, top={args.top}, rows={args.rows}, "
        f"batch={args.batch_size}, demo rows of {mean_len:.0f} tokens on average, threads={torch.get_num_threads()}, "
        f"repeats={args.repeats}; cache: {len(prefix_cache)} rows, {prefix_cache.bytes / 2**20:.1f} MiB, "
        f"hits {prefix_cache.hits}, misses {prefix_cache.misses}, disabled={prefix_cache.disabled}"
    )
    print(f"first (cache-filling) training pass of top+cache: {fill_seconds:.2f} s")
    print(f"{'setup':<10} {'train s':>8} {'x vs all':>9} {'grads s':>8} {'x vs all':>9} {'peak RSS MiB':>13}")
    base = {stage: statistics.median(times[("all", stage)]) for stage in ("train", "grads")}
    for setup in models:
        train = statistics.median(times[(setup, "train")])
        grads = statistics.median(times[(setup, "grads")])
        print(
            f"{setup:<10} {train:8.2f} {base['train'] / train:8.2f}x {grads:8.2f} {base['grads'] / grads:8.2f}x "
            f"{peaks[setup] / 2**20:13.0f}"
        )


if __name__ == "__main__":
    main()
