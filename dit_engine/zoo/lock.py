"""The zoo's one-writer-at-a-time lock: an advisory flock on the zoo directory, held for a whole job.

The holder's pid goes into ``writer.pid`` so a refused writer can say who holds the lock; that file
is informational only (the flock is the lock, and a killed holder's flock goes with its process), so
a stale pid file never blocks. Reentrant within one lock object: an append inside a job reuses it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .format import ZooError

WRITER_PID = "writer.pid"


class WriterLock:
    def __init__(self, path: Path):
        self.path = path
        self.pid_file = path / WRITER_PID
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._depth:  # already held by this object (an append inside Zoo.writer())
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fd = os.open(self.path, os.O_RDONLY)
        pid_file = self.pid_file
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ZooError(f"{self.path}: {_lock_holder(pid_file)} is writing to this zoo; "
                               f"wait for it to finish (or stop it) and try again") from None
            try:  # a stale file from a killed writer is simply overwritten: the flock is the lock
                pid_file.write_text(f"{os.getpid()}\n")
            except OSError:
                pass  # informational only (a full disk must not stop a writer from locking)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                pid_file.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the descriptor releases the lock (also when the process dies)


def _lock_holder(pid_file: Path) -> str:
    """Who holds a zoo's writer lock, as far as its pid file tells (a dead pid is not named)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return "another process"
    if pid == os.getpid():
        return f"another writer in this process (pid {pid})"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "another process"
    except PermissionError:
        pass  # alive, owned by someone else
    return f"another process (pid {pid})"
