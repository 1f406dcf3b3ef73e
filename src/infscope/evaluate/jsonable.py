"""Turn evaluation results into strict JSON: numpy to Python, NaN/inf to ``None``, frames to records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    Dict keys become strings, numpy arrays and tuples become lists, numpy scalars become Python
    numbers, non-finite floats become ``None``, DataFrames become lists of row dicts.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, pd.DataFrame):
        return [to_jsonable(record) for record in obj.to_dict(orient="records")]
    if isinstance(obj, (pd.Series, np.ndarray, list, tuple)):
        return [to_jsonable(value) for value in (obj.tolist() if hasattr(obj, "tolist") else obj)]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)
