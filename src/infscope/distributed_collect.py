"""``torchrun --nproc-per-node N -m infscope.distributed_collect RUN``: score a run with N processes.

Every process computes the gradients of its own rows; rank 0 reduces, saves the scores as
``infscope score`` does and prints a one-line summary per method. Without torchrun it runs as one
process. Options: ``--method`` (comma-separated), ``--checkpoint`` (best, last, epoch-N),
``--stream`` (aggregate methods inside the gradient pass, no stores), ``--batch-size``.
"""

from __future__ import annotations

import argparse
import sys

from infscope.errors import InfscopeError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m infscope.distributed_collect", description=__doc__)
    parser.add_argument("run", help="a run directory made by infscope finetune or demo")
    parser.add_argument("--method", default="datainf,hessian_free", help="comma-separated methods")
    parser.add_argument("--checkpoint", default="best", help="best, last or epoch-N")
    parser.add_argument("--stream", action="store_true", help="stream aggregate scores, keep no gradients")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per gradient batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run on every rank; rank 0 prints. Returns the exit code (2 on bad input)."""
    from infscope.scoring.distributed import score_run_distributed  # torch-heavy: after argument parsing

    args = parse_args(argv)
    try:
        scored = score_run_distributed(
            args.run, args.method, checkpoint=args.checkpoint, stream=args.stream, batch_size=args.batch_size
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
