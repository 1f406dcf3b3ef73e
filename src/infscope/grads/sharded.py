"""Gradient stores and streamed scores computed by several processes, each on its own rows.

Under ``torchrun`` every rank runs the gradient hooks on one contiguous range of rows
(:func:`~infscope.grads.distributed.shard_range`); outside it (a world of one) both functions are
exactly their single-process counterparts.

- :func:`collect_to_store_sharded`: the ranges are whole store shards. Each rank collects its share
  of the shards still to write into a resumable store of its own beside the target (``<name>.rank-R``,
  made by :func:`~infscope.grads.store.collect_to_store`); after a barrier rank 0 moves the shard
  files into the target store under their global shard numbers and writes its index. The target is
  laid out exactly as a one-process store with the same ``shard_rows``; a target already there with
  the same contents keeps its own ``shard_rows`` (whatever process count wrote it) and is reused when
  complete or finished when not.
- :func:`stream_scores_sharded`: the passes of :func:`~infscope.grads.streaming.stream_scores` on
  each rank's rows, with the cross-row sums (each block's squared norms for the damping, DataInf's
  weighted sum ``s_b``) all-reduced between passes and the per-row numbers gathered at the end. The
  scores equal the one-process ones up to the order of float64 summation.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from infscope.errors import InfscopeError
from infscope.grads.batching import RowSource, as_row_source
from infscope.grads.distributed import (
    all_reduce_sum,
    barrier,
    gather_rows,
    is_distributed,
    is_main,
    rank,
    shard_range,
    world_size,
)
from infscope.grads.hooks import BatchSizer, PerExampleGradients, iter_gradients
from infscope.grads.store import (
    INDEX_FILE,
    RUNTIME_META,
    SHARD_DIR,
    GradientStore,
    collect_to_store,
    store_contents,
)
from infscope.grads.streaming import (
    DATAINF,
    METHODS,
    Damping,
    StreamedScores,
    check_methods,
    final_scores,
    given_damping,
    query_vectors,
    rule_damping,
    scalars,
    stream_scores,
)

#: Rows per store shard in one-process collections (the default of collect_to_store's callers).
DEFAULT_SHARD_ROWS = 256
_SHARD_FILE = re.compile(r"^(?P<stem>.+)-s(?P<shard>\d{5})(?P<suffix>.*)\.npy$")


def shard_rows_for(n: int, world: int, default: int = DEFAULT_SHARD_ROWS) -> int:
    """Shard size that gives every rank work: ``default`` unless ``n`` has fewer than ``world`` such
    shards, then ``ceil(n / world)`` (the store then differs from a one-process store only in it)."""
    if n >= default * world:
        return default
    return max(1, math.ceil(n / max(1, world)))


def row_slice(source: RowSource, start: int, stop: int) -> RowSource:
    """Rows ``start:stop`` of an addressable row source, as a row source of their own."""
    columns = {name: column[start:stop] for name, column in source.columns.items()}
    return RowSource(columns, ids=source.ids[start:stop], pad_id=source.pad_id)


def row_subset(source: RowSource, positions: Sequence[int]) -> RowSource:
    """The rows at ``positions`` (in that order) of an addressable row source, as one of their own."""
    picked = list(positions)
    index = torch.as_tensor(picked, dtype=torch.long)

    def take(column: Any) -> Any:
        if isinstance(column, torch.Tensor):
            return column[index]
        if isinstance(column, np.ndarray):
            return column[index.numpy()]
        return [column[i] for i in picked]

    columns = {name: take(column) for name, column in source.columns.items()}
    return RowSource(columns, ids=[source.ids[i] for i in picked], pad_id=source.pad_id)


def rank_rows(n_rows: int, shard_rows: int, rank_: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank_``: a contiguous run of whole shards of ``shard_rows`` rows."""
    n_shards = max(1, math.ceil(n_rows / shard_rows))
    first, last = shard_range(n_shards, rank_, world)
    return min(first * shard_rows, n_rows), min(last * shard_rows, n_rows)


def rank_shards(todo: Sequence[int], rank_: int, world: int) -> list[int]:
    """The shards (of those still ``todo``, in order) that rank ``rank_`` collects: a balanced contiguous share."""
    first, last = shard_range(len(todo), rank_, world)
    return list(todo[first:last])


def part_path(store_path: Path, rank_: int) -> Path:
    """Where rank ``rank_`` collects its shards before rank 0 merges them (beside the target)."""
    return store_path.with_name(f"{store_path.name}.rank-{rank_}")


def collect_to_store_sharded(
    model: nn.Module,
    data: Any,
    store_path: str | Path,
    *,
    shard_rows: int | None = None,
    ids: Sequence[str] | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> GradientStore | None:
    """:func:`~infscope.grads.store.collect_to_store` with the rows split over the ranks of a torchrun.

    ``shard_rows`` defaults to :func:`shard_rows_for` (256 once there are enough rows). Other keyword
    arguments go to ``collect_to_store`` (layers, block_by, batch_size, dtype, projection, meta...).
    Every rank must call it; rank 0 returns the complete store, the others ``None``.

    A store already at the target with the same contents (ids, blocks, dtype, meta: adapter, layers,
    block grouping, projection) is kept in its own shard layout, whatever process count wrote it:
    complete, it is reused without running the model; incomplete (or with shard files deleted), only
    its missing shards are collected, shared among the ranks. One with other contents is refused
    with the fix, unless ``overwrite``.
    """
    path = Path(store_path)
    source = as_row_source(data, ids)
    if source is None:
        raise InfscopeError("sharded collection splits rows by position; pass encoded columns or rows")
    world, me = world_size(), rank()
    existing = None if overwrite else _existing(path)
    shard_rows = (
        existing.shard_rows if existing is not None else int(shard_rows or shard_rows_for(source.n, world))
    )
    if not is_distributed():
        return collect_to_store(model, source, path, shard_rows=shard_rows, overwrite=overwrite, **kwargs)
    if existing is not None:
        _check_contents(model, existing, source.ids, kwargs)
        todo = existing.missing_shards()
    else:
        todo = list(range(max(1, math.ceil(source.n / shard_rows))))
    if not todo:
        barrier()
        return GradientStore.open(path) if is_main() else None
    mine = rank_shards(todo, me, world)
    if mine:
        rows = [i for k in mine for i in range(k * shard_rows, min((k + 1) * shard_rows, source.n))]
        collect_to_store(
            model,
            row_subset(source, rows),
            part_path(path, me),
            shard_rows=shard_rows,
            overwrite=True,  # a part left by an interrupted run of other settings is replaced
            **kwargs,
        )
    barrier()
    store = None
    if is_main():
        store = _merge(path, source.ids, shard_rows, todo, world, overwrite)
    barrier()
    return store


def _existing(path: Path) -> GradientStore | None:
    """The store at ``path`` (shards whose files went missing flagged as such), or ``None``.

    Rank 0 rechecks the files and saves the index; the other ranks read it after a barrier, so every
    rank sees the same shards missing.
    """
    there = (path / INDEX_FILE).is_file()
    if there and is_main():
        GradientStore.open(path).recheck()
    barrier()
    return GradientStore.open(path) if there else None


def _check_contents(model: nn.Module, store: GradientStore, ids: Sequence[str], options: Mapping) -> None:
    """Refuse an existing target that holds other gradients than this collection would write."""
    contents = store_contents(
        model,
        layers=options.get("layers"),
        block_by=options.get("block_by", "matrix"),
        projection=options.get("projection"),
        meta=options.get("meta"),
    )
    differ = store.differences(ids, contents.dims, options.get("dtype", "float32"), contents.meta)
    if differ:
        raise InfscopeError(
            f"gradient store {store.path} was made with other {', '.join(differ)}; delete it, pass "
            "overwrite=True (--overwrite) to replace it, or choose another path"
        )


def _merge(
    path: Path, ids: Sequence[str], shard_rows: int, todo: Sequence[int], world: int, overwrite: bool
) -> GradientStore:
    """Rank 0: move every rank's shard files into the target store under their global shard numbers."""
    parts = []
    for r in range(world):
        shards = rank_shards(todo, r, world)
        if shards:
            parts.append((GradientStore.open(part_path(path, r)), shards))
    first = parts[0][0]
    meta = {k: v for k, v in first.meta.items() if k not in RUNTIME_META}
    store = GradientStore.create(
        path,
        ids,
        {name: first.block_dim(name) for name in first.block_names},
        first.dtype,
        meta,
        shard_rows=shard_rows,
        overwrite=overwrite,
        param_shapes=first.param_shapes,
    )
    for part, shards in parts:
        if not part.is_complete or part.n_shards != len(shards):
            raise InfscopeError(f"gradient part {part.path} is incomplete; rerun the same torchrun to resume")
        for file in sorted((part.path / SHARD_DIR).glob("*.npy")):
            match = _SHARD_FILE.match(file.name)
            if match is None:
                continue
            target = (
                path / SHARD_DIR / f"{match['stem']}-s{shards[int(match['shard'])]:05d}{match['suffix']}.npy"
            )
            file.replace(target)
    # the files were written (atomically) by the parts' own collections
    store.mark_complete([k for _, shards in parts for k in shards])
    store.set_runtime_meta(batch_size_used=min(int(p.meta.get("batch_size_used", 0)) for p, _ in parts))
    for part, _ in parts:
        shutil.rmtree(part.path, ignore_errors=True)
    return GradientStore.open(path)


def stream_scores_sharded(
    model: nn.Module,
    encoded_train: Any,
    query_vector_blocks: Mapping[str, Any],
    *,
    batch_size: int = 8,
    block_by: str = "matrix",
    methods: Sequence[str] = METHODS,
    damping_scale: float = 0.1,
    damping: Damping = None,
    layers: Sequence[str] | None = None,
    loss_fn: Any = None,
    ids: Sequence[str] | None = None,
    projection: Any = None,
    dtype: torch.dtype = torch.float64,
) -> StreamedScores:
    """:func:`~infscope.grads.streaming.stream_scores` with the rows split over the ranks of a torchrun.

    Every rank must call it with the same arguments; every rank returns the scores of all rows. The
    query vector is the same on every rank (compute it on each, or broadcast it).
    """
    options = dict(
        batch_size=batch_size,
        block_by=block_by,
        methods=methods,
        damping_scale=damping_scale,
        damping=damping,
        layers=layers,
        loss_fn=loss_fn,
        ids=ids,
        projection=projection,
        dtype=dtype,
    )
    if not is_distributed():
        return stream_scores(model, encoded_train, query_vector_blocks, **options)
    methods = check_methods(methods)
    if damping_scale <= 0:
        raise InfscopeError(f"damping_scale {damping_scale} must be positive; the DataInf paper uses 0.1")
    source = as_row_source(encoded_train, ids)
    if source is None or source.n == 0:
        raise InfscopeError("sharded streaming needs encoded rows (columns or row dicts), at least one")
    engine = PerExampleGradients(model, layers)
    layout = engine.layout(block_by)
    dims = layout.dims if projection is None else projection.out_dims(layout.dims)
    names = list(dims)
    v = query_vectors(query_vector_blocks, dims, dtype)
    n = source.n
    start, stop = shard_range(n, rank(), world_size())
    m = stop - start
    sizer = BatchSizer(batch_size)
    passes = 0

    def local_pass() -> Iterator[dict[str, Any]]:
        nonlocal passes
        passes += 1
        for a, b, blocks, _ in iter_gradients(
            model,
            source,
            layers=engine.layer_names,
            block_by=block_by,
            batch_size=sizer.size,
            loss_fn=loss_fn,
            projection=projection,
            breaks=(start, stop),
            skip=lambda s, e: s >= stop or e <= start,
            sizer=sizer,
        ):
            yield {"rows": slice(a - start, b - start), **{k: t.to("cpu", dtype) for k, t in blocks.items()}}

    want_datainf = any(x in DATAINF for x in methods)
    lams = given_damping(damping, names)
    dot = torch.zeros(m, dtype=torch.float64)
    sq = torch.zeros(m, dtype=torch.float64)
    block_sq = torch.zeros(len(names), dtype=torch.float64)
    weighted = {name: torch.zeros(d, dtype=dtype) for name, d in dims.items()}

    def accumulate(G: torch.Tensor, name: str, a: torch.Tensor, q: torch.Tensor, lam: float) -> None:
        weighted[name] += (a / (lam + q)) @ G

    for batch in local_pass():  # pass 1: per-row scalars, each block's squared norms
        rows = batch["rows"]
        for j, name in enumerate(names):
            a, q = scalars(batch[name], v[name])
            dot[rows] += a.double()
            sq[rows] += q.double()
            block_sq[j] += q.double().sum()
            if want_datainf and lams is not None:
                accumulate(batch[name], name, a, q, lams[name])
    if lams is None:
        totals = all_reduce_sum(block_sq)
        lams = {
            name: rule_damping(float(totals[j]), n, dims[name], damping_scale) for j, name in enumerate(names)
        }
        if want_datainf:  # pass 2: s_b with every block's damping known
            for batch in local_pass():
                for name in names:
                    if lams[name] > 0:
                        accumulate(batch[name], name, *scalars(batch[name], v[name]), lams[name])
    per_row = [dot, sq]
    u: dict[str, torch.Tensor] = {}
    if want_datainf:
        summed = all_reduce_sum(torch.cat([weighted[name] for name in names])).split(list(dims.values()))
        active = [name for name in names if lams[name] > 0]
        u = {
            name: (v[name] - s / n) / lams[name]
            for name, s in zip(names, summed, strict=True)
            if name in active
        }
        influence = torch.zeros(m, dtype=torch.float64)
        active_sq = torch.zeros(m, dtype=torch.float64)
        for batch in local_pass():  # last pass: every row against the preconditioned query u
            rows = batch["rows"]
            for name in active:
                G = batch[name]
                influence[rows] += (G @ u[name]).double()
                active_sq[rows] += torch.linalg.vector_norm(G, dim=1).square().double()
        per_row += [influence, active_sq]
    full = gather_rows(torch.stack(per_row, dim=1)).unbind(dim=1)
    datainf_sums = full[2:] if want_datainf else (None, None)
    scores = final_scores(methods, v, u, full[0], full[1], *datainf_sums)
    return StreamedScores(source.ids, scores, dict(lams), passes, sizer.size)
