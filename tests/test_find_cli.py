"""`dit find`: resuming a run (after a kill that tore the last line), refusing to mix runs, and
every bad input as one error line."""

from __future__ import annotations

import json

import pytest

from dit_engine.cli import main
from dit_engine.find.run import load_answers


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    err = [line for line in cap.err.replace("\r", "\n").splitlines() if line.strip() and "fn/s" not in line
           and "?fn" not in line]
    return code, cap.out, err


@pytest.fixture()
def suite(tmp_path, capsys):
    path = tmp_path / "suite.jsonl"
    assert run(["find", "generate", "--seed", "1", "--n-numeric", "3", "--n-string", "3", "--out", str(path)],
               capsys)[0] == 0
    return path


def test_a_torn_run_resumes_to_every_answer_once(tmp_path, suite, capsys):
    out = tmp_path / "run"
    argv = ["find", "run", "--suite", str(suite), "--agent", "reference", "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    full = (out / "answers.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:2]) + lines[2][:25])  # killed mid-append
    assert run(argv, capsys)[0] == 0
    again = (out / "answers.jsonl").read_text().splitlines()
    assert sorted(again) == sorted(full.splitlines()) and len(load_answers(out)) == 6
    code, out_text, _ = run(["find", "score", "--suite", str(suite), "--run", str(out), "--json"], capsys)
    assert code == 0 and json.loads(out_text)["overall"]["accuracy"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["find", "run", "--agent", "search", "--out", "R"], "the following arguments are required: --suite"),
    (["find", "run", "--suite", "S", "--agent", "oracle", "--out", "R"], "argument --agent: invalid choice"),
    (["find", "generate", "--n-numeric", "-3", "--out", "x.jsonl"], "-3 is negative"),
    (["find", "run", "--suite", "S", "--agent", "search", "--rounds", "2", "--out", "R"],
     "--rounds does not apply to --agent search"),
    (["find", "score", "--suite", "S", "--run", "R", "--timeout-s", "0"], "is not positive"),
])
def test_usage_errors_are_one_line(argv, message, suite, tmp_path, capsys):
    argv = [str(suite) if a == "S" else str(tmp_path / "run") if a == "R" else a for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("dit find"), err


def test_failures_are_one_line(tmp_path, suite, capsys):
    out = tmp_path / "run"
    code, _, err = run(["find", "run", "--suite", str(tmp_path / "none.jsonl"), "--agent", "zero", "--out", str(out)],
                       capsys)
    assert code == 1 and err == [f"dit find run: error: {tmp_path / 'none.jsonl'}: no such suite file (write one "
                                 "with 'dit find generate')"]
    assert run(["find", "run", "--suite", str(suite), "--agent", "zero", "--out", str(out)], capsys)[0] == 0
    code, _, err = run(["find", "run", "--suite", str(suite), "--agent", "reference", "--out", str(out)], capsys)
    assert code == 1 and len(err) == 1 and "holds a different run (zero on suite" in err[0]
    code, _, err = run(["find", "report", "--suite", str(suite), "--run", str(out), "--out", str(tmp_path / "rep")],
                       capsys)
    assert code == 1 and len(err) == 1 and "run 'dit find score'" in err[0]
    other = tmp_path / "other.jsonl"
    assert run(["find", "generate", "--seed", "2", "--n-numeric", "3", "--n-string", "3", "--out", str(other)],
               capsys)[0] == 0
    code, _, err = run(["find", "score", "--suite", str(other), "--run", str(out)], capsys)
    assert code == 1 and len(err) == 1 and "was run on another suite" in err[0]
    (tmp_path / "junk.jsonl").write_text("hello\n")
    code, _, err = run(["find", "run", "--suite", str(tmp_path / "junk.jsonl"), "--agent", "zero", "--out",
                        str(tmp_path / "r2")], capsys)
    assert code == 1 and "not a FIND suite" in err[0]
