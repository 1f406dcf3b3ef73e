"""``torchrun --nproc-per-node N -m infscope.distributed_collect RUN``: score a run with N processes.

Every process computes the gradients of its own rows; rank 0 reduces, saves the scores as
``infscope score`` does and prints a one-line summary per method. Without torchrun it runs as one
process. Options: ``--method`` (comma-separated), ``--checkpoint`` (best, last, epoch-N, or inrun /
inrun:EPOCH for the gradients captured in fine-tuning), ``--stream`` (aggregate methods inside the
gradient pass, no stores), ``--batch-size``, ``--query`` (a file of query rows instead of the run's
validation rows) and ``--measurement`` (loss, or pairing: saved as ``METHOD+pairing``), as
``infscope score`` takes them.
"""

from __future__ import annotations

import argparse
import sys

from infscope.errors import InfscopeError

#: The query measurements, as :data:`infscope.scoring.inputs.MEASUREMENTS` (not imported from there:
#: that module loads torch, and ``--help`` or a mistyped option should answer at once).
MEASUREMENTS = ("loss", "pairing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m infscope.distributed_collect", description=__doc__)
    parser.add_argument("run", help="a run directory made by infscope finetune or demo")
    parser.add_argument("--method", default="datainf,hessian_free", help="comma-separated methods")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best, last, epoch-N, or inrun / inrun:EPOCH (the gradients fine-tuning captured with "
        "--capture: no gradient pass, rank 0 scores alone)",
    )
    parser.add_argument("--stream", action="store_true", help="stream aggregate scores, keep no gradients")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per gradient batch")
    parser.add_argument(
        "--query", default=None, help="a file of query rows (default: the run's validation rows)"
    )
    parser.add_argument(
        "--measurement",
        default="loss",
        choices=MEASUREMENTS,
        help="what the query gradient measures: loss (the query loss) or pairing (own prompt versus another "
        "row's); pairing scores are saved as METHOD+pairing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run on every rank; rank 0 prints. Returns the exit code (2 on bad input)."""
    from infscope.scoring.distributed import score_run_distributed  # torch-heavy: after argument parsing

    args = parse_args(argv)
    try:
        scored = score_run_distributed(
            args.run,
            args.method,
            checkpoint=args.checkpoint,
            stream=args.stream,
            batch_size=args.batch_size,
            query=args.query,
            measurement=args.measurement,
        )
    except InfscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for name, scores in (scored or {}).items():
        top = ", ".join(scores.harmful(3))
        print(f"{name}: {len(scores.train_ids)} rows scored; most harmful: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
