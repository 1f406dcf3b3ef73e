"""Do swapped responses actually hurt the validation loss? Retrain without them and see.

Influence estimators such as DataInf predict how a training row changes the *validation loss*; noise
detection then assumes that noisy rows raise it. This script checks that assumption directly on the
runs of ``benchmarks/swap_study.py`` (or any pipeline run with a noise manifest): for each run it
fine-tunes again, with the run's own settings and seed, on

* ``dropped``: the training rows minus the noisy ones;
* ``control``: the training rows minus as many randomly chosen *clean* rows (seeded), which separates
  the effect of removing the noise from the effect of training on fewer rows (fewer optimizer steps);
* ``clean``: every row with its original response restored (``data/train.clean.jsonl``),

and prints the best validation loss of each next to the run's own best (``noisy``). ``removal_effect`` =
``dropped - noisy`` is what removing the noisy rows did to the validation loss (positive: they had been
*lowering* it, i.e. helping), the quantity an influence estimator predicts for the group; ``datainf_group``
and ``hessian_free_group`` are those predictions (the sum of the noisy rows' scores, positive = harmful), and
``datainf_sign_ok`` says whether DataInf's sign matches the retraining. ``dropped`` against ``control`` says
whether the noisy rows were worth less than as many clean ones. ``--recheck`` also retrains the noisy rows,
to show that retraining reproduces the run. Instruction runs only (the retrain uses the run's causal LM).

    python3 benchmarks/swap_counterfactual.py bench_out/swap_study/*/swap/smollm2-135m/seed-*
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infscope.data.loading import load_rows
from infscope.models.finetune import read_checkpoints
from infscope.pipeline import PipelineConfig, finetune_config, model_spec
from infscope.scoring import load_scores, row_task


def retrain_val_loss(cfg: PipelineConfig, rows: list[dict], val: list[dict], out: Path) -> float:
    """Best validation loss of a fine-tune of ``rows`` with the run's settings (resumes if done)."""
    from infscope.models.finetune import finetune

    loaded = model_spec(cfg, rows, None).load_base()
    return float(finetune(loaded, rows, val, finetune_config(cfg), out).best.val_loss)


def study_run(run: Path, recheck: bool) -> dict:
    """Validation loss noisy / dropped / control / clean and each estimator's group prediction for one run."""
    record = json.loads((run / "run.json").read_text())
    fields = PipelineConfig.__dataclass_fields__
    cfg = PipelineConfig(**{k: v for k, v in record["args"].items() if k in fields})
    train = load_rows(run / "data" / "train.jsonl").rows
    if row_task(train) != "instruction":
        raise SystemExit(
            f"{run}: only instruction runs can be retrained here (this one is {row_task(train)})"
        )
    manifest = pd.read_json(run / "data" / "manifest.jsonl", lines=True).set_index("id")
    noisy_ids = set(manifest.index[manifest["is_noisy"]])
    clean_ids = sorted(set(manifest.index) - noisy_ids)
    control_ids = set(random.Random(f"control:{cfg.seed}").sample(clean_ids, len(noisy_ids)))
    clean = load_rows(run / "data" / "train.clean.jsonl").rows
    val = load_rows(run / "data" / "val.jsonl").rows
    work = run / "counterfactual"

    def without(ids: set[str]) -> list[dict]:
        return [r for r in train if r["id"] not in ids]

    out = {
        "run": str(run),
        "noisy_rows": len(noisy_ids),
        "noisy": float(read_checkpoints(run / "finetune").best.val_loss),
        "dropped": retrain_val_loss(cfg, without(noisy_ids), val, work / "dropped"),
        "control": retrain_val_loss(cfg, without(control_ids), val, work / "control"),
        "clean": retrain_val_loss(cfg, clean, val, work / "clean"),
    }
    if recheck:
        out["noisy_again"] = retrain_val_loss(cfg, train, val, work / "noisy")
    scores = load_scores(run)
    truth = manifest["is_noisy"]
    for method in ("datainf", "hessian_free"):
        if method not in scores:
            continue
        s = scores[method]
        values = pd.Series(np.asarray(s.values), index=s.train_ids)
        out[f"{method}_group"] = float(values[truth.loc[s.train_ids].to_numpy()].sum())
    evaluation = json.loads((run / "evaluation.json").read_text())
    for row in evaluation["leaderboard"]:
        if row["method"] in ("datainf", "loss"):
            out[f"{row['method']}_auroc"] = row["auroc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="Pipeline run directories with a noise manifest.")
    parser.add_argument(
        "--recheck", action="store_true", help="Also retrain the noisy rows (reproducibility)."
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is safest on shared cores)"
    )
    parser.add_argument("--csv", type=Path, help="Also write the table here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    frame = pd.DataFrame([study_run(run, args.recheck) for run in args.runs])
    frame["removal_effect"] = frame["dropped"] - frame["noisy"]
    if "datainf_group" in frame:
        frame["datainf_sign_ok"] = (frame["datainf_group"] > 0) == (frame["removal_effect"] < 0)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    print(f"{len(frame)} runs in {time.perf_counter() - start:.0f} s")
    columns = ["run", "noisy", "dropped", "control", "clean", "removal_effect"]
    optional = (
        "datainf_group",
        "datainf_sign_ok",
        "hessian_free_group",
        "noisy_again",
        "datainf_auroc",
        "loss_auroc",
    )
    columns += [c for c in optional if c in frame]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in frame[columns].itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
