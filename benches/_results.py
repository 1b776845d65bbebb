"""One results file per device: ``benches/results/<device>.json``, one key per bench file.

Each bench merges its own section (``"kernels"``, ``"runtime"``, ``"dit"``) so runs of different
benches never overwrite each other; every section carries device, commit, date and versions.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def save_results(device: str, key: str, fields: dict) -> Path:
    """Merge ``fields`` (plus provenance) under ``key`` into the device's results file, atomically."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") or "cuda"
    target = RESULTS_DIR / f"{name}.json"
    doc = json.loads(target.read_text()) if target.exists() else {"device": device}
    doc[key] = {
        "device": device,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **fields,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"
