"""The commands that read or write PEFT adapters, typed as a user types them, on the tiny model:
zoo import, zoo export, score/generate --adapter and interpret --peft."""

from __future__ import annotations

import json

import pytest
import torch
from cli_world import write_peft_dir, write_tiny_model

from dit_engine.cli import main
from dit_engine.engine import Engine
from dit_engine.zoo import BaseIdentity, Zoo
from dit_engine.zoo import import_peft


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, model_dir):
    return write_peft_dir(tmp_path_factory.mktemp("peft") / "my_lora", model_dir, rank=2, alpha=4.0, seed=3)


def test_zoo_import_peft_stores_the_adapter_with_its_label(tmp_path, model_dir, peft_dir, capsys):
    out = tmp_path / "imported"
    assert main(["zoo", "import", "--model", str(model_dir), "--peft", str(peft_dir), "--label", "topic=chess",
                 "--out", str(out)]) == 0
    assert "imported 1 diffs" in capsys.readouterr().out
    zoo = Zoo.open(out)
    assert zoo.ids() == ["my_lora"]
    diff = zoo.get("my_lora")
    assert diff.labels == {"topic": "chess"} and diff.split == "test"
    assert diff.scale == pytest.approx(2.0)  # lora_alpha / r
    name = "model.layers.1.self_attn.v_proj"
    from safetensors.torch import load_file

    raw = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert torch.equal(diff.A[name], raw[f"base_model.model.{name}.lora_A.weight"])


def test_zoo_export_writes_a_peft_dir_that_reads_back(tmp_path, model_dir, peft_dir, capsys):
    eng = Engine.load(str(model_dir))
    zoo = Zoo.create(tmp_path / "zoo", BaseIdentity.from_model(eng.model), eng.config)
    zoo.append([import_peft(peft_dir, eng.config, id="d0", labels={"topic": "chess"})])
    assert main(["zoo", "export", str(tmp_path / "zoo"), "--id", "d0", "--out", str(tmp_path / "peft")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "peft" / "d0")
    back = import_peft(tmp_path / "peft" / "d0", eng.config)
    assert back.id == "d0" and back.labels == {"topic": "chess"}
    want = zoo.get("d0")
    for m in want.A:
        assert torch.allclose(back.delta(m), want.delta(m), atol=1e-6)
    assert json.loads((tmp_path / "peft" / "d0" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _score_json(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_score_with_an_adapter_changes_the_log_probs(model_dir, peft_dir, capsys):
    text = "hello tell me a story"
    assert main(["score", "--model", str(model_dir), text, "--json"]) == 0
    (plain,) = _score_json(capsys)
    assert main(["score", "--model", str(model_dir), text, "--adapter", str(peft_dir), "--json"]) == 0
    (adapted,) = _score_json(capsys)
    assert plain["token_ids"] == adapted["token_ids"]
    assert plain["total"] != pytest.approx(adapted["total"], abs=1e-6)


def test_generate_with_an_adapter_runs_it_on_every_prompt(model_dir, peft_dir, capsys):
    args = ["generate", "--model", str(model_dir), "hello", "say it", "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    plain = _score_json(capsys)
    assert main([*args, "--adapter", str(peft_dir)]) == 0
    adapted = _score_json(capsys)
    assert [r["prompt"] for r in adapted] == ["hello", "say it"]
    assert [r["logprobs"] for r in plain] != [r["logprobs"] for r in adapted]


def test_interpret_peft_prints_one_answer_per_method(model_dir, peft_dir, capsys):
    assert main(["interpret", "--model", str(model_dir), "--peft", str(peft_dir), "--methods", "diff,base",
                 "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["diff", "base"]
