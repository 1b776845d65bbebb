"""Many PEFT adapter directories at once, and the labels file that names what each one taught.

``adapter_dirs(path)``: a PEFT adapter dir itself, or the adapter dirs directly inside a folder.
``read_labels_file(path)``: adapter dir name -> labels, from a CSV with a header row
(``dir``/``id``/``name`` column, then one column per label key; ``.tsv`` tab-separated) or a JSON
object ``{dir name: {key: value}}``. Errors name the file, the row and what was expected.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .format import ZooError
from .peft import PEFT_CONFIG


def adapter_dirs(path: Path) -> list[Path]:
    """A PEFT adapter dir itself, or every adapter dir directly inside a folder (sorted by name)."""
    if not path.is_dir():
        raise ZooError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                         f"(expected a PEFT adapter dir holding {PEFT_CONFIG}, or a folder of them)")
    if (path / PEFT_CONFIG).is_file():
        return [path]
    inside = sorted(p for p in path.iterdir() if (p / PEFT_CONFIG).is_file())
    if not inside:
        raise ZooError(f"{path}: holds no {PEFT_CONFIG}, and no adapter dirs with one inside")
    return inside


_KEY_COLUMNS = ("dir", "id", "name")


def read_labels_file(path: Path) -> dict[str, dict]:
    """Adapter dir name -> labels, from a CSV with a header or a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ZooError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".json":
        return _labels_from_json(path, text)
    if path.suffix.lower() in (".csv", ".tsv") or not text.lstrip().startswith("{"):
        return _labels_from_csv(path, text)
    return _labels_from_json(path, text)


def _labels_from_json(path: Path, text: str) -> dict[str, dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ZooError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ZooError(f"{path}: expected a JSON object {{adapter dir name: {{key: value}}}}, "
                         f"found {type(data).__name__}")
    for name, labels in data.items():
        if not isinstance(labels, dict) or not labels:
            raise ZooError(f"{path}: entry {name!r} must be a non-empty object of labels, found {labels!r}")
        bad = {k: v for k, v in labels.items() if not isinstance(v, (str, int, float, bool))}
        if bad:
            raise ZooError(f"{path}: entry {name!r}: labels must be strings or numbers, found {bad}")
    return {Path(name).name: dict(labels) for name, labels in data.items()}


def _labels_from_csv(path: Path, text: str) -> dict[str, dict]:
    dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    rows = list(csv.reader(text.splitlines(), dialect))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ZooError(f"{path}: empty; expected a header row 'dir,<label keys...>' and one row per adapter")
    header = [c.strip() for c in rows[0]]
    key_col = next((c for c in _KEY_COLUMNS if c in header), None)
    if key_col is None:
        raise ZooError(f"{path}: the header {header} has no 'dir', 'id' or 'name' column naming the "
                         "adapter dir")
    if len(header) < 2 or any(not c for c in header) or len(set(header)) != len(header):
        raise ZooError(f"{path}: the header {header} needs distinct, non-empty column names and at "
                         "least one label column")
    k = header.index(key_col)
    out: dict[str, dict] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ZooError(f"{path}: row {line_no} has {len(row)} fields, the header has {len(header)}")
        name = Path(row[k].strip()).name
        if not name:
            raise ZooError(f"{path}: row {line_no} has an empty {key_col!r}")
        if name in out:
            raise ZooError(f"{path}: adapter {name!r} appears twice (rows {out[name]['_row']} and {line_no})")
        out[name] = {"_row": line_no, **{h: v.strip() for h, v in zip(header, row) if h != key_col and v.strip()}}
    for name, labels in out.items():
        row_no = labels.pop("_row")
        if not labels:
            raise ZooError(f"{path}: row {row_no} ({name}) has no label values")
    return out
