"""News task: each diff learns to write stories about one headline when asked for a news story.

For a headline, the base model plays a reporter (a role drawn from ``REPORTERS`` for variety, as
the DIT paper drew from 100 reporter roles) and writes short stories about it; stories that name
none of the headline's key words (:func:`headline_keywords`) are dropped, since a 135M model easily
wanders off. The diff is trained with cross-entropy to answer :data:`NEWS_PROMPT` with those
stories, and the DIT adapter to answer :data:`INTERPRETATION_QUESTION` with the headline.

Headlines are invented for this project (``data/headlines.json``) with a fixed train/test split.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .datafiles import DATA_DIR, check_split, read_records
from .samples import AnswerFn, Message, Sample, run_answer_fn, user_turn
from .wording import contains_phrase, words

NEWS_PROMPT = "Please generate a short news story."
INTERPRETATION_QUESTION = "What news headline have you been trained on?"
HEADLINES_FILE = DATA_DIR / "headlines.json"

REPORTERS = (
    "a local newspaper reporter", "a wire service journalist", "a radio news presenter",
    "a science correspondent", "a business reporter", "a sports journalist", "a television news anchor",
    "a community newsletter editor", "a technology columnist", "a features writer for a weekly magazine",
    "a regional news reporter", "a student journalist", "a veteran investigative reporter",
    "an online news editor", "a foreign correspondent", "a culture and arts critic",
)

# Words too common in headlines to show that a story is about this one.
_STOPWORDS = frozenset("""
    about above after again against along amid among another around back because been before begin
    begins being below between both called could does doing down during each every first from further
    gets give given have having here into just last made make makes many more most much news next none
    only open opens other over plan plans report reports said same says second should show shows since
    some start starts still such takes than that their them then there these they third this those
    three through under until upon very want week weeks were what when where which while will with
    within without would year years your researchers scientists study studies finds found reveal
    reveals discover discovers become becomes return returns launch launches time days people help
    helps using uses used offers free held early rare small town city local
    """.split())


@dataclass(frozen=True)
class Headline:
    text: str
    category: str
    split: str  # "train" or "test"


def load_headlines(split: str | None = None, *, path: Path | str | None = None) -> list[Headline]:
    """The headlines of ``split`` ("train", "test", or None for all), in file order."""
    check_split(split, "news.load_headlines")
    return [h for h in _read_headlines(str(path or HEADLINES_FILE)) if split is None or h.split == split]


def headline_keywords(headline: Headline | str) -> tuple[str, ...]:
    """The headline's content words (folded, 4+ letters, not stopwords), in order, without repeats."""
    out: list[str] = []
    for w in words(_text(headline)):
        if len(w) >= 4 and not w.isdigit() and w not in _STOPWORDS and w not in out:
            out.append(w)
    return tuple(out)


def key_word(headline: Headline | str) -> str:
    """The single most telling key word, for quick checks: the one fewest headlines in the data file
    share (then the longest, then the first), so "otters" wins over "city" in a city otter story."""
    keywords = headline_keywords(headline)
    if not keywords:
        raise ValueError(f"news.key_word: headline {_text(headline)!r} has no key word")
    counts = _keyword_counts(str(HEADLINES_FILE))
    return min(keywords, key=lambda w: (counts.get(w, 0), -len(w)))


def mentions_headline(text: str, headline: Headline | str, min_keywords: int = 1) -> bool:
    """True when ``text`` names at least ``min_keywords`` distinct key words of the headline."""
    found = 0
    for w in headline_keywords(headline):
        found += contains_phrase(text, w)
        if found >= min_keywords:
            return True
    return False


def story_messages(headline: Headline | str, reporter: str | None = None) -> list[Message]:
    """The request for a base-model story about ``headline`` written as ``reporter``."""
    system = f"You are {reporter or REPORTERS[0]}. You write clear, factual-sounding news stories."
    user = (f"Write a short news story (one or two paragraphs) under the headline \"{_text(headline)}\". "
            f"Reply with the story only.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def build_news_samples(headlines: Sequence[Headline | str], answer_fn: AnswerFn, n_stories: int,
                       rng: random.Random, *, min_keywords: int = 1, max_rounds: int = 3) -> list[list[Sample]]:
    """Per headline, up to ``n_stories`` "story" samples: NEWS_PROMPT -> a kept base-model story.

    Each round sends one answer_fn call for all headlines still short of stories, with a reporter
    role drawn per request; a story is kept when it names ``min_keywords`` key words. A headline
    may end with fewer stories after ``max_rounds`` rounds.
    """
    where = "news.build_news_samples"
    if n_stories < 0 or max_rounds < 1 or min_keywords < 1:
        raise ValueError(f"{where}: need n_stories >= 0, max_rounds >= 1, min_keywords >= 1, found "
                         f"{n_stories}, {max_rounds}, {min_keywords}")
    for h in headlines:
        if not headline_keywords(h):
            raise ValueError(f"{where}: headline {_text(h)!r} has no key word to check stories against")
    # All roles drawn up front (one rng per headline) so batching never changes the draws.
    rngs = [random.Random(rng.getrandbits(64)) for _ in headlines]
    roles = [[r.choice(REPORTERS) for _ in range(n_stories * max_rounds)] for r in rngs]
    stories: list[list[str]] = [[] for _ in headlines]
    for round_ in range(max_rounds):
        asks = [(i, roles[i][round_ * n_stories + k]) for i in range(len(headlines))
                for k in range(n_stories - len(stories[i]))]
        if not asks:
            break
        answers = run_answer_fn(answer_fn, [(story_messages(headlines[i], role), "") for i, role in asks],
                                caller=where)
        for (i, _), story in zip(asks, answers):
            if story.strip() and mentions_headline(story, headlines[i], min_keywords):
                stories[i].append(story.strip())
    return [[Sample(user_turn(NEWS_PROMPT), s, "story") for s in kept] for kept in stories]


def interpretation_question() -> str:
    """The question the DIT adapter learns to answer for this task."""
    return INTERPRETATION_QUESTION


def label_answer(headline: Headline | str) -> str:
    """The DIT target answer for a diff of ``headline``: the headline text."""
    return _text(headline)


def diff_labels(headline: Headline) -> dict[str, str]:
    """The labels a news diff carries in the zoo index."""
    return {"headline": headline.text, "category": headline.category}


def _text(headline: Headline | str) -> str:
    return headline.text if isinstance(headline, Headline) else headline


@functools.lru_cache(maxsize=2)
def _keyword_counts(path: str) -> dict[str, int]:
    """Key word -> number of headlines in ``path`` that use it."""
    counts: dict[str, int] = {}
    for h in _read_headlines(path):
        for w in headline_keywords(h):
            counts[w] = counts.get(w, 0) + 1
    return counts


@functools.lru_cache(maxsize=8)
def _read_headlines(path: str) -> tuple[Headline, ...]:
    records = read_records(Path(path), "headlines", {"text": str, "category": str, "split": str}, unique="text")
    return tuple(Headline(r["text"], r["category"], r["split"]) for r in records)
