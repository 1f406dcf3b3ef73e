"""DataInf speed: vectorised block-wise scoring vs a per-example Python loop of the same formula.

Scores ``--n-train`` training examples against ``--n-query`` queries in the per-query matrix mode,
on gradients shaped like SmolLM2-135M with LoRA r=8 on q_proj and v_proj: 30 layers x {q, v} x
{A, B} = 120 blocks, 460,800 parameters (q: A 8x576, B 576x8; v: A 8x576, B 192x8). By default the
gradients are seeded random tensors; ``--store PATH`` reads a real GradientStore instead.

The loop follows the DataInf paper's Algorithm 1 one example at a time: per block, the damping is
accumulated over examples; per query ``v``, ``u = (1/n) sum_i (v.g_i) / (lam + ||g_i||^2) g_i``,
then ``score_k += -(1/lam) (v - u) . g_k`` for every training example ``k``. It runs on
``--loop-queries`` queries and its per-query time is extrapolated linearly to all queries (the
output says so). Both use the same dtype, and their scores on the looped queries are compared.

    python3 benchmarks/datainf_speed.py [--n-train 900] [--n-query 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from infscope.errors import InfscopeError
from infscope.estimators.datainf import DataInf
from infscope.grads.base import GradientSet, InMemoryGradients
from infscope.runs import atomic_write_json

LAYERS, RANK, HIDDEN, KV_DIM = 30, 8, 576, 192


def smollm2_lora_shapes() -> dict[str, int]:
    """Block name -> dimension for LoRA r=8 on q_proj, v_proj of SmolLM2-135M (120 blocks, 460,800)."""
    shapes = {}
    for layer in range(LAYERS):
        for proj, out_dim in (("q_proj", HIDDEN), ("v_proj", KV_DIM)):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            shapes[f"{prefix}.lora_A.default"] = RANK * HIDDEN
            shapes[f"{prefix}.lora_B.default"] = out_dim * RANK
    return shapes


def random_gradients(n: int, shapes: dict[str, int], seed: int, prefix: str) -> InMemoryGradients:
    """Seeded standard-normal gradients with the given block shapes."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {name: torch.randn(n, d, generator=gen) for name, d in shapes.items()}
    return InMemoryGradients([f"{prefix}{i}" for i in range(n)], blocks)


def loop_datainf(train: GradientSet, query: GradientSet, rows: list[int], dtype: torch.dtype) -> tuple:
    """The per-example loop. Returns (scores (len(rows), n), seconds for damping, seconds per query)."""
    n = len(train.ids)
    scores = torch.zeros(len(rows), n, dtype=torch.float64)
    damping_seconds = query_seconds = 0.0
    for name in train.block_names:
        G = train.load_block(name, dtype)
        V = query.load_block(name, dtype)
        start = time.perf_counter()
        sq = [float(G[i] @ G[i]) for i in range(n)]
        lam = 0.1 * sum(sq) / (n * G.shape[1])
        damping_seconds += time.perf_counter() - start
        start = time.perf_counter()
        for out_row, j in enumerate(rows):
            v = V[j]
            u = torch.zeros_like(v)
            for i in range(n):
                u += (float(v @ G[i]) / (lam + sq[i])) * G[i]
            direction = (v - u / n) / lam
            for k in range(n):
                scores[out_row, k] -= float(direction @ G[k])
        query_seconds += time.perf_counter() - start
    return scores, damping_seconds, query_seconds / len(rows)


def load_inputs(args: argparse.Namespace) -> tuple[GradientSet, GradientSet, str]:
    """Train and query gradients: seeded random, or read from ``--store`` (queries from ``--query-store``)."""
    if args.store is None:
        shapes = smollm2_lora_shapes()
        train = random_gradients(args.n_train, shapes, args.seed, "t")
        query = random_gradients(args.n_query, shapes, args.seed + 1, "q")
        return train, query, f"random seed={args.seed}"
    from infscope.grads.store import GradientStore

    train = GradientStore.open(args.store)
    query = GradientStore.open(args.query_store) if args.query_store else train
    return train, query, f"store {args.store}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=900, help="random mode only")
    parser.add_argument("--n-query", type=int, default=100, help="random mode only")
    parser.add_argument("--loop-queries", type=int, default=2, help="queries the slow loop really runs")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 by default: on a shared 2-core machine, 2 OpenMP threads stall badly)",
    )
    parser.add_argument(
        "--store", default=None, help="a GradientStore directory to use instead of random data"
    )
    parser.add_argument("--query-store", default=None, help="query GradientStore (default: --store itself)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    train, query, source = load_inputs(args)
    dims = sum(train.block_dim(b) for b in train.block_names)
    print(
        f"inputs: {source}; {len(train.ids)} train x {len(query.ids)} queries, "
        f"{len(train.block_names)} blocks, {dims:,} params, {args.dtype}, {args.threads} threads"
    )

    start = time.perf_counter()
    scores = DataInf(dtype=dtype).fit(train).score(query, aggregate=False)
    vector_seconds = time.perf_counter() - start
    print(f"vectorised DataInf (fit + score, matrix mode): {vector_seconds:.2f} s")

    rows = list(range(min(args.loop_queries, len(query.ids))))
    loop_scores, damping_seconds, per_query = loop_datainf(train, query, rows, dtype)
    loop_seconds = damping_seconds + per_query * len(query.ids)
    reference = loop_scores.numpy()
    got = scores.values[rows]
    rel_err = float(((got - reference) ** 2).sum() ** 0.5 / (reference**2).sum() ** 0.5)
    print(
        f"per-example loop: ran {len(rows)} of {len(query.ids)} queries ({per_query:.2f} s per query, "
        f"{damping_seconds:.2f} s damping); EXTRAPOLATED linearly to all queries: {loop_seconds:.1f} s"
    )
    print(f"speed ratio (loop / vectorised): {loop_seconds / vector_seconds:.0f}x")
    print(f"agreement on the looped queries: relative error {rel_err:.2e}")
    result = {
        "source": source,
        "n_train": len(train.ids),
        "n_query": len(query.ids),
        "blocks": len(train.block_names),
        "params": dims,
        "dtype": args.dtype,
        "threads": args.threads,
        "vectorised_seconds": vector_seconds,
        "loop_queries_run": len(rows),
        "loop_seconds_per_query": per_query,
        "loop_damping_seconds": damping_seconds,
        "loop_seconds_extrapolated": loop_seconds,
        "speed_ratio": loop_seconds / vector_seconds,
        "relative_error": rel_err,
    }
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except InfscopeError as exc:
        raise SystemExit(f"error: {exc}") from None
