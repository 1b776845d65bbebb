"""String primitives (str -> str) and their compositions: FIND's string functions.

Each primitive is a plain Python function ``name(s, *params)`` defined in this module; its source
text (``inspect.getsource``) is the reference code, so the code an agent is scored against is the
very function the black box runs. An *instance* is a primitive with its parameters bound,
``(name, params)``; a string function is a composition of one or two instances, applied left to
right. :data:`INSTANCES` lists every instance the suite draws from (and the search agent searches).
"""

from __future__ import annotations

import inspect
import random


def reverse(s):
    return s[::-1]


def upper(s):
    return s.upper()


def lower(s):
    return s.lower()


def swapcase(s):
    return s.swapcase()


def capitalize(s):
    return s.capitalize()


def title(s):
    return s.title()


def sort_chars(s):
    return "".join(sorted(s))


def dedupe(s):
    seen = []
    for c in s:
        if c not in seen:
            seen.append(c)
    return "".join(seen)


def remove_vowels(s):
    return "".join(c for c in s if c.lower() not in "aeiou")


def keep_vowels(s):
    return "".join(c for c in s if c.lower() in "aeiou")


def remove_digits(s):
    return "".join(c for c in s if not c.isdigit())


def keep_digits(s):
    return "".join(c for c in s if c.isdigit())


def remove_spaces(s):
    return s.replace(" ", "")


def double_chars(s):
    return "".join(c + c for c in s)


def repeat(s, n):
    return s * n


def shift_letters(s, k):
    out = []
    for c in s:
        if "a" <= c <= "z":
            out.append(chr((ord(c) - 97 + k) % 26 + 97))
        elif "A" <= c <= "Z":
            out.append(chr((ord(c) - 65 + k) % 26 + 65))
        else:
            out.append(c)
    return "".join(out)


def first(s, n):
    return s[:n]


def last(s, n):
    return s[-n:] if n <= len(s) else s


def drop_first(s, n):
    return s[n:]


def drop_last(s, n):
    return s[:-n] if n < len(s) else ""


def rotate_left(s, k):
    if not s:
        return s
    k = k % len(s)
    return s[k:] + s[:k]


def rotate_right(s, k):
    if not s:
        return s
    k = k % len(s)
    return s[len(s) - k:] + s[:len(s) - k]


def append(s, suffix):
    return s + suffix


def prepend(s, prefix):
    return prefix + s


def replace_char(s, old, new):
    return s.replace(old, new)


def mask_vowels(s, ch):
    return "".join(ch if c.lower() in "aeiou" else c for c in s)


def even_positions(s):
    return s[::2]


def odd_positions(s):
    return s[1::2]


def mirror(s):
    return s + s[::-1]


def join_chars(s, sep):
    return sep.join(s)


def length(s):
    return str(len(s))


def count_vowels(s):
    return str(sum(c.lower() in "aeiou" for c in s))


def upper_vowels(s):
    return "".join(c.upper() if c.lower() in "aeiou" else c for c in s)


def alternate_case(s):
    return "".join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(s))


def reverse_words(s):
    return " ".join(s.split(" ")[::-1])


def sort_words(s):
    return " ".join(sorted(s.split(" ")))


def initials(s):
    return "".join(w[0] for w in s.split(" ") if w)


def double_words(s):
    return " ".join(w + " " + w for w in s.split(" "))


def remove_char(s, ch):
    return s.replace(ch, "")


def insert_middle(s, ch):
    h = len(s) // 2
    return s[:h] + ch + s[h:]


def letter_positions(s):
    return "-".join(str(ord(c.lower()) - 96) if c.isalpha() else c for c in s)


def surround(s, left, right):
    return left + s + right


def swap_halves(s):
    h = len(s) // 2
    return s[h:] + s[:h]


def first_last_swap(s):
    if len(s) < 2:
        return s
    return s[-1] + s[1:-1] + s[0]


def keep_letters(s):
    return "".join(c for c in s if c.isalpha())


def upper_consonants(s):
    return "".join(c.upper() if c.isalpha() and c.lower() not in "aeiou" else c for c in s)


def first_word(s):
    return s.split(" ")[0]


def last_word(s):
    return s.split(" ")[-1]


def shift_digits(s, k):
    return "".join(str((int(c) + k) % 10) if c.isdigit() else c for c in s)


# name -> (function, parameter tuples, description template with {0}, {1}, ... for the parameters)
PRIMITIVES: dict[str, tuple] = {
    "reverse": (reverse, [()], "reverses the string"),
    "upper": (upper, [()], "converts every letter to upper case"),
    "lower": (lower, [()], "converts every letter to lower case"),
    "swapcase": (swapcase, [()], "swaps the case of every letter"),
    "capitalize": (capitalize, [()], "capitalises the first letter and lower-cases the rest"),
    "title": (title, [()], "capitalises the first letter of every word"),
    "sort_chars": (sort_chars, [()], "sorts the characters by their code point"),
    "dedupe": (dedupe, [()], "removes repeated characters, keeping each one's first occurrence"),
    "remove_vowels": (remove_vowels, [()], "removes the vowels"),
    "keep_vowels": (keep_vowels, [()], "keeps only the vowels"),
    "remove_digits": (remove_digits, [()], "removes the digits"),
    "keep_digits": (keep_digits, [()], "keeps only the digits"),
    "remove_spaces": (remove_spaces, [()], "removes the spaces"),
    "double_chars": (double_chars, [()], "doubles every character"),
    "repeat": (repeat, [(2,), (3,)], "repeats the string {0} times"),
    "shift_letters": (shift_letters, [(1,), (2,), (3,), (5,), (13,), (25,)],
                      "shifts every letter {0} places forward in the alphabet (wrapping around)"),
    "first": (first, [(1,), (2,), (3,)], "keeps the first {0} characters"),
    "last": (last, [(1,), (2,), (3,)], "keeps the last {0} characters"),
    "drop_first": (drop_first, [(1,), (2,)], "drops the first {0} characters"),
    "drop_last": (drop_last, [(1,), (2,)], "drops the last {0} characters"),
    "rotate_left": (rotate_left, [(1,), (2,)], "rotates the string {0} characters to the left"),
    "rotate_right": (rotate_right, [(1,), (2,)], "rotates the string {0} characters to the right"),
    "append": (append, [("ing",), ("!",), ("xyz",), ("s",)], "appends {0!r}"),
    "prepend": (prepend, [("un",), ("#",), ("q",), ("re",)], "prepends {0!r}"),
    "replace_char": (replace_char, [("a", "e"), ("e", "a"), ("o", "0"), ("s", "z"), (" ", "_"), ("t", "7"), ("i", "1"), ("l", "L")],
                     "replaces every {0!r} with {1!r}"),
    "mask_vowels": (mask_vowels, [("*",), ("_",)], "replaces every vowel with {0!r}"),
    "even_positions": (even_positions, [()], "keeps the characters at even positions (0, 2, 4, ...)"),
    "odd_positions": (odd_positions, [()], "keeps the characters at odd positions (1, 3, 5, ...)"),
    "mirror": (mirror, [()], "appends the reversed string to the string"),
    "join_chars": (join_chars, [("-",), (" ",), (".",)], "puts {0!r} between every two characters"),
    "length": (length, [()], "returns the number of characters, as digits"),
    "count_vowels": (count_vowels, [()], "returns the number of vowels, as digits"),
    "upper_vowels": (upper_vowels, [()], "upper-cases the vowels"),
    "alternate_case": (alternate_case, [()], "alternates upper and lower case, starting upper"),
    "reverse_words": (reverse_words, [()], "reverses the order of the space-separated words"),
    "sort_words": (sort_words, [()], "sorts the space-separated words"),
    "initials": (initials, [()], "returns the first character of every word"),
    "double_words": (double_words, [()], "repeats every word twice"),
    "remove_char": (remove_char, [("a",), ("e",), ("l",), ("r",), ("o",)], "removes every {0!r}"),
    "insert_middle": (insert_middle, [("|",), ("X",)], "inserts {0!r} in the middle"),
    "letter_positions": (letter_positions, [()],
                         "replaces every letter with its position in the alphabet, joined by '-'"),
    "surround": (surround, [("[", "]"), ("<", ">"), ("*", "*")], "wraps the string in {0!r} and {1!r}"),
    "swap_halves": (swap_halves, [()], "swaps the first and second halves"),
    "first_last_swap": (first_last_swap, [()], "swaps the first and last characters"),
    "keep_letters": (keep_letters, [()], "keeps only the letters"),
    "upper_consonants": (upper_consonants, [()], "upper-cases the consonants"),
    "first_word": (first_word, [()], "keeps the first space-separated word"),
    "last_word": (last_word, [()], "keeps the last space-separated word"),
    "shift_digits": (shift_digits, [(1,), (5,)], "adds {0} to every digit, modulo 10"),
}

INSTANCES: list[tuple[str, tuple]] = [(name, params) for name, (_, plist, _) in PRIMITIVES.items() for params in plist]


def apply(chain: list[tuple[str, tuple]], s: str) -> str:
    """The composition ``chain`` (instances applied left to right) on ``s``."""
    for name, params in chain:
        s = PRIMITIVES[name][0](s, *params)
    return s


def describe(chain: list[tuple[str, tuple]]) -> str:
    parts = [PRIMITIVES[name][2].format(*params) for name, params in chain]
    return "the function " + ", then ".join(parts)


def reference_code(chain: list[tuple[str, tuple]]) -> str:
    """Python source defining ``f(s)``: the primitives' own source, then their composition."""
    names = list(dict.fromkeys(name for name, _ in chain))
    body = "s"
    for name, params in chain:
        body = f"{name}({', '.join([body] + [repr(p) for p in params])})"
    return "\n".join(inspect.getsource(PRIMITIVES[n][0]) for n in names) + f"\ndef f(s):\n    return {body}\n"


_WORDS = ("apple", "river", "stone", "light", "table", "green", "music", "paper", "dream", "ocean", "tiger", "honey",
          "cloud", "bread", "train", "smile", "lemon", "piano", "quiet", "zebra", "forest", "window", "garden",
          "silver", "purple", "rocket", "castle", "winter", "orange", "yellow")


def random_input(rng: random.Random) -> str:
    """A probe or test string: words, mixed case, sometimes digits."""
    kind = rng.random()
    if kind < 0.4:
        s = rng.choice(_WORDS)
    elif kind < 0.7:
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 3)))
    elif kind < 0.85:
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
    else:
        s = rng.choice(_WORDS) + str(rng.randint(0, 999))
    if rng.random() < 0.25:
        s = s.capitalize() if rng.random() < 0.7 else s.upper()
    return s


def draw_chain(rng: random.Random, depth: int) -> list[tuple[str, tuple]]:
    """``depth`` distinct primitives (never the same one twice in a row), with their parameters."""
    chain: list[tuple[str, tuple]] = []
    while len(chain) < depth:
        name = rng.choice(sorted(PRIMITIVES))
        if chain and chain[-1][0] == name:
            continue
        chain.append((name, rng.choice(PRIMITIVES[name][1])))
    return chain
