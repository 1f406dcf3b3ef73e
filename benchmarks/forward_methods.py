"""Forward-pass methods side by side: seconds and AUROC of mirrored, tracin_we and repsim next to datainf and loss.

One pipeline run (the demo setting by default: built-in sentence transformations, 20 % noise of the
demo mix, LoRA fine-tune, best-validation-loss checkpoint) is fine-tuned once; then every method is
scored in ONE ``score_run`` call on that checkpoint against the validation rows, so they share the
model load, and each method's seconds are its own (``Scores.meta["seconds"]``). The gradient pass
that datainf needs runs before scoring and is reported on its own line (``gradients`` stage), since
the forward methods never take it. AUROC is against the run's noise manifest (sklearn).

    python3 benchmarks/forward_methods.py                           # tiny-llama: a plumbing check, seconds
    python3 benchmarks/forward_methods.py --model smollm2-135m --json forward.json
    python3 benchmarks/forward_methods.py --mirrored-steps 3 --mirrored-optimizer adam --mirrored-lr 1e-4

``--out`` keeps the run (rerunning resumes the fine-tune); by default it lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from infscope.pipeline import PipelineConfig, run_pipeline
from infscope.runs import atomic_write_json
from infscope.scoring import score_run
from infscope.scoring.run import open_run

METHODS = ("datainf", "loss", "mirrored", "tracin_we", "repsim")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny-llama", help="tiny-llama (seconds) or smollm2-135m (the real one)"
    )
    parser.add_argument("--classes", type=int, default=10, help="built-in task classes")
    parser.add_argument("--train-per-class", type=int, default=12)
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--noise-ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mirrored-steps", type=int, default=1)
    parser.add_argument("--mirrored-lr", type=float, default=1e-3)
    parser.add_argument("--mirrored-optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--mirrored-direction", default="descent", choices=("descent", "ascent"))
    parser.add_argument("--out", type=Path, default=None, help="run folder to keep (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    return parser.parse_args()


def fine_tuned_run(args: argparse.Namespace, out: Path) -> tuple[Path, float]:
    """Fine-tune (or resume) the run; returns its folder and the seconds it took here."""
    config = PipelineConfig(
        model=args.model,
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        epochs=args.epochs,
        max_length=args.max_length,
        noise_ratio=args.noise_ratio,
        methods=("loss",),
        seed=args.seed,
    )
    start = time.perf_counter()
    run_pipeline(config, out, log=lambda message: print(f"  {message}", flush=True))
    return out, time.perf_counter() - start


def gradient_seconds(run_dir: Path) -> float:
    """Seconds of the gradient stages recorded in the run (the pass datainf needs)."""
    stages = open_run(run_dir).dir.record.stages
    return float(sum(s.get("seconds", 0.0) for name, s in stages.items() if name.startswith("gradients")))


def table(run_dir: Path, scored: dict, grad_seconds: float) -> pd.DataFrame:
    """One line per method: seconds, AUROC against the manifest, and the gradient pass on its own line."""
    manifest = pd.read_json(run_dir / "data" / "manifest.jsonl", lines=True).set_index("id")
    lines = []
    for name in METHODS:
        scores = scored[name]
        truth = manifest.loc[scores.train_ids, "is_noisy"].astype(bool).to_numpy()
        lines.append(
            {
                "method": name,
                "seconds": float(scores.meta.get("seconds", np.nan)),
                "auroc": float(roc_auc_score(truth, scores.vector())),
                "needs": "gradients" if name == "datainf" else ("losses" if name == "loss" else "forward"),
            }
        )
    lines.append({"method": "(gradient pass)", "seconds": grad_seconds, "auroc": np.nan, "needs": ""})
    return pd.DataFrame(lines)


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table (numbers to 3 decimals, NaN as a dash)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        print(f"fine-tuning {args.model} ({out})", flush=True)
        run_dir, tune_seconds = fine_tuned_run(args, out)
        mirrored = {
            "steps": args.mirrored_steps,
            "lr": args.mirrored_lr,
            "optimizer": args.mirrored_optimizer,
            "direction": args.mirrored_direction,
        }
        scored = score_run(run_dir, list(METHODS), options={"mirrored": mirrored})
        result = table(run_dir, scored, gradient_seconds(run_dir))
    n = len(scored["loss"].train_ids)
    print(f"\n{args.model}, {n} training rows, fine-tune {tune_seconds:.1f} s; mirrored {mirrored}\n")
    print(markdown(result))
    if args.json:
        atomic_write_json(
            args.json,
            {
                "model": args.model,
                "n_train": n,
                "mirrored": mirrored,
                "rows": result.to_dict(orient="records"),
            },
        )


if __name__ == "__main__":
    main()
