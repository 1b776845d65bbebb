"""User label files (``--topics FILE`` / ``--headlines FILE``): CSV with a header or a JSON list, and
one-line errors that name the file, the line and what was expected."""

from __future__ import annotations

import json

import pytest

from dit_engine.diffgen import DiffGenConfig, _task_items
from dit_engine.tasks.datafiles import TaskDataError, read_label_file
from dit_engine.tasks.hidden_topic import load_topics_file


def test_csv_topics_in_either_column_order_with_optional_split(tmp_path):
    f = tmp_path / "topics.csv"
    f.write_text("category,topic\nmammals,elephants\nspace,\"black holes, and more\"\n\nfood,sushi\n")
    assert [(t.name, t.category, t.split) for t in load_topics_file(f, "test")] == [
        ("elephants", "mammals", "test"), ("black holes, and more", "space", "test"), ("sushi", "food", "test")]
    g = tmp_path / "split.csv"
    g.write_text("topic,category,split\nelephants,mammals,train\nsushi,food,test\nchess,games,\n")
    assert [t.name for t in load_topics_file(g, "train")] == ["elephants", "chess"]
    assert [t.name for t in load_topics_file(g, "test")] == ["sushi", "chess"]


def test_json_topics_list(tmp_path):
    f = tmp_path / "topics.json"
    f.write_text(json.dumps([{"topic": "volcanoes", "category": "earth"}, {"category": "music", "topic": "jazz"}]))
    assert [(t.name, t.category) for t in load_topics_file(f, "train")] == [("volcanoes", "earth"), ("jazz", "music")]


@pytest.mark.parametrize("text, match", [
    ("name,category\nelephants,mammals\n", r"line 1: expected a header 'category,topic'"),
    ("category,topic\nmammals,elephants\nspace\n", r"line 3: expected 2 comma-separated values"),
    ("category,topic\nmammals,elephants\nfood,\n", r"line 3: topic is empty"),
    ("category,topic\nmammals,elephants\nzoo,Elephants\n", r"line 3: topic 'Elephants' repeats line 2"),
    ("category,topic,split\nmammals,elephants,dev\n", r"line 2: split must be one of"),
    ("category,topic\n", r"no topic rows"),
    ('[{"topic": "jazz"}]', r"item 0: expected an object with keys 'topic' and 'category'"),
    ('[{"topic": "jazz", "category": "music"},', r"line 1: not valid JSON"),
    ('{"topic": "jazz"}', r"expected a JSON list"),
])
def test_malformed_files_fail_in_one_line_naming_file_and_place(tmp_path, text, match):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(TaskDataError, match=match) as e:
        read_label_file(f, "topic")
    msg = str(e.value)
    assert msg.startswith(str(f)) and "\n" not in msg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(TaskDataError, match=r"nope.csv: topic file not found"):
        load_topics_file(tmp_path / "nope.csv", "train")


def test_config_takes_labels_from_the_files(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("category,topic\nmammals,elephants\nfood,sushi\n")
    items = _task_items(DiffGenConfig(topics_file=str(t), split="train"))
    assert sorted(x.name for x in items) == ["elephants", "sushi"]
    h = tmp_path / "h.json"
    h.write_text(json.dumps([{"headline": "Otters open a bakery", "category": "odd"}]))
    items = _task_items(DiffGenConfig(task="news", headlines_file=str(h), split="test"))
    assert [(x.text, x.split) for x in items] == [("Otters open a bakery", "test")]
