"""Run untrusted code (an agent's ``def f(x)``) in a separate, fenced process.

Each run is a fresh interpreter (``python -I``: no user site, no ``PYTHON*`` variables) with an
empty environment but a PATH, started in an empty temporary directory. Before the agent's code
runs, the child preloads a few harmless modules (math, re, string, itertools, functools,
collections, random, statistics, numpy where the code mentions it), sets ``resource`` limits
(CPU seconds, address space, no file writes, no new processes) and installs an audit hook
(``sys.addaudithook``, which cannot be removed) that refuses every event that opens a file,
imports a new module, touches a socket, starts a process, uses ``os`` / ``ctypes`` / ``gc``
or frame introspection, or changes the limits. The parent adds a wall-clock timeout and kills the
process when it passes. Whatever the code does, its program ends in a :class:`Result` with either
outputs or one clear error line; it cannot crash the caller.

This is a fence as far as the standard library allows, not a security boundary against a
determined attacker with a CPython exploit: run suites from people you trust less than that inside
a container.

Several programs can share one process (``batch_size``; for trusted code such as the reference
solutions, where starting 1000 interpreters would be slow). When a shared process fails as a
whole (a timeout, a kill), each of its programs is run again alone, so a bad program still fails
alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # per program (a shared process gets the sum, plus start-up)
    cpu_s: int = 5  # per program
    memory_mb: int = 512  # address space the code may add to the preloaded interpreter
    startup_s: float = 10.0  # the interpreter's own start and preloads (numpy), before the code's clock


@dataclasses.dataclass(frozen=True)
class Program:
    code: str  # Python source defining f
    inputs: list  # f is called on each
    kind: str = "numeric"  # "numeric": outputs are floats; "string": outputs must be str


@dataclasses.dataclass
class Result:
    outputs: list | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_programs(programs: Sequence[Program], *, limits: Limits = Limits(), batch_size: int = 1,
                 workers: int | None = None, progress: Callable[[int], None] | None = None) -> list[Result]:
    """Run every program; results in order. ``workers`` processes at a time (default: the CPUs)."""
    for p in programs:
        if p.kind not in ("numeric", "string"):
            raise ValueError(f"program kind must be 'numeric' or 'string', got {p.kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [list(range(s, min(s + batch_size, len(programs)))) for s in range(0, len(programs), batch_size)]
    results: list[Result | None] = [None] * len(programs)

    def one_chunk(idx: list[int]) -> None:
        out = _run_process([programs[i] for i in idx], limits)
        if len(idx) > 1 and any(r.error and r.error.startswith(_WHOLE) for r in out):
            out = [_run_process([programs[i]], limits)[0] for i in idx]  # so a bad program fails alone
        for i, r in zip(idx, out):
            results[i] = r
        if progress is not None:
            progress(len(idx))

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(one_chunk, chunks))
    return results  # type: ignore[return-value]


def run_program(code: str, inputs: list, kind: str = "numeric", *, limits: Limits = Limits()) -> Result:
    return run_programs([Program(code, list(inputs), kind)], limits=limits)[0]


_WHOLE = "the sandbox process "  # errors that end a shared process, not one program


def _run_process(programs: list[Program], limits: Limits) -> list[Result]:
    marker = "@@dit-find-" + secrets.token_hex(8) + "@@"
    preload = ["numpy"] if any("numpy" in p.code for p in programs) else []
    request = {"marker": marker, "preload": preload, "cpu_s": int(limits.cpu_s * len(programs)) + 1,
               "memory_mb": limits.memory_mb,
               "programs": [{"code": p.code, "inputs": p.inputs, "kind": p.kind} for p in programs]}
    wall = limits.startup_s + limits.wall_s * len(programs)
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="dit-find-sandbox-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=json.dumps(request), text=True,
                                  capture_output=True, cwd=cwd, env=env, timeout=wall)
        except subprocess.TimeoutExpired:
            return [Result(error=f"{_WHOLE}ran past its wall-clock limit of {wall:g} s (an endless loop?)")] * len(
                programs)
    tail = proc.stdout.rsplit(marker, 1)
    if len(tail) == 2:
        try:
            rows = json.loads(tail[1])
            return [Result(outputs=r.get("outputs"), error=r.get("error")) for r in rows]
        except (json.JSONDecodeError, AttributeError):
            pass
    code = proc.returncode
    if code < 0:
        name = signal.Signals(-code).name
        why = {"SIGXCPU": f"used more than its CPU limit of {request['cpu_s']} s",
               "SIGKILL": "was killed (out of memory or CPU time)",
               "SIGSEGV": "crashed (segmentation fault)"}.get(name, f"was killed by {name}")
        msg = f"{_WHOLE}{why}"
    else:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        msg = f"{_WHOLE}exited with status {code} without answering ({err})"
    return [Result(error=msg)] * len(programs)


# The child: read the request, preload, fence itself in, run each program, answer after the marker.
_CHILD = r'''
import sys, os, json, io, resource
req = json.loads(sys.stdin.read())
out_fd = os.dup(1)
for name in ["math", "cmath", "re", "string", "itertools", "functools", "collections", "random", "statistics",
             "operator", "bisect", "heapq"] + req["preload"]:
    try:
        __import__(name)
    except ImportError:
        pass
def _vm_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()
try:
    base = _vm_bytes()
except OSError:
    base = 0
mem = base + req["memory_mb"] * 2**20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (req["cpu_s"], req["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
try:
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
except (ValueError, OSError):
    pass
_BLOCKED = ("open", "import", "os.", "socket.", "subprocess.", "shutil.", "ctypes.", "gc.", "resource.", "pty.",
            "fcntl.", "mmap.", "sys._getframe", "sys._current_frames", "object.__setattr__", "object.__delattr__",
            "code.__new__", "function.__new__", "sys.settrace", "sys.setprofile", "urllib.", "http.", "ftplib.",
            "smtplib.", "telnetlib.", "poplib.", "imaplib.", "nntplib.", "webbrowser.", "winreg.", "glob.",
            "tempfile.", "sqlite3.", "cpython.")
def _fence(event, args, _blocked=_BLOCKED):
    if event.startswith(_blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_fence)
del _fence
import builtins
results = []
for prog in req["programs"]:
    sys.stdout = sys.stderr = io.StringIO()
    try:
        ns = {"__builtins__": builtins, "__name__": "agent_code"}
        exec(compile(prog["code"], "<agent code>", "exec"), ns)
        fn = ns.get("f")
        if not callable(fn):
            raise NameError("the code defines no function f")
        outs = []
        for v in prog["inputs"]:
            y = fn(v)
            if prog["kind"] == "string":
                if not isinstance(y, str):
                    raise TypeError(f"f({v!r}) returned {type(y).__name__}, not str")
            else:
                try:
                    y = float(y)
                except (TypeError, ValueError, OverflowError):
                    raise TypeError(f"f({v!r}) returned {type(y).__name__}, not a number") from None
            outs.append(y)
        results.append({"outputs": outs})
    except MemoryError:
        results.append({"error": f"MemoryError: ran out of its memory limit of {req['memory_mb']} MiB"})
    except RecursionError:
        results.append({"error": "RecursionError: maximum recursion depth exceeded"})
    except BaseException as e:
        results.append({"error": (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]})
os.write(out_fd, (req["marker"] + json.dumps(results) + "\n").encode())
'''
