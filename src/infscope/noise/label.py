"""Label noise: the target itself becomes wrong.

For classification, a label flip to another class: uniform over the other classes (as in the
DataInf paper) or class-balanced (rarer classes receive more flips, ``label_flip_balanced``,
used only when named in weights). For math-style instruction data, a wrong numeric answer: the
last number of the output (the final answer) is shifted.
"""

from __future__ import annotations

import random
import re
from typing import Any

from infscope.noise.registry import NoiseContext, register

NUMBER_RE = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?")


@register("label", 1.0, label_changed=True, tasks=("classification",), fields=("label",), context=True)
def label_flip(label: Any, rng: random.Random, ctx: NoiseContext) -> Any:
    """Replace the label by another class, uniformly at random."""
    others = [c for c in ctx.classes if c != label]
    return rng.choice(others) if others else None


@register(
    "label",
    1.0,
    label_changed=True,
    tasks=("classification",),
    fields=("label",),
    context=True,
    default=False,
)
def label_flip_balanced(label: Any, rng: random.Random, ctx: NoiseContext) -> Any:
    """Replace the label by another class drawn with weight 1/frequency (class-balanced flips)."""
    others = [c for c in ctx.classes if c != label]
    if not others:
        return None
    weights = [1.0 / max(1, ctx.class_counts.get(c, 1)) for c in others]
    return rng.choices(others, weights=weights, k=1)[0]


def shift_number(token: str, rng: random.Random) -> str:
    """A different number written like ``token`` (same decimals, thousands commas kept)."""
    commas = "," in token
    digits = token.replace(",", "")
    whole, _, frac = digits.partition(".")
    scaled = int(whole + frac)
    span = max(1, scaled // 2)
    delta = rng.randint(1, span) * rng.choice((-1, 1))
    new = scaled + delta if scaled + delta >= 0 else scaled - delta
    if frac:
        text = f"{new:0{len(frac) + 1}d}"
        head, tail = text[: -len(frac)], text[-len(frac) :]
        return (f"{int(head):,}" if commas else head) + "." + tail
    return f"{new:,}" if commas else str(new)


@register("label", 0.9, label_changed=True, tasks=("instruction",), fields=("output",))
def wrong_numeric(text: str, rng: random.Random) -> str | None:
    """Change the final number of a math-style answer to a wrong value."""
    matches = list(NUMBER_RE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return text[: last.start()] + shift_number(last.group(), rng) + text[last.end() :]
