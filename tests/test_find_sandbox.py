"""The sandbox: good code answers; each kind of bad or hostile program fails alone, fast, with one
clear error line, and leaves nothing behind."""

from __future__ import annotations

import math
import time

import pytest

from dit_engine.find.sandbox import Limits, Program, run_program, run_programs

FAST = Limits(wall_s=2.0, cpu_s=1, memory_mb=256, startup_s=5.0)


def test_good_code_answers_numbers_and_strings():
    r = run_program("import math\ndef f(x):\n    return math.sqrt(x) + 1", [4.0, 9.0], limits=FAST)
    assert r.ok and r.outputs == [3.0, 4.0]
    r = run_program("def f(s):\n    return s[::-1]", ["abc", ""], "string", limits=FAST)
    assert r.outputs == ["cba", ""]
    r = run_program("import numpy as np\ndef f(x):\n    return np.float64(x) * 2", [1.5], limits=FAST)
    assert r.outputs == [3.0]
    r = run_program("def f(x):\n    return 1 / 0.0 if x > 0 else float('nan')", [-1.0], limits=FAST)
    assert math.isnan(r.outputs[0])


def test_prints_do_not_corrupt_the_answer():
    r = run_program("print('@@dit-find-fake@@[]')\ndef f(x):\n    print(x)\n    return x", [2.0], limits=FAST)
    assert r.outputs == [2.0]


@pytest.mark.parametrize("name, code, message", [
    ("exception", "def f(x):\n    raise ValueError('boom')", "ValueError: boom"),
    ("no function", "g = 1", "defines no function f"),
    ("syntax", "def f(x) return x", "SyntaxError"),
    ("wrong type", "def f(x):\n    return 'a'", "returned str, not a number"),
    ("recursion", "def f(x):\n    return f(x)", "RecursionError"),
    ("memory bomb", "def f(x):\n    return len([0] * 10 ** 10)", "MemoryError: ran out of its memory limit of 256"),
    ("bytes bomb", "def f(x):\n    return len(bytearray(2 ** 33))", "MemoryError"),
    ("file write", "def f(x):\n    open('owned.txt', 'w').write('x')\n    return 0", "sandbox: open is not allowed"),
    ("file read", "def f(x):\n    return len(open('/etc/hostname').read())", "sandbox: open is not allowed"),
    ("builtins open", "def f(x):\n    return __builtins__.open('/etc/hostname')", "open is not allowed"),
    ("socket", "import socket\ndef f(x):\n    return 0", "sandbox: import is not allowed"),
    ("os.system", "import os\ndef f(x):\n    os.system('true')\n    return 0", "sandbox: os.system is not allowed"),
    ("posix.system", "import posix\ndef f(x):\n    return posix.system('true')", "os.system is not allowed"),
    ("fork", "import os\ndef f(x):\n    return os.fork()", "os.fork is not allowed"),
    ("listdir", "import os\ndef f(x):\n    return len(os.listdir('/'))", "os.listdir is not allowed"),
    ("subprocess", "import subprocess\ndef f(x):\n    return 0", "import is not allowed"),
    ("raise limits", "import resource\ndef f(x):\n    resource.setrlimit(resource.RLIMIT_CPU, (99, 99))\n    return 0",
     "resource.setrlimit is not allowed"),
    ("exit", "def f(x):\n    raise SystemExit(0)", "SystemExit"),
    ("hard exit", "import os\ndef f(x):\n    os._exit(3)", "exited with status 3 without answering"),
])
def test_bad_programs_fail_alone_with_one_clear_line(name, code, message, tmp_path, monkeypatch):
    t = time.monotonic()
    r = run_program(code, [1.0], limits=FAST)
    assert not r.ok and r.outputs is None
    assert message in r.error and "\n" not in r.error, (name, r.error)
    assert time.monotonic() - t < 4.0, name


def test_endless_loop_hits_the_cpu_limit():
    t = time.monotonic()
    r = run_program("def f(x):\n    while True:\n        pass", [1.0], limits=FAST)
    assert "CPU limit" in r.error and time.monotonic() - t < 6.0


def test_sleeping_forever_hits_the_wall_clock():
    t = time.monotonic()
    r = run_program("import time\ndef f(x):\n    time.sleep(60)", [1.0], limits=Limits(wall_s=0.5, startup_s=2.0))
    assert "wall-clock limit of 2.5 s" in r.error and time.monotonic() - t < 5.0


def test_no_environment_secrets_and_an_empty_working_directory(monkeypatch):
    monkeypatch.setenv("DIT_FIND_SECRET", "hunter2")
    # The environment and the cwd are read before the fence would refuse os.* events: look at what
    # the process inherited through the already-imported os module's snapshot.
    r = run_program("import os\ndef f(s):\n    return repr(sorted(os.environ)) + ' ' + os.getcwd()", ["x"], "string",
                    limits=FAST)
    assert r.ok and "DIT_FIND_SECRET" not in r.outputs[0] and "dit-find-sandbox-" in r.outputs[0]


def test_a_shared_process_reruns_its_programs_alone_when_one_kills_it():
    good = Program("def f(x):\n    return x + 1", [1.0])
    bad = Program("import os\ndef f(x):\n    os._exit(1)", [1.0])
    rs = run_programs([good, bad, good], limits=FAST, batch_size=3)
    assert [r.outputs for r in rs] == [[2.0], None, [2.0]]
    assert "without answering" in rs[1].error


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind must be"):
        run_programs([Program("", [], "image")])
    with pytest.raises(ValueError, match="batch_size"):
        run_programs([Program("", [])], batch_size=0)
