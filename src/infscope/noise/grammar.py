"""Grammar noise: label-preserving, low-severity surface errors.

Typos (misspelling table, adjacent transposition, QWERTY neighbour), a local word swap,
punctuation errors and agreement errors. All are cosmetic: a token that holds a digit is never
touched, so numbers and decimal points survive byte for byte.
"""

from __future__ import annotations

import random

from infscope.noise.registry import register
from infscope.noise.text import PUNCT_CHARS, has_digit, match_case, replace_span, split_core, word_spans

# Common English misspellings (correct -> misspelt), the kind people really make.
MISSPELLINGS = {
    "receive": "recieve", "believe": "beleive", "separate": "seperate", "definitely": "definately",
    "occurred": "occured", "until": "untill", "which": "wich", "their": "thier", "because": "becuase",
    "beginning": "begining", "necessary": "neccessary", "accommodate": "accomodate", "address": "adress",
    "achieve": "acheive", "argument": "arguement", "calendar": "calender", "committee": "commitee",
    "environment": "enviroment", "government": "goverment", "immediately": "immediatly",
    "independent": "independant", "knowledge": "knowlege", "library": "libary", "occasion": "occassion",
    "possession": "posession", "really": "realy", "recommend": "reccomend", "successful": "succesful",
    "surprise": "suprise", "tomorrow": "tommorow", "truly": "truely", "weird": "wierd", "writing": "writting",
    "different": "diffrent", "important": "importent", "information": "infomation", "people": "poeple",
    "probably": "probaly", "question": "questoin", "sentence": "sentance", "should": "shoud",
    "the": "teh", "there": "ther", "through": "thru", "what": "waht", "with": "wiht", "would": "woud",
    "example": "exmaple", "language": "langauge", "answer": "anwser", "friend": "freind",
    "government's": "goverment's", "similar": "similiar", "business": "buisness", "experience": "experiance",
    "interest": "intrest", "world": "wrold", "could": "coud", "about": "abuot", "every": "evrey",
}  # fmt: skip

QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _qwerty_neighbours() -> dict[str, str]:
    """Keys touching each letter: same row left/right, and the two keys above and below.

    Rows are staggered: the keys above column ``c`` are ``c`` and ``c + 1`` of the row above,
    the keys below are ``c - 1`` and ``c`` of the row below.
    """
    pos = {ch: (r, c) for r, row in enumerate(QWERTY_ROWS) for c, ch in enumerate(row)}
    touching = {0: (-1, 1), -1: (0, 1), 1: (-1, 0)}
    out = {}
    for ch, (r, c) in pos.items():
        near = [other for other, (r2, c2) in pos.items() if r2 - r in touching and c2 - c in touching[r2 - r]]
        out[ch] = "".join(sorted(near))
    return out


QWERTY_NEIGHBOURS = _qwerty_neighbours()

AGREEMENT_SWAPS = {
    "is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
    "does": "do", "do": "does", "isn't": "aren't", "aren't": "isn't", "wasn't": "weren't",
    "weren't": "wasn't", "doesn't": "don't", "don't": "doesn't", "a": "an", "an": "a",
    "this": "these", "these": "this", "that": "those", "those": "that",
}  # fmt: skip


def _eligible_words(text: str) -> list[tuple[int, int]]:
    """Word spans without digits (the only tokens cosmetic operators may touch)."""
    return [(s, e) for s, e in word_spans(text) if not has_digit(text[s:e])]


@register("grammar", 0.1, cosmetic=True)
def typo_misspelling(text: str, rng: random.Random) -> str | None:
    """Replace one word by its common misspelling (receive -> recieve)."""
    hits = []
    for start, end in _eligible_words(text):
        lead, core, _ = split_core(text[start:end])
        wrong = MISSPELLINGS.get(core.lower())
        if wrong is not None:
            hits.append((start + len(lead), start + len(lead) + len(core), match_case(wrong, core)))
    if not hits:
        return None
    start, end, new = rng.choice(hits)
    return replace_span(text, start, end, new)


@register("grammar", 0.1, cosmetic=True)
def typo_transposition(text: str, rng: random.Random) -> str | None:
    """Swap two adjacent different letters inside one word (form -> from)."""
    spots = []
    for start, end in _eligible_words(text):
        token = text[start:end]
        spots.extend(
            start + i
            for i in range(len(token) - 1)
            if token[i].isalpha() and token[i + 1].isalpha() and token[i] != token[i + 1]
        )
    if not spots:
        return None
    i = rng.choice(spots)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


@register("grammar", 0.15, cosmetic=True)
def typo_keyboard(text: str, rng: random.Random) -> str | None:
    """Replace one ASCII letter by a neighbouring key on a QWERTY keyboard (cat -> cst)."""
    spots = [
        i
        for start, end in _eligible_words(text)
        for i in range(start, end)
        if text[i].lower() in QWERTY_NEIGHBOURS and text[i].isascii()
    ]
    if not spots:
        return None
    i = rng.choice(spots)
    new = rng.choice(QWERTY_NEIGHBOURS[text[i].lower()])
    return text[:i] + (new.upper() if text[i].isupper() else new) + text[i + 1 :]


@register("grammar", 0.25, cosmetic=True)
def word_order_swap(text: str, rng: random.Random) -> str | None:
    """Swap two neighbouring words within a sentence, keeping punctuation in place (local shuffle)."""
    spans = word_spans(text)
    pairs = []
    for (s1, e1), (s2, e2) in zip(spans, spans[1:], strict=False):
        t1, t2 = text[s1:e1], text[s2:e2]
        if has_digit(t1) or has_digit(t2):
            continue
        lead1, core1, trail1 = split_core(t1)
        lead2, core2, trail2 = split_core(t2)
        if not core1 or not core2 or core1 == core2 or any(ch in ".!?" for ch in trail1):
            continue
        pairs.append((s1, e1, s2, e2, lead1 + core2 + trail1, lead2 + core1 + trail2))
    if not pairs:
        return None
    s1, e1, s2, e2, new1, new2 = rng.choice(pairs)
    return text[:s1] + new1 + text[e1:s2] + new2 + text[e2:]


@register("grammar", 0.1, cosmetic=True)
def punctuation_error(text: str, rng: random.Random) -> str | None:
    """Drop, double or misplace one punctuation mark, or insert a stray comma (never in numbers)."""
    edits = []
    for start, end in _eligible_words(text):
        token = text[start:end]
        for i, ch in enumerate(token):
            if ch in PUNCT_CHARS:
                pos = start + i
                edits.append((pos, pos + 1, ""))  # drop it
                edits.append((pos, pos + 1, ch + ch))  # double it
                if ch != ",":
                    edits.append((pos, pos + 1, ","))  # wrong mark
        if token[-1:] not in PUNCT_CHARS and any(ch.isalpha() for ch in token):
            edits.append((end, end, ","))  # stray comma after a word
    if not edits:
        return None
    start, end, new = rng.choice(edits)
    return replace_span(text, start, end, new)


@register("grammar", 0.2, cosmetic=True)
def agreement_error(text: str, rng: random.Random) -> str | None:
    """Break subject-verb or article agreement (is -> are, a -> an, this -> these)."""
    hits = []
    for start, end in _eligible_words(text):
        lead, core, _ = split_core(text[start:end])
        swap = AGREEMENT_SWAPS.get(core.lower())
        if swap is not None:
            hits.append((start + len(lead), start + len(lead) + len(core), match_case(swap, core)))
    if not hits:
        return None
    start, end, new = rng.choice(hits)
    return replace_span(text, start, end, new)
