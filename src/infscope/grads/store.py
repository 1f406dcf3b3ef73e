"""An on-disk :class:`~infscope.grads.base.GradientSet`: block-contiguous shards and a JSON index.

Layout of a store directory::

    index.json                 ids, blocks (name, dim), dtype, shard_rows, complete flags, meta
    shards/b0003-s00012.npy    rows of shard 12 for block 3, shape (rows, dim)
    shards/loss-s00012.npy     the per-example losses of shard 12 (float64)

Each block's rows live in their own files, so an estimator loads one block without reading the
others. Shards hold ``shard_rows`` consecutive examples; a shard's files are each written
atomically and the shard is flagged complete in the index only after all of them exist, so an
interrupted :func:`collect_to_store` resumes at the first missing shard. float32 is stored as is;
bfloat16 as its raw 16 bits (an int16 view), since numpy has no bfloat16. float16 has a narrow range
(gradients below 6e-5 lose precision, below 6e-8 vanish, above 65504 overflow), so each row is
divided by a power of two near its largest magnitude before rounding and the exact float32 scales
are kept in ``...-scale.npy`` beside the shard: rounding is then relative to each row's scale.

``meta`` records what the gradients depend on (adapter fingerprint, layers, block grouping,
projection). Creating a store over an existing one with other ids, blocks, dtype or meta is
refused unless ``overwrite=True``, so gradients of different models never mix. How rows are cut into
shards is layout, not content: :func:`collect_to_store` keeps an existing store's ``shard_rows`` (a
store written by several processes, or by one, is reused or resumed by the other), and
:meth:`GradientStore.recheck` flags shards whose files went missing so that they are collected again.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from infscope.errors import InfscopeError
from infscope.grads.batching import as_row_source
from infscope.grads.hooks import (
    BatchSizer,
    PerExampleGradients,
    iter_gradients,
    model_fingerprint,
    row_progress,
)
from infscope.grads.plan import check_plan, scoring_bytes
from infscope.runs import atomic_path, atomic_write_json

INDEX_FILE = "index.json"
SHARD_DIR = "shards"
FORMAT = "infscope-gradient-store"
VERSION = 1
# Meta keys that describe how a collection ran, not what the gradients are: never a mismatch on resume.
RUNTIME_META = ("batch_size_used",)
#: Index fields that say what a store holds; a store is reused or resumed only when all of them agree.
CONTENT_KEYS = ("ids", "blocks", "dtype", "meta")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical storage dtype name (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""
    name = str(dtype).replace("torch.", "")
    name = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
    }.get(name, name)
    if name not in DTYPES:
        raise InfscopeError(f"unsupported gradient store dtype {dtype!r}; use float32, float16 or bfloat16")
    return name


def _to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    data = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    return data.view(torch.int16).numpy() if dtype == "bfloat16" else data.numpy()


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _row_scales(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows divided by a power of two near their largest magnitude, and those float32 scales."""
    data = tensor.detach().to("cpu", torch.float32)
    amax = data.abs().amax(dim=1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))), torch.zeros_like(amax))
    scale = torch.pow(2.0, exponent)
    return data / scale.unsqueeze(1), scale


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _comparable(key: str, value: Any) -> Any:
    """An index field as compared on reuse: ``meta`` without its run-time entries."""
    if key == "meta" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in RUNTIME_META}
    return value


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class GradientStore:
    """Per-example gradients on disk; implements :class:`~infscope.grads.base.GradientSet`.

    Make one with :meth:`create` (or :func:`collect_to_store`), read one with :meth:`open`.
    """

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self._index = index
        self._block_pos = {b["name"]: i for i, b in enumerate(index["blocks"])}

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        ids: Sequence[str],
        block_dims: Mapping[str, int],
        dtype: str | torch.dtype = "float32",
        meta: Mapping[str, Any] | None = None,
        *,
        shard_rows: int = 1024,
        overwrite: bool = False,
        param_shapes: Mapping[str, Sequence[Sequence[int]]] | None = None,
    ) -> GradientStore:
        """Create an empty store, or reopen an identical one to resume; refuse a mismatching one."""
        path = Path(path)
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise InfscopeError("gradient store ids are not unique; give every row a distinct id")
        if shard_rows < 1:
            raise InfscopeError(f"shard_rows must be >= 1, got {shard_rows}")
        if not block_dims:
            raise InfscopeError("no gradient blocks given; select at least one layer")
        n_shards = max(1, math.ceil(len(ids) / shard_rows))
        index = {
            "format": FORMAT,
            "version": VERSION,
            "ids": ids,
            "blocks": [{"name": str(k), "dim": int(v)} for k, v in block_dims.items()],
            "dtype": dtype_name(dtype),
            "shard_rows": int(shard_rows),
            "n_shards": n_shards,
            "complete": [False] * n_shards,
            "meta": _json_roundtrip(dict(meta or {})),
            "param_shapes": _json_roundtrip(
                {k: [list(s) for s in v] for k, v in (param_shapes or {}).items()}
            ),
        }
        if (path / INDEX_FILE).exists():
            existing = cls.open(path)
            differ = existing._differences(index, CONTENT_KEYS + ("shard_rows",))
            if not differ:
                return existing
            if not overwrite:
                raise InfscopeError(
                    f"gradient store {path} was made with other {', '.join(differ)}; delete it, "
                    "pass overwrite=True (--overwrite) to replace it, or choose another path"
                )
            shutil.rmtree(path)
        elif path.exists() and any(path.iterdir()):
            raise InfscopeError(
                f"{path} exists and is not a gradient store; choose an empty or new directory"
            )
        need = len(ids) * sum(int(v) for v in block_dims.values()) * DTYPES[index["dtype"]].itemsize
        free = _free_bytes(path)
        if need > free:
            raise InfscopeError(
                f"gradient store needs {need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are free at {path}; "
                "free disk space, project gradients to fewer dims, or use float16"
            )
        try:
            (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InfscopeError(
                f"cannot create gradient store at {path} ({exc.strerror}); pass a writable path"
            ) from None
        store = cls(path, index)
        store._save_index()
        return store

    @classmethod
    def open(cls, path: str | Path) -> GradientStore:
        """Open an existing store (complete or not)."""
        path = Path(path)
        try:
            index = json.loads((path / INDEX_FILE).read_text())
        except FileNotFoundError:
            raise InfscopeError(
                f"no gradient store at {path} ({INDEX_FILE} missing); run gradient collection first"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise InfscopeError(
                f"gradient store index {path / INDEX_FILE} is unreadable ({exc}); recollect with overwrite"
            ) from None
        if index.get("format") != FORMAT:
            raise InfscopeError(
                f"{path} is not an infscope gradient store; pass the directory collect_to_store wrote"
            )
        return cls(path, index)

    def _save_index(self) -> None:
        atomic_write_json(self.path / INDEX_FILE, self._index)

    def _differences(self, index: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
        return [key for key in keys if _comparable(key, self._index[key]) != _comparable(key, index[key])]

    def differences(
        self,
        ids: Sequence[str],
        block_dims: Mapping[str, int],
        dtype: str | torch.dtype,
        meta: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """The index fields (of :data:`CONTENT_KEYS`) in which this store differs from the one described.

        ``shard_rows`` is not compared: it says how the rows were cut into files, not what they hold.
        An empty list means the store holds (or, incomplete, is filling) exactly these gradients.
        """
        wanted = {
            "ids": [str(i) for i in ids],
            "blocks": [{"name": str(k), "dim": int(v)} for k, v in block_dims.items()],
            "dtype": dtype_name(dtype),
            "meta": _json_roundtrip(dict(meta or {})),
        }
        return self._differences(wanted, CONTENT_KEYS)

    def recheck(self) -> list[int]:
        """Flag as missing every shard flagged complete whose files are gone; return those shards.

        One directory listing, not a read of the data: a shard counts as present when each block's
        file (and its ``-scale`` file for float16) exists, and its losses file when the store has any.
        """
        folder = self.path / SHARD_DIR
        present = {f.name for f in folder.iterdir()} if folder.is_dir() else set()
        with_losses = any(name.startswith("loss-") for name in present)
        suffixes = ("", "-scale") if self.dtype == "float16" else ("",)
        lost = []
        for shard, done in enumerate(self._index["complete"]):
            if not done:
                continue
            names = [
                self._file(pos, shard, sfx).name for pos in range(len(self.block_names)) for sfx in suffixes
            ]
            if with_losses:
                names.append(self._file("loss", shard).name)
            if not present.issuperset(names):
                lost.append(shard)
        if lost:
            for shard in lost:
                self._index["complete"][shard] = False
            self._save_index()
        return lost

    # -- GradientSet ----------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return list(self._index["ids"])

    @property
    def block_names(self) -> list[str]:
        return [b["name"] for b in self._index["blocks"]]

    def block_dim(self, name: str) -> int:
        return int(self._index["blocks"][self._pos(name)]["dim"])

    def __len__(self) -> int:
        return len(self._index["ids"])

    @property
    def dtype(self) -> str:
        return self._index["dtype"]

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._index["meta"])

    @property
    def param_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        return {k: [tuple(s) for s in v] for k, v in self._index.get("param_shapes", {}).items()}

    @property
    def shard_rows(self) -> int:
        return int(self._index["shard_rows"])

    @property
    def n_shards(self) -> int:
        return int(self._index["n_shards"])

    def _pos(self, name: str) -> int:
        if name not in self._block_pos:
            raise InfscopeError(
                f"block {name!r} is not in gradient store {self.path}; blocks: {self.block_names[:3]}..."
            )
        return self._block_pos[name]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Row positions ``(start, stop)`` covered by ``shard``."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, len(self))

    def missing_shards(self) -> list[int]:
        """Shards not yet written completely, in order."""
        return [k for k, done in enumerate(self._index["complete"]) if not done]

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards()

    def reset(self) -> None:
        """Mark every shard missing so the next collection recomputes all of them."""
        self._index["complete"] = [False] * self.n_shards
        self._save_index()

    def mark_complete(self, shards: Sequence[int] | None = None) -> None:
        """Flag ``shards`` (default: every shard) as written, for shard files put in place another way.

        :meth:`write_shard` flags its own shard; this is for files written (atomically) by another
        store's collection and moved here, as when rank parts are merged into one store.
        """
        chosen = range(self.n_shards) if shards is None else [int(k) for k in shards]
        bad = [k for k in chosen if not 0 <= k < self.n_shards]
        if bad:
            raise InfscopeError(f"shard {bad[0]} is out of range 0..{self.n_shards - 1}")
        for shard in chosen:
            self._index["complete"][shard] = True
        self._save_index()

    def _file(self, block: int | str, shard: int, suffix: str = "") -> Path:
        """Shard file of a block position (``b0003-s00012.npy``) or of the losses (``loss-s00012.npy``)."""
        stem = f"b{block:04d}" if isinstance(block, int) else block
        return self.path / SHARD_DIR / f"{stem}-s{shard:05d}{suffix}.npy"

    def write_shard(
        self, shard: int, blocks: Mapping[str, torch.Tensor], losses: torch.Tensor | np.ndarray | None = None
    ) -> None:
        """Write all blocks (``(rows, dim)`` each) of one shard, then flag the shard complete."""
        if not 0 <= shard < self.n_shards:
            raise InfscopeError(f"shard {shard} is out of range 0..{self.n_shards - 1}")
        start, stop = self.shard_range(shard)
        if set(blocks) != set(self.block_names):
            missing = sorted(set(self.block_names) - set(blocks)) or sorted(
                set(blocks) - set(self.block_names)
            )
            raise InfscopeError(
                f"shard {shard} blocks do not match the store (e.g. {missing[0]!r}); write every block"
            )
        for name, tensor in blocks.items():
            expected = (stop - start, self.block_dim(name))
            if tuple(tensor.shape) != expected:
                raise InfscopeError(
                    f"block {name!r} of shard {shard} has shape {tuple(tensor.shape)}, expected {expected}"
                )
        for name, tensor in blocks.items():
            pos = self._pos(name)
            if self.dtype == "float16":
                tensor, scale = _row_scales(tensor)
                _save_npy(self._file(pos, shard, "-scale"), scale.numpy())
            _save_npy(self._file(pos, shard), _to_numpy(tensor, self.dtype))
        if losses is not None:
            values = losses.detach().double().cpu().numpy() if isinstance(losses, torch.Tensor) else losses
            _save_npy(self._file("loss", shard), np.asarray(values, dtype=np.float64).reshape(stop - start))
        self.mark_complete([shard])

    def set_runtime_meta(self, **values: Any) -> None:
        """Record how the collection ran (e.g. ``batch_size_used``) in ``meta``; ignored on reuse."""
        unknown = sorted(set(values) - set(RUNTIME_META))
        if unknown:
            raise InfscopeError(
                f"{unknown[0]!r} is not a run-time meta key; use one of {', '.join(RUNTIME_META)}"
            )
        self._index["meta"].update(_json_roundtrip(values))
        self._save_index()

    def _require_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise InfscopeError(
                f"gradient store {self.path} is incomplete ({len(missing)} of {self.n_shards} shards missing); "
                "rerun the gradient collection to resume"
            )

    def load_block(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(n, dim)`` gradients of one block, converted to ``dtype``."""
        self._require_complete()
        pos = self._pos(name)
        out = torch.empty(len(self), self.block_dim(name), dtype=dtype)
        for shard in range(self.n_shards):
            start, stop = self.shard_range(shard)
            values = _from_numpy(np.load(self._file(pos, shard)), self.dtype)
            if self.dtype == "float16":
                scale = torch.from_numpy(np.load(self._file(pos, shard, "-scale")))
                values = values.float().mul_(scale.unsqueeze(1))
            out[start:stop] = values.to(dtype)
        return out

    def losses(self) -> np.ndarray | None:
        """Per-example losses recorded during collection (``None`` if not written)."""
        self._require_complete()
        files = [self._file("loss", k) for k in range(self.n_shards)]
        if not all(f.exists() for f in files):
            return None
        return np.concatenate([np.load(f) for f in files])


class StoreContents(NamedTuple):
    """What a collection of ``model``'s gradients would hold: block dims, index meta, layers, shapes."""

    dims: dict[str, int]
    meta: dict[str, Any]
    layers: list[str]
    param_shapes: dict[str, Any]


def store_contents(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    block_by: str = "matrix",
    projection: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> StoreContents:
    """The blocks and meta :func:`collect_to_store` gives a store of ``model`` (no forward pass).

    Lets a caller check an existing store (:meth:`GradientStore.differences`) before running anything.
    """
    engine = PerExampleGradients(model, layers)
    layout = engine.layout(block_by)
    dims = layout.dims if projection is None else projection.out_dims(layout.dims)
    full_meta = {
        "fingerprint": model_fingerprint(model, engine.layer_names),
        "layers": engine.layer_names,
        "block_by": block_by,
        "projection": projection.info() if projection is not None else None,
        **dict(meta or {}),
    }
    return StoreContents(dict(dims), full_meta, list(engine.layer_names), engine.block_param_shapes(layout))


def collect_to_store(
    model: nn.Module,
    data: Any,
    store_path: str | Path,
    *,
    layers: Sequence[str] | None = None,
    block_by: str = "matrix",
    batch_size: int = 8,
    shard_rows: int = 256,
    dtype: str | torch.dtype = "float32",
    projection: Any = None,
    resume: bool = True,
    overwrite: bool = False,
    loss_fn: Any = None,
    ids: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    nan_check: bool = True,
    progress_label: str | None = None,
) -> GradientStore:
    """Compute per-example gradients batch by batch and write them to a :class:`GradientStore`.

    Batches never cross shard edges, and shards already complete are skipped without running the
    model, so rerunning after an interruption finishes the store with the same numbers as an
    uninterrupted run. ``resume=False`` recomputes every shard. ``projection`` is a
    :class:`~infscope.grads.projection.BlockProjector` applied on the fly. ``meta`` is stored with
    the adapter fingerprint, layers, block grouping and projection settings.
    ``progress_label`` (e.g. ``"gradients train"``) shows a bar over the rows still to compute, with
    rows/s and time left, on stderr (:func:`infscope.progress.progress`: on a terminal, or wherever
    ``INFSCOPE_PROGRESS=1``); ``None`` keeps it silent, as does ``progress=False``.
    Before a new store is made, :func:`~infscope.grads.plan.check_plan` warns if the disk cannot hold
    it or memory cannot hold the scoring stage. On an out-of-memory failure the batch size halves
    and the batch is retried; the size finally used is kept in ``meta["batch_size_used"]``.
    """
    source = as_row_source(data, ids)
    if source is not None:
        row_ids = source.ids
    elif ids is not None:
        row_ids = [str(i) for i in ids]
    else:
        raise InfscopeError(
            "pass ids= when giving ready batches to collect_to_store (the store needs the row count)"
        )
    contents = store_contents(model, layers=layers, block_by=block_by, projection=projection, meta=meta)
    dims, full_meta = contents.dims, contents.meta
    if (Path(store_path) / INDEX_FILE).exists():
        if not overwrite:
            # The shard size is layout, not content: keep the existing store's, so a store written by
            # another process count (or another caller) is reused when complete and resumed otherwise.
            shard_rows = GradientStore.open(store_path).shard_rows
    else:  # a new store: say now if disk or memory is short
        itemsize = DTYPES[dtype_name(dtype)].itemsize
        check_plan(
            len(row_ids) * sum(dims.values()) * itemsize,
            store_path,
            scoring_memory=scoring_bytes(len(row_ids), dims),
        )
    store = GradientStore.create(
        store_path,
        row_ids,
        dims,
        dtype,
        full_meta,
        shard_rows=shard_rows,
        overwrite=overwrite,
        param_shapes=contents.param_shapes,
    )
    if not resume:
        store.reset()
    store.recheck()  # shards flagged done whose files were deleted are collected again
    missing = set(store.missing_shards())
    if not missing:
        return store
    shard_rows = store.shard_rows
    edges = [k * shard_rows for k in range(1, store.n_shards)]

    def shards_of(start: int, stop: int) -> range:
        return range(start // shard_rows, (stop - 1) // shard_rows + 1)

    pending: dict[int, tuple[dict[str, list[torch.Tensor]], list[torch.Tensor], int]] = {}
    todo = sum(store.shard_range(k)[1] - store.shard_range(k)[0] for k in missing)
    sizer = BatchSizer(batch_size)
    with row_progress(progress_label if progress else None, todo) as bar:
        for start, stop, blocks, losses in iter_gradients(
            model,
            source if source is not None else data,
            layers=contents.layers,
            block_by=block_by,
            batch_size=batch_size,
            loss_fn=loss_fn,
            ids=row_ids,
            projection=projection,
            nan_check=nan_check,
            breaks=edges,
            skip=lambda s, e: not any(k in missing for k in shards_of(s, e)),
            sizer=sizer,
        ):
            for shard in shards_of(start, stop):
                if shard not in missing:
                    continue
                lo, hi = store.shard_range(shard)
                a, b = max(lo, start) - start, min(hi, stop) - start
                parts, loss_parts, rows = pending.setdefault(shard, ({}, [], 0))
                for name, tensor in blocks.items():
                    parts.setdefault(name, []).append(tensor[a:b])
                loss_parts.append(losses[a:b])
                rows += b - a
                pending[shard] = (parts, loss_parts, rows)
                if rows == hi - lo:
                    store.write_shard(
                        shard, {n: torch.cat(p) for n, p in parts.items()}, torch.cat(loss_parts)
                    )
                    del pending[shard]
                    missing.discard(shard)
                bar.advance(b - a)
    if store.missing_shards():
        raise InfscopeError(
            f"the data gave fewer rows than the {len(row_ids)} ids; pass batches that cover every id"
        )
    store.set_runtime_meta(batch_size_used=sizer.size)
    return store
