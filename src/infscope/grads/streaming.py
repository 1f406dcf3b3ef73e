"""Aggregate influence scores computed inside the gradient pass, without keeping any row's gradient.

For one query vector ``v`` (the mean query gradient, per block ``b``), the four aggregate scores
need only a few numbers per row and a few vectors per block. Write ``a_ib = g_ib . v_b`` and
``q_ib = ||g_ib||^2``:

- ``hessian_free``: ``-sum_b a_ib``;
- ``grad_cos``: ``-sum_b a_ib / (||v|| sqrt(sum_b q_ib))``;
- ``datainf``: DataInf's inverse applied to ``v`` per block is
  ``u_b = (v_b - (1/n) sum_i w_ib g_ib) / lam_b`` with ``w_ib = a_ib / (lam_b + q_ib)`` and
  ``lam_b = scale * (1/n) sum_i q_ib / d_b``; the score is ``-sum_b u_b . g_ib``;
- ``datainf_cos``: ``-sum_b u_b . g_ib / (||u|| sqrt(sum_b q_ib))``.

DataInf is *not* a function of the per-row scalars alone: expanding ``u_b . g_zb`` gives
``(a_zb - (1/n) sum_i w_ib (g_ib . g_zb)) / lam_b``, which pairs every row with every other row.
What streams is the weighted sum ``s_b = sum_i w_ib g_ib`` (one ``d_b`` vector per block), and
``w_ib`` needs ``lam_b``, which needs the squared norms of *all* rows. So DataInf takes three
gradient passes: (1) the per-row scalars and ``lam_b``; (2) ``s_b``; (3) ``u_b . g_ib`` per row.
With the damping given (``damping=``), passes 1 and 2 merge. ``hessian_free`` and ``grad_cos``
need pass 1 only. Memory is one batch of gradients, ``O(d)`` per block and ``O(n)`` per score:
it does not grow with the rows' gradients, unlike a :class:`~infscope.grads.store.GradientStore`.

All sums are in float64 (``dtype``). Blocks whose gradients are all zero get damping 0 from the
rule and add nothing to the DataInf scores, as in the store-based estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from infscope.errors import InfscopeError
from infscope.grads.batching import as_row_source
from infscope.grads.hooks import BatchSizer, PerExampleGradients, iter_gradients

METHODS = ("datainf", "hessian_free", "grad_cos", "datainf_cos")
#: The methods that need DataInf's preconditioned query ``u`` (and so the extra passes).
DATAINF = ("datainf", "datainf_cos")
Damping = float | Mapping[str, float] | None


@dataclass
class StreamedScores:
    """Per-method aggregate scores (higher = more harmful) with the row ids and how they were made."""

    ids: list[str]
    scores: dict[str, np.ndarray]
    damping: dict[str, float] = field(default_factory=dict)
    passes: int = 1
    batch_size_used: int = 0

    def __getitem__(self, method: str) -> np.ndarray:
        if method not in self.scores:
            raise InfscopeError(f"no streamed scores for {method!r}; computed: {', '.join(self.scores)}")
        return self.scores[method]


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The requested methods, refusing unknown names and an empty list."""
    methods = tuple(dict.fromkeys(str(m) for m in methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InfscopeError(f"method {unknown[0]!r} cannot be streamed; use some of {', '.join(METHODS)}")
    if not methods:
        raise InfscopeError(f"no methods given; pass some of {', '.join(METHODS)}")
    return methods


def query_vectors(
    query: Mapping[str, Any], dims: Mapping[str, int], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The query vector of every block as a flat ``(d,)`` tensor, checked against the block dims.

    A block given as ``(q, d)`` rows is averaged (the mean query gradient).
    """
    missing = [name for name in dims if name not in query]
    if missing:
        raise InfscopeError(
            f"query vector lacks block {missing[0]!r}; compute the query gradient on the same layers and block_by"
        )
    out = {}
    for name, d in dims.items():
        v = torch.as_tensor(query[name]).detach().to("cpu", dtype)
        if v.ndim == 2:
            v = v.mean(dim=0)
        if v.ndim != 1 or v.shape[0] != d:
            raise InfscopeError(
                f"query block {name!r} has shape {tuple(v.shape)}, expected ({d},); use the same model and projection"
            )
        out[name] = v
    return out


def rule_damping(sum_sq: float, n: int, d: int, scale: float) -> float:
    """DataInf's damping ``scale * mean_i ||g_i||^2 / d`` from the sum of squared norms."""
    return scale * sum_sq / n / d


def given_damping(damping: Damping, names: Sequence[str]) -> dict[str, float] | None:
    """Per-block damping when every block's is given (float or full dict), else ``None`` (use the rule)."""
    if damping is None:
        return None
    if isinstance(damping, Mapping):
        unknown = sorted(set(damping) - set(names))
        if unknown:
            raise InfscopeError(
                f"damping given for unknown block {unknown[0]!r}; use the gradient block names"
            )
        if set(damping) != set(names):
            return None
        values = {name: float(damping[name]) for name in names}
    else:
        values = dict.fromkeys(names, float(damping))
    bad = [name for name, lam in values.items() if not math.isfinite(lam) or lam <= 0]
    if bad:
        raise InfscopeError(
            f"damping {values[bad[0]]} for block {bad[0]!r} is invalid; pass a positive number"
        )
    return values


class _Pass:
    """Runs the gradient pass batch by batch, handing each batch's float64 blocks to a callback."""

    def __init__(self, model: nn.Module, data: Any, dtype: torch.dtype, **kwargs: Any) -> None:
        self.model, self.data, self.dtype, self.kwargs = model, data, dtype, kwargs
        self.sizer = BatchSizer(int(kwargs["batch_size"]))
        self.count = 0

    def batches(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        self.count += 1
        for start, stop, blocks, _ in iter_gradients(self.model, self.data, sizer=self.sizer, **self.kwargs):
            yield start, stop, {name: t.to("cpu", self.dtype) for name, t in blocks.items()}


def scalars(G: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g . v, ||g||^2)`` of every row of one batch block."""
    return G @ v, torch.linalg.vector_norm(G, dim=1).square()


def cosine(dot: torch.Tensor, sq: torch.Tensor, vector_sq: float) -> torch.Tensor:
    """``dot / (sqrt(vector_sq) sqrt(sq))``, 0 where either norm is 0 (as the store-based cosine)."""
    tiny = torch.finfo(torch.float64).tiny
    return dot / (math.sqrt(vector_sq) * sq.sqrt()).clamp_min(tiny)


def final_scores(
    methods: Sequence[str],
    v: Mapping[str, torch.Tensor],
    u: Mapping[str, torch.Tensor],
    dot: torch.Tensor,
    sq: torch.Tensor,
    influence: torch.Tensor | None,
    active_sq: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    """Each method's scores (higher = more harmful, in ``methods`` order) from the per-row sums.

    ``dot`` and ``sq`` are ``sum_b g_ib . v_b`` and ``sum_b ||g_ib||^2``; ``influence`` and
    ``active_sq`` (needed for the DataInf methods only) are ``sum_b u_b . g_ib`` and the squared
    norms over the blocks of ``u`` (those with positive damping).
    """
    scores: dict[str, np.ndarray] = {}
    if "hessian_free" in methods:
        scores["hessian_free"] = (-dot).numpy()
    if "grad_cos" in methods:
        v_sq = sum(float(t.double().square().sum()) for t in v.values())
        scores["grad_cos"] = (-cosine(dot, sq, v_sq)).numpy()
    if "datainf" in methods:
        scores["datainf"] = (-influence).numpy()
    if "datainf_cos" in methods:
        u_sq = sum(float(t.double().square().sum()) for t in u.values())
        scores["datainf_cos"] = (-cosine(influence, active_sq, u_sq)).numpy()
    return {m: scores[m] for m in methods}


def stream_scores(
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
    on_pass: Callable[[int], None] | None = None,
) -> StreamedScores:
    """Aggregate scores of every training row against ``query_vector_blocks`` ({block: (d,)}), streamed.

    Runs one gradient pass for ``hessian_free``/``grad_cos`` and three for ``datainf``/
    ``datainf_cos`` (two when ``damping`` gives every block's damping); see the module docstring for
    the algebra. ``encoded_train`` must be addressable by row (encoded columns or rows), since it is
    read once per pass. ``damping_scale`` is DataInf's rule ``scale * mean ||g||^2 / d`` per block.
    ``on_pass(k)`` is called as pass ``k`` (1-based) starts. Scores equal the store-based
    estimators' aggregate scores (``query_mean="gradient"`` for the cosines) up to rounding.
    """
    methods = check_methods(methods)
    if damping_scale <= 0:
        raise InfscopeError(f"damping_scale {damping_scale} must be positive; the DataInf paper uses 0.1")
    source = as_row_source(encoded_train, ids)
    if source is None:
        raise InfscopeError(
            "stream_scores reads the rows once per pass; pass encoded columns or rows, not an iterator of batches"
        )
    engine = PerExampleGradients(model, layers)
    layout = engine.layout(block_by)
    dims = layout.dims if projection is None else projection.out_dims(layout.dims)
    v = query_vectors(query_vector_blocks, dims, dtype)
    n = source.n
    if n == 0:
        raise InfscopeError("no training rows to score; pass at least one encoded row")
    runner = _Pass(
        model,
        source,
        dtype,
        layers=engine.layer_names,
        block_by=block_by,
        batch_size=batch_size,
        loss_fn=loss_fn,
        projection=projection,
    )

    def start_pass() -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        if on_pass is not None:
            on_pass(runner.count + 1)
        return runner.batches()

    want_datainf = any(m in DATAINF for m in methods)
    lams = given_damping(damping, list(dims))
    dot = torch.zeros(n, dtype=torch.float64)  # sum_b g_ib . v_b
    sq = torch.zeros(n, dtype=torch.float64)  # sum_b ||g_ib||^2
    block_sq = dict.fromkeys(dims, 0.0)  # sum_i ||g_ib||^2
    weighted = {name: torch.zeros(d, dtype=dtype) for name, d in dims.items()}  # s_b = sum_i w_ib g_ib

    def accumulate(G: torch.Tensor, name: str, a: torch.Tensor, q: torch.Tensor, lam: float) -> None:
        weighted[name] += (a / (lam + q)) @ G

    # Pass 1: per-row scalars and the damping (plus s_b when the damping is already known).
    for start, stop, blocks in start_pass():
        for name, G in blocks.items():
            a, q = scalars(G, v[name])
            dot[start:stop] += a.double()
            sq[start:stop] += q.double()
            block_sq[name] += float(q.double().sum())
            if want_datainf and lams is not None:
                accumulate(G, name, a, q, lams[name])
    if lams is None:
        lams = {name: rule_damping(block_sq[name], n, d, damping_scale) for name, d in dims.items()}
        if want_datainf:  # Pass 2: s_b with the damping of every block now known.
            for _, _, blocks in start_pass():
                for name, G in blocks.items():
                    if lams[name] > 0:
                        accumulate(G, name, *scalars(G, v[name]), lams[name])
    u: dict[str, torch.Tensor] = {}
    influence = active_sq = None
    if want_datainf:
        active = [name for name in dims if lams[name] > 0]
        u = {name: (v[name] - weighted[name] / n) / lams[name] for name in active}
        influence = torch.zeros(n, dtype=torch.float64)  # sum_b u_b . g_ib
        active_sq = torch.zeros(n, dtype=torch.float64)  # sum over active blocks of ||g_ib||^2
        # Last pass: every row against the preconditioned query u.
        for start, stop, blocks in start_pass():
            for name in active:
                G = blocks[name]
                influence[start:stop] += (G @ u[name]).double()
                active_sq[start:stop] += torch.linalg.vector_norm(G, dim=1).square().double()
    scores = final_scores(methods, v, u, dot, sq, influence, active_sq)
    return StreamedScores(source.ids, scores, dict(lams), runner.count, runner.sizer.size)
