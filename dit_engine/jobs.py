"""Long jobs (zoo generation, DIT training, interpretation): checkpoint on a time interval, and stop
cleanly on SIGINT / SIGTERM.

A job runs inside :func:`job`. Between steps (the only points where its state can be saved) it asks
:meth:`Job.should_checkpoint` (true once ``checkpoint_every_s`` have passed since the last
checkpoint, and always after a stop request), saves, calls :meth:`Job.checkpointed`, then calls
:meth:`Job.stop_if_requested`, which raises :class:`JobInterrupted` (a ``KeyboardInterrupt``, so
callers and the CLI treat it as an interrupt) with a message saying where the progress is and how
to resume. The first SIGINT/SIGTERM only sets :attr:`Job.stop_requested`; a second one aborts at
once with a plain ``KeyboardInterrupt`` (every write is atomic, so the last checkpoint stays whole).

Handlers are installed only in the main thread (elsewhere signals cannot be caught, and the job
still checkpoints on its interval) and restored when the job ends. A job started inside another
(``train_diffs`` inside ``generate_zoo``) joins it: one timer, one stop flag.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .distributed import any_rank, rank_world
from .files import read_json, write_json

DEFAULT_CHECKPOINT_EVERY_S = 300.0  # a kill loses at most about this much work
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: "Job | None" = None


class JobInterrupted(KeyboardInterrupt):
    """A job stopped by a signal after saving its progress; the message says how to resume."""


class Job:
    """The checkpoint timer and stop flag of one running job (see the module docstring)."""

    def __init__(self, name: str, checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S):
        if not isinstance(checkpoint_every_s, (int, float)) or math.isnan(checkpoint_every_s) or checkpoint_every_s < 0:
            raise ValueError(f"{name}: checkpoint_every_s must be a number of seconds >= 0, found {checkpoint_every_s!r}")
        self.name = name
        self.checkpoint_every_s = float(checkpoint_every_s)
        self.signal: str | None = None  # name of the signal that asked the job to stop
        self._last = time.monotonic()

    @property
    def stop_requested(self) -> bool:
        return self.signal is not None

    def should_checkpoint(self) -> bool:
        """True when the job should save its state at this safe point."""
        return self.stop_requested or time.monotonic() - self._last >= self.checkpoint_every_s

    def checkpointed(self) -> None:
        """The job saved its state: the interval starts again."""
        self._last = time.monotonic()

    def request_stop(self, reason: str) -> None:
        """Ask the job to stop at its next safe point (what the first signal does)."""
        if self.signal is None:
            self.signal = reason

    def stop_if_requested(self, saved: str | Path | None) -> None:
        """At a safe point, after saving: raise :class:`JobInterrupted` if a stop was requested.
        ``saved`` names where the progress is (None: the job keeps nothing to resume from)."""
        if self.signal is None:
            return
        where = (f"progress is saved in {saved}; run the same command again to resume" if saved is not None
                 else "it keeps no checkpoint, so a rerun starts it again")
        msg = f"{self.name} stopped by {self.signal}: {where}"
        _say(f"dit: {msg}\n")
        raise JobInterrupted(msg)

    def agree_stop(self, device=None) -> bool:
        """Under torch.distributed: make every rank see a stop that any rank was asked for (a
        collective: call it at the same step on every rank). Returns :attr:`stop_requested`."""
        if rank_world()[1] > 1 and any_rank(self.stop_requested, device):
            self.request_stop(self.signal or "a signal on another rank")
        return self.stop_requested

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise KeyboardInterrupt(f"{self.name}: second {name}: aborting without a checkpoint")
        self.signal = name
        _say(f"dit: {name} received: {self.name} stops at its next safe point after saving its progress "
             f"(send it again to abort at once)\n")


@contextmanager
def job(name: str, checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S) -> Iterator[Job]:
    """Run a job: SIGINT/SIGTERM handlers installed for its duration (main thread only), previous
    handlers restored after. Inside another job, yields that job."""
    global _active
    if _active is not None:
        yield _active
        return
    j = Job(name, checkpoint_every_s)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            previous[sig] = signal.signal(sig, j._on_signal)
    _active = j
    try:
        yield j
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def job_in(out_dir: str | Path, name: str, checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S) -> Iterator[Job]:
    """:func:`job` for a job that writes into ``out_dir``: when it fails (or is stopped) before
    writing anything there, a directory this call found missing is removed again, so a failed
    first try leaves no empty run directory behind."""
    out = Path(out_dir)
    created = not out.exists()
    try:
        with job(name, checkpoint_every_s) as j:
            yield j
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _say(text: str) -> None:
    """Write to stderr without Python's buffered stream (safe inside a signal handler)."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


class StageTimings:
    """The wall time of each named stage of a resumable job, summed over resumes, kept in a JSON
    file (``timings.json``) rewritten after every stage."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.times = read_json(self.path, "the run's timings", kind=dict) if self.path.exists() else {}

    def run(self, name: str, fn):
        """``fn()``, its wall time added to stage ``name``; returns what it returned."""
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = round(time.perf_counter() - t0 + self.times.get(name, 0.0), 2)
        write_json(self.path, self.times, indent=1)
        return result
