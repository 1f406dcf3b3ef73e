"""torch.distributed glue for the gradient passes: joining, row ranges, reductions, a barrier.

Launched with ``torchrun --nproc-per-node N``, every process reads ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` from the environment; :func:`init_from_env` joins the process group.
Without ``WORLD_SIZE`` (a plain ``python`` run), or with ``WORLD_SIZE=1``, nothing is initialised and
every helper acts as a world of one: :func:`shard_range` gives all rows, reductions return their
input and :func:`barrier` returns at once, so the same code runs either way.

The process-group helpers (rank, world, barrier, row ranges, the collectives' device) are those of
:mod:`infscope.models.ddp`, which DDP fine-tuning uses, re-exported here so that one copy serves
both; this module adds the backend choice of a gradient pass and the tensor collectives.

Rows are split into contiguous ranges (rank 0 first), so each rank's results concatenate in rank
order back into row order and stores keep their block-contiguous shard layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from infscope.errors import InfscopeError
from infscope.models import ddp
from infscope.models.ddp import (
    TIMEOUT,
    barrier,
    collective_device,
    is_distributed,
    is_main,
    rank,
    shard_range,
    world_size,
)

__all__ = [
    "TIMEOUT",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main",
    "pass_device",
    "rank",
    "shard_range",
    "world_size",
]

#: The device kind that makes :func:`infscope.models.ddp.init_from_env` pick each backend.
BACKEND_DEVICES = {"nccl": "cuda", "gloo": "cpu"}


def pass_device(backend: str | None = None, device: torch.device | str | None = None) -> torch.device:
    """The device whose kind picks the backend of a gradient pass.

    ``backend`` (nccl or gloo) wins when given; else ``device`` (the model's device, as DDP fine-tuning
    passes it); else CUDA when it is present and the CPU otherwise (the model of a scoring pass is
    loaded after the group is joined, so its device is not known yet).
    """
    if backend is not None:
        if backend not in BACKEND_DEVICES:
            raise InfscopeError(f"unknown backend {backend!r}; use {' or '.join(BACKEND_DEVICES)}")
        return torch.device(BACKEND_DEVICES[backend])
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_from_env(backend: str | None = None, device: torch.device | str | None = None) -> bool:
    """Join the process group torchrun described; ``False`` (and nothing done) in a world of one.

    :func:`infscope.models.ddp.init_from_env` on :func:`pass_device`: nccl (and the local rank's GPU)
    for a CUDA device, gloo otherwise. A no-op when the group is already initialised; returns whether
    this process is one of several.
    """
    return ddp.init_from_env(pass_device(backend, device))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor on the input's device)."""
    if not is_distributed():
        return tensor.clone()
    out = tensor.detach().to(collective_device()).clone()
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
    world, device = world_size(), collective_device()
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
