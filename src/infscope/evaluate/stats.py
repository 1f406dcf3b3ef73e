"""Student's t distribution for confidence intervals over a handful of seeds, without scipy.

For whole degrees of freedom the t CDF has a closed form in ``theta = atan(t / sqrt(df))``
(a finite trigonometric series, odd and even ``df`` separately); the quantile inverts it by bisection.
Exact to ~1e-12, which is far below what a seed-level confidence interval needs.
"""

from __future__ import annotations

import math


def _check_df(df: int) -> int:
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df!r}")
    return int(df)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (whole) degrees of freedom."""
    df = _check_df(df)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # odd: 1/2 + (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)) / pi
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        upper_half = (theta + math.sin(theta) * math.cos(theta) * series) / math.pi
    else:  # even: 1/2 + sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...) / 2
        term, series = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        upper_half = math.sin(theta) * series / 2.0
    return 0.5 + upper_half if t >= 0 else 0.5 - upper_half


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``)."""
    df = _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    high = 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0


def t_critical(confidence: float, n: int) -> float:
    """Two-sided critical value for a ``confidence`` interval of a mean of ``n >= 2`` values."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return t_quantile(0.5 + confidence / 2.0, n - 1)
