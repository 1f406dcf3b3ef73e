"""Data-parallel fine-tuning under torchrun: process group, batch shards, DDP wrapper, rank-0 helpers.

``torchrun --nproc-per-node N -m infscope.cli finetune ...`` starts N processes with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous address in the environment. :func:`init_from_env` joins
the process group (gloo for a CPU model, nccl and the local rank's GPU for a CUDA one). Without
``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and every helper acts as a world of
one, so fine-tuning runs unchanged in a plain process.

Every rank walks the same seeded global batches; :func:`shard_batch` gives each rank a contiguous
slice of each batch and the factor each of its rows' losses enters its local loss with, chosen so
that DDP's gradient average equals the one-process gradient of the global batch (weighted or not,
uneven last batch included). The trained adapter is then the one-process adapter up to the order
of summation.

This layer (``models``) sits above ``grads`` in DESIGN.md's list, so the process-group helpers
(joining, rank and world, barrier, the device collectives run on, contiguous row ranges) live here
once; :mod:`infscope.grads.distributed` re-exports them and adds the tensor collectives of the
gradient passes.
"""

from __future__ import annotations

import atexit
import inspect
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from infscope.errors import InfscopeError

#: How long a rank waits for the others at a collective before giving up (a crashed or slow peer).
TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise InfscopeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun or unset it"
        ) from None


def local_rank() -> int:
    """This process's GPU index on its machine (``LOCAL_RANK``, 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Join the process group torchrun described; ``False`` (and nothing done) in a world of one.

    A no-op when the group is already initialised (e.g. by a caller that launched more stages).
    ``device`` picks the backend: nccl for CUDA, gloo otherwise. The group is destroyed at exit.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    if not dist.is_available():
        raise InfscopeError("torch was built without torch.distributed; run with one process (plain python)")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (returns at once in a world of one)."""
    if is_distributed():
        dist.barrier()


def collective_device() -> torch.device:
    """Where collectives need their tensors: the current CUDA device under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank`` when ``n`` rows are split into ``world`` contiguous ranges.

    The first ``n % world`` ranks get one row more; ranges cover ``0..n`` in rank order without gaps,
    so per-rank results concatenate in rank order back into row order.
    """
    if world < 1 or not 0 <= rank < world:
        raise InfscopeError(f"rank {rank} is not in a world of {world}; check RANK and WORLD_SIZE")
    if n < 0:
        raise InfscopeError(f"cannot split {n} rows; pass a non-negative count")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def train_device(device: torch.device) -> torch.device:
    """The device a rank trains on: the local rank's GPU under DDP for a CUDA model, else ``device``."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", local_rank())
    return device


class Shard(NamedTuple):
    """One rank's part of a global batch.

    ``rows``: positions in the training data; ``factors``: ``dLocalLoss/dl_i`` (float64), so the local
    loss is ``sum factors_i * l_i``; ``dummy``: the rank got no row of this batch and runs ``rows`` (one
    row of the batch) with factor 0 only so that DDP's gradient all-reduce still has every rank.
    """

    rows: np.ndarray
    factors: torch.Tensor
    dummy: bool


def shard_batch(rows: np.ndarray, weights: torch.Tensor | None, rank: int, world: int) -> Shard:
    """``rank``'s contiguous slice of the global batch ``rows`` and its rows' loss factors.

    The one-process batch loss is ``sum_i s_i l_i`` with ``s_i = 1/b`` or ``w_i / sum w`` over the
    whole batch (``weights`` are the batch's row weights, in ``rows`` order). DDP averages the ranks'
    gradients, so each rank trains on ``world * sum_{i in slice} s_i l_i``: the average is then the
    one-process gradient. Slices follow row order, the first ``b % world`` ranks get one row more.
    """
    n = len(rows)
    start, stop = shard_range(n, rank, world)
    if n == 0:
        raise InfscopeError("cannot shard an empty batch; pass at least one training row")
    if weights is None:
        scale = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        w = weights.double()
        total = w.sum()
        scale = w / total if total > 0 else w
    if stop == start:
        return Shard(rows[:1], torch.zeros(1, dtype=torch.float64), True)
    return Shard(rows[start:stop], scale[start:stop] * world, False)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` (only trainable parameters sync).

    Buffers are not re-broadcast at each forward: a LoRA model's buffers never change in training
    (torch >= 2.13 names that option ``forward_sync_buffers``, older ones ``broadcast_buffers``).
    """
    from torch.nn.parallel import DistributedDataParallel  # only under torchrun

    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    options = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})


def sum_over_ranks(value: float) -> float:
    """The sum of ``value`` over all ranks (``value`` itself in a world of one)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item())


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0 (pickled), ``None`` on the other ranks."""
    if not is_distributed():
        return [obj]
    box: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, box, dst=0)
    return box


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 only, its result given to every rank; rank 0's InfscopeError is raised on all.

    For setup that writes files (a run directory) or reads a source once. Other exceptions on rank
    0 stop it, and torchrun then stops the others.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except InfscopeError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def refuse_capture(capture: str | None, observer: object | None = None) -> None:
    """In-run gradient capture observes one process's steps; refuse it when several train together."""
    if launched() and (capture is not None or observer is not None):
        raise InfscopeError(
            "in-run gradient capture (--capture) does not run under torchrun; fine-tune with capture in "
            "one process, or drop --capture and collect gradients with torchrun -m infscope.distributed_collect"
        )
