"""Where and when a measurement was made: machine, commit, date, versions.

Every result a person should see (reports under ``results/``, bench figures under
``benches/results/``) carries this, so a number can be traced to the code and machine behind it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

_SOURCE = Path(__file__).resolve().parent


def provenance(device: str | None = None) -> dict[str, object]:
    """Machine (CPU model and cores, or the CUDA device), git commit of the engine's source (and
    whether it had uncommitted changes), UTC date, torch and Python versions."""
    return {
        "machine": device or machine(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": _git("status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine() -> str:
    """``"<CPU model>, N cores"`` (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=_SOURCE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
