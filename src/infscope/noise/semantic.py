"""Semantic noise: the text stays fluent but no longer fits the example.

An irrelevant sentence added, topic drift (the last sentence replaced by an off-topic one), a
wrong context (the input replaced by another row's input) and a response swap (the output
replaced by another row's output, a mismatched pair that changes the target).
"""

from __future__ import annotations

import random
from typing import Any

from infscope.noise.banks import IRRELEVANT_SENTENCES, OFF_TOPIC_SENTENCES, WRONG_CONTEXTS
from infscope.noise.registry import NoiseContext, register
from infscope.noise.text import join_sentence, sentence_spans

_DONOR_TRIES = 16


def donor_value(value: Any, rng: random.Random, ctx: NoiseContext, field: str) -> Any:
    """A value of ``field`` from another row that differs from ``value`` (``None`` if there is none).

    A few random picks first, then a scan from a random start, so the result depends only on
    the clean pool (sorted by id) and the row's own generator.
    """
    ids, values = ctx.pools.get(field, ((), ()))
    n = len(values)
    if n == 0:
        return None

    def usable(i: int) -> bool:
        other = values[i]
        return ids[i] != ctx.row_id and isinstance(other, str) and other.strip() != "" and other != value

    for _ in range(_DONOR_TRIES):
        i = rng.randrange(n)
        if usable(i):
            return values[i]
    start = rng.randrange(n)
    for step in range(n):
        i = (start + step) % n
        if usable(i):
            return values[i]
    return None


@register("semantic", 0.5)
def irrelevant_sentence(text: str, rng: random.Random) -> str | None:
    """Insert an unrelated sentence at a sentence boundary (or at the end)."""
    sentence = rng.choice(IRRELEVANT_SENTENCES)
    bounds = [end for _, end in sentence_spans(text)]
    if len(bounds) < 2:
        return join_sentence(text, sentence)
    cut = rng.choice(bounds)
    head, tail = text[:cut], text[cut:]
    return join_sentence(head, sentence) + ("" if tail[:1].isspace() or not tail else " ") + tail


@register("semantic", 0.6)
def topic_drift(text: str, rng: random.Random) -> str | None:
    """Replace the last sentence by an off-topic one (needs at least two sentences)."""
    spans = sentence_spans(text)
    if len(spans) < 2:
        return None
    start, end = spans[-1]
    lead = len(text[start:end]) - len(text[start:end].lstrip())
    new = text[: start + lead] + rng.choice(OFF_TOPIC_SENTENCES) + text[end:]
    return new if new != text else None


@register("semantic", 0.7, fields=("input", "text_b"), context=True)
def wrong_context(text: str, rng: random.Random, ctx: NoiseContext) -> str | None:
    """Replace the input/context by another row's input (or a stock unrelated context)."""
    donor = None
    for field in ("input", "text_b"):
        if field in ctx.pools:
            donor = donor_value(text, rng, ctx, field)
            break
    if donor is None:
        choices = [c for c in WRONG_CONTEXTS if c != text]
        donor = rng.choice(choices)
    return donor


@register("semantic", 0.9, label_changed=True, tasks=("instruction",), fields=("output",), context=True)
def response_swap(text: str, rng: random.Random, ctx: NoiseContext) -> str | None:
    """Replace the output by another row's output: a mismatched instruction/response pair."""
    return donor_value(text, rng, ctx, "output")
