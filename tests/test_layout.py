"""The house keeps its shape: no import cycles, kernels never import the engine, no room switches
on a task's name, no oversized file without a reason, and the built wheel carries every package."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dit_engine": ROOT / "dit_engine", "dit_kernels": ROOT / "kernels"}
MAX_LINES = 500
TASK_NAMES = {"hidden-topic", "news"}


def _modules() -> dict[str, Path]:
    """Every module of both packages: dotted name -> file."""
    out = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ours that ``name`` imports (at module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    # Imports for type annotations only (under `if TYPE_CHECKING:`) never run: not part of the graph.
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is how packages work, not a loop; a loop is
    # two rooms that need each other.
    graph = {n: {t for t in targets if t not in _parents(n) and n not in _parents(t)} for n, targets in GRAPH.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_loop():
    graph = dict(GRAPH, **{"dit_engine.checkpoint": GRAPH["dit_engine.checkpoint"] | {"dit_engine.gguf_import"}})
    assert ["dit_engine.checkpoint", "dit_engine.gguf_import"] in _cycles(graph)


def test_kernels_never_import_the_engine():
    for name, path in MODULES.items():
        if name.startswith("dit_kernels"):
            text = path.read_text()
            assert "dit_engine" not in {t.split(".")[0] for t in GRAPH[name]}, name
            assert "import dit_engine" not in text and "from dit_engine" not in text, name


def test_data_flows_down_from_cli():
    """Nothing imports the cli, and the runtime core (model, adapters, cache, generate, train) never
    reaches up into the jobs built on it."""
    jobs = {"dit_engine.cli", "dit_engine.pipeline", "dit_engine.diffgen", "dit_engine.dit", "dit_engine.report"}
    core = ("dit_engine.model", "dit_engine.adapters", "dit_engine.cache", "dit_engine.generate", "dit_engine.train",
            "dit_engine.config", "dit_engine.checkpoint", "dit_engine.tokenizer")
    for name, targets in GRAPH.items():
        if not name.startswith("dit_engine.cli"):
            assert not any(t.startswith("dit_engine.cli") for t in targets), f"{name} imports the cli"
        if name in core:
            reach = {t for t in targets if any(t == j or t.startswith(j + ".") for j in jobs)}
            assert not reach, f"{name} reaches up into {reach}"


def _task_switches(tree: ast.AST) -> list[int]:
    """Lines that compare against a task name, or key a dict literal by task names."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
            if any(c.value in TASK_NAMES for c in consts):
                lines.append(node.lineno)
        elif isinstance(node, ast.Dict):
            if any(isinstance(k, ast.Constant) and k.value in TASK_NAMES for k in node.keys):
                lines.append(node.lineno)
    return lines


def test_no_room_switches_on_a_task_name():
    offenders = {}
    for name, path in MODULES.items():
        if name.startswith("dit_engine.tasks"):
            continue
        found = _task_switches(ast.parse(path.read_text()))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}, "ask the task registry (dit_engine.tasks.get_task) instead"


def test_task_switch_finder_sees_both_shapes():
    tree = ast.parse('if cfg.task == "news":\n    x = 1\nprefix = {"hidden-topic": "ht"}[task]\n')
    assert _task_switches(tree) == [1, 3]


def test_no_oversized_file_without_a_reason():
    """A module over ~500 lines says in its docstring why it is one room (a line starting 'Size:')."""
    too_big = []
    for name, path in MODULES.items():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > MAX_LINES and not any(line.startswith("Size:") for line in doc.splitlines()):
            too_big.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert too_big == []


def test_pyproject_lists_every_package():
    text = (ROOT / "pyproject.toml").read_text()
    packages = sorted(n for n, p in MODULES.items() if p.name == "__init__.py")
    missing = [p for p in packages if f'"{p}"' not in text]
    assert missing == []


@pytest.mark.slow
def test_built_wheel_installs_and_imports(tmp_path):
    """`pip wheel .` then a fresh venv: both import names come from the wheel, not the source tree."""
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "out", "*.egg-info",
                                                             "__pycache__", ".gguf", ".whl"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, timeout=600)
    (wheel,) = wheels.glob("dit_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dit_kernels/multi_lora.py", "dit_engine/zoo/store.py", "dit_engine/dit/training.py",
            "dit_engine/tasks/data/topics.json"} <= names
    assert not any(n.startswith(("kernels/", "tests/", "tools/", "benches/")) for n in names)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    # The dependencies (torch, ...) come from this test's own environment on PYTHONPATH, where no .pth
    # file is read, so the editable install's hook stays off: the project can only come from the wheel.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    probe = ("import dit_engine, dit_kernels, dit_engine.cli, dit_engine.zoo, dit_engine.dit;"
             "print(dit_engine.__file__); print(dit_kernels.__file__)")
    run = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(deps)})
    assert run.returncode == 0, run.stderr
    engine_file, kernels_file = run.stdout.split()
    assert Path(engine_file).is_relative_to(env_dir) and Path(kernels_file).is_relative_to(env_dir)
