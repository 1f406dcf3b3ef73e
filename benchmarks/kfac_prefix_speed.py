"""What the frozen-prefix cache buys the K-FAC / EK-FAC factor pass, with LoRA on the top layers only.

One model with LoRA on the last N decoder layers, the demo's own rows (prompt tokens masked,
right-padded batches). Set-ups, timed in interleaved repetitions (medians; the machine is shared):

* ``empirical, whole model``: :func:`collect_kfac_factors` with ``prefix=False``;
* ``empirical, cold cache``: the default (``prefix=True``) with a new cache: every row's frozen
  bottom still runs once, so this is what a lone factor pass saves (little: the bottom layers
  never built an autograd graph anyway);
* ``empirical, warm cache``: a cache another pass already filled (``prefix=PrefixStates``), as when
  the factor pass shares it with the gradient pass or a fine-tuning run; the bottom does not run;
* ``true Fisher + eigen pass``: ``fisher="true", eigen_correction=True``, whole model against the
  default, where the second pass (per-example gradients for EK-FAC's lambdas) hits the cache the
  first one filled.

Every cached result is checked against the whole model's (largest relative difference printed).

    python3 benchmarks/kfac_prefix_speed.py --model smollm2-135m --top 10 --rows 24 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from infscope.grads.kfac import KFACFactors, collect_kfac_factors
from infscope.models.prefix import PrefixStates


def demo_rows(tokenizer, rows: int, max_length: int, seed: int):
    """The demo's own rows (built-in sentence transformations), encoded as scoring encodes them."""
    from infscope.data.builtin import make_builtin
    from infscope.models.encode import encode_rows

    split = make_builtin(
        "sentence_transform", seed=seed, n_classes=10, per_class=rows // 10 + 2, n_test_per_class=1
    )
    return encode_rows(split.train[:rows], tokenizer, task="causal", max_length=max_length)


def build(name: str, rank: int, top: int, seed: int):
    from infscope.models.lora import LoraSpec, attach_lora
    from infscope.models.registry import load_model

    loaded = load_model(name)
    model = attach_lora(loaded, LoraSpec(r=rank, layers=f"top:{top}"), seed=seed)
    with torch.no_grad():  # a trained-looking adapter: nonzero B, so S is not degenerate
        gen = torch.Generator().manual_seed(seed)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.requires_grad_(False)
    model.eval()
    return model, loaded.tokenizer


def max_rel_diff(a: KFACFactors, b: KFACFactors) -> float:
    """Largest |a - b| / max|b| over every layer's A, S and lambdas."""
    worst = 0.0
    for name, f in b.layers.items():
        g = a.layers[name]
        pairs = [(g.A, f.A), (g.S, f.S)] + ([(g.lambdas, f.lambdas)] if f.lambdas is not None else [])
        for x, y in pairs:
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--top", type=int, default=10, help="LoRA on the last N decoder layers.")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = build(args.model, args.rank, args.top, args.seed)
    enc = demo_rows(tokenizer, args.rows, args.max_length, args.seed)
    n_layers = int(model.config.num_hidden_layers)
    depth = n_layers - args.top
    warm = PrefixStates(depth)
    collect_kfac_factors(model, enc, batch_size=args.batch_size, prefix=warm)  # fills the shared cache
    emp = {"batch_size": args.batch_size}
    true = {"batch_size": args.batch_size, "fisher": "true", "seed": args.seed, "eigen_correction": True}
    setups = {
        "empirical, whole model": lambda: collect_kfac_factors(model, enc, prefix=False, **emp),
        "empirical, cold cache": lambda: collect_kfac_factors(model, enc, **emp),
        "empirical, warm cache": lambda: collect_kfac_factors(model, enc, prefix=warm, **emp),
        "true Fisher + eigen, whole model": lambda: collect_kfac_factors(model, enc, prefix=False, **true),
        "true Fisher + eigen, cached": lambda: collect_kfac_factors(model, enc, **true),
    }
    times: dict[str, list[float]] = {k: [] for k in setups}
    results: dict[str, KFACFactors] = {}
    for _ in range(args.repeats):
        for name, run in setups.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)

    mean_len = float(enc.lengths.mean())
    print(
        f"model {args.model} ({n_layers} layers), LoRA r={args.rank} q/v on the top {args.top} "
        f"(cache depth {depth}), rows={len(enc)} of {mean_len:.0f} tokens on average, batch={args.batch_size}, "
        f"threads={torch.get_num_threads()}, repeats={args.repeats} interleaved; medians, spread min-max"
    )
    print(f"{'setup':<34} {'seconds':>8} {'min-max':>13} {'x faster':>9} {'max rel diff':>13}")
    baselines = {"empirical": "empirical, whole model", "true": "true Fisher + eigen, whole model"}
    for name, values in times.items():
        base = baselines["true" if name.startswith("true") else "empirical"]
        median = statistics.median(values)
        speedup = statistics.median(times[base]) / median
        diff = max_rel_diff(results[name], results[base])
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"{name:<34} {median:8.2f} {spread:>13} {speedup:8.2f}x {diff:13.1e}")


if __name__ == "__main__":
    main()
