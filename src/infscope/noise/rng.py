"""Order-independent randomness for noise injection.

Every random choice about a row derives from ``(seed, row id, tag)`` through a keyed hash, never
from a shared generator that advances row by row. The same seed therefore gives the same noise
for a row whatever the row order, the other rows, the other ratios requested, or whether
anything else ran first.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np

_SEP = "\x1f"


def stable_hash(seed: int, row_id: str, tag: str) -> int:
    """A 64-bit integer that depends only on ``(seed, row_id, tag)`` (blake2b, platform-stable)."""
    key = f"{seed}{_SEP}{row_id}{_SEP}{tag}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def row_rng(seed: int, row_id: str, tag: str) -> random.Random:
    """A private generator for one decision (``tag``) about one row."""
    return random.Random(stable_hash(seed, row_id, tag))


def rank_keys(seed: int, ids: Sequence[str], tag: str) -> np.ndarray:
    """Hash keys (uint64) of ``ids``; sorting by them gives an order that ignores input order."""
    return np.fromiter((stable_hash(seed, row_id, tag) for row_id in ids), dtype=np.uint64, count=len(ids))


def hash_order(seed: int, ids: Sequence[str], tag: str) -> np.ndarray:
    """Indices of ``ids`` sorted by their hash key (ties broken by the id itself)."""
    keys = rank_keys(seed, ids, tag)
    id_array = np.asarray(ids, dtype=object)
    return np.lexsort((id_array.astype(str), keys))
