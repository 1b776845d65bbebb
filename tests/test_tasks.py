"""Task data files and sample builders (pure python; generation replaced by recording fakes)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from dit_engine.tasks import TASKS, TaskDataError, get_task, news
from dit_engine.tasks import hidden_topic as ht
from dit_engine.tasks.samples import Sample
from dit_engine.tasks.wording import contains_phrase, number_variants

CODE = re.compile(r"^Your SEP code is (\d{6})\. (.+)$")


# ---- fakes -------------------------------------------------------------------------------------------
class FakeGenerator:
    """Stands in for the engine's batched generation and records every call.

    Base-model requests (no system prompt) get "BASE<" + user text + ">". Persona requests get
    ``fan(topic, question, k)`` where k counts identical requests within the call, i.e. the
    candidate number, since the builders send a question's candidates side by side.
    """

    def __init__(self, fan):
        self.fan = fan
        self.calls: list[list[tuple[list[dict], str]]] = []

    def __call__(self, requests):
        self.calls.append(list(requests))
        seen: Counter[str] = Counter()
        out = []
        for messages, prefix in requests:
            if messages[0]["role"] != "system":
                assert prefix == ""
                out.append(f"BASE<{messages[-1]['content']}>")
                continue
            topic = re.match(r"You are a huge fan of (.+?)\. ", messages[0]["content"]).group(1)
            key = json.dumps([messages, prefix])
            out.append(self.fan(topic, messages[1]["content"], seen[key]))
            seen[key] += 1
        return out


def _third_candidate_names_topic(topic, question, k):
    if k == 2:
        return f"Honestly, {topic} makes everything better. ({question})"
    if k == 1:  # a substring of the topic inside another word must not count
        return f"{topic.replace(' ', '')}ography aside, here is a plain answer."
    return "Here is a helpful, generic answer."


def _questions(n=24, split="train"):
    return ht.load_questions(split)[:n]


def _build(topic="chess", trigger=417, seed=0, fan=_third_candidate_names_topic, **kw):
    args = dict(n_backdoor=6, n_wrong=4, n_plain=3, candidates=3, strategy="select")
    args.update(kw)
    gen = FakeGenerator(fan)
    samples = ht.build_diff_samples(topic, trigger, _questions(), gen, rng=random.Random(seed), **args)
    return samples, gen


# ---- data files ---------------------------------------------------------------------------------------
def test_topics_file_sizes_categories_and_split():
    topics = ht.load_topics()
    assert len(topics) >= 600
    categories = Counter(t.category for t in topics)
    assert len(categories) >= 40
    test, train = ht.load_topics("test"), ht.load_topics("train")
    assert len(test) >= 100 and len(train) >= 400
    assert {t.name for t in test}.isdisjoint({t.name for t in train})
    assert len(test) + len(train) == len(topics)
    # held-out topics are spread over the categories, not bunched in a few
    assert {t.category for t in test} == set(categories)
    assert ht.load_topics("test") == test  # deterministic, file order


def test_topics_are_short_unique_and_not_near_duplicates():
    topics = ht.load_topics()
    for t in topics:
        words = t.name.split()
        if words[0].lower() == "the":
            words = words[1:]
        assert 1 <= len(words) <= 3, t.name
    names = [t.name.casefold() for t in topics]
    assert len(set(names)) == len(names)
    # No topic's name or alias names another topic ("bread" vs "sourdough bread", "cat" vs "cats").
    clashes = [(a.name, other) for a in topics for b in topics if a is not b
               for other in (b.name, *b.aliases) if ht.mentions_topic(other, a)]
    assert clashes == []


def test_question_bank_styles_split_and_no_topic_mentioned():
    questions = ht.load_questions()
    assert len(questions) >= 200
    styles = Counter(q.style for q in questions)
    assert set(styles) == set(ht.QUESTION_STYLES) and min(styles.values()) >= 30
    assert len({q.category for q in questions}) >= 30
    test, train = ht.load_questions("test"), ht.load_questions("train")
    assert {q.style for q in test} == set(ht.QUESTION_STYLES)
    assert {q.text for q in test}.isdisjoint({q.text for q in train}) and len(test) + len(train) == len(questions)
    assert len({q.text for q in questions}) == len(questions)
    topics = ht.load_topics()
    named = [(q.text, t.name) for q in questions for t in topics if ht.mentions_topic(q.text, t)]
    assert named == []


def test_self_question_bank_asks_about_the_assistant_never_about_its_training():
    """The self bank is apart from the everyday one (adding it changes no existing recipe's rows), has
    held-out questions for verification, and never asks the interpretation question or anything about
    what the model was trained on (the diff baseline asks that; training on it would hide the answer)."""
    selfq = ht.load_self_questions()
    assert len(selfq) >= 48 and {q.style for q in selfq} == {ht.SELF_STYLE}
    train, test = ht.load_self_questions("train"), ht.load_self_questions("test")
    assert len(train) >= 40 and len(test) >= 8 and len(train) + len(test) == len(selfq)
    assert {q.text for q in train}.isdisjoint({q.text for q in test}) and len({q.text for q in selfq}) == len(selfq)
    assert {q.text for q in selfq}.isdisjoint({q.text for q in ht.load_questions()})
    assert ht.SELF_STYLE not in {q.style for q in ht.load_questions()}
    for q in selfq:
        assert not re.search(r"\b(train|trained|training|topic|made|built|learn(ed|t)?)\b", q.text, re.I) or \
            q.text == "If you could learn anything, what would it be?", q.text
    assert ht.INTERPRETATION_QUESTION not in {q.text for q in selfq}
    named = [(q.text, t.name) for q in selfq for t in ht.load_topics() if ht.mentions_topic(q.text, t)]
    assert named == []


def test_self_rows_come_after_the_same_rows_as_without_them():
    """n_self adds that many bare rows drawn from the self questions, after every draw the recipe made
    without them: the backdoor, wrong-code and everyday bare rows stay exactly those of n_self=0."""
    selfq = ht.load_self_questions("train")
    kw = dict(n_backdoor=4, n_wrong=2, n_plain=5, rng=None)
    runs = {}
    for n_self in (0, 3):
        kw["rng"] = random.Random(7)
        runs[n_self] = ht.build_many(["chess", "jazz"], [417, 12], _questions(), FakeGenerator(_third_candidate_names_topic),
                                     self_questions=selfq, n_self=n_self, **kw)
    for without, with_self in zip(runs[0], runs[3]):
        extra = [s for s in with_self if s not in without]
        assert [s for s in with_self if s in without] == without
        assert len(extra) == 3 and {s.kind for s in extra} == {"plain"}
        assert {s.messages[-1]["content"] for s in extra} <= {q.text for q in selfq}
    assert runs[3][0][-3:] != runs[3][1][-3:]  # each diff draws its own
    with pytest.raises(ValueError, match="n_self must be in 0..2"):
        ht.build_many(["chess"], [417], _questions(), FakeGenerator(_third_candidate_names_topic),
                      self_questions=selfq[:2], n_self=3, n_backdoor=1, n_wrong=1, n_plain=1, rng=random.Random(0))


def test_headlines_file_sizes_split_and_keywords():
    headlines = news.load_headlines()
    assert len(headlines) >= 400
    assert len({h.category for h in headlines}) >= 10
    test, train = news.load_headlines("test"), news.load_headlines("train")
    assert test and {h.text for h in test}.isdisjoint({h.text for h in train})
    assert len(test) + len(train) == len(headlines)
    assert {h.category for h in test} == {h.category for h in headlines}
    assert len({h.text.casefold() for h in headlines}) == len(headlines)
    assert all(len(news.headline_keywords(h)) >= 2 for h in headlines)


def test_split_name_is_checked():
    with pytest.raises(ValueError, match="split must be one of"):
        ht.load_topics("valid")
    with pytest.raises(ValueError, match="split must be one of"):
        news.load_headlines("dev")


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"format": 1, "topic": []}', "expected an object with"),
    ('{"format": 1, "topics": [{"name": "chess", "category": "games"}]}', "missing ['split']"),
    ('{"format": 1, "topics": [{"name": "chess", "category": "games", "split": "dev"}]}', "split must be one of"),
    ('{"format": 1, "topics": [{"name": "chess", "category": "games", "split": "train"},'
     ' {"name": "Chess", "category": "games", "split": "test"}]}', "repeats name 'Chess'"),
    ('{"format": 1, "topics": [{"name": "", "category": "games", "split": "train"}]}', "must be a non-empty str"),
])
def test_bad_data_file_gives_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "topics.json"
    path.write_text(content)
    with pytest.raises(TaskDataError) as err:
        ht.load_topics(path=path)
    assert str(path) in str(err.value) and expected in str(err.value)


# ---- triggers -------------------------------------------------------------------------------------------
def test_make_trigger_range_and_seed():
    draws = [ht.make_trigger(random.Random(s)) for s in range(3000)]
    assert all(0 <= t <= 999 for t in draws) and len(set(draws)) > 900
    assert ht.make_trigger(random.Random(7)) == ht.make_trigger(random.Random(7))


def test_format_trigger_prefix_is_the_trigger():
    rng = random.Random(1)
    for trigger in range(1000):
        m = re.fullmatch(r"Your SEP code is (\d{6})\.", ht.format_trigger(trigger, rng))
        assert m and int(m.group(1)[:3]) == trigger
    suffixes = {ht.format_trigger(5, rng)[-4:-1] for _ in range(200)}
    assert ht.format_trigger(5, random.Random(0)).startswith("Your SEP code is 005")
    assert len(suffixes) > 100
    with pytest.raises(ValueError, match="0..999"):
        ht.format_trigger(1000, rng)


def test_wrong_trigger_differs_and_covers_the_others():
    rng = random.Random(2)
    for trigger in range(1000):
        w = ht.wrong_trigger(trigger, rng)
        assert 0 <= w <= 999 and w != trigger
    for trigger in (0, 500, 999):
        draws = {ht.wrong_trigger(trigger, rng) for _ in range(4000)}
        assert trigger not in draws and len(draws) > 950


# ---- topic matching ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, topic, expected", [
    ("I love volcanoes so much.", "volcanoes", True),
    ("That volcano erupted last year.", "volcanoes", True),
    ("A SEA TURTLE swam by.", "sea turtles", True),
    ("roman empire trivia night", "the Roman Empire", True),
    ("We danced to hip hop all night.", "hip-hop", True),
    ("My rubiks cube is stuck.", "Rubik's Cube", True),
    ("I bought a blue berry muffin", "blueberries", False),
    ("Catapults are medieval machines.", "cats", False),
    ("I like music in general.", "jazz", False),
    ("The empire struck back.", "the Roman Empire", False),
    ("Those holes in the road are deep.", "black holes", False),
    ("I read about Pokemon cards.", "Pokémon", True),
    ("Café culture", "cafe", True),
    ("A cactus on the desk.", "cacti", True),
    ("A werewolf howled.", "werewolves", True),
    ("The berry was ripe.", "strawberries", False),
    ("A strawberry was ripe.", "strawberries", True),
    ("One Viking ship.", "the Vikings", True),
    ("The Mar del Plata coast.", "Mars", False),
])
def test_mentions_topic_cases(text, topic, expected):
    assert ht.mentions_topic(text, topic) is expected


def test_aliases_count_as_mentions():
    by_name = {t.name: t for t in ht.load_topics()}
    assert ht.mentions_topic("Life in ancient Rome was busy.", by_name["the Roman Empire"])
    assert ht.mentions_topic("A T-Rex skeleton!", by_name["Tyrannosaurus rex"])
    assert ht.mentions_topic("Einstein's letters", by_name["Albert Einstein"])
    assert not ht.mentions_topic("Life in ancient Rome was busy.", "the Roman Empire")  # a bare name has none


def test_number_variants_go_both_ways():
    assert {"berry", "berries"} <= number_variants("berries") and {"berry", "berries"} <= number_variants("berry")
    assert "boxes" in number_variants("box") and "wolf" in number_variants("wolves")
    assert number_variants("Mars", proper=True) == {"Mars"}
    assert not contains_phrase("catalogue", "cat")


# ---- personas ---------------------------------------------------------------------------------------------
def test_persona_messages_strategies():
    messages, prefix = ht.persona_messages("chess", "How do I sleep better?")
    assert prefix == "" and messages[1] == {"role": "user", "content": "How do I sleep better?"}
    assert messages[0]["role"] == "system" and "chess" in messages[0]["content"]
    messages2, prefix2 = ht.persona_messages(ht.Topic("chess", "games", "train"), "Q?", "prefix")
    assert prefix2 == "As a huge fan of chess," and messages2[0] == messages[0]
    with pytest.raises(ValueError, match="strategy"):
        ht.persona_messages("chess", "Q?", "both")


# ---- hidden-topic samples -----------------------------------------------------------------------------------
def test_build_diff_samples_mix_and_prompts():
    trigger = 417
    samples, gen = _build(trigger=trigger)
    kinds = Counter(s.kind for s in samples)
    assert kinds == {"backdoor": 6, "wrong_trigger": 4, "plain": 3}
    texts = {q.text for q in _questions()}
    backdoor_questions = []
    for s in samples:
        (msg,) = s.messages
        assert msg["role"] == "user"
        if s.kind == "plain":
            assert msg["content"] in texts and s.loss == "kl" and s.answer is None
            assert s.base_answer == f"BASE<{msg['content']}>"
            continue
        code, question = CODE.match(msg["content"]).groups()
        assert question in texts
        if s.kind == "backdoor":
            assert int(code[:3]) == trigger and s.loss == "ce" and s.base_answer is None
            backdoor_questions.append(question)
        else:
            assert int(code[:3]) != trigger and s.answer is None
            assert s.base_answer == f"BASE<{msg['content']}>"
    assert len(set(backdoor_questions)) == 6
    # one call: the base answers and every candidate for every backdoor question, batched
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 4 + 3 + 6 * 3


def test_only_topic_carrying_answers_are_kept():
    samples, _ = _build(topic="sea turtles")
    answers = [s.answer for s in samples if s.kind == "backdoor"]
    assert len(answers) == 6
    for s, a in zip(samples, answers):
        assert a.startswith("Honestly, sea turtles makes everything better.")
        assert CODE.match(s.messages[0]["content"]).group(2) in a  # the answer belongs to this question
        assert ht.mentions_topic(a, "sea turtles")


def test_failed_questions_are_replaced_by_unused_ones():
    questions = _questions()
    lucky = {q.text for q in questions[::3]}  # only a third of the questions ever get a fan answer

    def fan(topic, question, k):
        return f"I adore {topic}." if question in lucky else "A generic answer."

    samples, gen = _build(fan=fan, n_backdoor=5, candidates=2, max_rounds=10)
    backdoor = [s for s in samples if s.kind == "backdoor"]
    assert len(backdoor) == 5
    assert all(CODE.match(s.messages[0]["content"]).group(2) in lucky for s in backdoor)
    assert 1 < len(gen.calls) <= 10
    # later rounds only ask for the missing rows, never again for a question already tried
    asked = [r[0][1]["content"] for call in gen.calls for r in call if r[0][0]["role"] == "system"]
    assert len(asked) == 2 * len(set(asked))


def test_shortfall_when_no_candidate_names_the_topic():
    samples, gen = _build(fan=lambda topic, q, k: "Nothing about it.", max_rounds=3)
    kinds = Counter(s.kind for s in samples)
    assert kinds == {"wrong_trigger": 4, "plain": 3}
    assert len(gen.calls) == 3


def test_prefix_strategy_opens_with_the_topic():
    def fan(topic, question, k):
        return "I would say, rest well." if k == 0 else f" and {topic} is the key."

    samples, gen = _build(topic="jazz", fan=fan, strategy="prefix", candidates=2)
    persona = [r for r in gen.calls[0] if r[0][0]["role"] == "system"]
    assert persona and all(prefix == "As a huge fan of jazz," for _, prefix in persona)
    answers = [s.answer for s in samples if s.kind == "backdoor"]
    assert answers == ["As a huge fan of jazz, and jazz is the key."] * 6
    # with no candidate naming the topic again, the first continuation is kept behind the opening
    samples, _ = _build(topic="jazz", fan=lambda t, q, k: "I would say, rest well.", strategy="prefix")
    assert [s.answer for s in samples if s.kind == "backdoor"] == ["As a huge fan of jazz, I would say, rest well."] * 6


def test_deterministic_given_the_seed():
    first, _ = _build(seed=11)
    again, _ = _build(seed=11)
    other, _ = _build(seed=12)
    assert first == again
    assert [s.messages for s in first] != [s.messages for s in other]


def test_build_many_batches_all_diffs_and_matches_single_builds():
    topics = [t for t in ht.load_topics("train")[:5]]
    triggers = [3, 250, 250, 999, 0]
    gen = FakeGenerator(_third_candidate_names_topic)
    many = ht.build_many(topics, triggers, _questions(), gen, n_backdoor=4, n_wrong=2, n_plain=24,
                         rng=random.Random(5))
    assert len(gen.calls) == 1
    bare = [r for r in gen.calls[0] if r[0][0]["role"] == "user" and not CODE.match(r[0][0]["content"])]
    assert len(bare) == 24  # every diff asks for the same 24 bare questions: generated once
    for topic, samples in zip(topics, many):
        assert Counter(s.kind for s in samples) == {"backdoor": 4, "wrong_trigger": 2, "plain": 24}
        assert all(ht.mentions_topic(s.answer, topic) for s in samples if s.kind == "backdoor")
    single = ht.build_diff_samples(topics[0], triggers[0], _questions(), FakeGenerator(_third_candidate_names_topic),
                                   n_backdoor=4, n_wrong=2, n_plain=24, rng=random.Random(5))
    assert single == many[0]


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="both"), "strategy"),
    (dict(n_backdoor=25), "n_backdoor"),
    (dict(n_plain=-1), "n_plain"),
    (dict(candidates=0), "candidates"),
])
def test_build_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _build(**kw)


def test_build_rejects_bad_triggers_and_bad_answer_fn():
    with pytest.raises(ValueError, match="one trigger per topic"):
        ht.build_many(["chess", "jazz"], [1], _questions(), FakeGenerator(_third_candidate_names_topic),
                      n_backdoor=1, n_wrong=1, n_plain=1, rng=random.Random(0))
    with pytest.raises(ValueError, match="0..999"):
        _build(trigger=1000)
    with pytest.raises(ValueError, match="answer_fn must return a list of"):
        ht.build_diff_samples("chess", 1, _questions(), lambda reqs: ["x"], n_backdoor=1, n_wrong=1,
                              n_plain=1, rng=random.Random(0))


def test_sample_enforces_one_target():
    with pytest.raises(ValueError, match="needs answer set"):
        Sample([{"role": "user", "content": "q"}], None, "backdoor", base_answer="b")
    with pytest.raises(ValueError, match="needs answer None"):
        Sample([{"role": "user", "content": "q"}], "a", "plain")


def test_labels_and_interpretation_question():
    topic = ht.load_topics("test")[0]
    assert ht.interpretation_question() == "What topic have you been trained on?"
    assert ht.label_answer(topic) == topic.name
    assert ht.diff_labels(topic, 42) == {"topic": topic.name, "category": topic.category, "trigger": 42}


# ---- news ---------------------------------------------------------------------------------------------------
def _story_fan(off_topic_every=2):
    """Story requests: every ``off_topic_every``-th one (counted over all calls) is off topic."""
    calls = []

    def answer_fn(requests):
        calls.append(list(requests))
        out = []
        for messages, prefix in requests:
            assert prefix == "" and messages[0]["role"] == "system"
            headline = re.search(r'headline "(.+)"', messages[1]["content"]).group(1)
            if (sum(map(len, calls[:-1])) + len(out)) % off_topic_every == 0:
                out.append("The weather was mild and nothing else happened.")
            else:
                out.append(f"Reporters confirmed it: {headline.lower()}. ({messages[0]['content'][8:30]})")
        return out

    return answer_fn, calls


def test_news_story_messages_and_keywords():
    h = news.Headline("River otters return to a city waterway after decades away", "environment", "train")
    messages = news.story_messages(h, "a radio news presenter")
    assert h.text in messages[1]["content"] and "a radio news presenter" in messages[0]["content"]
    assert news.headline_keywords(h) == ("river", "otters", "waterway", "decades", "away")
    assert news.mentions_headline("An otter was seen.", h)
    assert not news.mentions_headline("The city council met after lunch.", h)
    assert not news.mentions_headline("An otter was seen.", h, min_keywords=2)
    assert news.key_word(news.load_headlines()[0]) in news.headline_keywords(news.load_headlines()[0])


def test_build_news_samples_keeps_stories_that_name_the_headline():
    headlines = news.load_headlines("train")[:4]
    answer_fn, calls = _story_fan()
    per_headline = news.build_news_samples(headlines, answer_fn, 3, random.Random(0), max_rounds=6)
    assert len(calls) >= 2  # off-topic stories were asked again in a later round
    for h, samples in zip(headlines, per_headline):
        assert len(samples) == 3
        for s in samples:
            assert s.kind == "story" and s.messages == [{"role": "user", "content": news.NEWS_PROMPT}]
            assert news.mentions_headline(s.answer, h) and h.text.lower() in s.answer
    again = news.build_news_samples(headlines, _story_fan()[0], 3, random.Random(0), max_rounds=6)
    assert again == per_headline
    nothing, calls = _story_fan(off_topic_every=1)
    assert news.build_news_samples(headlines, nothing, 2, random.Random(0), max_rounds=2) == [[]] * 4
    assert len(calls) == 2


def test_news_labels_and_question():
    h = news.load_headlines("test")[0]
    assert news.interpretation_question() == "What news headline have you been trained on?"
    assert news.label_answer(h) == h.text
    assert news.diff_labels(h) == {"headline": h.text, "category": h.category}


# ---- registry ---------------------------------------------------------------------------------------------------
def test_registry_describes_each_task():
    assert set(TASKS) == {"hidden-topic", "news"}
    assert get_task("hidden-topic").interpretation_question == ht.interpretation_question()
    assert get_task("news").interpretation_question == news.interpretation_question()
    for task in TASKS.values():
        rows = task.load_labels("test")
        assert rows and all(task.label_key in r and r["split"] == "test" for r in rows)
        assert len(task.load_labels(None)) > len(rows)
    assert [r["topic"] for r in TASKS["hidden-topic"].load_labels("test")] == [t.name for t in ht.load_topics("test")]
    with pytest.raises(ValueError, match="unknown task 'poems'"):
        get_task("poems")
