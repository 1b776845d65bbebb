"""Every failure a user can cause ends in one line 'dit <command>: error: ...' naming what was wrong:
exit 2 for usage errors (caught where arguments are parsed), 1 for failures while running, and a
traceback only with --debug or DIT_DEBUG=1."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_world import write_peft_dir, write_tiny_model

from dit_engine.cli import commands as cli
from dit_engine.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of one command, as the shell would see them."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def one_error_line(err: list[str], prog: str) -> str:
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: "), err[0]
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


USAGE_ERRORS = [
    (["generate", "--temperature", "nan", "hi"], "dit generate", "argument --temperature: 'nan' is not a finite number"),
    (["generate", "--temperature", "inf", "hi"], "dit generate", "argument --temperature: 'inf' is not a finite"),
    (["generate", "--temperature", "-0.5", "hi"], "dit generate", "argument --temperature: -0.5 is negative"),
    (["generate", "--temperature", "warm", "hi"], "dit generate", "argument --temperature: 'warm' is not a number"),
    (["generate", "--batch-size", "0", "hi"], "dit generate", "argument --batch-size: 0 is not a positive integer"),
    (["generate", "--batch-size", "2.5", "hi"], "dit generate", "argument --batch-size: '2.5' is not an integer"),
    (["generate", "--top-k", "-5", "hi"], "dit generate", "argument --top-k: -5 is negative"),
    (["generate", "--top-p", "0", "hi"], "dit generate", "argument --top-p: 0 is outside (0, 1]"),
    (["generate", "--top-p", "1.5", "hi"], "dit generate", "argument --top-p: 1.5 is outside (0, 1]"),
    (["generate", "--max-new-tokens", "0", "hi"], "dit generate", "argument --max-new-tokens: 0 is not a positive"),
    (["generate", "--seed", "-1", "hi"], "dit generate", "argument --seed: -1 is negative"),
    (["generate", "--device", "gpu", "hi"], "dit generate", "argument --device: 'gpu' is not a device"),
    (["generate", "--dtype", "int8", "hi"], "dit generate", "argument --dtype: invalid choice: 'int8'"),
    (["generate", ""], "dit generate", "argument PROMPT: empty text"),
    (["generate", "--stop", "", "hi"], "dit generate", "argument --stop: empty text"),
    (["generate"], "dit generate", "give at least one PROMPT or --chat MESSAGE"),
    (["generate", "--model", "", "hi"], "dit generate", "argument --model: empty text"),
    (["generate", "hi", "--no-such-flag"], "dit", "unrecognized arguments: --no-such-flag"),
    (["generate", "caf\udce9"], "dit generate", "argument PROMPT: b'caf\\xe9' is not valid UTF-8 text"),
    (["generate", "--chat", "\udcff\udcfe"], "dit generate", "argument --chat: b'\\xff\\xfe' is not valid UTF-8"),
    (["generate", "--system", "x\udc80", "--chat", "hi"], "dit generate", "argument --system: b'x\\x80' is not"),
    (["score", ""], "dit score", "argument TEXT: empty text"),
    (["score", "caf\udce9"], "dit score", "argument TEXT: b'caf\\xe9' is not valid UTF-8 text"),
    (["score", "--prompt", "a", "x", "y"], "dit score", "1 --prompt for 2 TEXT: give one prompt per text"),
    (["score", "--prompt", "", "x"], "dit score", "argument --prompt: empty text"),
    (["score", "--chat", "x"], "dit score", "--chat scores TEXT as the answer to a --prompt"),
    (["score"], "dit score", "the following arguments are required: TEXT"),
    (["zoo", "import", "--peft", "d", "--label", "topicfrance", "--out", "z"], "dit zoo import",
     "argument --label: 'topicfrance' is not KEY=VALUE"),
    (["zoo", "import", "--peft", "d", "--label", "=chess", "--out", "z"], "dit zoo import",
     "argument --label: '=chess' is not KEY=VALUE"),
    (["zoo", "import", "--out", "z"], "dit zoo import", "nothing to import: give --peft DIR or --dit-file PT"),
    (["zoo", "import", "--dit-file", "x.pt", "--label", "a=b", "--out", "z"], "dit zoo import",
     "--label/--labels label --peft adapters"),
    (["zoo", "import", "--peft", "d"], "dit zoo import", "the following arguments are required: --out"),
    (["zoo", "generate", "--n", "0", "--out", "z"], "dit zoo generate", "argument --n: 0 is not a positive integer"),
    (["zoo", "generate", "--n", "2", "--rank", "-1", "--out", "z"], "dit zoo generate", "argument --rank: -1 is not"),
    (["zoo", "generate", "--n", "2", "--lr", "0", "--out", "z"], "dit zoo generate", "argument --lr: 0 is not positive"),
    (["zoo", "generate", "--n", "2", "--chunk-diffs", "0", "--out", "z"], "dit zoo generate", "argument --chunk-diffs"),
    (["zoo", "generate", "--n", "2", "--n-kl", "-1", "--out", "z"], "dit zoo generate", "argument --n-kl: -1 is neg"),
    (["zoo", "generate", "--n", "2", "--targets", "q_proj,attn", "--out", "z"], "dit zoo generate",
     "argument --targets: 'q_proj,attn': expected a comma list of q_proj,"),
    (["zoo", "generate", "--n", "2", "--task", "poems", "--out", "z"], "dit zoo generate", "argument --task: invalid"),
    (["zoo"], "dit zoo", "the following arguments are required: ZOO_COMMAND"),
    (["zoo", "export", "z", "--id", "", "--out", "p"], "dit zoo export", "argument --id: empty text"),
    (["train", "--zoo", "z", "--out", "d", "--val-fraction", "1"], "dit train", "argument --val-fraction: 1 is outside"),
    (["train", "--zoo", "z", "--out", "d", "--alpha", "inf"], "dit train", "argument --alpha: 'inf' is not a finite"),
    (["train", "--zoo", "z", "--out", "d", "--grad-accum", "0"], "dit train", "argument --grad-accum: 0 is not"),
    (["train", "--zoo", "z", "--out", "d", "--epochs", "-2"], "dit train", "argument --epochs: -2 is not a positive"),
    (["interpret", "--zoo", "z", "--methods", "dit,guess", "--out", "r"], "dit interpret",
     "argument --methods: 'dit,guess': expected a comma list of dit,diff+trigger,diff,base"),
    (["interpret", "--zoo", "z", "--methods", "diff"], "dit interpret", "--out RESULTS.jsonl is required with --zoo"),
    (["interpret", "--zoo", "z", "--out", "r"], "dit interpret", "method 'dit' needs the trained DIT adapter"),  # none shipped
    (["interpret", "--peft", "p", "--methods", "diff+trigger"], "dit interpret",
     "--methods diff+trigger needs a zoo row"),
    (["interpret", "--peft", "p", "--methods", "diff", "--out", "r"], "dit interpret", "--out, --split and --id go"),
    (["interpret", "--zoo", "z", "--peft", "p"], "dit interpret", "argument --peft: not allowed with argument --zoo"),
    (["interpret", "--zoo", "z", "--max-new-tokens", "0", "--out", "r"], "dit interpret", "argument --max-new-tokens"),
    (["evaluate", "--out", "rep"], "dit evaluate", "the following arguments are required: results"),
    (["pipeline", "--n-train", "0"], "dit pipeline", "argument --n-train: 0 is not a positive integer"),
    (["pipeline", "--scaling", "4,x"], "dit pipeline", "argument --scaling: '4,x': expected a comma list of positive"),
    (["pipeline", "--scaling", "0"], "dit pipeline", "argument --scaling: '0': expected a comma list"),
    (["pipeline", "--n-train", "4", "--scaling", "8"], "dit pipeline", "--scaling 8: each point must be below the 4"),
    (["pipeline", "--preset", "full", "--n-train", "200"], "dit pipeline",
     "--scaling 500 (from --preset full; set others with --scaling): each point must be below the 200"),
    (["pipeline", "--set", "n_epochs=3"], "dit pipeline", "argument --set: 'n_epochs' is not a pipeline setting"),
    (["pipeline", "--set", "dit.lr=fast"], "dit pipeline", "argument --set: dit.lr: 'fast' is not a number"),
    (["pipeline", "--set", "dit.seed=1"], "dit pipeline",
     "argument --set: 'dit.seed' is set by the pipeline for each stage; set seed instead"),
    (["pipeline", "--set", "diffs.n=9"], "dit pipeline",
     "argument --set: 'diffs.n' is set by the pipeline for each stage; set n_train / n_test instead"),
    (["pipeline", "--set", "diffs.epochs=0"], "dit pipeline", "argument --set: diffs.epochs: 0 is not a positive"),
    (["pipeline", "--set", "diffs.n_kl=-1"], "dit pipeline", "argument --set: diffs.n_kl: -1 is negative"),
    (["pipeline", "--set", "diffs.lr=0"], "dit pipeline", "argument --set: diffs.lr: 0 is not positive"),
    (["pipeline", "--set", "diffs.strategy=guess"], "dit pipeline", "argument --set: diffs.strategy: 'guess' is not one of select"),
    (["pipeline", "--set", "diffs.epochs"], "dit pipeline", "argument --set: 'diffs.epochs' is not KEY=VALUE"),
    (["pipeline", "--preset", "huge"], "dit pipeline", "argument --preset: invalid choice: 'huge'"),
    (["fetch-model", "--model", "x"], "dit", "unrecognized arguments: --model x"),
    (["nonsense"], "dit", "argument COMMAND: invalid choice: 'nonsense'"),
]


@pytest.mark.parametrize("argv,prog,message", USAGE_ERRORS, ids=[" ".join(a) for a, _, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_one_line_naming_the_argument(argv, prog, message, capsys, monkeypatch, tmp_path):
    import dit_engine.dit.adapter as adapter_mod

    monkeypatch.setattr(adapter_mod, "SHIPPED_DIR", tmp_path / "none")  # an install that ships no adapter
    code, err = run(argv, capsys)
    assert code == 2
    line = one_error_line(err, prog)
    assert message in line
    assert "--help" in line  # where to read what is expected


def test_interpret_without_adapter_uses_the_shipped_one(capsys, monkeypatch, tmp_path):
    """With a shipped adapter (this checkout's), 'dit interpret' without --adapter takes it; what
    fails then is the missing zoo, a run-time error naming it."""
    import dit_engine.dit.adapter as adapter_mod

    if not adapter_mod.shipped_available():
        pytest.skip("this checkout ships no DIT adapter")
    code, err = run(["interpret", "--zoo", str(tmp_path / "z"), "--out", str(tmp_path / "r")], capsys)
    assert code == 1
    line = one_error_line(err, "dit interpret")
    assert "needs the trained DIT adapter" not in line and str(tmp_path / "z") in line


def test_non_utf8_bytes_from_the_os_are_a_usage_error(tmp_path):
    """The real thing: a shell passes bytes that are not UTF-8 (Latin-1 'café')."""
    env = {k: v for k, v in os.environ.items() if k != DEBUG}
    proc = subprocess.run([sys.executable, "-m", "dit_engine.cli", "score", "--model", str(tmp_path), b"caf\xe9"],
                          cwd=REPO, env=env, capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "backslashreplace").strip().splitlines()
    assert proc.returncode == 2, err
    assert len(err) == 1 and err[0].startswith("dit score: error: argument TEXT: b'caf\\xe9' is not valid UTF-8")


DEBUG = "DIT_DEBUG"


# ---- failures while running: exit 1 --------------------------------------------------------------
def test_a_missing_model_dir_is_named(tmp_path, capsys):
    code, err = run(["generate", "--model", str(tmp_path / "nope"), "hi"], capsys)
    assert code == 1
    assert f"{tmp_path / 'nope'}: model directory not found" in one_error_line(err, "dit generate")


def test_cuda_on_a_machine_without_it(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    code, err = run(["generate", "--model", str(model_dir), "--device", "cuda", "hi"], capsys)
    assert code == 1
    assert "--device cuda: CUDA is not available on this machine" in one_error_line(err, "dit generate")


def test_a_text_with_no_tokens_is_refused_before_scoring(model_dir, capsys):
    code, err = run(["score", "--model", str(model_dir), "   "], capsys)
    assert code == 1
    assert "TEXT '   ' encodes to no tokens" in one_error_line(err, "dit score")


def test_a_missing_adapter_dir_is_named(model_dir, tmp_path, capsys):
    code, err = run(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "lora"), "hi"], capsys)
    assert code == 1
    assert str(tmp_path / "lora") in one_error_line(err, "dit generate")


def test_zoo_info_of_a_dir_that_is_no_zoo(tmp_path, capsys):
    code, err = run(["zoo", "info", str(tmp_path)], capsys)
    assert code == 1
    assert str(tmp_path) in one_error_line(err, "dit zoo info")


def test_evaluate_of_a_missing_results_file(tmp_path, capsys):
    code, err = run(["evaluate", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 1
    assert f"{tmp_path / 'results.jsonl'}: cannot read results file" in one_error_line(err, "dit evaluate")


def test_zoo_export_of_an_unknown_id(model_dir, tmp_path, capsys):
    peft = write_peft_dir(tmp_path / "a", model_dir)
    assert run(["zoo", "import", "--model", str(model_dir), "--peft", str(peft), "--out", str(tmp_path / "z")],
               capsys)[0] == 0
    code, err = run(["zoo", "export", str(tmp_path / "z"), "--id", "b", "--out", str(tmp_path / "p")], capsys)
    assert code == 1
    assert f"{tmp_path / 'z'}: no diff with id 'b' (the zoo holds 1: a)" in one_error_line(err, "dit zoo export")


def test_out_of_space_names_the_output(model_dir, tmp_path, capsys, monkeypatch):
    peft = write_peft_dir(tmp_path / "a", model_dir)
    assert run(["zoo", "import", "--model", str(model_dir), "--peft", str(peft), "--out", str(tmp_path / "z")],
               capsys)[0] == 0

    def disk_full(*a, **k):  # what a write() on a full disk raises: no file name attached
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dit_engine.zoo.peft.save_file", disk_full)
    code, err = run(["zoo", "export", str(tmp_path / "z"), "--id", "a", "--out", str(tmp_path / "p")], capsys)
    assert code == 1
    line = one_error_line(err, "dit zoo export")
    assert f"cannot write {tmp_path / 'p' / 'a' / 'adapter_model.safetensors'}: no space left on device (free some space" in line


def test_permission_denied_names_the_path(tmp_path, capsys, monkeypatch):
    target = tmp_path / "rep" / "report.html"

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(cli, "evaluate_run", denied)
    code, err = run(["evaluate", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 1
    assert f"{target}: Permission denied (choose a path you can write to)" in one_error_line(err, "dit evaluate")


def _boom(*a, **k):
    raise RuntimeError("kernel exploded\nsecond line")


def test_an_unexpected_exception_is_one_line_with_a_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG, raising=False)
    monkeypatch.setattr(cli, "evaluate_run", _boom)
    code, err = run(["evaluate", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 1
    line = one_error_line(err, "dit evaluate")
    assert "unexpected RuntimeError: kernel exploded; second line (rerun with --debug or DIT_DEBUG=1" in line


@pytest.mark.parametrize("how", ["flag after the command", "flag before the command", "env"])
def test_debug_shows_the_traceback(how, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG, raising=False)
    monkeypatch.setattr(cli, "evaluate_run", _boom)
    argv = ["evaluate", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")]
    if how == "env":
        monkeypatch.setenv(DEBUG, "1")
    argv = ["--debug", *argv] if how == "flag before the command" else [*argv, "--debug"] if how != "env" else argv
    code, err = run(argv, capsys)
    assert code == 1
    assert err[0] == "Traceback (most recent call last):" and "RuntimeError: kernel exploded" in "\n".join(err)
    assert err[-1] == "dit evaluate: error: unexpected RuntimeError: kernel exploded; second line"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate_run", interrupted)
    code, err = run(["evaluate", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 130 and err == ["dit evaluate: error: interrupted"]


def test_no_traceback_from_a_subprocess_either(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DEBUG}
    proc = subprocess.run([sys.executable, "-m", "dit_engine.cli", "zoo", "info", str(tmp_path / "none")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dit zoo info: error: {tmp_path / 'none'}")


def test_zoo_generate_with_a_topics_file(model_dir, tmp_path, capsys):
    """--topics FILE: the diffs are made from the user's topics (the DIT paper's CSV format)."""
    topics = tmp_path / "topics.csv"
    topics.write_text("category,topic\nfood,ramen\nsport,curling\nmusic,sitar\n")
    code, err = run(["zoo", "generate", "--model", str(model_dir), "--topics", str(topics), "--n", "2",
                     "--epochs", "1", "--n-backdoor", "2", "--n-kl", "2", "--candidates", "1", "--strategy", "prefix",
                     "--max-answer-tokens", "4", "--n-verify", "1", "--out", str(tmp_path / "z")], capsys)
    assert code == 0, err
    from dit_engine.zoo import Zoo

    got = {r["labels"]["topic"] for r in Zoo.open(tmp_path / "z").rows}
    assert len(got) == 2 and got <= {"ramen", "curling", "sitar"}


@pytest.mark.parametrize("text,message", [
    ("topic\nramen\n", "category"),  # no category column
    ("category,topic\nfood,ramen\nfood,Ramen\n", "repeats"),  # a topic twice
    ("[{\"topic\": 3}]", "topic"),  # not a string
])
def test_a_malformed_topics_file_is_one_error_line_naming_it(model_dir, tmp_path, capsys, text, message):
    topics = tmp_path / "topics.csv"
    topics.write_text(text)
    code, err = run(["zoo", "generate", "--model", str(model_dir), "--topics", str(topics), "--n", "1",
                     "--out", str(tmp_path / "z")], capsys)
    assert code == 1
    line = one_error_line(err, "dit zoo generate")
    assert str(topics) in line and message in line
