"""The :class:`Method` record: one row of the method table, and the option check every method uses.

A method module (``pair``, ``dynamics``, ``shapley``, ...) builds its own ``Method`` rows from this
small module and lists them in a module-level ``METHODS``; :mod:`infscope.estimators.registry`
collects them, so adding a method touches neither scoring nor the other methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infscope.errors import InfscopeError
from infscope.estimators.inputs import MethodInputs
from infscope.estimators.scores import Scores


def check_options(name: str, target: Callable, options: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(target).parameters if p not in ("self", "inputs")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InfscopeError(
            f"method {name!r} has no option {unknown[0]!r}; its options are {', '.join(accepted) or 'none'}"
        )


Compute = Callable[[MethodInputs, dict[str, Any]], Scores]


@dataclass(frozen=True)
class Method:
    """One scoring method: name, needs, how to compute it, and a one-line summary for ``--help``.

    ``per_query``: the method can return one row per query (``aggregate=False``), for attribution.
    ``family``: a label for tables (``influence``, ``baseline``, ``pair``, ``dynamics``, ...).
    """

    name: str
    needs: tuple[str, ...]
    compute: Compute
    summary: str
    family: str = "influence"
    per_query: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] = ("instruction", "classification")
