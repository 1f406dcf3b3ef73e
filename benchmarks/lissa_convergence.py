"""LiSSA convergence: the old recursion (as ``infscope score`` ran it) against the new defaults, block by block.

For every block it prints, for the OLD solver (the damped recursion from ``x = 0`` with a
power-iteration step, ``max_iter=300, tol=1e-4`` as ``scoring.METHOD_OPTIONS`` passes) and for the
NEW :class:`~infscope.estimators.lissa.LiSSA` defaults (conjugate gradients in the ``n``-dim Gram
span, ``tol=1e-6``): iterations, final relative residual ``||v - (H + lam I) x|| / ||v||``, the
score error ``max|lissa - exact| / max|exact|`` (scores ``-x . g_z`` against the mean query
gradient) and seconds, next to ``exact``'s seconds (float64 Woodbury + Cholesky). ``NEW@300`` is
the new solver under the pipeline's options (``max_iter=300, tol=1e-4``). The last row sums the
block scores, as the estimators do. Damping is DataInf's rule per block
(:func:`~infscope.estimators.primitives.datainf_damping`, scale 0.1).

By default the gradients are synthetic with a realistic spectrum: per block a shared mean direction
plus a low-rank part whose singular values decay like ``k^-p`` plus a small isotropic floor, 120
training rows and 40 query rows, blocks shaped like SmolLM2-135M LoRA r=8 (A: 8 x 576 = 4608,
B: 576 x 8 = 4608 or 192 x 8 = 1536). ``--store RUN/grads/train --query RUN/grads/val`` reads real
GradientStores instead (``--max-blocks`` keeps the first few blocks).

    python3 benchmarks/lissa_convergence.py [--blocks 6] [--json out.json]
    python3 benchmarks/lissa_convergence.py --store RUN/grads/train --query RUN/grads/val
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from infscope.estimators.primitives import datainf_damping, fisher_matvec, lissa_solve, woodbury_solve
from infscope.grads.store import GradientStore
from infscope.runs import atomic_write_json

OLD_OPTIONS = {"max_iter": 300, "tol": 1e-4}  # scoring.METHOD_OPTIONS["lissa"] when this was written
NEW_PIPELINE_OPTIONS = {"max_iter": 300, "tol": 1e-4}


def old_lissa_solve(
    G: torch.Tensor, V: torch.Tensor, lam: float, tol: float, max_iter: int, power_iters: int = 20
) -> tuple[torch.Tensor, int, float]:
    """The solver LiSSA used before (commit 75f9d85): recursion from ``x = 0``, step
    ``1 / (1.1 lambda_max_estimate + lam)``, halved when a residual grows. Returns (x, iterations, residual)."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(1, G.shape[1], generator=gen, dtype=G.dtype)
    top = 0.0
    for _ in range(power_iters):
        b = b / b.norm()
        Hb = fisher_matvec(G, b, 0.0)
        top, b = float((Hb * b).sum()), Hb
    alpha = 1.0 / (1.1 * top + lam)
    v_norm = V.norm(dim=1)
    X, R = torch.zeros_like(V), V.clone()
    previous = R.norm(dim=1)
    rel, iterations = float((previous / v_norm).max()), 0
    while rel >= tol and iterations < max_iter:
        X = X + alpha * R
        R = V - fisher_matvec(G, X, lam)
        iterations += 1
        current = R.norm(dim=1)
        if bool((current > previous * (1 + 1e-6)).any()):
            alpha /= 2.0
        previous = current
        rel = float((current / v_norm).max())
    return X, iterations, rel


def synthetic_block(n: int, q: int, d: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``(n, d)`` and query ``(q, d)`` gradients: mean direction + ``k^-decay`` spectrum + floor."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(64, d)
    basis = torch.linalg.qr(torch.randn(d, rank + 1, generator=gen, dtype=torch.float64))[0]
    mean_dir, low = basis[:, 0], basis[:, 1:]
    spectrum = torch.arange(1, rank + 1, dtype=torch.float64) ** -decay

    def rows(m: int) -> torch.Tensor:
        coef = torch.randn(m, rank, generator=gen, dtype=torch.float64) * spectrum
        mean = (1.0 + 0.3 * torch.randn(m, 1, generator=gen, dtype=torch.float64)) * mean_dir
        floor = 0.02 * torch.randn(m, d, generator=gen, dtype=torch.float64) / d**0.5
        return 1e-3 * (2.0 * mean + coef @ low.T + floor)

    return rows(n), rows(q)


def synthetic_blocks(n_blocks: int, n: int, q: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Blocks named and shaped like SmolLM2 LoRA r=8 (q_proj A/B 4608, v_proj B 1536)."""
    shapes = [("q_proj.lora_A", 4608), ("q_proj.lora_B", 4608), ("v_proj.lora_B", 1536)]
    out = {}
    for k in range(n_blocks):
        name, d = shapes[k % len(shapes)]
        decay = (0.6, 1.0, 1.5)[(k // len(shapes)) % 3]
        out[f"layers.{k // len(shapes)}.{name}"] = synthetic_block(n, q, d, decay, seed=k)
    return out


def store_blocks(
    train: str, query: str, max_blocks: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of two real GradientStores (float64)."""
    tr, qu = GradientStore.open(train), GradientStore.open(query)
    names = tr.block_names[:max_blocks] if max_blocks else tr.block_names
    return {b: (tr.load_block(b, torch.float64), qu.load_block(b, torch.float64)) for b in names}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    """One row per block (and a total): iterations, residual, score error and seconds per solver."""
    rows, totals = [], {k: 0.0 for k in ("exact", "old", "new", "new300")}
    summed: dict[str, torch.Tensor] = {}
    for name, (G, Vq) in blocks.items():
        v = Vq.mean(dim=0, keepdim=True)
        lam = datainf_damping(G, 0.1)
        top = float(torch.linalg.eigvalsh(G @ G.T / G.shape[0])[-1])
        exact_x, t_exact = timed(lambda G=G, v=v, lam=lam: woodbury_solve(G, v, lam))
        exact = -(exact_x @ G.T)[0]
        row: dict[str, Any] = {
            "block": name,
            "n": G.shape[0],
            "d": G.shape[1],
            "lam": lam,
            "kappa": (top + lam) / lam,
            "exact_s": t_exact,
        }
        summed["exact"] = summed.get("exact", 0) + exact
        totals["exact"] += t_exact
        (old_x, old_it, old_res), t_old = timed(
            lambda G=G, v=v, lam=lam: old_lissa_solve(G, v, lam, **OLD_OPTIONS)
        )
        new, t_new = timed(lambda G=G, v=v, lam=lam: lissa_solve(G, v, lam))
        new300, t_new300 = timed(lambda G=G, v=v, lam=lam: lissa_solve(G, v, lam, **NEW_PIPELINE_OPTIONS))
        for key, x, its, res, secs in (
            ("old", old_x, old_it, old_res, t_old),
            ("new", new.solution, new.iterations, new.residual, t_new),
            ("new300", new300.solution, new300.iterations, new300.residual, t_new300),
        ):
            scores = -(x @ G.T)[0]
            summed[key] = summed.get(key, 0) + scores
            totals[key] += secs
            err = float((scores - exact).abs().max() / exact.abs().max())
            row.update({f"{key}_iter": its, f"{key}_res": res, f"{key}_err": err, f"{key}_s": secs})
        rows.append(row)
    total: dict[str, Any] = {"block": "TOTAL (sum of blocks)", "exact_s": totals["exact"]}
    for key in ("old", "new", "new300"):
        err = float((summed[key] - summed["exact"]).abs().max() / summed["exact"].abs().max())
        total.update({f"{key}_err": err, f"{key}_s": totals[key]})
    rows.append(total)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'block':34s} {'d':>5s} {'kappa':>7s} {'exact s':>8s} |"
    for label in ("OLD 300/1e-4", "NEW default", "NEW 300/1e-4"):
        head += f" {label:^36s} |"
    print(head)
    sub = " " * 58 + "|" + (f" {'iter':>5s} {'resid':>8s} {'rel.err':>9s} {'s':>8s}   |" * 3)
    print(sub)
    for r in rows:
        kappa = f"{r['kappa']:7.0f}" if "kappa" in r else " " * 7
        line = f"{r['block'][-34:]:34s} {r.get('d', ''):>5} {kappa} {r['exact_s']:8.4f} |"
        for key in ("old", "new", "new300"):
            its = r.get(f"{key}_iter", "")
            res = f"{r[f'{key}_res']:8.1e}" if f"{key}_res" in r else " " * 8
            line += f" {its:>5} {res} {r[f'{key}_err']:9.2e} {r[f'{key}_s']:8.4f}   |"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", help="training GradientStore directory (RUN/grads/train)")
    parser.add_argument("--query", help="query GradientStore directory (RUN/grads/val)")
    parser.add_argument("--max-blocks", type=int, default=None, help="only the first N blocks of --store")
    parser.add_argument("--blocks", type=int, default=6, help="synthetic blocks (default 6)")
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-query", type=int, default=40)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.store or args.query:
        if not (args.store and args.query):
            parser.error("--store and --query go together")
        blocks = store_blocks(args.store, args.query, args.max_blocks)
        print(f"real stores: {args.store} ({len(blocks)} blocks)")
    else:
        blocks = synthetic_blocks(args.blocks, args.n_train, args.n_query)
        print(f"synthetic: {len(blocks)} blocks, n={args.n_train}, queries={args.n_query} (mean query)")
    rows = run(blocks)
    print_table(rows)
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "old_options": OLD_OPTIONS})


if __name__ == "__main__":
    main()
