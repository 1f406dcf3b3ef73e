"""Quality noise: the response is still on topic but worse.

A truncated response, duplicated content, a meaningless non-answer and rambling filler.
Duplication and filler are cosmetic (they never add, drop or change a digit); truncation and
the meaningless answer remove content by design and so may remove numbers.
"""

from __future__ import annotations

import random

from infscope.noise.banks import FILLER_PHRASES, FILLER_SENTENCES, MEANINGLESS_ANSWERS
from infscope.noise.registry import register
from infscope.noise.text import has_digit, join_sentence, match_case, sentence_spans, word_spans


@register("quality", 0.5)
def truncate_response(text: str, rng: random.Random) -> str | None:
    """Cut the text after 30-70 % of its words, mid-sentence (needs two words)."""
    spans = word_spans(text)
    n = len(spans)
    if n < 2:
        return None
    keep = min(n - 1, max(1, round(n * rng.uniform(0.3, 0.7))))
    return text[: spans[keep - 1][1]]


@register("quality", 0.4, cosmetic=True)
def duplicate_content(text: str, rng: random.Random) -> str | None:
    """Repeat one sentence right after itself (only sentences without digits)."""
    spans = [(s, e) for s, e in sentence_spans(text) if not has_digit(text[s:e])]
    if not spans:
        return None
    start, end = rng.choice(spans)
    sentence = text[start:end].strip()
    return text[:end] + " " + sentence + text[end:]


@register("quality", 0.8)
def meaningless_answer(text: str, rng: random.Random) -> str | None:
    """Replace the whole text by a non-answer such as "I don't know."."""
    choices = [answer for answer in MEANINGLESS_ANSWERS if answer != text.strip()]
    return rng.choice(choices)


@register("quality", 0.3, cosmetic=True)
def rambling_filler(text: str, rng: random.Random) -> str | None:
    """Pad the text with filler: a hedge before one word, or a vacuous sentence at the end."""
    spans = [(s, e) for s, e in word_spans(text) if not has_digit(text[s:e])]
    if spans and rng.random() < 0.5:
        start, _ = rng.choice(spans)
        phrase = rng.choice(FILLER_PHRASES)
        at_sentence_start = start == 0 or text[:start].rstrip()[-1:] in ".!?\n" or not text[:start].strip()
        if at_sentence_start:
            phrase = match_case(phrase, "A")
        return text[:start] + phrase + " " + text[start:]
    return join_sentence(text, rng.choice(FILLER_SENTENCES))
