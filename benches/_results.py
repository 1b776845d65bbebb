"""One results file per device: ``benches/results/<device>.json``, one key per bench file.

Each bench merges its own section (``"kernels"``, ``"runtime"``, ``"dit"``) so runs of different
benches never overwrite each other; every section carries device, commit, date and versions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dit_engine.files import write_json
from dit_engine.provenance import provenance

RESULTS_DIR = Path(__file__).parent / "results"


def save_results(device: str, key: str, fields: dict) -> Path:
    """Merge ``fields`` (plus provenance) under ``key`` into the device's results file, atomically."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") or "cuda"
    target = RESULTS_DIR / f"{name}.json"
    doc = json.loads(target.read_text()) if target.exists() else {"device": device}
    prov = provenance(device)
    doc[key] = {"device": device, **{k: v for k, v in prov.items() if k != "machine"}, **fields}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_json(target, doc)
    return target
