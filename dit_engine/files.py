"""The one atomic write and the one JSON reader, used by every room that writes or reads files.

``write_atomically`` writes a temp file beside the target, fsyncs it, renames it into place and
fsyncs the directory: a reader (or a process killed mid-write) sees the old file or the whole new
one, never a part. ``read_json`` turns the three ways a JSON file can be unusable (missing, not
UTF-8 / not JSON, not the expected kind of value) into one error line naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # in the name of every temp file this module writes (recovery deletes them)


class FileFormatError(ValueError):
    """A file that exists but cannot be used as what it should be: names the file and why."""


def write_atomically(path: str | Path, write: Callable[[Path], Any], *, mode: int | None = 0o644) -> None:
    """Write ``path`` via ``write(tmp)`` on a temp file in the same directory, fsync, rename.

    On failure the temp file is removed and the old ``path`` (if any) is untouched; an OSError
    (a full disk, no permission) is re-raised naming ``path``, and so is an I/O error that a
    library reports in its own exception type (safetensors' ``save_file`` raises a
    ``SafetensorError`` "... (os error 28)" on a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named_error(e, path) from None
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = _wrapped_errno(e)
        if code is not None:
            raise named_error(OSError(code, os.strerror(code)), path) from None
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, ensure_ascii: bool = True) -> None:
    """``obj`` as JSON (finite numbers only), atomically, with a trailing newline."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=ensure_ascii) + "\n")


def read_json(path: str | Path, what: str = "a JSON file", *, kind: type | None = None,
              error: type[Exception] = FileFormatError) -> Any:
    """``path`` parsed as JSON. ``what`` says what the file should be (for the error line); with
    ``kind`` (e.g. ``dict``) the top-level value must be of that type. Errors raise ``error``."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: not found (expected {what})") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory (expected {what})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (expected {what}): {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (expected {what}): {e.msg} at line {e.lineno} column {e.colno}") from None
    if kind is not None and not isinstance(value, kind):
        raise error(f"{path}: expected {what} holding a JSON {_json_kind(kind)}, found a {_json_kind(type(value))}")
    return value


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_synced(fh, data: bytes, path: str | Path) -> None:
    """Append ``data`` to the open unbuffered binary file ``fh`` (at ``path``) and fsync it: a
    results file's checkpoint. Nothing is left in a buffer to fail again at close; a full disk is
    one error naming ``path``, and the rows already there stay (a cut last line is for the reader
    to drop)."""
    try:
        view = memoryview(data)
        while view:
            view = view[fh.write(view):]
        os.fsync(fh.fileno())
    except OSError as e:
        raise named_error(e, path) from None


def named_error(e: OSError, path: str | Path, what: str = "write") -> OSError:
    """The same kind of OSError with ``path`` in its message (a full disk says which file it was
    writing); ``what`` is the thing that failed ("write", "write checkpoint", ...)."""
    if e.errno is None:
        return OSError(f"cannot {what} {path}: {e}")
    reason = "no space left on device" if e.errno == errno.ENOSPC else os.strerror(e.errno)
    return type(e)(e.errno, f"cannot {what} {path}: {reason}")


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) spell an errno


def _wrapped_errno(e: BaseException) -> int | None:
    """The errno of an I/O failure reported as a library's own exception (not an OSError)."""
    if isinstance(e, Exception) and not isinstance(e, OSError):
        m = _OS_ERROR.search(str(e))
        if m:
            return int(m.group(1))
    return None


def _json_kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        t, t.__name__)


def drop_cut_line(path: Path) -> None:
    """A kill mid-write leaves a JSONL file's last line without its newline: drop it (the job that
    appends to the file redoes that row)."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def complete_rows(path: Path) -> Iterator[dict]:
    """Every complete row of a results JSONL file, in order (a line cut by a kill is skipped); none
    when the file does not exist."""
    if not path.exists():
        return
    with open(path) as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def done_keys(path: Path) -> set[tuple[str, str]]:
    """``(id, method)`` of every complete row of a results JSONL file (a line cut by a kill is
    skipped: its row is redone); the empty set when the file does not exist."""
    return {(d["id"], d["method"]) for d in complete_rows(path)}
