"""The MTM check: may "keep the top-k rows by value" be trusted for this utility?

Wang, Yang, Zou, Kwon & Jia ("Rethinking Data Shapley for Data Selection Tasks", ICML 2024) show that
selecting the top-k rows by a data value is optimal when the utility is a monotone transformation of
a modular function (MTM): ``U(S) = g(sum_{i in S} v_i)`` with ``g`` non-decreasing; far from MTM,
value-based selection can do worse than random. This check measures how far the sampled utilities
are from MTM *with the given values as the modular part*: it fits the best non-decreasing ``g`` by
isotonic regression of ``U(S)`` on ``s(S) = sum_{i in S} values_i`` and reports

- ``r2``: ``1 - SS_res / SS_tot`` of that fit (1 = exactly MTM; 0 = no better than a constant),
- ``nrmse``: RMSE of the fit divided by the standard deviation of the utilities,
- ``r2_heldout``: the same R^2 when ``g`` is fitted on one half of the subsets and evaluated on the
  other (two folds, split by ``seed``): isotonic regression is flexible, and this guards against
  reading noise as structure when there are few subsets.

``trustworthy`` is ``r2_heldout >= threshold`` (default 0.9), a heuristic flag, not a guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infscope.errors import InfscopeError


@dataclass(frozen=True)
class MTMCheck:
    """Result of :func:`mtm_check`; see the module docstring for each field."""

    r2: float
    nrmse: float
    r2_heldout: float
    n_subsets: int
    trustworthy: bool


def _r2(target: np.ndarray, fitted: np.ndarray) -> float:
    """Coefficient of determination; a constant target that is fitted exactly scores 1."""
    residual = float(np.sum((target - fitted) ** 2))
    total = float(np.sum((target - target.mean()) ** 2))
    if total <= 1e-300:
        return 1.0 if residual <= 1e-24 else 0.0
    return 1.0 - residual / total


def mtm_check(
    values: object, subsets: object, utilities: object, *, threshold: float = 0.9, seed: int = 0
) -> MTMCheck:
    """How well ``utilities`` are a non-decreasing function of the summed ``values`` over ``subsets``.

    ``values``: one value per row (length n, higher = more valuable). ``subsets``: (m x n) boolean or
    0/1 membership masks, e.g. ``SampledValues.subsets``. ``utilities``: the m utilities.
    """
    # scikit-learn is an optional dependency (the "test" extra); imported only when this check runs.
    from sklearn.isotonic import IsotonicRegression

    value = np.asarray(values, dtype=np.float64)
    masks = np.asarray(subsets)
    target = np.asarray(utilities, dtype=np.float64)
    if value.ndim != 1 or masks.ndim != 2 or masks.shape[1] != len(value) or target.shape != (len(masks),):
        raise InfscopeError(
            f"mtm_check needs values (n), subsets (m x n) and utilities (m); got shapes {value.shape}, "
            f"{masks.shape}, {target.shape}"
        )
    if len(target) < 4:
        raise InfscopeError(f"mtm_check needs at least 4 subsets, got {len(target)}; record more subsets")
    if not (np.isfinite(value).all() and np.isfinite(target).all()):
        raise InfscopeError("values and utilities must be finite; drop NaN rows before the MTM check")
    sums = masks.astype(np.float64) @ value
    fitted = IsotonicRegression(increasing=True).fit(sums, target).predict(sums)
    spread = float(target.std())
    rmse = float(np.sqrt(np.mean((target - fitted) ** 2)))
    nrmse = rmse / spread if spread > 1e-300 else (0.0 if rmse <= 1e-12 else float("inf"))

    fold = np.random.default_rng(seed).permutation(len(target)) % 2 == 0
    heldout = np.empty_like(target)
    for part in (fold, ~fold):
        model = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(sums[~part], target[~part])
        heldout[part] = model.predict(sums[part])
    r2_heldout = _r2(target, heldout)
    return MTMCheck(
        r2=_r2(target, fitted),
        nrmse=nrmse,
        r2_heldout=r2_heldout,
        n_subsets=len(target),
        trustworthy=bool(r2_heldout >= threshold),
    )
