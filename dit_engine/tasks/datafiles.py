"""Reading the JSON data files the tasks own, with errors that name the file and the entry.

Every data file is one JSON object ``{"format": 1, "<list key>": [ {record}, ... ], ...}``; each
record is a flat object of strings (and lists of strings where a field allows it) carrying a
``split`` of "train" or "test". The split is written in the file, not computed, so it never moves
when a list is edited elsewhere.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..files import read_json

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
    doc = read_json(path, "a task data file", error=TaskDataError)
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


def read_label_file(path: Path | str, label: str) -> list[dict[str, str]]:
    """User label rows from ``path``: CSV with a header naming ``category`` and ``label`` (in either
    order; an optional ``split`` column), the format of the DIT paper's topic files, or a JSON list of
    objects with those keys. Rows without a split get none (``"split": ""``: the caller decides).

    Errors are one line naming the file, the line (CSV) or item (JSON) and what was expected.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskDataError(f"{path}: {label} file not found") from None
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    rows = _json_label_rows(path, stripped, label) if stripped.startswith(("[", "{")) else _csv_label_rows(
        path, text, label)
    if not rows:
        raise TaskDataError(f"{path}: no {label} rows (expected a header line 'category,{label}' and one row per "
                            f"{label})")
    seen: dict[str, str] = {}
    for where, row in rows:
        key = row[label].casefold()
        if key in seen:
            raise TaskDataError(f"{path}: {where}: {label} {row[label]!r} repeats {seen[key]}; every {label} "
                                f"must be unique")
        seen[key] = where
    return [row for _, row in rows]


def _csv_label_rows(path: Path, text: str, label: str) -> list[tuple[str, dict[str, str]]]:
    lines = list(csv.reader(text.splitlines()))
    header_at = next((i for i, cols in enumerate(lines) if any(c.strip() for c in cols)), None)
    if header_at is None:
        return []
    header = [c.strip().lower() for c in lines[header_at]]
    allowed = {"category", label, "split"}
    if "category" not in header or label not in header or set(header) - allowed or len(set(header)) != len(header):
        raise TaskDataError(f"{path}: line {header_at + 1}: expected a header 'category,{label}' (optional "
                            f"column 'split'), found {','.join(lines[header_at])!r}")
    out = []
    for i, cols in enumerate(lines[header_at + 1:], start=header_at + 2):
        if not any(c.strip() for c in cols):
            continue
        if len(cols) != len(header):
            raise TaskDataError(f"{path}: line {i}: expected {len(header)} comma-separated values "
                                f"({','.join(header)}), found {len(cols)}: {','.join(cols)!r}")
        row = {h: c.strip() for h, c in zip(header, cols)}
        out.append((f"line {i}", _check_label_row(path, f"line {i}", row, label)))
    return out


def _json_label_rows(path: Path, text: str, label: str) -> list[tuple[str, dict[str, str]]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); expected a list of "
                            f"{{\"{label}\": ..., \"category\": ...}} objects") from None
    if not isinstance(doc, list):
        raise TaskDataError(f"{path}: expected a JSON list of {{\"{label}\": ..., \"category\": ...}} objects, "
                            f"found {type(doc).__name__}")
    out = []
    for i, rec in enumerate(doc):
        where = f"item {i}"
        if not isinstance(rec, dict) or not {label, "category"} <= set(rec) or set(rec) - {label, "category", "split"}:
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise TaskDataError(f"{path}: {where}: expected an object with keys {label!r} and 'category' "
                                f"(optional 'split'), found {found}")
        if not all(isinstance(v, str) for v in rec.values()):
            raise TaskDataError(f"{path}: {where}: values must be strings, found {rec!r}")
        out.append((where, _check_label_row(path, where, {k: v.strip() for k, v in rec.items()}, label)))
    return out


def _check_label_row(path: Path, where: str, row: dict[str, str], label: str) -> dict[str, str]:
    for key in (label, "category"):
        if not row.get(key):
            raise TaskDataError(f"{path}: {where}: {key} is empty; expected a non-empty {key}")
    split = row.get("split", "")
    if split and split not in SPLITS:
        raise TaskDataError(f"{path}: {where}: split must be one of {SPLITS} or empty, found {split!r}")
    return {label: row[label], "category": row["category"], "split": split}
