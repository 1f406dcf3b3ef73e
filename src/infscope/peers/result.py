"""What every peer adapter returns, and the guard that turns a peer's failure into a table row.

Peers are other projects' implementations (kronfluence, dattri, cleanlab) plus our own plain-loop
reference. They are compared side by side, so one that crashes, runs out of memory or is not
installed must not stop the others: :func:`guarded` times a call, samples its peak memory and
returns a :class:`PeerResult` whose ``error`` says what went wrong instead of raising.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infscope.runs import PeakMemory

SIGN = "higher = more harmful to the query loss"


@dataclass
class PeerResult:
    """One peer's scores for every training row, in our sign convention (higher = more harmful).

    ``scores`` is ``(n_train,)`` aligned with ``train_ids``, or ``None`` when the peer failed; then
    ``error`` holds one line saying why (not installed, not applicable, out of memory, ...).
    ``seconds`` and ``peak_mb`` measure the whole peer call (model load, factors and scores).
    """

    method: str
    scores: np.ndarray | None
    seconds: float
    peak_mb: float
    error: str | None = None
    train_ids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the peer produced scores."""
        return self.error is None and self.scores is not None

    def as_row(self) -> dict[str, Any]:
        """The cost columns of a comparison table."""
        return {
            "method": self.method,
            "seconds": round(self.seconds, 3),
            "peak_mb": round(self.peak_mb, 1),
            "error": self.error,
        }


class PeerUnavailable(Exception):
    """Raised inside an adapter when the peer cannot run here (not installed, not applicable)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if isinstance(exc, PeerUnavailable):
        return text
    return f"{name}: {text}"[:300] if text else name


def guarded(
    method: str, train_ids: list[str], compute: Callable[[], tuple[np.ndarray, dict[str, Any]]]
) -> PeerResult:
    """Run ``compute() -> (scores, meta)`` under a timer and a memory sampler; never raises.

    Any exception (including ``MemoryError`` and a missing import) becomes ``PeerResult.error``;
    ``KeyboardInterrupt`` still propagates. Scores must be finite and one per training row.
    """
    start = time.perf_counter()
    scores: np.ndarray | None = None
    meta: dict[str, Any] = {}
    error: str | None = None
    with PeakMemory() as mem:
        try:
            raw, meta = compute()
            scores = np.asarray(raw, dtype=np.float64).reshape(-1)
            if scores.shape[0] != len(train_ids):
                raise ValueError(f"peer returned {scores.shape[0]} scores for {len(train_ids)} training rows")
            if not np.isfinite(scores).all():
                raise ValueError(f"peer returned {int((~np.isfinite(scores)).sum())} non-finite scores")
        except ImportError as exc:
            scores, error = None, f"not installed: {exc.name or exc} (pip install the 'peers' extra)"
        except Exception as exc:  # noqa: BLE001 - every peer failure becomes a table row
            scores, error = None, _one_line(exc)
    seconds = time.perf_counter() - start
    meta = {"sign": SIGN, **meta}
    return PeerResult(method, scores, seconds, mem.peak_rss / 2**20, error, list(train_ids), meta)
