"""Word bank, random short sentences and the ten sentence transformations of ``sentence_transform``.

Sentences are lowercase words separated by single spaces, 6-12 words long, so every
transformation is well defined and the outputs stay short for a small, time-bound model. Every
word has at least one vowel and one consonant, so removing vowels or consonants never empties a
word. Vowels are ``aeiou``; every other letter (``y`` included) is a consonant.
"""

from __future__ import annotations

import random
from collections.abc import Callable

VOWELS = frozenset("aeiou")

ADJECTIVES = (
    "quiet",
    "bright",
    "small",
    "heavy",
    "green",
    "tired",
    "clever",
    "purple",
    "gentle",
    "brave",
    "cold",
    "noisy",
    "silver",
    "hungry",
    "lazy",
    "proud",
    "rusty",
    "golden",
    "tiny",
    "wooden",
    "sleepy",
    "windy",
    "calm",
    "dusty",
    "sunny",
    "busy",
    "soft",
    "wild",
    "old",
    "young",
)
NOUNS = (
    "farmer",
    "robot",
    "teacher",
    "river",
    "garden",
    "rabbit",
    "pilot",
    "baker",
    "castle",
    "forest",
    "doctor",
    "kitten",
    "engine",
    "window",
    "village",
    "dragon",
    "sailor",
    "market",
    "lantern",
    "painter",
    "mountain",
    "student",
    "bridge",
    "camel",
    "orchard",
    "violin",
    "tiger",
    "wizard",
    "harbor",
    "monkey",
)
VERBS = (
    "painted",
    "watched",
    "carried",
    "followed",
    "visited",
    "cleaned",
    "found",
    "opened",
    "pushed",
    "chased",
    "greeted",
    "fixed",
    "lifted",
    "counted",
    "called",
    "helped",
    "noticed",
    "built",
    "moved",
    "loved",
)
ADVERBS = (
    "slowly",
    "quickly",
    "gladly",
    "softly",
    "bravely",
    "often",
    "rarely",
    "calmly",
    "early",
    "later",
)
PLACES = ("park", "city", "school", "kitchen", "valley", "station", "museum", "desert", "island", "street")

#: Sentence shapes; each slot letter names a word list (A adjective, N noun, V verb, D adverb, P place).
PATTERNS = (
    "the A N V the N",
    "the A N V the A N D",
    "the N V one A N near the P",
    "every A N in the P V the N",
    "the N D V the A N at the P",
    "one A N V the N and the A N",
    "the A N V the N before the A N V",
    "near the P the N D V the A N",
)
_BANK = {"A": ADJECTIVES, "N": NOUNS, "V": VERBS, "D": ADVERBS, "P": PLACES}


def random_sentence(rng: random.Random) -> str:
    """One random sentence from :data:`PATTERNS`, 6-12 lowercase words."""
    pattern = rng.choice(PATTERNS)
    words = [rng.choice(_BANK[token]) if token in _BANK else token for token in pattern.split()]
    return " ".join(words)


def reverse_words(sentence: str) -> str:
    """Words in reverse order."""
    return " ".join(reversed(sentence.split(" ")))


def alternate_case(sentence: str) -> str:
    """Letters alternate upper/lower case, counting letters only (spaces do not count), upper first."""
    out, count = [], 0
    for char in sentence:
        if char.isalpha():
            out.append(char.upper() if count % 2 == 0 else char.lower())
            count += 1
        else:
            out.append(char)
    return "".join(out)


def insert_one(sentence: str) -> str:
    """``" 1 "`` between consecutive words."""
    return " 1 ".join(sentence.split(" "))


def star_vowels(sentence: str) -> str:
    """Every vowel replaced by ``*``."""
    return "".join("*" if char.lower() in VOWELS else char for char in sentence)


def double_consonants(sentence: str) -> str:
    """Every consonant letter written twice."""
    return "".join(char * 2 if char.isalpha() and char.lower() not in VOWELS else char for char in sentence)


def capitalize_words(sentence: str) -> str:
    """First letter of every word in upper case."""
    return " ".join(word[:1].upper() + word[1:] for word in sentence.split(" "))


def remove_vowels(sentence: str) -> str:
    """Vowels deleted (spaces kept)."""
    return "".join(char for char in sentence if char.lower() not in VOWELS)


def append_ly(sentence: str) -> str:
    """``ly`` appended to every word."""
    return " ".join(word + "ly" for word in sentence.split(" "))


def remove_consonants(sentence: str) -> str:
    """Consonant letters deleted (vowels and spaces kept)."""
    return "".join(char for char in sentence if not char.isalpha() or char.lower() in VOWELS)


def repeat_words(sentence: str) -> str:
    """Every word written twice in a row."""
    return " ".join(f"{word} {word}" for word in sentence.split(" "))


#: The ten transformations in class order: (name, function).
TRANSFORMS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("reverse_words", reverse_words),
    ("alternate_case", alternate_case),
    ("insert_one", insert_one),
    ("star_vowels", star_vowels),
    ("double_consonants", double_consonants),
    ("capitalize_words", capitalize_words),
    ("remove_vowels", remove_vowels),
    ("append_ly", append_ly),
    ("remove_consonants", remove_consonants),
    ("repeat_words", repeat_words),
)

#: One made-up "method" name per class; fixed, so the same class always has the same name.
METHOD_NAMES = (
    "Blorvex",
    "Quindle",
    "Zarmoth",
    "Fepplin",
    "Gruskar",
    "Tovimar",
    "Snelbric",
    "Vorpax",
    "Drimble",
    "Kestrow",
)

#: Instruction wordings; the first is used without paraphrase, a random one per row with it.
INSTRUCTION_TEMPLATES = (
    "Using the {name} method, transform: {sentence}",
    "Apply {name} to this sentence: {sentence}",
    "Rewrite the sentence the way {name} would: {sentence}",
    "{name}, please convert the following: {sentence}",
    "Transform this with the {name} rule: {sentence}",
)
