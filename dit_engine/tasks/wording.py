"""Does a text name a phrase? Word-level matching shared by the task builders.

A 135M model's persona answers often drift off topic, so the builders keep only answers that name
the topic (or a headline's key word). Matching is on words, not substrings ("cats" is not found in
"catapults"), ignores case and accents ("Pokemon" finds "Pokémon"), lets the words of a phrase be
joined by any punctuation or none ("hip hop", "hip-hop", "hiphop"), drops a leading article of the
phrase ("the Roman Empire" is found in "Roman Empire trivia"), and accepts singular and plural forms
of the phrase's last word, which carries the number in English ("volcano" finds "volcanoes" and back).
Proper nouns (a capitalised last word) get no invented plural ("Mars" never becomes "Mar").
"""

from __future__ import annotations

import functools
import re
import unicodedata

_ARTICLES = ("the", "a", "an")
_WORD = re.compile(r"[a-z0-9]+")
_SEPARATOR = r"[^a-z0-9]*"

# Plurals that no suffix rule produces; matched as word endings so compounds follow
# ("werewolves" -> "werewolf", "cavemen" -> "caveman").
_IRREGULAR_PLURALS = {
    "wolves": "wolf", "leaves": "leaf", "knives": "knife", "shelves": "shelf", "elves": "elf",
    "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "men": "man",
    "children": "child", "cacti": "cactus", "fungi": "fungus", "nebulae": "nebula",
    "octopi": "octopus", "people": "person", "oxen": "ox",
}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items()}


def fold(text: str) -> str:
    """Lower case with accents removed: the form every comparison in this module works on."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def words(text: str) -> list[str]:
    """The folded alphanumeric words of ``text`` ("Rubik's Cube" -> ["rubik", "s", "cube"])."""
    return _WORD.findall(fold(text))


def contains_phrase(text: str, phrase: str) -> bool:
    """True when ``text`` names ``phrase`` under the rules in the module docstring."""
    return phrase_pattern(phrase).search(fold(text)) is not None


@functools.lru_cache(maxsize=8192)
def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """The compiled regex that finds ``phrase`` in folded text (cached: builders ask thousands of times)."""
    tokens = words(phrase)
    if len(tokens) > 1 and tokens[0] in _ARTICLES:
        tokens = tokens[1:]
    if not tokens:
        raise ValueError(f"wording.phrase_pattern: phrase {phrase!r} has no letters or digits to match")
    last_word = phrase.split()[-1] if phrase.split() else phrase
    proper = last_word[:1].isupper()
    heads = sorted(number_variants(tokens[-1], proper=proper), key=lambda w: (-len(w), w))
    body = "".join(re.escape(t) + _SEPARATOR for t in tokens[:-1])
    head = "(?:" + "|".join(re.escape(h) for h in heads) + ")"
    return re.compile(r"(?<![a-z0-9])" + body + head + r"(?![a-z0-9])")


def number_variants(word: str, *, proper: bool = False) -> set[str]:
    """``word`` (folded) with its likely singular and plural forms.

    Candidate forms are generated generously (both "horse" and "hors" from "horses"): a wrong
    candidate is a non-word that never occurs, while a missing one loses a real match. Proper nouns
    only lose a plural "s" (Vikings -> Viking) and only when long enough not to make a new word.
    """
    forms = {word}
    forms |= _singulars(word, min_len=6 if proper else 4)
    if not proper:
        forms |= _plurals(word)
    return forms


def _singulars(word: str, *, min_len: int) -> set[str]:
    out: set[str] = set()
    for plural, singular in _IRREGULAR_PLURALS.items():
        if word.endswith(plural):
            out.add(word[: len(word) - len(plural)] + singular)
    if len(word) < min_len or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return out
    out.add(word[:-1])
    if word.endswith("ies") and len(word) > 4:
        out.add(word[:-3] + "y")
    if word.endswith("es"):
        out.add(word[:-2])
    return out


def _plurals(word: str) -> set[str]:
    out: set[str] = set()
    for singular, plural in _IRREGULAR_SINGULARS.items():
        if word.endswith(singular):
            out.add(word[: len(word) - len(singular)] + plural)
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        out.add(word[:-1] + "ies")
    else:
        out.add(word + "s")
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        out.add(word + "es")
    return out
