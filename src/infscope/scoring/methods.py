"""Choose methods by name and score them on one set of inputs, timing each.

``all`` means every registered method whose needs the run can provide. Every method goes through
the registry (:mod:`infscope.estimators.registry`); nothing here knows a method by name.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from infscope.defaults import DEFAULT_METHODS
from infscope.errors import InfscopeError
from infscope.estimators.inputs import MethodInputs
from infscope.estimators.registry import METHODS, get_method
from infscope.estimators.scores import Scores
from infscope.runs import PeakMemory


def parse_methods(
    spec: str | Sequence[str], inputs: MethodInputs | None = None, *, keep_all: bool = False
) -> list[str]:
    """Turn ``"datainf,loss"`` into a validated, de-duplicated list of method names.

    ``default`` expands to :data:`~infscope.defaults.DEFAULT_METHODS` (those of the run's task when
    ``inputs`` is given). ``all`` expands
    to every registered method whose needs ``inputs`` can provide (every method when ``inputs`` is
    ``None``), or stays ``"all"`` with ``keep_all`` (a configuration resolved when the run exists).
    """
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    out: list[str] = []
    for name in names:
        if name == "all" and keep_all:
            expanded = ["all"]
        elif (
            name == "default"
        ):  # the defaults of this run's task (xprompt reads instructions, text_oof labels)
            expanded = [m for m in DEFAULT_METHODS if inputs is None or inputs.task in get_method(m).tasks]
        elif name == "all":
            expanded = [m.name for m in METHODS.values() if inputs is None or runnable(m.name, inputs)]
        else:
            expanded = [get_method(name).name]
        out.extend(m for m in expanded if m not in out)
    if not out:
        raise InfscopeError("no method given; pass --method datainf,loss (or 'default' or 'all')")
    return out


def runnable(name: str, inputs: MethodInputs) -> bool:
    """Whether method ``name`` fits the run's task and every need can be provided by ``inputs``."""
    method = get_method(name)
    return inputs.task in method.tasks and all(inputs.available(need) for need in method.needs)


def score_methods(
    methods: Sequence[str],
    inputs: MethodInputs,
    *,
    options: dict[str, dict[str, Any]] | None = None,
    on_method: Callable[[str, float], None] | None = None,
) -> dict[str, Scores]:
    """Score every training row with each method; returns ``{method: Scores}``.

    Each Scores' meta records the method's seconds and peak memory (gradient collection that a
    method triggers counts in the first method that needs it; stages report it separately) and
    any warnings it raised (for example LiSSA blocks that did not converge).
    """
    options = options or {}
    cache = getattr(inputs, "score_cache", None)  # RunInputs keeps what it computed, for fusion
    out: dict[str, Scores] = {}
    for name in methods:
        if cache is not None and name in cache and not options.get(name):
            out[name] = cache[name]
            continue
        method = get_method(name)
        if inputs.task not in method.tasks:
            raise InfscopeError(
                f"method {name} scores {' or '.join(method.tasks)} data, but this run is {inputs.task}; "
                "choose another method (or 'all')"
            )
        missing = [need for need in method.needs if not inputs.available(need)]
        if missing:
            raise InfscopeError(f"method {name} needs {', '.join(missing)}, which this run does not have")
        if not inputs.aggregate and not method.per_query:
            continue
        start = time.perf_counter()
        with PeakMemory() as mem, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = method.compute(inputs, dict(options.get(name, {})))
        seconds = time.perf_counter() - start
        scores.method = name
        scores.meta.update(seconds=round(seconds, 4), peak_rss_mb=round(mem.peak_rss / 2**20, 1))
        if caught:
            scores.meta["warnings"] = [str(w.message) for w in caught[:5]]
            scores.meta["warning_count"] = len(caught)
        out[name] = scores
        if cache is not None and not options.get(name):
            cache[name] = scores
        if on_method:
            on_method(name, seconds)
    return out
