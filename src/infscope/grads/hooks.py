"""Per-example gradients of chosen ``nn.Linear`` layers from one batched forward and backward pass.

For a linear layer ``y = x W^T + b`` the gradient of a loss that is a *sum over examples* splits
exactly by example: example ``i``'s weight gradient is ``sum_t outer(dL_i/dy_it, x_it)``. A forward
hook keeps each layer's input ``x``; a hook on the layer's output receives ``dL/dy`` during the
backward pass and forms all per-example gradients at once with one batched matmul
(``einsum("bto,bti->boi")``; an outer product for 2-D inputs such as a classifier head). Nothing
loops over examples and the batched ``.grad`` fields are never touched.

Positions whose ``attention_mask`` is 0 are excluded explicitly: the losses mask them, so their
output gradient is already zero, and masking also keeps a NaN at a padded position out of the sum.
The model runs in eval mode (dropout off) with gradients enabled; the previous mode is restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from infscope.errors import InfscopeError
from infscope.grads.base import InMemoryGradients
from infscope.grads.batching import as_row_source, batch_bounds, iter_ready_batches
from infscope.grads.blocks import BLOCK_BY, BlockLayout
from infscope.grads.losses import LossFn, default_loss
from infscope.progress import progress as progress_bar


def lora_linear_names(model: nn.Module) -> list[str]:
    """Names of the LoRA ``lora_A`` / ``lora_B`` linear modules of the active adapter(s), in order.

    Frozen adapters (loaded for scoring) count too: gradients are taken with respect to the chosen
    layers whether or not they are trainable.
    """
    active = getattr(model, "active_adapters", None)
    if callable(active):  # some peft versions expose it as a method
        active = active()
    if isinstance(active, str):
        active = [active]
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if (
            isinstance(module, nn.Linear)
            and len(parts) >= 2
            and parts[-2] in ("lora_A", "lora_B")
            and (not active or parts[-1] in active)
        ):
            names.append(name)
    return names


def resolve_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """Map the chosen module names (default: all trainable LoRA matrices) to their ``nn.Linear``."""
    modules = dict(model.named_modules())
    if layers is None:
        layers = lora_linear_names(model)
        if not layers:
            raise InfscopeError(
                "no LoRA layers found in the model; attach a LoRA adapter or pass layers= with nn.Linear module names"
            )
    if isinstance(layers, str):
        layers = [layers]
    chosen: dict[str, nn.Linear] = {}
    for name in layers:
        module = modules.get(name)
        if module is None:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:5]
            raise InfscopeError(
                f"layer {name!r} is not in the model; pass nn.Linear module names such as {linear}"
            )
        if not isinstance(module, nn.Linear):
            raise InfscopeError(
                f"layer {name!r} is a {type(module).__name__}, not nn.Linear; choose linear layers"
            )
        chosen[name] = module
    if not chosen:
        raise InfscopeError("no layers chosen; pass at least one nn.Linear module name in layers=")
    return chosen


def module_dim(module: nn.Linear) -> int:
    """Length of a linear layer's flat gradient: ``vec(W)`` then the bias if present."""
    return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)


def model_fingerprint(model: nn.Module, layers: Sequence[str] | None = None) -> str:
    """SHA-256 (16 hex digits) of the chosen layers' names, shapes and weights (the adapter state)."""
    digest = hashlib.sha256()
    for name, module in resolve_layers(model, layers).items():
        for pname, param in module.named_parameters():
            data = param.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}.{pname}{tuple(data.shape)}".encode())
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


class PerExampleGradients:
    """Hooks that turn one batched backward pass into per-example gradients of chosen linear layers.

    Use as a context manager around forward passes; after each forward, call :meth:`backward` with
    the ``(b,)`` per-example losses to get ``{module name: (b, d_module) gradient}``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        self.model = model
        self.modules = resolve_layers(model, layers)
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self._grads: dict[str, torch.Tensor] = {}
        self._called: set[str] = set()

    @property
    def layer_names(self) -> list[str]:
        return list(self.modules)

    def module_dims(self) -> dict[str, int]:
        """Module name -> length of its flat per-example gradient."""
        return {name: module_dim(m) for name, m in self.modules.items()}

    def param_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """Module name -> shapes of the parameters in its flat gradient (weight, then bias)."""
        return {
            name: [tuple(m.weight.shape)] + ([tuple(m.bias.shape)] if m.bias is not None else [])
            for name, m in self.modules.items()
        }

    def layout(self, block_by: str = "matrix") -> BlockLayout:
        """How this engine's module gradients group into blocks under ``block_by``."""
        if block_by not in BLOCK_BY:
            raise InfscopeError(f"unknown block_by {block_by!r}; use one of {', '.join(BLOCK_BY)}")
        return BlockLayout.build(self.module_dims(), block_by)

    def block_param_shapes(self, layout: BlockLayout) -> dict[str, list[tuple[int, ...]]]:
        """Block name -> shapes of the parameters concatenated in that block (for the inventory)."""
        shapes = self.param_shapes()
        return {block: [s for m in mods for s in shapes[m]] for block, mods in layout.members.items()}

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask ``(b, t)`` of the next forward; positions with 0 add nothing to the gradients."""
        self._mask = None if mask is None else mask.ne(0)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in (m.weight, m.bias) if p is not None]

    def __enter__(self) -> PerExampleGradients:
        """Register the hooks; the chosen layers require grad until exit (frozen adapters too)."""
        self._flags = [p.requires_grad for p in self._params()]
        for param in self._params():
            param.requires_grad_(True)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in zip(self._params(), self._flags, strict=True):
            param.requires_grad_(flag)
        self._reset()

    def _forward_hook(self, name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            self._called.add(name)
            x = inputs[0].detach()
            mask = self._mask
            has_bias = module.bias is not None
            output.register_hook(lambda g: self._accumulate(name, x, g, mask, has_bias))

        return hook

    def _accumulate(
        self, name: str, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, has_bias: bool
    ) -> None:
        g = g.detach()
        if x.ndim == 2:
            flat = (g.unsqueeze(2) * x.unsqueeze(1)).flatten(1)
            bias = g
        else:
            b = x.shape[0]
            if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                g = g.masked_fill(~mask.unsqueeze(-1), 0)
            g3, x3 = g.reshape(b, -1, g.shape[-1]), x.reshape(b, -1, x.shape[-1])
            flat = torch.bmm(g3.transpose(1, 2), x3).flatten(1)
            bias = g3.sum(dim=1)
        if has_bias:
            flat = torch.cat([flat, bias], dim=1)
        previous = self._grads.get(name)
        self._grads[name] = flat if previous is None else previous + flat  # a layer called twice

    def backward(self, losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Back-propagate ``losses.sum()`` and return ``{module: (b, d)}`` per-example gradients."""
        if losses.ndim != 1:
            raise InfscopeError(
                f"loss_fn must return one loss per example (shape (b,)), got {tuple(losses.shape)}"
            )
        missing = [n for n in self.modules if n not in self._called]
        if missing:
            raise InfscopeError(
                f"layer {missing[0]!r} was not called in the forward pass; choose layers the model uses"
            )
        if not losses.requires_grad:
            raise InfscopeError("the loss does not depend on the chosen layers; check layers= and loss_fn")
        # Asking for the (tiny) batched weight gradients makes autograd run exactly the part of the
        # backward pass that reaches the chosen layers; the output hooks do the per-example work.
        torch.autograd.grad(losses.sum(), [m.weight for m in self.modules.values()], allow_unused=True)
        return self.take(losses.shape[0], dtype=losses.dtype, device=losses.device)

    def take(
        self, rows: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """``{module: (rows, d)}`` per-example gradients the hooks gathered since the last take, then cleared.

        :meth:`backward` runs the backward itself; call this directly after a backward run elsewhere
        (e.g. a training step's, with the hooks on). A module that got no gradient (it does not
        influence the loss) gets zeros of ``dtype`` on ``device``.
        """
        grads = {
            name: self._grads[name]
            if name in self._grads
            else torch.zeros(rows, module_dim(module), dtype=dtype, device=device)
            for name, module in self.modules.items()
        }
        self._reset()
        return grads


@contextlib.contextmanager
def eval_with_grad(model: nn.Module) -> Iterator[None]:
    """Dropout off, autograd on; the model's previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _batches(
    data: Any, batch_size: int, ids: Sequence[str] | None, breaks: Iterable[int]
) -> tuple[list[str] | None, int | None, Iterator[tuple[int, int, dict[str, Any]]]]:
    source = as_row_source(data, ids)
    if source is None:
        n = len(ids) if ids is not None else None
        return ([str(i) for i in ids] if ids is not None else None), n, iter_ready_batches(data)
    bounds = batch_bounds(source.n, batch_size, breaks)
    return source.ids, source.n, ((s, e, source.batch(s, e)) for s, e in bounds)


def check_finite(blocks: Mapping[str, torch.Tensor], losses: torch.Tensor, ids: Sequence[str]) -> None:
    """Raise a one-line error naming the rows whose gradients or losses are NaN or infinite."""
    ok = torch.isfinite(losses)
    for tensor in blocks.values():
        ok &= torch.isfinite(tensor).all(dim=1)
    if not bool(ok.all()):
        bad = [ids[i] for i in torch.nonzero(~ok).flatten().tolist()]
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InfscopeError(
            f"non-finite gradients or losses for rows {', '.join(bad[:5])}{more}; "
            "check those rows (empty targets, extreme values) or compute in float32/float64"
        )


class ExampleGradients(InMemoryGradients):
    """:class:`InMemoryGradients` plus each example's loss and the parameter shapes of each block."""

    def __init__(
        self,
        ids: Sequence[str],
        blocks: Mapping[str, torch.Tensor],
        losses: np.ndarray,
        param_shapes: Mapping[str, list[tuple[int, ...]]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(ids, blocks)
        self.losses = np.asarray(losses, dtype=np.float64)
        self.param_shapes = dict(param_shapes or {})
        self.meta = dict(meta or {})


class _SilentBar:
    def advance(self, n: int = 1) -> None:
        """Nothing to show."""


_SILENT = _SilentBar()


@contextlib.contextmanager
def row_progress(label: str | None, total: int | None) -> Iterator[Any]:
    """A rows/s progress bar named ``label`` (see :mod:`infscope.progress`), or a silent one for ``None``."""
    if label is None:
        yield _SILENT
        return
    with progress_bar(label, total=total, unit="rows") as bar:
        yield bar


# Messages of allocation failures: CUDA caching allocator, cuBLAS workspace, CPU allocator.
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "can't allocate", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA or CPU allocation failure (which a smaller batch may avoid)."""
    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if cuda_oom is not None and isinstance(exc, cuda_oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


class BatchSizer:
    """The gradient pass's batch size: halved after each out-of-memory failure, down to 1.

    Pass one to :func:`iter_gradients` (``sizer=``) to read the size finally used (``.size``).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise InfscopeError(f"batch_size must be >= 1, got {size}")
        self.requested = int(size)
        self.size = int(size)

    def shrink(self, exc: BaseException, rows: int | None = None) -> None:
        """Halve the size (or the ``rows`` of the batch that failed, if fewer) after ``exc``, an
        allocation failure; a one-line error once it is 1."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if rows is not None:
            self.size = max(1, min(self.size, int(rows)))
        if self.size <= 1:
            raise InfscopeError(
                f"out of memory in the gradient pass even with batch size 1 ({reason}); "
                "use a shorter --max-length, fewer --lora-layers, or a device with more memory"
            ) from None
        self.size = max(1, self.size // 2)
        warnings.warn(
            f"out of memory in the gradient pass; retrying with batch size {self.size}",
            UserWarning,
            stacklevel=3,
        )


def _slice_batch(batch: Mapping[str, Any], a: int, b: int, rows: int) -> dict[str, Any]:
    """Rows ``a:b`` of a padded batch (tensors whose first dimension is the batch's ``rows``)."""
    return {
        k: v[a:b] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == rows else v
        for k, v in batch.items()
    }


def _free_cached_memory() -> None:
    """Return cached CUDA blocks after a failed allocation, so the retry starts clean."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def iter_gradients(
    model: nn.Module,
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    block_by: str = "matrix",
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    ids: Sequence[str] | None = None,
    projection: Any = None,
    nan_check: bool = True,
    breaks: Iterable[int] = (),
    skip: Any = None,
    sizer: BatchSizer | None = None,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor], torch.Tensor]]:
    """Yield ``(start, stop, {block: (b, d)}, losses (b,))`` batch by batch (blocks in compute dtype).

    ``breaks`` are row positions no batch crosses (shard edges); ``skip(start, stop)`` returning
    True skips a batch without running the model (resume). ``projection`` (a
    :class:`~infscope.grads.projection.BlockProjector`) projects each block as it is produced.
    On an out-of-memory failure the batch size halves and the rows are retried (down to 1, then an
    :class:`InfscopeError`); the smaller size is kept for the rest of the pass. ``sizer`` (a
    :class:`BatchSizer`) lets the caller read the size finally used.
    """
    loss_fn = loss_fn or default_loss
    sizer = sizer if sizer is not None else BatchSizer(batch_size)
    engine = PerExampleGradients(model, layers)
    layout = engine.layout(block_by)
    row_ids, _, batches = _batches(data, batch_size, ids, breaks)
    with eval_with_grad(model), engine:
        for start, stop, batch in batches:
            if skip is not None and skip(start, stop):
                continue
            pos = start
            while pos < stop:
                end = min(stop, pos + sizer.size)
                part = (
                    batch
                    if end - pos == stop - start
                    else _slice_batch(batch, pos - start, end - start, stop - start)
                )
                try:
                    engine.set_mask(part.get("attention_mask"))
                    losses = loss_fn(model, part)
                    blocks = layout.assemble(engine.backward(losses))
                except (RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    engine._reset()
                    sizer.shrink(exc, end - pos)
                    _free_cached_memory()
                    continue
                if projection is not None:
                    blocks = {name: projection(name, t) for name, t in blocks.items()}
                losses = losses.detach()
                if nan_check:
                    names = row_ids[pos:end] if row_ids is not None else [str(i) for i in range(pos, end)]
                    check_finite(blocks, losses, names)
                yield pos, end, blocks, losses
                pos = end


def compute_gradients(
    model: nn.Module,
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    block_by: str = "matrix",
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    ids: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    projection: Any = None,
    progress: bool = True,
    nan_check: bool = True,
    progress_label: str | None = None,
) -> ExampleGradients:
    """Per-example gradients of ``data`` as an :class:`ExampleGradients` (``.losses`` holds the losses).

    ``data`` is encoded columns/rows or an iterable of ready batches (see
    :mod:`infscope.grads.batching`); ``layers`` defaults to every LoRA matrix of the active
    adapter; ``loss_fn`` returns one loss per example (default
    :func:`~infscope.grads.losses.default_loss`). Blocks are named by module
    (``block_by="matrix"``), adapted module (``"module"``) or layer (``"layer"``). ``projection``
    (a :class:`~infscope.grads.projection.BlockProjector`) projects blocks batch by batch; the
    result is cast to ``dtype``. Non-finite values raise an error naming the rows (``nan_check``).
    ``progress_label`` (e.g. ``"gradients train"``) shows a bar with rows/s and time left on stderr
    (:func:`infscope.progress.progress`: on a terminal, or wherever ``INFSCOPE_PROGRESS=1``);
    ``None`` keeps it silent, as does ``progress=False``.
    """
    source = as_row_source(data, ids)
    engine = PerExampleGradients(model, layers)
    layout = engine.layout(block_by)
    parts: dict[str, list[torch.Tensor]] = {}
    loss_parts: list[torch.Tensor] = []
    label = progress_label if progress else None
    with row_progress(label, source.n if source is not None else None) as bar:
        for _, _, blocks, losses in iter_gradients(
            model,
            source if source is not None else data,
            layers=engine.layer_names,
            block_by=block_by,
            batch_size=batch_size,
            loss_fn=loss_fn,
            ids=ids,
            projection=projection,
            nan_check=nan_check,
        ):
            for name, tensor in blocks.items():
                parts.setdefault(name, []).append(tensor.to(dtype))
            loss_parts.append(losses)
            bar.advance(int(losses.shape[0]))
    if not loss_parts:
        raise InfscopeError("no examples to compute gradients for; pass at least one encoded row")
    n = sum(int(t.shape[0]) for t in loss_parts)
    if source is not None:
        row_ids = source.ids
    elif ids is not None:
        row_ids = [str(i) for i in ids]
    else:
        row_ids = [str(i) for i in range(n)]
    if len(row_ids) != n:
        raise InfscopeError(f"got {len(row_ids)} ids for {n} rows; pass one id per row")
    meta = {"block_by": block_by, "layers": engine.layer_names}
    if projection is not None:
        meta["projection"] = projection.info()
    return ExampleGradients(
        row_ids,
        {name: torch.cat(chunks) for name, chunks in parts.items()},
        torch.cat(loss_parts).double().numpy(),
        param_shapes=engine.block_param_shapes(layout),
        meta=meta,
    )
