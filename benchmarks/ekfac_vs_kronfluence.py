"""Our EK-FAC / K-FAC against kronfluence's on the same pipeline run: agreement (Spearman) and seconds.

One pipeline run (built-in sentence-transformation task with injected noise) is fine-tuned; then

- ours: ``score_run(run, ["ekfac"])`` from scratch (gradient stores + K-FAC factors + scores),
  ``ekfac`` again with the stores kept (what it costs beside the other gradient methods), and
  ``kfac`` (stores kept, factors collected again);
- kronfluence: its EK-FAC (and K-FAC) through the peer adapter, on the same adapter, rows and
  LoRA modules, empirical Fisher, damping 0.1 x mean eigenvalue (both sides).

It prints Spearman between the two, each one's noise-detection AUROC and wall seconds side by side.

    python3 benchmarks/ekfac_vs_kronfluence.py                          # tiny-llama, a minute
    python3 benchmarks/ekfac_vs_kronfluence.py --model smollm2-135m     # the real model
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from infscope.data.manifest import manifest_for_ids, read_manifest
from infscope.peers import PeerInputs
from infscope.peers.agreement import spearman
from infscope.peers.kronfluence_peer import kronfluence_scores
from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.scoring import open_run, score_run

SIZES = {
    "tiny-llama": {"classes": 4, "train_per_class": 16, "val_per_class": 2, "max_length": 64},
    "smollm2-135m": {"classes": 10, "train_per_class": 12, "val_per_class": 2, "max_length": 128},
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def auroc(values: np.ndarray, ids: list[str], run_dir: Path) -> float:
    run = open_run(run_dir)
    if run.manifest is None:
        return float("nan")
    truth = manifest_for_ids(read_manifest(run.manifest), ids)["is_noisy"].astype(bool).to_numpy()
    return float(roc_auc_score(truth, values)) if 0 < truth.sum() < len(truth) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama", choices=sorted(SIZES))
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fisher", default="empirical", choices=("empirical", "true"), help="ours only")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = dict(SIZES[args.model])
    if args.train_per_class:
        size["train_per_class"] = args.train_per_class
    out = Path(args.out or tempfile.mkdtemp(prefix="ekfac-bench-")) / "run"
    config = PipelineConfig(model=args.model, epochs=args.epochs, methods=("loss",), **size)
    _, tune_s = timed(lambda: run_pipeline(config, out))
    run = open_run(out)
    ckpt = run.checkpoint("best")
    shutil.rmtree(run.layout.scoring(ckpt.path), ignore_errors=True)  # ours from scratch

    opts = {"ekfac": {"fisher": args.fisher}, "kfac": {"fisher": args.fisher}}
    ours, ours_s = timed(lambda: score_run(out, ["ekfac"], options=opts)["ekfac"])
    shutil.rmtree(run.layout.kfac(ckpt.path), ignore_errors=True)
    _, ours_reuse_s = timed(lambda: score_run(out, ["ekfac"], options=opts))
    shutil.rmtree(run.layout.kfac(ckpt.path), ignore_errors=True)
    ours_kfac, ours_kfac_s = timed(lambda: score_run(out, ["kfac"], options=opts)["kfac"])

    inputs = PeerInputs.from_run(out)
    ids = inputs.train_ids
    (kron, _), kron_s = timed(lambda: kronfluence_scores(inputs, strategy="ekfac"))
    (kron_kfac, _), kron_kfac_s = timed(lambda: kronfluence_scores(inputs, strategy="kfac"))
    ours_v = np.asarray(ours.values)[[ours.train_ids.index(i) for i in ids]]
    ours_k = np.asarray(ours_kfac.values)[[ours_kfac.train_ids.index(i) for i in ids]]

    rows = [
        ("ekfac", ours_v, kron, ours_s, ours_reuse_s, kron_s),
        ("kfac", ours_k, kron_kfac, None, ours_kfac_s, kron_kfac_s),
    ]
    n_train, n_val = len(ids), len(inputs.val_rows)
    print(f"\nmodel {args.model}: {n_train} training rows, {n_val} queries, fisher {args.fisher} (ours)")
    print(f"fine-tuning took {tune_s:.1f} s (not counted)\n")
    header = (
        f"{'method':<7} {'spearman':>9} {'auroc ours':>11} {'auroc kron':>11} "
        f"{'ours s (scratch)':>17} {'ours s (store kept)':>20} {'kron s':>8} {'speed-up':>9}"
    )
    print(header)
    report = {"model": args.model, "n_train": n_train, "n_query": n_val, "fisher": args.fisher}
    for name, mine, theirs, scratch, kept, kron_t in rows:
        rho = spearman(mine, theirs)
        a_ours, a_kron = auroc(mine, ids, out), auroc(theirs, ids, out)
        scratch_txt = f"{scratch:17.1f}" if scratch is not None else f"{'-':>17}"
        ref = scratch if scratch is not None else kept
        print(
            f"{name:<7} {rho:9.4f} {a_ours:11.3f} {a_kron:11.3f} {scratch_txt} {kept:20.1f} "
            f"{kron_t:8.1f} {kron_t / ref:8.1f}x"
        )
        report[name] = {
            "spearman": rho,
            "auroc_ours": a_ours,
            "auroc_kronfluence": a_kron,
            "seconds_ours_from_scratch": scratch,
            "seconds_ours_store_kept": kept,
            "seconds_kronfluence": kron_t,
        }
    print(
        "\nours from scratch = gradient stores + factors + scores; store kept = factors + scores "
        "(the stores are shared with the other gradient methods); kronfluence = its factors + its own "
        "gradient passes."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
