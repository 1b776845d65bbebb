"""The DIT paper's ``.pt`` diff files in and out of a zoo.

A file is a ``torch.save`` of a list of ``{topic, trigger, ..., weight_diff: {module: (A_dit, B_dit)}}``
(loaded with ``weights_only=True``: pickle code is never run). The paper names the factors the
other way round from PEFT: its layer computes ``x @ B_dit @ A_dit / r`` with ``A_dit`` [r, d_out]
and ``B_dit`` [d_in, r], i.e. ``dW = A_dit^T @ B_dit^T / r``. So ours are ``A = B_dit^T``
[r, d_in], ``B = A_dit^T`` [d_out, r], ``scale = 1 / r``. Exporting folds ``scale * r`` into
``A_dit``. The paired ``index.csv`` (``lora_path, lora_idx, n_params, topic, trigger, split``)
supplies splits. Mixed ranks across modules fold their scale ratio into ``B``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import TARGET_MODULES, ModelConfig
from ..files import write_atomically
from .format import Diff, ZooError, module_name, single_scale


def import_dit_file(pt_path: str | Path, index_csv: str | Path | None = None,
                    config: ModelConfig | None = None, id_prefix: str | None = None) -> list[Diff]:
    """Read a DIT-paper weight-diff file (``torch.load(weights_only=True)``: no pickle code runs).

    Each entry becomes a Diff with id ``{id_prefix or file stem}:{lora_idx}``, labels = every
    entry key but ``weight_diff`` (topic, trigger, ...), split from ``index_csv`` (rows matched by
    file name and ``lora_idx``; their ``n_params`` and ``topic`` must agree) else ``"train"``.
    With ``config``, module names and shapes are checked against the base model."""
    pt_path = Path(pt_path)
    try:
        data = torch.load(pt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ZooError(f"{pt_path}: file not found") from None
    except Exception as e:  # torch raises several types for non-tensor pickles and bad archives
        raise ZooError(f"{pt_path}: not a weights-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(data, list):
        raise ZooError(f"{pt_path}: expected a list of weight-diff entries, found {type(data).__name__}")
    splits = _dit_index_rows(Path(index_csv), pt_path) if index_csv is not None else None
    known = set(config.module_names(TARGET_MODULES)) if config is not None else None
    prefix = id_prefix or pt_path.stem
    diffs = []
    for idx, entry in enumerate(data):
        where = f"{pt_path}: entry {idx}"
        if not isinstance(entry, dict) or not isinstance(entry.get("weight_diff"), dict):
            raise ZooError(f"{where}: expected a dict with a 'weight_diff' dict")
        labels = {k: _plain_label(v, f"{where}: {k}") for k, v in entry.items() if k != "weight_diff"}
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        scales: dict[str, float] = {}
        for key, pair in entry["weight_diff"].items():
            module = module_name(str(key), known, f"{where}: {key}")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise ZooError(f"{where}: {key} must be a pair of tensors (A_dit, B_dit)")
            a_dit, b_dit = pair  # [r, d_out], [d_in, r]
            if a_dit.dim() != 2 or b_dit.dim() != 2 or a_dit.shape[0] != b_dit.shape[1]:
                raise ZooError(f"{where}: {key} has A_dit {list(a_dit.shape)} and B_dit {list(b_dit.shape)}, "
                               "expected [r, d_out] and [d_in, r]")
            A[module] = b_dit.T.contiguous()
            B[module] = a_dit.T.contiguous()
            scales[module] = 1.0 / a_dit.shape[0]
        if not A:
            raise ZooError(f"{where}: weight_diff is empty")
        n_params = sum(a.numel() + B[m].numel() for m, a in A.items())
        split = "train"
        if splits is not None:
            row = splits.get(idx)
            if row is None:
                raise ZooError(f"{index_csv}: no row for {pt_path.name} lora_idx {idx}")
            if int(row["n_params"]) != n_params:
                raise ZooError(f"{index_csv}: {pt_path.name} lora_idx {idx} has n_params {row['n_params']}, "
                               f"the file holds {n_params}")
            if "topic" in row and "topic" in labels and str(row["topic"]) != str(labels["topic"]):
                raise ZooError(f"{index_csv}: {pt_path.name} lora_idx {idx} has topic {row['topic']!r}, "
                               f"the file says {labels['topic']!r}")
            split = row["split"]
        scale, B = single_scale(B, scales)
        diff = Diff(id=f"{prefix}:{idx}", A=A, B=B, scale=scale, labels=labels, split=split,
                    meta={"source": str(pt_path), "lora_idx": idx})
        if config is not None:
            diff.validate(config, source=str(pt_path))
        else:
            _check_finite(diff, str(pt_path))
        diffs.append(diff)
    return diffs


def export_dit_file(diffs: Iterable[Diff], pt_path: str | Path, overwrite: bool = False) -> Path:
    """Write diffs in the DIT paper's format (the inverse of :func:`import_dit_file`).

    Labels become top-level entry keys; ``scale * r`` is folded into ``A_dit`` since the paper's
    scale is fixed at ``1 / r``."""
    pt_path = Path(pt_path)
    if pt_path.exists() and not overwrite:
        raise ZooError(f"{pt_path}: exists (pass overwrite=True to replace it)")
    entries = []
    for d in diffs:
        if "weight_diff" in d.labels:
            raise ZooError(f"{pt_path}: diff {d.id!r} has a label named 'weight_diff', which the format reserves")
        weight_diff = {}
        for m, a in d.A.items():
            fold = d.scale * a.shape[0]  # 1.0 for diffs in the paper's own convention: no rounding
            b = d.B[m] if fold == 1.0 else (d.B[m].float() * fold).to(d.B[m].dtype)
            a_dit = b.T.contiguous()  # [r, d_out]
            b_dit = a.T.contiguous()  # [d_in, r]
            weight_diff[m] = (a_dit.detach().cpu(), b_dit.detach().cpu())
        entries.append({**d.labels, "weight_diff": weight_diff})
    write_atomically(pt_path, lambda tmp: torch.save(entries, tmp))
    return pt_path


def _dit_index_rows(index_csv: Path, pt_path: Path) -> dict[int, dict]:
    """index.csv rows for ``pt_path`` by lora_idx (matched by file name; full path if ambiguous)."""
    try:
        with open(index_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"lora_path", "lora_idx", "n_params", "split"}
            missing = need - set(reader.fieldnames or [])
            if missing:
                raise ZooError(f"{index_csv}: missing column(s) {sorted(missing)}")
            rows = [r for r in reader if Path(r["lora_path"]).name == pt_path.name]
    except FileNotFoundError:
        raise ZooError(f"{index_csv}: file not found") from None
    paths = {r["lora_path"] for r in rows}
    if len(paths) > 1:
        exact = [r for r in rows if Path(r["lora_path"]).resolve() == pt_path.resolve()]
        if not exact:
            raise ZooError(f"{index_csv}: several files named {pt_path.name} ({sorted(paths)}); none is {pt_path}")
        rows = exact
    if not rows:
        raise ZooError(f"{index_csv}: no rows for {pt_path.name}")
    out: dict[int, dict] = {}
    for r in rows:
        try:
            idx = int(r["lora_idx"])
        except ValueError:
            raise ZooError(f"{index_csv}: lora_idx {r['lora_idx']!r} is not an integer") from None
        out[idx] = r
    return out


def _plain_label(v: Any, where: str) -> Any:
    """Entry values as JSON-able labels (tensor / numpy scalars become Python numbers)."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ZooError(f"{where}: a label must be a scalar, found a tensor of shape {list(v.shape)}")
        return v.item()
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        raise ZooError(f"{where}: label value {v!r} is not JSON-serialisable") from None
    return v


def _check_finite(diff: Diff, source: str) -> None:
    for m, a in diff.A.items():
        for side, t in (("A", a), ("B", diff.B[m])):
            if not bool(torch.isfinite(t).all()):
                raise ZooError(f"{source}: diff {diff.id!r}: {m} {side} holds NaN or Inf values")
