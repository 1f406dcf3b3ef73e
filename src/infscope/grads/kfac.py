"""Kronecker-factored curvature (K-FAC / EK-FAC factors) of chosen linear layers, from batched hook passes.

For a linear layer ``y = x W^T (+ b)`` example ``i`` has the gradient ``G_i = sum_t ds_it x_it^T``
(``ds = dL_i/dy``, one term per token). K-FAC (Martens & Grosse 2015; Grosse et al. 2023 for
influence) approximates the per-example Fisher ``E_i[vec(G_i) vec(G_i)^T]`` of a layer by ``S (x) A``,
with, over every real (``attention_mask`` = 1) position of every training row:

- ``A = sum_it x x^T / T``  (mean over the ``T`` tokens: the input covariance),
- ``S = sum_it ds ds^T / N`` (summed over a row's positions, averaged over the ``N`` rows).

``vec`` is row-major, the layout of ``weight.flatten()`` in the gradient store, for which
``vec(S X A) = (S (x) A) vec(X)``. Dropping the cross-token terms, ``S (x) A`` has the scale of the
per-example Fisher that EK-FAC's eigenvalue correction and the exact solve use, so one absolute
damping means the same thing for all of them (kronfluence divides ``S`` by ``T`` instead: a
constant factor that relative damping absorbs). A layer with a bias gets ``x`` augmented by a 1.

``fisher="empirical"`` back-propagates the rows' own labels; ``fisher="true"`` samples labels from
the model's predictive distribution (seeded), the Fisher / Gauss-Newton matrix of the paper. The
eigenvalue correction ``Lambda = E_i[(Q_S^T G_i Q_A)^2]`` needs per-example gradients: for the
empirical Fisher the estimator takes them from the gradient store; for the true Fisher a second
pass here takes them with sampled labels (:func:`collect_kfac_factors` with ``eigen_correction``).

When the chosen layers all sit in the top decoder layers (``--lora-layers top:N``), both passes run
inside :func:`~infscope.models.prefix.frozen_prefix`: the hidden state entering the lowest chosen
layer is computed once per row and reused, as the per-example gradient pass of a run does. Nothing
below that layer has a factor or a gradient here, so the factors are the same either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infscope.errors import InfscopeError
from infscope.grads.batching import as_row_source, batch_bounds, iter_ready_batches
from infscope.grads.hooks import eval_with_grad, iter_gradients, resolve_layers, row_progress
from infscope.grads.losses import NON_INPUT_KEYS, LossFn, default_loss
from infscope.models.loss import positions_to_keep
from infscope.models.prefix import PrefixStates, frozen_prefix, lora_layer_indices
from infscope.runs import atomic_path

FISHER = ("empirical", "true")
FACTORS_FILE = "factors.pt"
INFO_FILE = "factors.json"


# -- the factors of one layer and of a model ------------------------------------------------------


@dataclass
class LayerFactors:
    """Covariance factors of one linear layer: ``A`` (in x in) and ``S`` (out x out), float64.

    ``lambdas`` is the eigenvalue correction ``E_i[(Q_S^T G_i Q_A)^2]`` (out x in) when a pass
    computed it; ``in_features`` counts the bias column when ``has_bias``.
    """

    A: torch.Tensor
    S: torch.Tensor
    has_bias: bool = False
    lambdas: torch.Tensor | None = None
    _eigen: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def out_features(self) -> int:
        return int(self.S.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[0])

    @property
    def dim(self) -> int:
        """Length of this layer's flat gradient in the store (``vec(W)`` then the bias)."""
        return self.out_features * self.in_features

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, Q_A, s, Q_S)``: eigenvalues (clamped at 0) and eigenvectors of ``A`` and ``S``, float64."""
        if self._eigen is None:
            a, qa = symmetric_eigh(self.A)
            s, qs = symmetric_eigh(self.S)
            self._eigen = (a, qa, s, qs)
        return self._eigen  # type: ignore[return-value]


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the symmetrised matrix in float64; round-off negatives set to 0."""
    m = matrix.double()
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    return values.clamp(min=0), vectors


@dataclass
class KFACFactors:
    """Per-layer factors of one model on one set of training rows, with how they were collected."""

    layers: dict[str, LayerFactors]
    ids: list[str]
    fisher: str = "empirical"
    seed: int = 0
    n_tokens: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return len(self.ids)

    @property
    def has_lambdas(self) -> bool:
        return all(f.lambdas is not None for f in self.layers.values())

    def info(self) -> dict[str, Any]:
        """JSON description (no tensors): rows, Fisher, seed, layer shapes, token counts, meta."""
        return {
            "n_examples": self.n_examples,
            "fisher": self.fisher,
            "seed": self.seed,
            "eigen_correction": self.has_lambdas,
            "layers": {n: [f.out_features, f.in_features, f.has_bias] for n, f in self.layers.items()},
            "n_tokens": dict(self.n_tokens),
            **self.meta,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``factors.pt`` (tensors) and ``factors.json`` (description) atomically; returns the dir."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "ids": self.ids,
            "layers": {
                n: {"A": f.A, "S": f.S, "has_bias": f.has_bias, "lambdas": f.lambdas}
                for n, f in self.layers.items()
            },
            "info": self.info(),
        }
        with atomic_path(path / FACTORS_FILE) as tmp:
            torch.save(state, tmp)
        with atomic_path(path / INFO_FILE) as tmp:
            Path(tmp).write_text(json.dumps(self.info(), indent=1, default=str))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> KFACFactors:
        file = Path(directory) / FACTORS_FILE
        if not file.is_file():
            raise InfscopeError(f"no K-FAC factors at {file}; collect them with collect_kfac_factors")
        state = torch.load(file, map_location="cpu", weights_only=True)
        info = state["info"]
        known = ("n_examples", "fisher", "seed", "eigen_correction", "layers", "n_tokens")
        layers = {
            n: LayerFactors(d["A"], d["S"], bool(d["has_bias"]), d["lambdas"])
            for n, d in state["layers"].items()
        }
        return cls(
            layers,
            list(state["ids"]),
            fisher=info["fisher"],
            seed=int(info["seed"]),
            n_tokens={k: int(v) for k, v in info["n_tokens"].items()},
            meta={k: v for k, v in info.items() if k not in known},
        )


# -- rows of the gradient store <-> (out, in) matrices -------------------------------------------


def as_matrices(flat: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """``(n, out*in [+ out])`` store rows -> ``(n, out, in [+1])`` gradients ``[dW | db]``."""
    o, i = factors.out_features, factors.in_features - int(factors.has_bias)
    weight = flat[:, : o * i].reshape(-1, o, i)
    if not factors.has_bias:
        return weight
    return torch.cat([weight, flat[:, o * i :].unsqueeze(2)], dim=2)


def as_flat(matrices: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """Inverse of :func:`as_matrices`: ``(n, out, in [+1])`` -> store rows."""
    if not factors.has_bias:
        return matrices.flatten(1)
    return torch.cat([matrices[:, :, :-1].flatten(1), matrices[:, :, -1]], dim=1)


def rotate(matrices: torch.Tensor, factors: LayerFactors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Q_S^T G Q_A`` for a batch of ``(n, out, in)`` gradients: coordinates in the Kronecker eigenbasis."""
    _, qa, _, qs = factors.eigen()
    return qs.T.to(dtype) @ matrices.to(dtype) @ qa.to(dtype)


def rotate_back(rotated: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """``Q_S R Q_A^T``: back from the eigenbasis (inverse of :func:`rotate`)."""
    _, qa, _, qs = factors.eigen()
    return qs.to(rotated.dtype) @ rotated @ qa.T.to(rotated.dtype)


def rotated_square_sum(
    flat: torch.Tensor, factors: LayerFactors, dtype: torch.dtype = torch.float32, chunk: int = 1024
) -> torch.Tensor:
    """``sum_i (Q_S^T G_i Q_A)^2`` over the rows of ``flat`` (float64 ``(out, in)``), in row chunks."""
    total = torch.zeros(factors.out_features, factors.in_features, dtype=torch.float64)
    for start in range(0, flat.shape[0], chunk):
        part = rotate(as_matrices(flat[start : start + chunk], factors), factors, dtype)
        total += part.square().sum(dim=0).double()
    return total


# -- losses with sampled labels (true Fisher) ----------------------------------------------------


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One class per row of ``(m, classes)`` logits, drawn from their softmax."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def sampled_loss(seed: int) -> LossFn:
    """A per-example loss like :func:`~infscope.grads.losses.default_loss` with labels drawn from the model.

    Causal LMs keep the rows' target positions (labels != -100) and the per-row mean over them;
    classifiers and plain models draw one label per row (a Bernoulli draw for float labels). One
    seeded generator serves the batches in order, so a fixed seed and batch order give fixed labels.
    """
    generator = torch.Generator().manual_seed(int(seed))

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise InfscopeError("batch has no 'labels'; encode rows with labels to sample the true Fisher")
        labels = batch["labels"]
        if "inputs" in batch:
            out = model(batch["inputs"])
        else:
            inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
            keep = positions_to_keep(labels) if labels.ndim == 2 else 0
            try:  # project only the positions that predict a target onto the vocabulary
                out = model(**inputs, logits_to_keep=keep) if keep else model(**inputs)
            except TypeError:  # models without ``logits_to_keep``
                out = model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        if labels.ndim == 2:
            labels = labels[:, labels.shape[1] - logits.shape[1] :]
        if labels.is_floating_point():  # one logit per row, binary cross-entropy
            logit = logits.reshape(labels.shape)
            drawn = torch.bernoulli(torch.sigmoid(logit.detach().float()).cpu(), generator=generator)
            return F.binary_cross_entropy_with_logits(logit, drawn.to(logit), reduction="none")
        if labels.ndim == 1:
            return F.cross_entropy(logits, _sample(logits, generator), reduction="none")
        if labels.ndim != 2:
            raise InfscopeError(
                f"labels of shape {tuple(labels.shape)} are not supported; use fisher='empirical'"
            )
        keep = labels[:, 1:] != -100
        pred = logits[:, :-1][keep]
        if pred.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses small losses
            pred = pred.float()
        token = F.cross_entropy(pred, _sample(pred, generator), reduction="none")
        per_row = torch.zeros(keep.shape, dtype=token.dtype, device=token.device).masked_scatter(keep, token)
        return per_row.sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(token.dtype)

    return loss_fn


# -- the covariance pass -------------------------------------------------------------------------


class CovarianceHooks:
    """Hooks summing ``x x^T`` (forward) and ``ds ds^T`` (backward) of chosen linear layers over real tokens.

    Use as a context manager; call :meth:`set_mask` before each forward and :meth:`backward` with
    the ``(b,)`` per-example losses after it. Sums are float64; padded positions add nothing.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        self.modules = resolve_layers(model, layers)
        self.a_sum: dict[str, torch.Tensor] = {}
        self.s_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = None if mask is None else mask.ne(0)

    def _params(self) -> list[torch.Tensor]:
        return [p for m in self.modules.values() for p in (m.weight, m.bias) if p is not None]

    def __enter__(self) -> CovarianceHooks:
        self._flags = [p.requires_grad for p in self._params()]
        for param in self._params():
            param.requires_grad_(True)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in zip(self._params(), self._flags, strict=True):
            param.requires_grad_(flag)

    def _rows(self, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Flatten ``(b, ..., d)`` to ``(tokens, d)``, keeping only real positions when the mask fits."""
        if mask is not None and t.ndim == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
            return t[mask]
        return t.reshape(-1, t.shape[-1])

    def _hook(self, name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            mask = self._mask
            x = self._rows(inputs[0].detach(), mask)
            if module.bias is not None:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            self._add(self.a_sum, name, x)
            self.tokens[name] += int(x.shape[0])
            output.register_hook(lambda g: self._add(self.s_sum, name, self._rows(g.detach(), mask)))

        return hook

    @staticmethod
    def _add(sums: dict[str, torch.Tensor], name: str, rows: torch.Tensor) -> None:
        cov = (rows.T @ rows).double()
        sums[name] = cov if name not in sums else sums[name] + cov

    def backward(self, losses: torch.Tensor) -> None:
        """Back-propagate ``losses.sum()`` so that the output hooks see every ``ds``."""
        if losses.ndim != 1:
            raise InfscopeError(
                f"loss_fn must return one loss per example (shape (b,)), got {tuple(losses.shape)}"
            )
        if not torch.isfinite(losses).all():
            raise InfscopeError("non-finite losses in the K-FAC pass; check the rows or compute in float32")
        if not losses.requires_grad:
            raise InfscopeError("the loss does not depend on the chosen layers; check layers= and loss_fn")
        torch.autograd.grad(losses.sum(), [m.weight for m in self.modules.values()], allow_unused=True)


def _batches(data: Any, batch_size: int, ids: Sequence[str] | None) -> tuple[list[str] | None, Iterator]:
    source = as_row_source(data, ids)
    if source is None:
        return (None if ids is None else [str(i) for i in ids]), iter_ready_batches(data)
    return source.ids, ((s, e, source.batch(s, e)) for s, e in batch_bounds(source.n, batch_size))


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def prefix_depth(names: Sequence[str]) -> int | None:
    """The decoder layer below which none of the modules ``names`` sits (``None``: some are not in a layer).

    Parsed from module names (``...layers.12.self_attn.q_proj``); with LoRA on the top layers only it
    is the first tuned layer, whose input :func:`~infscope.models.prefix.frozen_prefix` can cache.
    """
    found = [lora_layer_indices([name]) for name in names]
    if not found or any(not f for f in found):
        return None
    return min(f[0] for f in found)


@contextlib.contextmanager
def _prefix_cache(
    model: nn.Module, names: Sequence[str], prefix: bool | PrefixStates
) -> Iterator[PrefixStates | None]:
    """Run the block inside :func:`frozen_prefix` at the chosen layers' depth, when asked and possible."""
    if prefix is False:
        yield None
        return
    depth = prefix.depth if isinstance(prefix, PrefixStates) else prefix_depth(names)
    if not depth:
        yield None
        return
    cache = prefix if isinstance(prefix, PrefixStates) else None
    with frozen_prefix(model, cache, depth=depth) as active:
        yield active


def collect_kfac_factors(
    model: nn.Module,
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 8,
    fisher: str = "empirical",
    seed: int = 0,
    ids: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    eigen_correction: bool = False,
    progress_label: str | None = None,
    prefix: bool | PrefixStates = True,
) -> KFACFactors:
    """K-FAC factors of ``layers`` (default: every LoRA matrix) over ``data``, one batched pass.

    ``data`` is encoded rows/columns or ready batches (as for
    :func:`~infscope.grads.hooks.compute_gradients`); ``loss_fn`` the per-example loss of the
    empirical Fisher (default :func:`~infscope.grads.losses.default_loss`); ``fisher="true"``
    replaces the labels by draws from the model (``seed``). ``eigen_correction=True`` adds a
    second pass of per-example gradients (same labels) for EK-FAC's ``lambdas``.

    ``prefix`` (default on) runs both passes from cached hidden states entering the lowest chosen
    decoder layer when all layers sit above the bottom one (LoRA on ``top:N``); pass a
    :class:`~infscope.models.prefix.PrefixStates` to share a cache with other passes, or ``False``
    to run the whole model. ``meta["prefix"]`` records the cache's depth and how many rows it
    stored and served (``None`` when the whole model ran).
    """
    if fisher not in FISHER:
        raise InfscopeError(f"unknown fisher {fisher!r}; use 'empirical' (row labels) or 'true' (sampled)")
    start_time = time.perf_counter()
    hooks = CovarianceHooks(model, layers)
    names = list(hooks.modules)
    device = _device(model)
    base_loss = loss_fn or default_loss
    row_ids, batches = _batches(data, batch_size, ids)
    n = 0
    with _prefix_cache(model, names, prefix) as cache:
        disabled_before = cache is not None and cache.disabled
        with eval_with_grad(model), hooks, row_progress(progress_label, len(row_ids or []) or None) as bar:
            loss = sampled_loss(seed) if fisher == "true" else base_loss
            for _, _, batch in batches:
                batch = _to_device(batch, device)
                hooks.set_mask(batch.get("attention_mask"))
                losses = loss(model, batch)
                hooks.backward(losses)
                n += int(losses.shape[0])
                bar.advance(int(losses.shape[0]))
        if cache is not None and cache.disabled and not disabled_before:
            # the cache switched itself off in this pass's first batch, which then ran twice through
            # the hooks: start again with the whole model (``data`` must be re-iterable, as rows are)
            return collect_kfac_factors(
                model,
                data,
                layers=names,
                batch_size=batch_size,
                fisher=fisher,
                seed=seed,
                ids=ids,
                loss_fn=loss_fn,
                eigen_correction=eigen_correction,
                progress_label=progress_label,
                prefix=False,
            )
        if n == 0:
            raise InfscopeError("no rows to collect K-FAC factors on; pass at least one encoded training row")
        missing = [m for m in names if m not in hooks.s_sum]
        if missing:
            raise InfscopeError(
                f"layer {missing[0]!r} got no output gradient; choose layers the loss depends on"
            )
        factors = {
            m: LayerFactors(
                hooks.a_sum[m] / max(hooks.tokens[m], 1),
                hooks.s_sum[m] / n,
                hooks.modules[m].bias is not None,
            )
            for m in names
        }
        out = KFACFactors(
            factors,
            row_ids if row_ids is not None else [str(i) for i in range(n)],
            fisher=fisher,
            seed=int(seed),
            n_tokens=dict(hooks.tokens),
        )
        if eigen_correction:
            loss = sampled_loss(seed) if fisher == "true" else base_loss
            add_eigen_correction(out, model, data, batch_size=batch_size, loss_fn=loss, ids=ids)
    out.meta["seconds"] = time.perf_counter() - start_time
    out.meta["prefix"] = (
        {"depth": cache.depth, "rows_stored": len(cache), "hits": cache.hits, "misses": cache.misses}
        if cache is not None
        else None
    )
    return out


def add_eigen_correction(
    factors: KFACFactors,
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    ids: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> KFACFactors:
    """Fill every layer's ``lambdas = mean_i (Q_S^T G_i Q_A)^2`` from a pass of per-example gradients.

    The rotation runs in ``dtype`` (default: the model's gradient dtype).
    """
    names = list(factors.layers)
    sums = {
        m: torch.zeros(f.out_features, f.in_features, dtype=torch.float64) for m, f in factors.layers.items()
    }
    n = 0
    for _, _, blocks, losses in iter_gradients(
        model, data, layers=names, block_by="matrix", batch_size=batch_size, loss_fn=loss_fn, ids=ids
    ):
        for m in names:
            grad = blocks[m].detach().cpu()
            sums[m] += rotated_square_sum(grad, factors.layers[m], dtype or grad.dtype)
        n += int(losses.shape[0])
    for m in names:
        factors.layers[m].lambdas = sums[m] / max(n, 1)
    return factors


def cached_kfac_factors(
    directory: str | os.PathLike,
    collect: Callable[[], KFACFactors],
    *,
    ids: Sequence[str],
    fisher: str,
    seed: int,
) -> KFACFactors:
    """Factors saved in ``directory`` when they were made on ``ids`` with this Fisher (and seed), else ``collect()`` and save.

    Each Fisher keeps its own subfolder (``empirical/``, ``true/``), so both can be cached side by side.
    """
    path = Path(directory) / fisher
    with contextlib.suppress(InfscopeError, OSError, KeyError, RuntimeError):
        found = KFACFactors.load(path)
        if (
            found.ids == [str(i) for i in ids]
            and found.fisher == fisher
            and (fisher != "true" or found.seed == seed)
        ):
            return found
    factors = collect()
    factors.save(path)
    return factors
