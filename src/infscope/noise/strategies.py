"""Strategies: how the noisy rows are split between families (or single operators).

A strategy is a weight per family: ``balanced`` 0.40/0.35/0.25, ``grammar_heavy`` 0.60/0.25/0.15,
``semantic_heavy`` 0.20/0.60/0.20 (grammar/semantic/quality), ``label`` (all label noise, the
natural choice for classification) and ``all`` (every family equally, label included where it
applies). Custom weights such as ``grammar=0.5,label=0.5`` may also name single operators
(``label_flip_balanced=1``); they are normalised and must sum to a positive number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from infscope.errors import InfscopeError
from infscope.noise.registry import FAMILIES, all_operators

STRATEGIES: dict[str, dict[str, float] | None] = {
    "balanced": {"grammar": 0.40, "semantic": 0.35, "quality": 0.25},
    "grammar_heavy": {"grammar": 0.60, "semantic": 0.25, "quality": 0.15},
    "semantic_heavy": {"grammar": 0.20, "semantic": 0.60, "quality": 0.20},
    "label": {"label": 1.0},
    "all": None,  # every family equally; label only where it applies (see ``resolve_weights``)
}
CUSTOM = "custom"


def parse_weights(spec: str | Mapping[str, Any]) -> dict[str, float]:
    """Parse ``"grammar=0.5,label=0.5"`` (or a mapping) into raw, unnormalised weights."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise InfscopeError(
                    f"weight '{part.strip()}' has no '='; write weights like grammar=0.5,label=0.5"
                )
            items.append((key.strip(), value.strip()))
    out: dict[str, float] = {}
    for key, value in items:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InfscopeError(
                f"weight for '{key}' is not a number ({value!r}); write e.g. {key}=0.5"
            ) from None
        if not math.isfinite(number) or number < 0:
            raise InfscopeError(
                f"weight for '{key}' must be a finite number >= 0, got {value}; fix --weights"
            )
        out[key] = out.get(key, 0.0) + number
    return out


def normalise(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate keys (families or operator names), drop zeros and scale to sum 1."""
    operators = all_operators()
    for key in weights:
        if key not in FAMILIES and key not in operators:
            raise InfscopeError(
                f"unknown noise family or operator '{key}' in weights; families: {', '.join(FAMILIES)}; "
                "see `infscope noise --help` for operators"
            )
    total = sum(weights.values())
    if not total > 0:
        raise InfscopeError("noise weights must sum to a positive number; give at least one weight > 0")
    return {key: value / total for key, value in sorted(weights.items()) if value > 0}


def split_strategies(spec: str | Sequence[str]) -> list[str]:
    """``"balanced,grammar_heavy"`` -> list of names, each checked; order and duplicates kept out."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise InfscopeError("no noise strategy given; use e.g. --strategy balanced")
    for name in names:
        if name not in STRATEGIES and name != CUSTOM:
            raise InfscopeError(
                f"unknown noise strategy '{name}'; choose from {', '.join(STRATEGIES)} or pass --weights"
            )
    return list(dict.fromkeys(names))


def resolve_weights(
    strategy: str, weights: str | Mapping[str, Any] | None, *, label_applicable: bool
) -> tuple[str, dict[str, float]]:
    """The strategy's name and its normalised unit weights (keys are families or operators).

    Explicit ``weights`` win over ``strategy`` and name the result ``custom``.
    """
    if weights is not None and (not isinstance(weights, str) or weights.strip()):
        return CUSTOM, normalise(parse_weights(weights))
    if strategy not in STRATEGIES:
        raise InfscopeError(
            f"unknown noise strategy '{strategy}'; choose from {', '.join(STRATEGIES)} or pass --weights"
        )
    preset = STRATEGIES[strategy]
    if preset is None:
        families = [f for f in FAMILIES if f != "label" or label_applicable]
        preset = {family: 1.0 for family in families}
    return strategy, normalise(preset)
