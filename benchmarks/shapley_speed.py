"""Speed of exact KNN-Shapley: 10,000 training rows x 1,000 validation rows, 384-dim embeddings.

Goal: under 5 s on one CPU thread. Embeddings are synthetic (Gaussian class clusters, 10 classes),
since only the shapes matter for the time; the script also checks the efficiency identity (values
sum to the mean validation KNN utility) so a fast wrong answer cannot pass. Prints the best of
``--repeats`` wall-clock times.

    OMP_NUM_THREADS=1 python3 benchmarks/shapley_speed.py [--train 10000 --val 1000 --dim 384 --k 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from infscope.estimators.shapley import knn_shapley


def knn_utility(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, k: int
) -> float:
    """Mean over validation points of the fraction of the k nearest training labels that match."""
    dist = (val_x**2).sum(1)[:, None] - 2 * val_x @ train_x.T + (train_x**2).sum(1)[None, :]
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return float((train_y[nearest] == val_y[:, None]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--val", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, args.dim))
    train_y = rng.integers(0, 10, args.train)
    val_y = rng.integers(0, 10, args.val)
    train_x = centres[train_y] + 6.0 * rng.normal(size=(args.train, args.dim))
    val_x = centres[val_y] + 6.0 * rng.normal(size=(args.val, args.dim))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        values = knn_shapley(train_x, train_y, val_x, val_y, k=args.k)
        times.append(time.perf_counter() - start)
    utility = knn_utility(train_x, train_y, val_x, val_y, args.k)
    print(
        f"knn_shapley {args.train} train x {args.val} val, dim {args.dim}, k={args.k}, "
        f"torch threads {torch.get_num_threads()}: best {min(times):.2f} s, all {', '.join(f'{t:.2f}' for t in times)} s"
    )
    print(f"efficiency check: sum(values) = {values.sum():.10f}, U(all) = {utility:.10f}")


if __name__ == "__main__":
    main()
