"""Estimators by name: ``get_estimator("datainf", damping_scale=0.1)``."""

from __future__ import annotations

import inspect
from typing import Any

from infscope.errors import InfscopeError
from infscope.estimators.base import Estimator
from infscope.estimators.datainf import DataInf
from infscope.estimators.exact import Exact
from infscope.estimators.hessian_free import HessianFree
from infscope.estimators.lissa import LiSSA

ESTIMATORS: dict[str, type] = {
    "datainf": DataInf,
    "lissa": LiSSA,
    "exact": Exact,
    "hessian_free": HessianFree,
    "tracin": HessianFree,
}


def get_estimator(name: str, **kwargs: Any) -> Estimator:
    """A new estimator by registry name, with keyword options checked against its constructor."""
    key = name.strip().lower().replace("-", "_")
    if key not in ESTIMATORS:
        raise InfscopeError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    cls = ESTIMATORS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise InfscopeError(
            f"estimator {key!r} has no option {unknown[0]!r}; its options are {', '.join(accepted) or 'none'}"
        )
    return cls(**kwargs)
