"""Does cleaning help? Test metric after ``infscope clean`` against no cleaning, random rows and the oracle.

Settings, 20 % noise each:

* ``cls``: label flips on the built-in ``sentence_transform_cls`` (MiniLM + LoRA classifier);
* ``sections``: label flips on the real built-in ``debian_sections`` (package descriptions ->
  archive section; MiniLM, max 64 tokens, as ``benchmarks/detectors.py``'s ``sections_flip``);
* ``math``: wrong final numbers on the built-in ``math_reason`` (test exact match of the final
  number by greedy generation, SmolLM2-135M).

Each class has 20 training rows, 10 validation rows and 40 test rows (10 classes: 200 / 100 / 400).
For every method x action (drop, reweight, plus relabel on classification; repair on ``math`` when
``--expert`` is given) and seed, one cleaning run (:func:`infscope.actions.loop.run_clean`) trains
round 0 (noisy), the cleaning rounds, and the random and oracle baselines; the loop keeps rounds
by the *validation* metric (``--select val``), so the test numbers are honest. Rounds that are the
same training (round 0, the oracle, random reweighting) are trained once per seed and shared
between runs through the loop's ``reuse`` folder.

The table (Markdown) gives, per setting x variant x action x method, the test metric of noisy,
random, oracle and the kept round (mean ± sd over seeds), the test loss, the test metric's standard
error, and per seed the share of the noisy -> oracle gap closed and whether cleaning beat random.
``--user ACTION,METHOD`` names the pair fixed in advance; the other pairs are oracle rows (a choice
made after seeing test numbers), and the ``auto`` row picks, per seed, the pair with the best
validation metric (no test label used). Results accumulate in ``OUT/results.json`` across calls
with other settings (``variant``: epochs, k, strength, margin, rounds, select)::

    python benchmarks/clean_gain.py --out /tmp/clean-gain --quick --settings cls
    python benchmarks/clean_gain.py --out bench-clean --settings cls --methods loss,label_margin --epochs 3
    python benchmarks/clean_gain.py --out bench-clean --settings cls --actions reweight --strength 2
"""

from __future__ import annotations

import argparse
import json
import time
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
    "sections": {
        "dataset": "debian_sections",
        "noise": "label_flip=1",
        "task": "classification",
        "max_length": 64,
    },
    "math": {"dataset": "math_reason", "noise": "wrong_numeric=1", "task": "instruction"},
}
#: 20 training rows per class; 10 validation rows (round and checkpoint choice) and 40 test rows per
#: class (test rows cost only forward passes, and accuracy on 400 rows moves in steps of 0.0025).
FULL = {
    "classes": 10,
    "train_per_class": 20,
    "val_per_class": 10,
    "test_per_class": 40,
    "cls_model": "minilm",
    "sections_model": "minilm",
    "math_model": "smollm2-135m",
}
#: A smaller size for the slow instruction setting (SmolLM2 + greedy generation): 120 / 30 / 100 rows.
SMALL = {**FULL, "train_per_class": 12, "val_per_class": 3, "test_per_class": 10}
QUICK = {
    "classes": 3,
    "train_per_class": 8,
    "val_per_class": 2,
    "test_per_class": 4,
    "cls_model": "tiny-bert",
    "sections_model": "tiny-bert",
    "math_model": "tiny-llama",
}


def make_setting(name: str, seed: int, size: dict[str, Any], root: Path) -> dict[str, str]:
    """Write the noisy training file (with its manifest), validation and test files of one setting.

    The held-out rows of each class are split into validation (the first ``val_per_class``) and test
    rows, so both are class-balanced.
    """
    spec = SETTINGS[name]
    folder = root / "data" / f"{name}-s{seed}"
    held = size["val_per_class"] + size["test_per_class"]
    split = make_builtin(
        spec["dataset"],
        seed=seed,
        n_classes=size["classes"],
        per_class=size["train_per_class"] + held,
        n_test_per_class=held,
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
    seen: dict[Any, int] = {}
    val, test = [], []
    for row in split.test:
        cls = row.get("class", row.get("label"))
        seen[cls] = seen.get(cls, 0) + 1
        (val if seen[cls] <= size["val_per_class"] else test).append(row)
    write_rows(val, folder / "val.jsonl")
    write_rows(test, folder / "test.jsonl")
    return {
        "data": str(folder / "train.jsonl"),
        "val": str(folder / "val.jsonl"),
        "test": str(folder / "test.jsonl"),
    }


def actions_for(name: str, expert: str | None, chosen: str | None = None) -> list[str]:
    if chosen:
        return chosen.split(",")
    extra = ["repair"] if SETTINGS[name]["task"] == "instruction" and expert else []
    extra = ["relabel"] if SETTINGS[name]["task"] == "classification" else extra
    return ["drop", "reweight", *extra]


def variant_name(args: argparse.Namespace) -> str:
    """A short name of the loop settings that differ from the defaults (the runs' folder and table column)."""
    parts = [f"e{args.epochs}"] + (["small"] if getattr(args, "size", "full") == "small" else [])
    if args.k != "10%":
        parts.append(f"k{args.k.replace('%', 'pct').replace(':', '')}")
    if args.strength != 1.0:
        parts.append(f"a{args.strength:g}")
    if args.margin != 0.5:
        parts.append(f"m{args.margin:g}")
    if args.rounds != 2:
        parts.append(f"r{args.rounds}")
    if args.select != "val":
        parts.append(f"sel-{args.select}")
    if args.select_metric:
        parts.append(f"by-{args.select_metric}")
    return "-".join(parts)


def _record(name: str, seed: int, method: str, action: str, variant: str, result: Any) -> dict[str, Any]:
    metric = result.metric
    best = result.table[result.best_round]
    base = result.baselines
    out = {
        "setting": name,
        "seed": seed,
        "method": method,
        "action": action,
        "variant": variant,
        "metric": metric,
        "kept_round": result.best_round,
        "rows_changed": best["cumulative"],
        "cleaned": best[metric],
        "cleaned_se": best.get(f"{metric}_se"),
        "cleaned_loss": best.get("loss"),
        "cleaned_val": best.get(f"val_{metric}"),
        "cleaned_val_loss": best.get("val_loss"),
        "stopped": result.stopped,
    }
    for b in ("noisy", "random", "oracle"):
        out[b] = base.get(b, {}).get(metric)
        out[f"{b}_loss"] = base.get(b, {}).get("loss")
        out[f"{b}_se"] = base.get(b, {}).get(f"{metric}_se")
        out[f"{b}_changed"] = base.get(b, {}).get("rows_changed")
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = QUICK if args.quick else SMALL if args.size == "small" else FULL
    root = Path(args.out)
    variant = variant_name(args)
    results = root / "results.json"
    records = json.loads(results.read_text()) if results.is_file() else []
    for name in args.settings.split(","):
        extra = {"max_length": SETTINGS[name].get("max_length", args.max_length)}
        for seed in [int(s) for s in args.seeds.split(",")]:
            files = make_setting(name, seed, size, root)
            for action in actions_for(name, args.expert, args.actions):
                for method in args.methods.split(","):
                    cfg = CleanConfig(
                        **files,
                        method=method,
                        action=action,
                        rounds=args.rounds,
                        k=args.k,
                        strength=args.strength,
                        margin=args.margin,
                        expert=args.expert,
                        model=size[f"{name}_model"],
                        epochs=args.epochs,
                        lr=args.lr,
                        seed=seed,
                        select=args.select,
                        select_metric=args.select_metric,
                        **extra,
                    )
                    out = root / "runs" / f"{name}-s{seed}" / variant / f"{method}-{action}"
                    tag = f"{name} s{seed} {variant} {method} {action}"
                    start = time.perf_counter()
                    result = run_clean(
                        cfg,
                        out,
                        log=lambda m, tag=tag: print(f"[{tag}] {m}", flush=True),
                        reuse=root / "reuse",
                    )
                    print(f"[{tag}] done in {time.perf_counter() - start:.0f} s", flush=True)
                    key = (name, seed, method, action, variant)
                    records = [r for r in records if (r["setting"], r["seed"], r["method"], r["action"],
                                                      r.get("variant")) != key]  # fmt: skip
                    records.append(_record(name, seed, method, action, variant, result))
                    atomic_write_json(results, records)
    return records


def _cell(values: list[float | None], digits: int = 3) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "-"
    if len(kept) == 1:
        return f"{kept[0]:.{digits}f}"
    return f"{np.mean(kept):.{digits}f} ± {np.std(kept, ddof=1):.{digits}f}"


def gap_closed(r: dict[str, Any]) -> float | None:
    """Share of the noisy -> oracle gap the kept round closed (``None`` when the oracle is no better)."""
    if r["oracle"] is None or r["oracle"] <= r["noisy"]:
        return None
    return (r["cleaned"] - r["noisy"]) / (r["oracle"] - r["noisy"])


def loss_gap_closed(r: dict[str, Any]) -> float | None:
    """The same share on the test loss (lower is better; finer-grained than accuracy)."""
    if r.get("oracle_loss") is None or r["oracle_loss"] >= r["noisy_loss"]:
        return None
    return (r["noisy_loss"] - r["cleaned_loss"]) / (r["noisy_loss"] - r["oracle_loss"])


def _beats(r: dict[str, Any]) -> str:
    if r["random"] is None:
        return "-"
    if not r["rows_changed"]:
        return "kept 0"  # nothing cleaned: no cleaning beat or lost to random
    diff = r["cleaned"] - r["random"]
    return "yes" if diff > 0 else ("tie" if diff == 0 else "no")


def _per_seed(group: list[dict[str, Any]]) -> tuple[str, str, str]:
    gaps, loss_gaps, beats = [], [], []
    for r in sorted(group, key=lambda r: r["seed"]):
        g, lg = gap_closed(r), loss_gap_closed(r)
        gaps.append("-" if g is None else f"{100 * g:.0f} %")
        loss_gaps.append("-" if lg is None else f"{100 * lg:.0f} %")
        beats.append(_beats(r))
    return " / ".join(gaps), " / ".join(loss_gaps), " / ".join(beats)


def auto_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting, variant and seed: the method x action whose kept round has the best *validation* metric.

    This choice uses no test label, so it is what a user could get by running every pair.
    """
    out = []
    keys = sorted({(r["setting"], r["variant"], r["seed"]) for r in records})
    for setting, variant, seed in keys:
        group = [r for r in records if (r["setting"], r["variant"], r["seed"]) == (setting, variant, seed)]
        if len(group) < 2 or any(r.get("cleaned_val_loss") is None for r in group):
            continue
        best = max(group, key=lambda r: (r["cleaned_val"], -r["cleaned_val_loss"]))
        out.append(
            {**best, "method": "auto", "action": "by val", "chosen": f"{best['action']}+{best['method']}"}
        )
    return out


def markdown(records: list[dict[str, Any]], user: tuple[str, str] | None = None) -> str:
    """Per setting x variant x action x method: test metric of noisy, random, oracle and cleaned (mean ±
    sd over seeds), test loss, the test set's standard error, and per seed the gap closed and whether
    cleaning beat random rows. ``user`` is the (action, method) fixed in advance; other rows are oracle rows
    (a choice made after seeing the test numbers)."""
    lines = [
        "| setting | variant | action | method | role | noisy | random | oracle | cleaned | "
        "test loss noisy -> cleaned | se | kept round | rows changed | gap closed per seed | "
        "loss gap closed per seed | beats random per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["setting"], r["variant"], r["action"], r["method"]), []).append(r)
    for (setting, variant, action, method), group in sorted(groups.items()):
        if method == "auto":
            role = "chosen by val"
            method = "auto: " + " / ".join(r["chosen"] for r in sorted(group, key=lambda r: r["seed"]))
        else:
            role = "user (fixed)" if user == (action, method) else "oracle row"
        cells = [_cell([r[c] for r in group]) for c in ("noisy", "random", "oracle", "cleaned")]
        loss = f"{_cell([r['noisy_loss'] for r in group])} -> {_cell([r['cleaned_loss'] for r in group])}"
        gaps, loss_gaps, beats = _per_seed(group)
        lines.append(
            f"| {setting} | {variant} | {action} | {method} | {role} | "
            + " | ".join(cells)
            + f" | {loss} | {_cell([r['cleaned_se'] for r in group])}"
            + f" | {'/'.join(str(r['kept_round']) for r in sorted(group, key=lambda r: r['seed']))}"
            + f" | {_cell([float(r['rows_changed']) for r in group], 0)} | {gaps} | {loss_gaps} | {beats} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for data, runs, results.json and table.md.")
    parser.add_argument(
        "--quick", action="store_true", help="Tiny models, small data, one seed (a smoke check)."
    )
    parser.add_argument("--settings", default="cls,math")
    parser.add_argument("--methods", default="loss,label_margin")
    parser.add_argument("--actions", default=None, help="Comma-separated actions [default: all that apply].")
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds [default: 0,1,2; --quick: 0].")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", default="10%")
    parser.add_argument("--strength", type=float, default=1.0, help="reweight's a.")
    parser.add_argument("--margin", type=float, default=0.5, help="relabel's margin in nats.")
    parser.add_argument("--select", default="val", choices=["val", "test"])
    parser.add_argument("--select-metric", default=None, help="Metric that keeps rounds (e.g. loss).")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--user",
        default="reweight,loss",
        help="The action,method fixed in advance (the others are oracle rows).",
    )
    parser.add_argument(
        "--expert", default=None, help="Repair expert for the math setting (e.g. local:smollm2-135m)."
    )
    parser.add_argument(
        "--size", default="full", choices=["full", "small"], help="small: 12 / 3 / 10 rows per class."
    )
    parser.add_argument("--table-only", action="store_true", help="Only rewrite table.md from results.json.")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = "0" if args.quick else "0,1,2"
    if args.quick:
        args.methods, args.rounds, args.epochs, args.lr, args.max_length = "loss", 1, 2, 1e-2, 64
    results = Path(args.out) / "results.json"
    records = json.loads(results.read_text()) if args.table_only else run(args)
    table = markdown(records + auto_records(records), tuple(args.user.split(",")))
    atomic_write_text(Path(args.out) / "table.md", table)
    print(table)
    print(json.dumps({"results": str(results)}))


if __name__ == "__main__":
    main()
