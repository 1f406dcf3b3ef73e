"""Word-level diff of an original text and its noisy version, as escaped HTML.

Tokens are words, single punctuation marks and whitespace runs, so joining the tokens gives the
text back exactly: dropping every ``<ins>`` span (and unescaping) yields the original, dropping every
``<del>`` span yields the noisy text. Every token is escaped, so row text can never inject markup.
"""

from __future__ import annotations

import difflib
import re
from html import escape

_TOKEN = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Words, punctuation marks and whitespace runs; ``"".join(tokenize(t)) == t``."""
    return _TOKEN.findall(text)


def word_diff_html(original: str, noisy: str) -> str:
    """HTML showing ``original`` turned into ``noisy``: removed words in ``<del>``, added in ``<ins>``."""
    before, after = tokenize(original), tokenize(noisy)
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    parts: list[str] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            parts.append(escape("".join(before[i1:i2])))
            continue
        if i2 > i1:
            parts.append(f"<del>{escape(''.join(before[i1:i2]))}</del>")
        if j2 > j1:
            parts.append(f"<ins>{escape(''.join(after[j1:j2]))}</ins>")
    return "".join(parts)
