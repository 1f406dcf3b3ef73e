"""Small text helpers shared by the noise operators: tokens, sentences, digits and case.

Operators edit text through word spans (``\\S+`` matches) so that the whitespace between words
is kept byte for byte, and they skip every token that holds a digit so that cosmetic noise never
changes a number.
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"\S+")
# A sentence ends at a run of . ! ? followed by whitespace or the end (so 3.14 and e.g.x do not
# split), or at newlines. The look-behind makes every run match once: linear time on any input.
BOUNDARY_RE = re.compile(r"(?<![.!?])[.!?]+(?=\s|$)|\n+")
PUNCT_CHARS = ".,;:!?"
NUMERIC_RE_ASCII = re.compile(r"[0-9]")


def has_digit(token: str) -> bool:
    """Whether ``token`` holds any digit character (any script; ASCII text takes a fast path)."""
    if token.isascii():
        return NUMERIC_RE_ASCII.search(token) is not None
    return any(ch.isdigit() for ch in token)


def digit_sequence(text: str) -> str:
    """The digits of ``text`` in order: equal before and after a cosmetic edit."""
    return "".join(ch for ch in text if ch.isdigit())


def word_spans(text: str) -> list[tuple[int, int]]:
    """Start and end offsets of the whitespace-separated tokens of ``text``."""
    return [m.span() for m in WORD_RE.finditer(text)]


def split_core(token: str) -> tuple[str, str, str]:
    """Split a token into leading punctuation, word core and trailing punctuation."""
    word = [i for i, ch in enumerate(token) if ch.isalnum() or ch == "_"]
    if not word:
        return token, "", ""
    return token[: word[0]], token[word[0] : word[-1] + 1], token[word[-1] + 1 :]


def replace_span(text: str, start: int, end: int, new: str) -> str:
    """``text`` with ``text[start:end]`` replaced by ``new``."""
    return text[:start] + new + text[end:]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Offsets of the sentences of ``text`` that hold at least one non-space character."""
    spans, start = [], 0
    for match in BOUNDARY_RE.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def match_case(word: str, template: str) -> str:
    """``word`` cased like ``template`` (all upper, capitalised or as given)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def join_sentence(text: str, sentence: str) -> str:
    """Append ``sentence`` to ``text`` with one separating space (or none if ``text`` is blank)."""
    stripped = text.rstrip()
    if not stripped:
        return sentence
    return stripped + " " + sentence + text[len(stripped) :]
