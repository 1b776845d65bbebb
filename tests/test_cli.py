"""The dit command on the default model: generate, score, --help, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from dit_engine.cli import main


@pytest.mark.slow
def test_generate_chat_and_plain_prompts_in_one_call(capsys):
    assert main(["generate", "--chat", "What is the capital of France?", "Hello", "--max-new-tokens", "12",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["chat"]) for r in rows] == [("Hello", False), ("What is the capital of France?", True)]
    assert "Paris" in rows[1]["text"]
    assert len(rows[1]["token_ids"]) == len(rows[1]["logprobs"]) and all(lp <= 0 for lp in rows[1]["logprobs"])


@pytest.mark.slow
def test_score_prefers_the_right_answer(capsys):
    q = "What is the capital of France?"
    assert main(["score", "--chat", "--prompt", q, "--prompt", q, "The capital of France is Paris.",
                 "The capital of France is Berlin.", "--json"]) == 0
    right, wrong = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert math.isclose(right["total"], sum(right["logprobs"]))
    assert right["total"] > wrong["total"]


def test_every_subcommand_has_help(capsys):
    for cmd in (["fetch-model"], ["generate"], ["score"], ["zoo", "generate"], ["zoo", "info"], ["zoo", "import"],
                ["zoo", "export"], ["train"], ["interpret"], ["evaluate"], ["pipeline"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: dit" in capsys.readouterr().out


def test_bad_model_is_one_clear_error_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["generate", "--model", str(tmp_path), "--chat", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported model_type 'gpt2'" in err[0]
