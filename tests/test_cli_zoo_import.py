"""dit zoo import --peft with many adapters at once: repeated --peft, folders of adapter dirs, and
per-adapter labels from a CSV or JSON --labels file; clear errors for bad label files."""

from __future__ import annotations

import json

import pytest
from cli_world import write_peft_dir, write_tiny_model

from dit_engine.cli import main
from dit_engine.zoo import Zoo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and a folder 'loras/' holding three adapter dirs (plus a stray file and dir)."""
    root = tmp_path_factory.mktemp("imp")
    model = write_tiny_model(root / "model")
    for i, name in enumerate(["chess", "cooking", "jazz"]):
        write_peft_dir(root / "loras" / f"lora_{name}", model, seed=i)
    (root / "loras" / "README.txt").write_text("not an adapter")
    (root / "loras" / "empty").mkdir()
    return root, model


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


def _import(world, tmp_path, *extra):
    root, model = world
    return ["zoo", "import", "--model", str(model), *extra, "--out", str(tmp_path / "zoo")]


def _labels(tmp_path) -> dict:
    return {r["id"]: r["labels"] for r in Zoo.open(tmp_path / "zoo").rows}


def test_repeated_peft_and_a_common_label(world, tmp_path, capsys):
    root, _ = world
    code, out, _ = run(_import(world, tmp_path, "--peft", str(root / "loras" / "lora_jazz"), "--peft",
                               str(root / "loras" / "lora_chess"), "--label", "source=hand", "--split", "train"),
                       capsys)
    assert code == 0 and "imported 2 diffs" in out
    zoo = Zoo.open(tmp_path / "zoo")
    assert zoo.ids() == ["lora_jazz", "lora_chess"]
    assert {r["split"] for r in zoo.rows} == {"train"}
    assert _labels(tmp_path) == {"lora_jazz": {"source": "hand"}, "lora_chess": {"source": "hand"}}


def test_a_folder_of_adapters_with_a_csv_labels_file(world, tmp_path, capsys):
    root, _ = world
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("dir,topic,category\nlora_chess,chess,games\nloras/lora_cooking,cooking,food\n"
                        "lora_jazz,jazz,music\nlora_other,other,unused\n")
    code, out, _ = run(_import(world, tmp_path, "--peft", str(root / "loras"), "--labels", str(csv_file),
                               "--label", "topic=overridden", "--label", "batch=1"), capsys)
    assert code == 0 and "imported 3 diffs" in out
    assert _labels(tmp_path) == {
        "lora_chess": {"topic": "chess", "category": "games", "batch": "1"},
        "lora_cooking": {"topic": "cooking", "category": "food", "batch": "1"},
        "lora_jazz": {"topic": "jazz", "category": "music", "batch": "1"},
    }


@pytest.mark.parametrize("key", ["id", "name"])
def test_csv_key_column_may_be_id_or_name(key, world, tmp_path, capsys):
    root, _ = world
    (tmp_path / "l.csv").write_text(f"topic,{key}\nchess,lora_chess\n")
    assert run(_import(world, tmp_path, "--peft", str(root / "loras" / "lora_chess"), "--labels",
                       str(tmp_path / "l.csv")), capsys)[0] == 0
    assert _labels(tmp_path) == {"lora_chess": {"topic": "chess"}}


def test_a_json_labels_file(world, tmp_path, capsys):
    root, _ = world
    (tmp_path / "l.json").write_text(json.dumps({"lora_chess": {"topic": "chess", "level": 3},
                                                 "lora_cooking": {"topic": "cooking"},
                                                 "lora_jazz": {"topic": "jazz"}}))
    assert run(_import(world, tmp_path, "--peft", str(root / "loras"), "--labels", str(tmp_path / "l.json")),
               capsys)[0] == 0
    assert _labels(tmp_path)["lora_chess"] == {"topic": "chess", "level": 3}
    assert len(_labels(tmp_path)) == 3


LABEL_FILE_ERRORS = [
    ("l.csv", "dir,topic\nlora_chess,chess\nlora_cooking,cooking\n", "no labels for adapter dir(s) lora_jazz"),
    ("l.csv", "folder,topic\nlora_chess,chess\n", "has no 'dir', 'id' or 'name' column"),
    ("l.csv", "dir\nlora_chess\n", "at least one label column"),
    ("l.csv", "dir,topic,topic\nlora_chess,a,b\n", "distinct, non-empty column names"),
    ("l.csv", "dir,topic\nlora_chess,chess,extra\n", "row 2 has 3 fields, the header has 2"),
    ("l.csv", "dir,topic\nlora_chess,chess\nlora_chess,chess\n", "'lora_chess' appears twice (rows 2 and 3)"),
    ("l.csv", "dir,topic\n,chess\n", "row 2 has an empty 'dir'"),
    ("l.csv", "dir,topic\nlora_chess,\n", "row 2 (lora_chess) has no label values"),
    ("l.csv", "", "empty; expected a header row"),
    ("l.json", "{\"lora_chess\": {\"topic\": \"chess\"}", "not valid JSON (line 1"),
    ("l.json", "[\"lora_chess\"]", "expected a JSON object {adapter dir name: {key: value}}, found list"),
    ("l.json", "{\"lora_chess\": \"chess\"}", "entry 'lora_chess' must be a non-empty object of labels"),
    ("l.json", "{\"lora_chess\": {\"topic\": [1, 2]}}", "labels must be strings or numbers"),
]


@pytest.mark.parametrize("name,text,message", LABEL_FILE_ERRORS, ids=[m for _, _, m in LABEL_FILE_ERRORS])
def test_a_bad_labels_file_is_one_clear_line(name, text, message, world, tmp_path, capsys):
    root, _ = world
    (tmp_path / name).write_text(text)
    code, _, err = run(_import(world, tmp_path, "--peft", str(root / "loras"), "--labels", str(tmp_path / name)),
                       capsys)
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"dit zoo import: error: --labels {tmp_path / name}: "), err
    assert message in err[0]
    assert not (tmp_path / "zoo").exists()  # checked before anything is written


def test_a_labels_file_that_is_not_utf8(world, tmp_path, capsys):
    root, _ = world
    (tmp_path / "l.csv").write_bytes(b"dir,topic\nlora_chess,caf\xe9\n")
    code, _, err = run(_import(world, tmp_path, "--peft", str(root / "loras"), "--labels", str(tmp_path / "l.csv")),
                       capsys)
    assert code == 1 and len(err) == 1 and "not UTF-8 text" in err[0]


def test_a_missing_labels_file_is_named(world, tmp_path, capsys):
    root, _ = world
    code, _, err = run(_import(world, tmp_path, "--peft", str(root / "loras"), "--labels", str(tmp_path / "no.csv")),
                       capsys)
    assert code == 1 and len(err) == 1 and f"{tmp_path / 'no.csv'}: No such file or directory" in err[0]


def test_a_peft_folder_without_adapters(world, tmp_path, capsys):
    root, _ = world
    code, _, err = run(_import(world, tmp_path, "--peft", str(root / "loras" / "empty")), capsys)
    assert code == 1 and len(err) == 1
    assert f"--peft {root / 'loras' / 'empty'}: holds no adapter_config.json, and no adapter dirs" in err[0]
    code, _, err = run(_import(world, tmp_path, "--peft", str(root / "nowhere")), capsys)
    assert code == 1 and f"--peft {root / 'nowhere'}: no such directory" in err[0]
