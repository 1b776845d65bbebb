"""LatentQA data: the packaged personas and stimuli, the loaders' errors on malformed files, and the
reader for the reference repository's data directories (pure python, no model)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from dit_engine.latentqa import (CATEGORIES, MIN_QA, QA, ReferenceDialog, load_personas, load_stimuli,
                                 read_reference)
from dit_engine.tasks.datafiles import TaskDataError

SENTENCE_END = re.compile(r"[.!?]['\"]?(?:\s|$)")


# ---- the packaged data -------------------------------------------------------------------------------------
def test_packaged_personas_counts_and_splits():
    personas, train, test = load_personas(), load_personas("train"), load_personas("test")
    assert len(personas) >= 130
    assert train + test == [p for p in personas if p.split == "train"] + [p for p in personas if p.split == "test"]
    assert len(train) + len(test) == len(personas)
    assert 0.15 <= len(test) / len(personas) <= 0.25
    assert {p.category for p in personas} == set(CATEGORIES)
    assert {p.category for p in train} == {p.category for p in test} == set(CATEGORIES)
    assert not {p.id for p in train} & {p.id for p in test}
    assert not {p.label.casefold() for p in train} & {p.label.casefold() for p in test}
    assert all(len(p.qa) >= MIN_QA for p in personas)


def test_packaged_personas_are_unique_consistent_and_plain_ascii():
    personas = load_personas()
    assert len({p.id for p in personas}) == len(personas)
    assert len({p.label.casefold() for p in personas}) == len(personas)
    for p in personas:
        texts = [p.id, p.label, p.category, p.system, *(s for qa in p.qa for s in (qa.q, qa.a))]
        assert all(t.isascii() and t == t.strip() for t in texts), p.id
        assert 1 <= len(SENTENCE_END.findall(p.system)) <= 3, p.id
        # The first pair asks who the assistant is and answers with the label itself.
        assert p.qa[0].a == p.label[0].upper() + p.label[1:] + ".", p.id
        assert len({qa.q for qa in p.qa}) == len(p.qa), p.id
        assert all(len(qa.a.split()) <= 12 for qa in p.qa), p.id
    # Questions vary across personas, so the decoder cannot key on one fixed wording.
    assert len({qa.q for p in personas for qa in p.qa}) >= 10


def test_packaged_stimuli_counts_splits_and_form():
    stimuli, train, test = load_stimuli(), load_stimuli("train"), load_stimuli("test")
    assert len(stimuli) >= 60 and len(train) + len(test) == len(stimuli)
    assert 0.15 <= len(test) / len(stimuli) <= 0.25
    assert len({s.text.casefold() for s in stimuli}) == len(stimuli)
    assert all(s.text.isascii() and s.text.endswith(("?", ".")) and len(s.text.split()) <= 15 for s in stimuli)


def test_loaders_refuse_an_unknown_split():
    with pytest.raises(ValueError, match="latentqa.load_personas: split must be one of"):
        load_personas("dev")
    with pytest.raises(ValueError, match="latentqa.load_stimuli: split must be one of"):
        load_stimuli("eval")


# ---- malformed persona and stimulus files ------------------------------------------------------------------
def _persona(pid: str, label: str, split: str = "train") -> dict:
    return {"id": pid, "label": label, "category": "profession", "split": split,
            "system": f"You are {label}.",
            "qa": [{"q": "Who is the assistant?", "a": label}, {"q": "What mood is it in?", "a": "Calm."},
                   {"q": "What does it like?", "a": "Tea."}]}


def _write(path, key: str, records: list) -> None:
    path.write_text(json.dumps({"format": 1, key: records}))


def test_a_user_persona_file_loads(tmp_path):
    path = tmp_path / "personas.json"
    _write(path, "personas", [_persona("a-cook", "a cook"), _persona("a-pilot", "a pilot", "test")])
    personas = load_personas(path=path)
    assert [p.id for p in personas] == ["a-cook", "a-pilot"]
    assert personas[1].split == "test" and personas[1].qa[0] == QA("Who is the assistant?", "a pilot")
    assert [p.id for p in load_personas("test", path=path)] == ["a-pilot"]


def _broken(change) -> list:
    records = [_persona("a-cook", "a cook"), _persona("a-pilot", "a pilot")]
    change(records[1])
    return records


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.pop("system"), r"personas\[1\]: expected fields .* missing \['system'\]"),
    (lambda r: r.update(colour="red"), r"personas\[1\]: expected fields .* unknown \['colour'\]"),
    (lambda r: r.update(id="a-cook"), r"personas\[1\] repeats id 'a-cook' of personas\[0\]"),
    (lambda r: r.update(label="A Cook"), r"personas\[1\] \(id 'a-pilot'\): repeats label 'A Cook' of personas\[0\]"),
    (lambda r: r.update(split="eval"), r"personas\[1\]: split must be one of \('train', 'test'\), found 'eval'"),
    (lambda r: r.update(label="  "), r"personas\[1\]: field 'label' must be a non-empty str"),
    (lambda r: r.update(id="A Pilot"), r"personas\[1\] \(id 'A Pilot'\): id must be a slug"),
    (lambda r: r.update(qa=r["qa"][:2]), r"personas\[1\] \(id 'a-pilot'\): has 2 question/answer pairs, expected "
                                         r"at least 3"),
    (lambda r: r.update(qa={"q": "x", "a": "y"}), r"personas\[1\] \(id 'a-pilot'\): field 'qa' must be a list"),
    (lambda r: r["qa"][2].update(a=""), r"personas\[1\] \(id 'a-pilot'\): qa\[2\]: expected an object with non-empty"),
    (lambda r: r["qa"][1].pop("q"), r"personas\[1\] \(id 'a-pilot'\): qa\[1\]: expected an object"),
    (lambda r: r["qa"][2].update(q="who is the assistant?"), r"personas\[1\] \(id 'a-pilot'\): qa\[2\]: repeats the "
                                                              r"question"),
], ids=["missing-field", "unknown-field", "duplicate-id", "duplicate-label", "bad-split", "empty-label", "bad-id",
        "two-qa", "qa-not-a-list", "empty-answer", "qa-without-q", "repeated-question"])
def test_a_malformed_persona_file_names_the_file_and_the_record(tmp_path, change, expected):
    path = tmp_path / "personas.json"
    _write(path, "personas", _broken(change))
    with pytest.raises(TaskDataError) as err:
        load_personas(path=path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(expected, message), message


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"format": 1, "persona": []}', "expected an object with \"format\": 1 and a list 'personas'"),
    ('{"format": 1, "personas": []}', "'personas' is empty"),
])
def test_a_persona_file_of_the_wrong_shape_names_the_file(tmp_path, content, expected):
    path = tmp_path / "personas.json"
    path.write_text(content)
    with pytest.raises(TaskDataError) as err:
        load_personas(path=path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


@pytest.mark.parametrize("records, expected", [
    ([{"text": "Hi?", "split": "train"}, {"text": "hi?", "split": "test"}], r"stimuli\[1\] repeats text 'hi\?'"),
    ([{"text": "Hi?", "split": "dev"}], r"stimuli\[0\]: split must be one of"),
    ([{"text": "", "split": "train"}], r"stimuli\[0\]: field 'text' must be a non-empty str"),
])
def test_a_malformed_stimulus_file_names_the_file_and_the_record(tmp_path, records, expected):
    path = tmp_path / "stimuli.json"
    _write(path, "stimuli", records)
    with pytest.raises(TaskDataError) as err:
        load_stimuli(path=path)
    assert str(err.value).startswith(f"{path}: ") and re.search(expected, str(err.value)), str(err.value)


# ---- the reference repository's format -----------------------------------------------------------------------
REFERENCE = {
    "system.json": [
        {"system": "Act as a lighthouse keeper.", "stimulus_user": "How was your night?",
         "label": "persona-lighthouse-keeper"},
        {"system": "Always answer with a question.", "stimulus_user": "What is two plus two?",
         "label": "goal-answer-with-questions"},
    ],
    "stimulus.json": [
        {"control_user": "Pretend you are a lighthouse keeper.", "control_thought": "Fine, a keeper it is.",
         "control_model": "Aye, the lamp is lit.", "stimulus_user": "Any ships tonight?",
         "label": "persona-lighthouse-keeper"},
    ],
    "control.json": [
        {"control_user": "Only say things that are true about owls.", "label": "sqa-owl-facts"},
    ],
    "qa.json": {
        "persona-lighthouse-keeper": [["Who is the assistant?", "A lighthouse keeper."],
                                      ["Where does it live?", "On a rocky coast."]],
        "goal-answer-with-questions": [["What is the assistant's goal?", "To answer with questions."],
                                       ["How will it reply?", "With a question."]],
        "sqa-owl-facts": [["What does the assistant talk about?", "Owls."], ["Is it truthful?", "Yes."]],
        "persona-unused": [["Who?", "Nobody."], ["Why?", "No file uses this label."]],
    },
}


def _reference_dir(tmp_path, name: str = "train", files: dict | None = None):
    directory = tmp_path / name
    directory.mkdir()
    for file, content in (REFERENCE if files is None else files).items():
        (directory / file).write_text(json.dumps(content))
    return directory


def test_read_reference_groups_each_label_with_its_dialogs_and_qa(tmp_path):
    labels = read_reference(_reference_dir(tmp_path))
    # In order of first appearance; "persona-unused" has QA pairs but no instruction, so it is left out.
    assert [lab.id for lab in labels] == ["persona-lighthouse-keeper", "goal-answer-with-questions", "sqa-owl-facts"]
    keeper, goal, owls = labels
    assert [lab.category for lab in labels] == ["persona", "goal", "sqa"]
    assert {lab.split for lab in labels} == {"train"}
    assert keeper.dialogs == (
        ReferenceDialog("system", system="Act as a lighthouse keeper.", stimulus_user="How was your night?"),
        ReferenceDialog("stimulus", control_user="Pretend you are a lighthouse keeper.",
                        control_thought="Fine, a keeper it is.", control_model="Aye, the lamp is lit.",
                        stimulus_user="Any ships tonight?"))
    assert keeper.qa == (QA("Who is the assistant?", "A lighthouse keeper."),
                         QA("Where does it live?", "On a rocky coast."))
    assert owls.dialogs == (ReferenceDialog("control", control_user="Only say things that are true about owls."),)
    assert goal.qa[1] == QA("How will it reply?", "With a question.")


def test_read_reference_takes_the_split_from_the_directory_name_or_the_caller(tmp_path):
    assert {lab.split for lab in read_reference(_reference_dir(tmp_path, "eval"))} == {"test"}
    other = _reference_dir(tmp_path, "mine")
    with pytest.raises(ValueError, match="cannot tell the split of .*mine.*pass split="):
        read_reference(other)
    assert {lab.split for lab in read_reference(other, split="test")} == {"test"}
    with pytest.raises(ValueError, match="split must be one of"):
        read_reference(other, split="eval")


def test_read_reference_needs_qa_and_one_instruction_file(tmp_path):
    only_qa = _reference_dir(tmp_path, "train", {"qa.json": REFERENCE["qa.json"]})
    with pytest.raises(TaskDataError, match=r"train: no LatentQA instruction file"):
        read_reference(only_qa)
    no_qa = _reference_dir(tmp_path, "eval", {"control.json": REFERENCE["control.json"]})
    with pytest.raises(TaskDataError, match=r"eval/qa.json: not found"):
        read_reference(no_qa)
    with pytest.raises(TaskDataError, match=r"nowhere: not a directory"):
        read_reference(tmp_path / "nowhere")


def _with(file: str, change) -> dict:
    files = copy.deepcopy(REFERENCE)
    change(files[file])
    return files


@pytest.mark.parametrize("files, file, expected", [
    (_with("control.json", lambda c: c[0].update(label="sqa-missing")), "control.json",
     r"item 0 \(label 'sqa-missing'\): no question/answer pairs for this label in .*qa.json"),
    (_with("system.json", lambda s: s[1].pop("label")), "system.json", r"item 1: expected an object with a non-empty "
                                                                      r"string 'label'"),
    (_with("stimulus.json", lambda s: s[0].update(reply="x")), "stimulus.json",
     r"item 0 \(label 'persona-lighthouse-keeper'\): unknown fields \['reply'\]"),
    (_with("system.json", lambda s: s[0].update(system="")), "system.json",
     r"item 0 \(label 'persona-lighthouse-keeper'\): needs a non-empty 'system' or 'control_user'"),
    (_with("control.json", lambda c: c[0].update(control_user=3)), "control.json",
     r"item 0 \(label 'sqa-owl-facts'\): fields \['control_user'\] must be strings"),
    (_with("qa.json", lambda q: q["sqa-owl-facts"].append(["Only a question"])), "qa.json",
     r"label 'sqa-owl-facts': pair 2: expected \[question, answer\]"),
    (_with("qa.json", lambda q: q.update({"goal-answer-with-questions": []})), "qa.json",
     r"label 'goal-answer-with-questions': expected a non-empty list"),
    ({**REFERENCE, "qa.json": [["Who?", "Me."]]}, "qa.json", r"holding a JSON object, found a array"),
    ({**REFERENCE, "control.json": {"label": "x"}}, "control.json", r"holding a JSON array, found a object"),
], ids=["label-without-qa", "item-without-label", "unknown-field", "no-instruction", "non-string-field",
        "short-pair", "no-pairs", "qa-not-an-object", "file-not-a-list"])
def test_a_malformed_reference_file_names_the_file_and_the_record(tmp_path, files, file, expected):
    directory = _reference_dir(tmp_path, "train", files)
    with pytest.raises(TaskDataError) as err:
        read_reference(directory)
    message = str(err.value)
    assert message.startswith(f"{directory / file}: ") and "\n" not in message
    assert re.search(expected, message), message

