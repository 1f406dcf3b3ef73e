"""Does cleaning help? Test metric after ``infscope clean`` against no cleaning, random rows and the oracle.

Two settings, 20 % noise each:

* ``cls``: label flips on the built-in ``sentence_transform_cls`` (test accuracy of the classifier);
* ``math``: wrong final numbers on the built-in ``math_reason`` (test exact match of the final
  number by greedy generation).

For every method x action (drop, reweight, plus relabel on ``cls``; repair on ``math`` when
``--expert`` is given) and seed, one cleaning run (:func:`infscope.actions.loop.run_clean`) trains
round 0 (noisy), the cleaning rounds, and the random and oracle baselines; the table reports the
kept round's test metric beside the three baselines, mean +- sd over seeds, as Markdown.

The full run (MiniLM and SmolLM2-135M, 3 seeds) takes hours on a CPU; ``--quick`` runs one seed of
the tiny test models on small data to check the script works::

    python benchmarks/clean_gain.py --out /tmp/clean-gain --quick
    python benchmarks/clean_gain.py --out bench-clean --methods loss,datainf,hessian_free
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from infscope.actions.loop import CleanConfig, run_clean
from infscope.data.builtin import make_builtin
from infscope.data.manifest import write_manifest
from infscope.data.writing import write_rows
from infscope.noise.inject import inject_noise
from infscope.runs import atomic_write_json, atomic_write_text

SETTINGS = {
    "cls": {"dataset": "sentence_transform_cls", "noise": "label_flip=1", "task": "classification"},
    "math": {"dataset": "math_reason", "noise": "wrong_numeric=1", "task": "instruction"},
}
FULL = {
    "classes": 10,
    "per_class": 30,
    "test_per_class": 10,
    "cls_model": "minilm",
    "math_model": "smollm2-135m",
}
QUICK = {
    "classes": 3,
    "per_class": 12,
    "test_per_class": 4,
    "cls_model": "tiny-bert",
    "math_model": "tiny-llama",
}


def make_setting(name: str, seed: int, size: dict[str, Any], root: Path) -> dict[str, str]:
    """Write the noisy training file (with its manifest), validation and test files of one setting."""
    spec = SETTINGS[name]
    folder = root / "data" / f"{name}-s{seed}"
    split = make_builtin(
        spec["dataset"],
        seed=seed,
        n_classes=size["classes"],
        per_class=size["per_class"],
        n_test_per_class=size["test_per_class"],
    )
    noisy = inject_noise(
        split.train,
        task=spec["task"],
        ratio=0.2,
        weights=spec["noise"],
        seed=seed,
        label_names=split.label_names,
    )
    write_rows(noisy.rows, folder / "train.jsonl")
    write_manifest(noisy.manifest, folder / "train.manifest.jsonl")
    half = len(split.test) // 2
    write_rows(split.test[:half], folder / "val.jsonl")
    write_rows(split.test[half:], folder / "test.jsonl")
    return {
        "data": str(folder / "train.jsonl"),
        "val": str(folder / "val.jsonl"),
        "test": str(folder / "test.jsonl"),
    }


def actions_for(name: str, expert: str | None) -> list[str]:
    extra = ["relabel"] if name == "cls" else (["repair"] if expert else [])
    return ["drop", "reweight", *extra]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = QUICK if args.quick else FULL
    root = Path(args.out)
    records = []
    for name in args.settings.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            files = make_setting(name, seed, size, root)
            for action in actions_for(name, args.expert):
                for method in args.methods.split(","):
                    cfg = CleanConfig(
                        **files,
                        method=method,
                        action=action,
                        rounds=args.rounds,
                        k=args.k,
                        expert=args.expert,
                        model=size[f"{name}_model"],
                        epochs=args.epochs,
                        lr=args.lr,
                        max_length=args.max_length,
                        seed=seed,
                    )
                    out = root / "runs" / f"{name}-s{seed}" / f"{method}-{action}"
                    result = run_clean(
                        cfg, out, log=lambda m, tag=f"{name} s{seed} {method} {action}": print(f"[{tag}] {m}")
                    )
                    best = result.table[result.best_round]
                    records.append(
                        {
                            "setting": name,
                            "seed": seed,
                            "method": method,
                            "action": action,
                            "metric": result.metric,
                            "cleaned": best[result.metric],
                            "kept_round": result.best_round,
                            "rows_changed": best["cumulative"],
                            **{
                                b: result.baselines.get(b, {}).get(result.metric)
                                for b in ("noisy", "random", "oracle")
                            },
                        }
                    )
                    atomic_write_json(root / "results.json", records)
    return records


def _cell(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "-"
    return f"{np.mean(kept):.3f} +- {np.std(kept):.3f}" if len(kept) > 1 else f"{kept[0]:.3f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """One line per setting x action x method: the test metric of noisy, random, oracle and cleaned."""
    lines = [
        "| setting | metric | action | method | noisy | random | oracle | cleaned | rows changed | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["setting"], r["action"], r["method"]) for r in records})
    for setting, action, method in keys:
        group = [r for r in records if (r["setting"], r["action"], r["method"]) == (setting, action, method)]
        cells = [_cell([r[c] for r in group]) for c in ("noisy", "random", "oracle", "cleaned")]
        changed = _cell([float(r["rows_changed"]) for r in group])
        lines.append(
            f"| {setting} | {group[0]['metric']} | {action} | {method} | "
            + " | ".join(cells)
            + f" | {changed} | {len(group)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for data, runs, results.json and table.md.")
    parser.add_argument(
        "--quick", action="store_true", help="Tiny models, small data, one seed (a smoke check)."
    )
    parser.add_argument("--settings", default="cls,math")
    parser.add_argument("--methods", default="loss,datainf")
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds [default: 0,1,2; --quick: 0].")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", default="10%")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--expert", default=None, help="Repair expert for the math setting (e.g. local:smollm2-135m)."
    )
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = "0" if args.quick else "0,1,2"
    if args.quick:
        args.methods, args.rounds, args.epochs, args.lr, args.max_length = "loss", 1, 2, 1e-2, 64
    records = run(args)
    table = markdown(records)
    atomic_write_text(Path(args.out) / "table.md", table)
    print(table)
    print(json.dumps({"results": str(Path(args.out) / "results.json")}))


if __name__ == "__main__":
    main()
