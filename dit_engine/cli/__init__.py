"""The ``dit`` command: parses and checks arguments, calls the Python API, prints.

Every argument is checked where it is parsed (``type=`` functions), so a bad value is a usage
error (exit 2) that names the argument. Any failure ends in one line on stderr,
``dit <command>: error: ...``: exit 2 for usage errors, 1 for failures while running; a
traceback only with ``--debug`` (or ``DIT_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import errno
import os
import traceback

from .args import DEBUG_ENV, UsageError, say_error
from .commands import COMMANDS
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 2
    sub = getattr(args, f"{args.cmd}_cmd", None)  # a command group's subcommand (zoo, latentqa)
    prog = " ".join(["dit", args.cmd] + ([sub] if sub else []))
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return COMMANDS[args.cmd](args)
    except UsageError as e:
        say_error(prog, f"{e} (see '{prog} --help')")
        return 2
    except KeyboardInterrupt:
        say_error(prog, "interrupted")
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        say_error(prog, _describe(e, args, debug))
        return 1


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
    if where is None and (e.strerror or "").startswith("cannot "):
        pass  # the engine's own I/O errors name their file: "cannot write PATH: reason"
    elif where is None:
        # Writes that fail for lack of space carry no file name: name what the command writes to.
        out = getattr(args, "out", None) or getattr(args, "export_peft", None)
        where = f"writing under {out}" if out else None
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what += " (free some space or write elsewhere)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what += " (choose a path you can write to)"
    return f"{where}: {what}" if where else what
