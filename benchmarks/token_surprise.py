"""Which token-level aggregate of a row's loss finds which noise? (design study behind ``answer_loss``)

For one finished run (a ``benchmarks/detectors.py`` run directory with a manifest), the loss of every
target token at the best checkpoint (or the base model) is computed once with
:func:`infscope.models.loss.per_token_losses`, then aggregated per row in several ways (mean = the
training loss, max, top-2 mean, EOS token, max minus median, log-sum-exp, 90th percentile, the final
number's tokens = ``answer_loss``), and each aggregate's AUROC is printed overall and per noise
operator. ``--fuse NAME`` adds the mean percentile rank of the aggregate with a score cached by
``detectors.py`` (for example ``xprompt_default``) at weights 0.25, 0.5 and 0.75.

This is a design study on design seeds; a choice made here is then measured unchanged on held-out
seeds by ``detectors.py``::

    python benchmarks/token_surprise.py /work/bench-runs/detectors/math_wrong/seed-0
    python benchmarks/token_surprise.py /work/bench-runs/detectors/demo_quality/seed-0 --fuse xprompt_default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from infscope.data.manifest import read_manifest
from infscope.estimators.answer_span import final_number_positions, target_pieces
from infscope.evaluate.metrics import auroc
from infscope.models.encode import encode_rows
from infscope.models.loss import per_token_losses
from infscope.models.pair_losses import length_sorted
from infscope.scoring import RunInputs, open_run


def _answer(values: np.ndarray, span: list[int]) -> float:
    return float(values[span].mean()) if span else float(values.mean())


AGGREGATES = {
    "mean (the loss)": lambda t, span: t.mean(),
    "max": lambda t, span: t.max(),
    "top-2 mean": lambda t, span: np.sort(t)[-2:].mean(),
    "EOS token": lambda t, span: t[-1],
    "max minus median": lambda t, span: t.max() - np.median(t),
    "log-sum-exp": lambda t, span: np.log(np.exp(t).sum()),
    "90th percentile": lambda t, span: np.quantile(t, 0.9),
    "final number (answer_loss)": _answer,
}


def token_losses_of_run(run_dir: Path, which: str) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
    """Row ids, per-token losses and final-number spans of a run's training rows under ``which``."""
    run = open_run(run_dir)
    inputs = RunInputs(run, run.checkpoint("best"), run.val)
    rows, options = inputs.rows(), inputs.encode_options()
    loaded = inputs.model(which)
    encoded = encode_rows(
        rows,
        loaded.tokenizer,
        task="causal",
        max_length=options["max_length"],
        response_only=options["response_only"],
    )
    order = length_sorted(encoded)
    losses: list[np.ndarray] = [np.zeros(0)] * len(rows)
    for position, values in zip(
        order.tolist(), per_token_losses(loaded.model, encoded.subset(order), 16), strict=True
    ):
        losses[position] = values
    spans = [final_number_positions(target_pieces(loaded.tokenizer, labels)) for labels in encoded.labels]
    return [str(r["id"]) for r in rows], losses, spans


def by_operator(values: np.ndarray, noisy: np.ndarray, operators: list[str | None]) -> dict[str, float]:
    """AUROC of each operator's rows against the clean rows."""
    out = {}
    for op in sorted({o for o in operators if o}):
        mask = np.array([o == op for o in operators])
        keep = mask | ~noisy
        out[op] = auroc(values[keep], mask[keep])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="A detectors.py run directory (with data/manifest.jsonl).")
    parser.add_argument("--model", default="checkpoint", choices=["checkpoint", "base"])
    parser.add_argument("--fuse", default=None, help="A score cached in RUN/detectors/scores.json.")
    args = parser.parse_args()
    run_dir = Path(args.run)
    ids, losses, spans = token_losses_of_run(run_dir, args.model)
    manifest = read_manifest(run_dir / "data" / "manifest.jsonl").set_index("id").loc[ids]
    noisy = manifest["is_noisy"].to_numpy(dtype=bool)
    operators = [o if isinstance(o, str) else None for o in manifest["operator"]]
    table = {
        name: np.array([f(t, s) for t, s in zip(losses, spans, strict=True)])
        for name, f in AGGREGATES.items()
    }
    if args.fuse:
        cached = json.loads((run_dir / "detectors" / "scores.json").read_text())[args.fuse]
        other = pd.Series(cached["values"], index=cached["ids"]).loc[ids].to_numpy()
        ranks = pd.Series(other).rank().to_numpy() / len(other)
        for name in list(table):
            own = pd.Series(table[name]).rank().to_numpy() / len(ids)
            for w in (0.25, 0.5, 0.75):
                table[f"{w} {args.fuse} + {1 - w} {name}"] = w * ranks + (1 - w) * own
        table[args.fuse] = other
    print(f"{run_dir} ({args.model}): {len(ids)} rows, {int(noisy.sum())} noisy")
    for name, values in table.items():
        ops = by_operator(values, noisy, operators)
        print(f"{name:60s} {auroc(values, noisy):.3f}  " + "  ".join(f"{o} {a:.2f}" for o, a in ops.items()))


if __name__ == "__main__":
    main()
