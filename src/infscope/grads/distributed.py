"""torch.distributed glue for the gradient passes: rank and world, row ranges, reductions, a barrier.

Launched with ``torchrun --nproc-per-node N``, every process reads ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` from the environment; :func:`init_from_env` joins the process group
(gloo on CPU, nccl when CUDA is present). Without ``WORLD_SIZE`` (a plain ``python`` run) nothing is
initialised and every helper acts as a world of one: :func:`shard_range` gives all rows, reductions
return their input and :func:`barrier` returns at once, so the same code runs either way.

Rows are split into contiguous ranges (rank 0 first), so each rank's results concatenate in rank
order back into row order and stores keep their block-contiguous shard layout.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from infscope.errors import InfscopeError

#: How long a rank waits for the others at a collective before giving up (a crashed peer).
TIMEOUT = timedelta(minutes=30)


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun described in the environment; ``False`` when not launched by it.

    A no-op when ``WORLD_SIZE`` is absent or the group is already initialised. ``backend`` defaults to
    nccl when CUDA is available and gloo otherwise.
    """
    if "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    if not dist.is_available():
        raise InfscopeError("torch was built without torch.distributed; run with one process (plain python)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return True


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process prints and saves (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (returns at once in a world of one)."""
    if is_distributed():
        dist.barrier()


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank`` when ``n`` rows are split into ``world`` contiguous ranges.

    The first ``n % world`` ranks get one row more; ranges cover ``0..n`` in rank order without gaps.
    """
    if world < 1 or not 0 <= rank < world:
        raise InfscopeError(f"rank {rank} is not in a world of {world}; check RANK and WORLD_SIZE")
    if n < 0:
        raise InfscopeError(f"cannot split {n} rows; pass a non-negative count")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _device() -> torch.device:
    """Where collectives need their tensors: the current CUDA device under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor on the input's device)."""
    if not is_distributed():
        return tensor.clone()
    out = tensor.detach().to(_device()).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def gather_rows(part: torch.Tensor) -> torch.Tensor:
    """Every rank's ``part`` concatenated along the first dimension in rank order, on every rank.

    With contiguous row ranges (:func:`shard_range`) this is the full per-row result in row order.
    The parts may differ in length (the lengths are exchanged first and the parts padded to one
    length for ``all_gather``); the other dimensions and the dtype must agree.
    """
    if not is_distributed():
        return part.clone()
    world, device = world_size(), _device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([part.shape[0]], dtype=torch.long, device=device))
    counts = [int(s.item()) for s in sizes]
    padded = part.new_zeros((max(counts), *part.shape[1:]), device=device)
    padded[: part.shape[0]] = part.detach().to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:c] for p, c in zip(pieces, counts, strict=True)]).to(part.device)


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (pickled; for small things such as paths or metadata)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
