"""What every ``dit`` parser is built with: the one-line-error parser class, a command's leaf parser
(it takes ``--debug``), and the flags many commands share (model, sampling, checkpoint interval)."""

from __future__ import annotations

import argparse

from .args import (DEBUG_ENV, device_arg, nonempty_text, nonnegative_float, nonnegative_int, positive_float,
                   positive_int, probability, say_error)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line: ``dit <command>: error: ...`` (exit 2)."""

    def error(self, message: str):
        say_error(self.prog, f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", type=nonempty_text,
                   help="'default' (SmolLM2-135M-Instruct, fetched once into the cache), an HF checkpoint dir, "
                        "or ORG/NAME of a model already in the local Hugging Face cache")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu, cuda, cuda:1, ...")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling, 0 < p <= 1")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--seed", type=nonnegative_int, default=None)
    p.add_argument("--stop", action="append", default=[], type=nonempty_text, metavar="STRING",
                   help="stop string (repeatable)")


def _leaf(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A command's parser; it takes ``--debug`` too (after the command, where users type flags)."""
    p = sub.add_parser(name, **kw)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=f"show the traceback of a failure (or {DEBUG_ENV}=1)")
    return p


def _checkpoint_arg(p: argparse.ArgumentParser, cls) -> None:
    p.add_argument("--checkpoint-every", dest="checkpoint_every_s", type=positive_float, metavar="SECONDS",
                   default=cls.checkpoint_every_s,
                   help="seconds between progress checkpoints (also written on Ctrl-C / SIGTERM); default "
                        "%(default)s")
