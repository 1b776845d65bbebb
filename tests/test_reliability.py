"""No bad input or fault costs a user their work.

Each long job (zoo generation, DIT training, interpretation) stopped by SIGINT/SIGTERM saves at the
next safe point and says how to resume, and a job killed with SIGKILL mid-way resumes from its last
timed checkpoint; either way the finished result is exactly the uninterrupted one. A full disk is
one clear error naming the file, and keeps every earlier output; a second writer of a zoo is refused
before it does any work; values beyond a zoo's dtype are refused with the zoo left valid.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from tiny_world import LABELS, tiny_engine

import dit_engine.diffgen as diffgen
from dit_engine.adapters import LoraSlot
from dit_engine.config import TARGET_MODULES
from dit_engine.diffgen import DiffGenConfig, generate_zoo
from dit_engine.dit import DitAdapter, DitTrainConfig, interpret, train_dit
from dit_engine.files import TMP_MARK
from dit_engine.train import Trainer, load_training_state
from dit_engine.zoo import BaseIdentity, Diff, Zoo, ZooError

interpret_mod = importlib.import_module("dit_engine.dit.interpret")  # the package exports a function of that name
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
QUESTION = "what topic have you been trained on ?"

# 2 chunks of 2 diffs, 6 optimizer steps each (4 rows per diff x 3 epochs / 2 rows per step).
GEN = DiffGenConfig(n=4, chunk_diffs=2, rank=2, epochs=3, n_backdoor=2, n_kl=2, candidates=1, strategy="prefix",
                    max_answer_tokens=4, n_verify=1, seed=0, gen_batch_size=8)
GEN_STEPS = 12
# 16 diffs, 2 epochs of 8 steps; save_every off, so only the time interval, a signal or the end checkpoints.
DIT = DitTrainConfig(question=QUESTION, rank=4, lr=3e-3, epochs=2, batch_size=2, val_fraction=0.0,
                     schedule="cosine", save_every=10**9, seed=1)
DIT_STEPS = 16
N_DIFFS = 16


# ---- helpers -------------------------------------------------------------------------------------
def _zoo(eng, path) -> Zoo:
    return Zoo.create(path, BaseIdentity.from_model(eng.model), eng.config, exist_ok=True)


def _st(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header, tensor bytes). Compared instead of the raw file: safetensors
    writes the keys of its header metadata in an order that varies from one write to the next."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _files(zoo_path: Path) -> dict[str, object]:
    """Every committed file of a zoo by name: the index's bytes, each shard's header and bytes."""
    out: dict[str, object] = {"index.jsonl": (zoo_path / "index.jsonl").read_bytes()}
    for p in sorted((zoo_path / "shards").iterdir()):
        out[p.name] = _st(p.read_bytes())
    return out


def _adapter(out: Path) -> tuple[dict, bytes]:
    return _st((out / "adapter.safetensors").read_bytes())


def _no_temp_files(path: Path) -> None:
    left = [str(p) for p in path.rglob("*") if TMP_MARK in p.name or p.name.startswith(".checkpoint.")]
    assert not left, left


def _sends(sig: int, times: int = 1):
    """A hook that sends ``sig`` to this process ``times`` times."""
    def send():
        for _ in range(times):
            os.kill(os.getpid(), sig)
    return send


class _Counter:
    """Counts calls of a patched function; ``at[k]()`` runs right after the k-th call returns."""

    def __init__(self, monkeypatch, owner, name: str, at: dict[int, Callable[[], None]] | None = None):
        self.n, self.at = 0, dict(at or {})
        orig = getattr(owner, name)

        def counted(*a, **k):
            out = orig(*a, **k)
            self.n += 1
            hook = self.at.pop(self.n, None)
            if hook is not None:
                hook()
            return out

        monkeypatch.setattr(owner, name, counted)

    def reset(self) -> None:
        self.n, self.at = 0, {}


def _steps(monkeypatch, at=None) -> _Counter:
    """Counts optimizer micro-steps (Trainer.backward)."""
    return _Counter(monkeypatch, Trainer, "backward", at)


def _batches(monkeypatch, at=None) -> _Counter:
    """Counts interpretation's generate calls (one per batch)."""
    return _Counter(monkeypatch, interpret_mod, "generate", at)


_CHILD = textwrap.dedent("""
    import importlib, sys, time
    import dit_engine.train as T
    I = importlib.import_module("dit_engine.dit.interpret")
    delay = float(sys.argv[2])
    orig_backward, orig_generate = T.Trainer.backward, I.generate
    def backward(self, loss):
        out = orig_backward(self, loss)
        time.sleep(delay)
        return out
    def generate(*a, **k):
        out = orig_generate(*a, **k)
        time.sleep(delay)
        return out
    T.Trainer.backward, I.generate = backward, generate
    sys.path.insert(0, {tests!r})
    import test_reliability as R
    try:
        getattr(R, sys.argv[1])(*sys.argv[3:])
    except KeyboardInterrupt:
        sys.exit(130)
""")


def _spawn(job: str, delay: float, *args: str) -> subprocess.Popen:
    """A child process running ``job`` (a ``_child_*`` function below) with ``delay`` s per step."""
    return subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS)), job, str(delay), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240.0):
    """Poll ``ready()`` until it returns something truthy; fail if the child ends first."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        got = ready()
        if got:
            return got
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child ended (rc {proc.returncode}) before it was ready:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("child not ready in time")


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _meta(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / "state.json").read_text())["meta"]
    except (OSError, ValueError):
        return None


# ---- the jobs the children run -------------------------------------------------------------------
def _child_generate(zoo_path: str, every_s: str) -> None:
    eng = tiny_engine(seed=1)
    generate_zoo(eng, _zoo(eng, zoo_path), DiffGenConfig(**{**GEN.__dict__, "checkpoint_every_s": float(every_s)}),
                 progress=False)


def _child_train(zoo_path: str, out: str, every_s: str) -> None:
    train_dit(tiny_engine(seed=0), Zoo.open(zoo_path), out,
              DitTrainConfig(**{**DIT.__dict__, "checkpoint_every_s": float(every_s)}), progress=False)


def _child_interpret(zoo_path: str, adapter: str, out: str) -> None:
    _interpret(tiny_engine(seed=0), Zoo.open(zoo_path), DitAdapter.load(adapter), out)


def _interpret(eng, zoo, adapter, out):
    return interpret(eng, zoo, out, adapter=adapter, methods=("dit", "diff"), batch_size=2, max_new_tokens=3,
                     progress=False)


def _results(path: Path) -> list[dict]:
    """Result rows in file order, without the timing field (the only one that is not deterministic)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


# ---- shared worlds -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_reference(tmp_path_factory):
    """The uninterrupted zoo generation (files by name)."""
    eng = tiny_engine(seed=1)
    path = tmp_path_factory.mktemp("gen") / "zoo"
    zoo = generate_zoo(eng, _zoo(eng, path), GEN, progress=False)
    return zoo.ids(), _files(path)


@pytest.fixture(scope="module")
def label_zoo(tmp_path_factory):
    """A zoo of 16 random labelled diffs on tiny_engine(seed=0), a random DIT adapter, and the
    uninterrupted DIT training and interpretation over them."""
    root = tmp_path_factory.mktemp("labels")
    eng = tiny_engine(seed=0)
    zoo = _zoo(eng, root / "zoo")
    g = torch.Generator().manual_seed(0)
    slot = LoraSlot.create(eng.config, N_DIFFS, 2, init="random", generator=g)
    zoo.append([Diff(id=f"d{i:02d}", A={m: a[i] * 4 for m, a in slot.A.items()},
                     B={m: b[i] * 4 for m, b in slot.B.items()}, scale=1.0, labels={"topic": LABELS[i]},
                     split="train", meta={}) for i in range(N_DIFFS)])
    dit = LoraSlot.create(eng.config, 1, 4, init="random", generator=g, name="dit")
    base = BaseIdentity.from_model(eng.model)
    DitAdapter(dit, QUESTION, "hidden-topic", dataclasses.asdict(base)).save(root / "adapter")
    adapter = DitAdapter.load(root / "adapter")
    train_dit(eng, zoo, root / "dit-straight", DIT, progress=False)
    _interpret(eng, zoo, adapter, root / "straight.jsonl")
    return eng, zoo, adapter, root


# ---- zoo generation ------------------------------------------------------------------------------
def test_zoo_generation_sigint_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path, monkeypatch, capfd,
                                                                               gen_reference):
    eng = tiny_engine(seed=1)
    handler = signal.getsignal(signal.SIGINT)
    steps = _steps(monkeypatch, at={8: _sends(signal.SIGINT)})  # the second chunk's second step
    with pytest.raises(KeyboardInterrupt):
        generate_zoo(eng, _zoo(eng, tmp_path / "z"), GEN, progress=False)
    assert steps.n == 8  # stopped at the next safe point, not later
    err = capfd.readouterr().err
    assert "zoo generation stopped by SIGINT: progress is saved in" in err and "again to resume" in err
    assert signal.getsignal(signal.SIGINT) is handler  # the job's handler is gone again
    ckpts = list((tmp_path / "z" / ".work").glob("chunk-*/train"))
    assert len(ckpts) == 1 and _meta(ckpts[0])["batch"] == 2
    assert len(Zoo.open(tmp_path / "z", verify=True)) == 2

    steps.reset()
    zoo = generate_zoo(eng, _zoo(eng, tmp_path / "z"), GEN, progress=False)
    assert steps.n == GEN_STEPS - 8  # nothing redone
    ids, files = gen_reference
    assert zoo.ids() == ids and _files(tmp_path / "z") == files  # same ids, same shard and index bytes
    # No chunk left in progress (.work keeps only the zoo's base-answer pool and its timings).
    assert not any(p.name.startswith("chunk-") for p in (tmp_path / "z" / ".work").iterdir())


def test_zoo_generation_killed_mid_chunk_resumes_from_its_timed_checkpoint(tmp_path, monkeypatch, gen_reference):
    path = tmp_path / "z"
    proc = _spawn("_child_generate", 0.3, str(path), "0.5")

    meta = _wait_for(proc, lambda: _meta(path / ".work" / f"chunk-{GEN.diff_id(2)}" / "train"))
    pid = proc.pid
    _kill9(proc)
    assert meta["batch"] < 6  # killed mid-chunk
    assert (path / "writer.pid").read_text().strip() == str(pid)  # a stale pid file: must not block
    assert len(Zoo.open(path, verify=True)) == 2

    eng = tiny_engine(seed=1)
    steps = _steps(monkeypatch)
    zoo = generate_zoo(eng, _zoo(eng, path), GEN, progress=False)
    assert 0 < steps.n < 6  # only the steps after the last checkpoint were redone
    ids, files = gen_reference
    assert zoo.ids() == ids and _files(path) == files
    assert not (path / "writer.pid").exists()


# ---- DIT training --------------------------------------------------------------------------------
def test_dit_training_sigint_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path, monkeypatch, capfd,
                                                                             label_zoo):
    eng, zoo, _, root = label_zoo
    steps = _steps(monkeypatch, at={5: _sends(signal.SIGINT)})
    with pytest.raises(KeyboardInterrupt):
        train_dit(eng, zoo, tmp_path / "dit", DIT, progress=False)
    assert steps.n == 5
    err = capfd.readouterr().err
    assert f"DIT training stopped by SIGINT: progress is saved in {tmp_path / 'dit' / 'checkpoint'}" in err
    assert _meta(tmp_path / "dit" / "checkpoint")["done_batches"] == 5
    assert not (tmp_path / "dit" / "adapter.safetensors").exists()

    steps.reset()
    train_dit(eng, zoo, tmp_path / "dit", DIT, progress=False)
    assert steps.n == DIT_STEPS - 5
    assert _adapter(tmp_path / "dit") == _adapter(root / "dit-straight")


def test_dit_training_killed_resumes_from_its_timed_checkpoint(tmp_path, monkeypatch, label_zoo):
    eng, zoo, _, root = label_zoo
    out = tmp_path / "dit"
    proc = _spawn("_child_train", 0.3, str(zoo.path), str(out), "0.5")
    meta = _wait_for(proc, lambda: _meta(out / "checkpoint"))
    _kill9(proc)
    assert 0 < meta["done_batches"] < DIT_STEPS

    steps = _steps(monkeypatch)
    train_dit(eng, zoo, out, DIT, progress=False)  # another interval on resume: not a change of settings
    assert 0 < steps.n < DIT_STEPS
    assert _adapter(out) == _adapter(root / "dit-straight")


def test_a_second_signal_aborts_at_once(tmp_path, monkeypatch, label_zoo):
    eng, zoo, _, _ = label_zoo
    handler = signal.getsignal(signal.SIGINT)
    steps = _steps(monkeypatch, at={3: _sends(signal.SIGINT, 2)})
    with pytest.raises(KeyboardInterrupt, match="second SIGINT: aborting"):
        train_dit(eng, zoo, tmp_path / "dit", DIT, progress=False)
    assert steps.n == 3
    assert not (tmp_path / "dit").exists()  # no checkpoint taken, and no empty directory left
    assert signal.getsignal(signal.SIGINT) is handler


# ---- interpretation ------------------------------------------------------------------------------
def test_interpretation_sigterm_stops_after_the_batch_and_resumes_exactly(tmp_path, monkeypatch, capfd,
                                                                          label_zoo):
    eng, zoo, adapter, root = label_zoo
    guard = lambda signum, frame: pytest.fail("SIGTERM reached the test: no job caught it")  # noqa: E731
    old = signal.signal(signal.SIGTERM, guard)
    try:
        calls = _batches(monkeypatch, at={5: _sends(signal.SIGTERM)})
        with pytest.raises(KeyboardInterrupt):
            _interpret(eng, zoo, adapter, tmp_path / "res.jsonl")
        assert calls.n == 5
        assert signal.getsignal(signal.SIGTERM) is guard
    finally:
        signal.signal(signal.SIGTERM, old)
    err = capfd.readouterr().err
    assert f"interpretation stopped by SIGTERM: progress is saved in {tmp_path / 'res.jsonl'}" in err
    assert len(_results(tmp_path / "res.jsonl")) == 10  # five whole batches of two

    calls.reset()
    _interpret(eng, zoo, adapter, tmp_path / "res.jsonl")
    assert calls.n == 2 * N_DIFFS // 2 - 5
    assert _results(tmp_path / "res.jsonl") == _results(root / "straight.jsonl")


def test_interpretation_killed_resumes_exactly(tmp_path, monkeypatch, label_zoo):
    eng, zoo, adapter, root = label_zoo
    out = tmp_path / "res.jsonl"
    proc = _spawn("_child_interpret", 0.3, str(zoo.path), str(root / "adapter"), str(out))
    _wait_for(proc, lambda: out.exists() and out.read_text().count("\n") >= 4)
    _kill9(proc)
    done = len(_results(out))
    assert 4 <= done < 2 * N_DIFFS

    calls = _batches(monkeypatch)
    _interpret(eng, zoo, adapter, out)
    left_dit, left_diff = max(0, N_DIFFS - done), min(N_DIFFS, 2 * N_DIFFS - done)  # "dit" rows come first
    assert calls.n == -(-left_dit // 2) + -(-left_diff // 2)  # only what was not written is redone
    assert _results(out) == _results(root / "straight.jsonl")


# ---- full disk -----------------------------------------------------------------------------------
class _Disk:
    """A small file system (a tmpfs, when this process may mount one) that can be filled up.
    Without mount rights, ``fill`` makes every safetensors write fail as a full disk does."""

    def __init__(self, path: Path):
        self.path, self._saved = path, []
        path.mkdir()
        self.tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                                    capture_output=True).returncode == 0

    def fill(self) -> None:
        if not self.tmpfs:
            from safetensors import SafetensorError

            def full(*a, **k):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

            for name in ("dit_engine.zoo.shards", "dit_engine.train", "dit_engine.dit.adapter"):
                mod = importlib.import_module(name)
                self._saved.append((mod, mod.save_file))
                mod.save_file = full
            return
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            for n in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * n)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        for mod, save_file in self._saved:
            mod.save_file = save_file
        self._saved.clear()
        (self.path / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        if self.tmpfs:
            subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def disk(tmp_path):
    d = _Disk(tmp_path / "disk")
    yield d
    d.close()


def _assert_full_disk_error(e: BaseException, path: Path) -> None:
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC, repr(e)
    assert e.strerror in (f"cannot write {path}: no space left on device",  # one line, naming the file
                          f"cannot write checkpoint {path}: no space left on device"), str(e)


def test_full_disk_during_zoo_generation_is_one_clear_error_and_keeps_earlier_work(disk, monkeypatch,
                                                                                  gen_reference):
    eng = tiny_engine(seed=1)
    path = disk.path / "z"
    orig, calls = diffgen.verify_diffs, []

    def verify_then_fill(*a, **k):  # the disk fills up once the second chunk is trained and verified
        calls.append(1)
        out = orig(*a, **k)
        if len(calls) == 2:
            disk.fill()
        return out

    monkeypatch.setattr(diffgen, "verify_diffs", verify_then_fill)
    with pytest.raises(Exception) as e:
        generate_zoo(eng, _zoo(eng, path), GEN, progress=False)
    _assert_full_disk_error(e.value, path / "shards" / "shard-000002.safetensors")
    zoo = Zoo.open(path, verify=True)  # the first shard is untouched and still verifies
    ids, files = gen_reference
    now = _files(path)
    assert zoo.ids() == ids[:2] and sorted(now) == ["index.jsonl", "shard-000001.safetensors"]
    assert now["shard-000001.safetensors"] == files["shard-000001.safetensors"]
    assert files["index.jsonl"].startswith(now["index.jsonl"])
    _no_temp_files(path)

    disk.free()
    monkeypatch.setattr(diffgen, "verify_diffs", orig)
    steps = _steps(monkeypatch)
    zoo = generate_zoo(eng, _zoo(eng, path), GEN, progress=False)
    assert steps.n == 0  # the second chunk's training was kept: nothing is trained again
    assert zoo.ids() == ids and _files(path) == files


def test_full_disk_at_the_first_dit_checkpoint_leaves_no_empty_output_dir(disk, label_zoo):
    eng, zoo, _, _ = label_zoo
    disk.fill()
    with pytest.raises(Exception) as e:
        train_dit(eng, zoo, disk.path / "dit", DitTrainConfig(**{**DIT.__dict__, "checkpoint_every_s": 0}),
                  progress=False)
    _assert_full_disk_error(e.value, disk.path / "dit" / "checkpoint")
    assert not (disk.path / "dit").exists()  # a rerun finds nothing in its way


def test_full_disk_mid_dit_training_keeps_the_last_good_checkpoint(disk, monkeypatch, label_zoo):
    eng, zoo, _, root = label_zoo
    out = disk.path / "dit"
    _steps(monkeypatch, at={6: disk.fill})  # after step 6, before its checkpoint
    with pytest.raises(Exception) as e:
        train_dit(eng, zoo, out, DitTrainConfig(**{**DIT.__dict__, "checkpoint_every_s": 0}), progress=False)
    _assert_full_disk_error(e.value, out / "checkpoint")
    assert _meta(out / "checkpoint")["done_batches"] == 5  # the last good one, whole
    load_training_state(out / "checkpoint")
    _no_temp_files(out)

    disk.free()
    steps = _steps(monkeypatch)
    train_dit(eng, zoo, out, DIT, progress=False)
    assert steps.n == DIT_STEPS - 5
    assert _adapter(out) == _adapter(root / "dit-straight")


# ---- one writer per zoo --------------------------------------------------------------------------
def test_a_second_zoo_writer_is_refused_before_it_does_any_work(tmp_path, monkeypatch):
    path = tmp_path / "z"
    proc = _spawn("_child_generate", 0.3, str(path), "300")
    try:
        _wait_for(proc, lambda: (path / "writer.pid").exists() and (path / "writer.pid").read_text().strip())
        assert (path / "writer.pid").read_text().strip() == str(proc.pid)

        def no_work(*a, **k):
            raise AssertionError("the second writer started working")

        monkeypatch.setattr(diffgen, "_load_or_build_specs", no_work)
        monkeypatch.setattr(diffgen, "train_diffs", no_work)
        eng = tiny_engine(seed=1)
        refused = rf"another process \(pid {proc.pid}\) is writing to this zoo"
        with pytest.raises(ZooError, match=refused):
            generate_zoo(eng, Zoo.open(path), GEN, progress=False)
        with pytest.raises(ZooError, match=refused):  # what `dit zoo generate` does first
            _zoo(eng, path)
    finally:
        proc.kill()
        proc.wait()
    # The killed writer's pid file is left behind; the flock died with it, so nothing is blocked.
    assert (path / "writer.pid").exists()
    with Zoo.open(path).writer():
        assert (path / "writer.pid").read_text().strip() == str(os.getpid())
    assert not (path / "writer.pid").exists()


# ---- values beyond a zoo's dtype -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,big", [("float32", 1e300), ("float16", 1e300), ("bfloat16", 1e300),
                                       ("float16", 1e5)])
def test_a_value_beyond_the_zoo_dtype_is_refused_and_the_zoo_stays_valid(tmp_path, dtype, big):
    cfg = tiny_config("qwen3")
    zoo = Zoo.create(tmp_path / "z", BaseIdentity(cfg.name, cfg.config_hash, "f00dfeed"), cfg, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    slot = LoraSlot.create(cfg, 3, 2, init="random", generator=g)

    def diff(i: int, dt=torch.float32) -> Diff:
        return Diff(id=f"d{i}", A={m: a[i].to(dt) for m, a in slot.A.items()},
                    B={m: b[i].to(dt) for m, b in slot.B.items()}, scale=0.5, labels={}, split="train", meta={})

    zoo.append([diff(0)])
    before = _files(tmp_path / "z")
    bad = diff(2, torch.float64)
    m = cfg.module_names(TARGET_MODULES)[3]
    bad.B[m][1, 0] = big
    with pytest.raises(ZooError, match=re.escape(f"diff 'd2': {m} B has values beyond the range of this zoo's "
                                                 f"dtype {dtype} (largest magnitude {big:.3g})")):
        zoo.append([diff(1), bad])  # the whole append is refused: d1 is not written either
    assert _files(tmp_path / "z") == before
    reopened = Zoo.open(tmp_path / "z", verify=True)
    assert reopened.ids() == ["d0"]
    assert zoo.append([diff(1)])[0]["id"] == "d1"  # the zoo takes good diffs as before
    assert Zoo.open(tmp_path / "z", verify=True).ids() == ["d0", "d1"]


def test_job_in_removes_only_a_run_directory_it_created_and_left_empty(tmp_path):
    from dit_engine.jobs import job_in

    def fail_in(out, write=False):
        with pytest.raises(RuntimeError, match="boom"):
            with job_in(out, "test job"):
                out.mkdir(parents=True, exist_ok=True)
                if write:
                    (out / "progress.json").write_text("{}")
                raise RuntimeError("boom")

    fail_in(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # made by this job, empty: removed
    fail_in(tmp_path / "written", write=True)
    assert (tmp_path / "written" / "progress.json").exists()  # what was written is kept
    (tmp_path / "mine").mkdir()
    fail_in(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # the user's own directory is never removed
