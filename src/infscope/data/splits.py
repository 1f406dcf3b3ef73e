"""Seeded train/validation split of loaded rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from infscope.errors import InfscopeError


def split_validation(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of ``rows`` into (train, validation); at least one row on each side when possible."""
    if not 0.0 <= fraction < 1.0:
        raise InfscopeError(f"--val-fraction must be in [0, 1), got {fraction}; pass e.g. 0.1")
    n_val = int(round(fraction * len(rows)))
    if fraction > 0 and len(rows) >= 2:
        n_val = min(max(n_val, 1), len(rows) - 1)
    order = np.random.default_rng(seed).permutation(len(rows))
    val_pos = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(rows) if i not in val_pos]
    val = [r for i, r in enumerate(rows) if i in val_pos]
    return train, val
