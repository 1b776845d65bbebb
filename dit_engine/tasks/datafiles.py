"""Reading the JSON data files the tasks own, with errors that name the file and the entry.

Every data file is one JSON object ``{"format": 1, "<list key>": [ {record}, ... ], ...}``; each
record is a flat object of strings (and lists of strings where a field allows it) carrying a
``split`` of "train" or "test". The split is written in the file, not computed, so it never moves
when a list is edited elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
FORMAT_VERSION = 1
SPLITS = ("train", "test")


class TaskDataError(ValueError):
    """A task data file that cannot be used: names the file, the record and expected vs found."""


def check_split(split: str | None, where: str) -> None:
    """Refuse a split name other than None, "train" or "test" (``where`` names the caller)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS} or None, found {split!r}")


def read_records(path: Path, list_key: str, fields: dict[str, type], optional: dict[str, type] | None = None,
                 *, unique: str) -> list[dict[str, Any]]:
    """The validated records under ``list_key`` in ``path``, in file order.

    ``fields`` are required (name -> type), ``optional`` may be absent; a ``list`` type means a list
    of non-empty strings. ``unique`` names the field whose case-folded value must not repeat.
    """
    optional = optional or {}
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskDataError(f"{path}: task data file not found") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION or not isinstance(doc.get(list_key), list):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise TaskDataError(f"{path}: expected an object with \"format\": {FORMAT_VERSION} and a list "
                            f"{list_key!r}, found {found}")
    records = doc[list_key]
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        _check_record(path, list_key, i, rec, fields, optional)
        key = rec[unique].casefold()
        if key in seen:
            raise TaskDataError(f"{path}: {list_key}[{i}] repeats {unique} {rec[unique]!r} "
                                f"of {list_key}[{seen[key]}]; every {unique} must be unique")
        seen[key] = i
    if not records:
        raise TaskDataError(f"{path}: {list_key!r} is empty")
    return records


def _check_record(path: Path, list_key: str, i: int, rec: Any, fields: dict[str, type],
                  optional: dict[str, type]) -> None:
    where = f"{path}: {list_key}[{i}]"
    if not isinstance(rec, dict):
        raise TaskDataError(f"{where}: expected an object, found {type(rec).__name__}")
    missing = [f for f in fields if f not in rec]
    extra = [f for f in rec if f not in fields and f not in optional]
    if missing or extra:
        raise TaskDataError(f"{where}: expected fields {sorted(fields)} (optional {sorted(optional)}), "
                            f"missing {missing}, unknown {extra}")
    for name, value in rec.items():
        kind = fields.get(name) or optional[name]
        if kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
        else:
            ok = isinstance(value, kind) and (not isinstance(value, str) or bool(value.strip()))
        if not ok:
            raise TaskDataError(f"{where}: field {name!r} must be a non-empty {kind.__name__}"
                                f"{' of strings' if kind is list else ''}, found {value!r}")
    if rec["split"] not in SPLITS:
        raise TaskDataError(f"{where}: split must be one of {SPLITS}, found {rec['split']!r}")
