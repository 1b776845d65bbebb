"""LatentQA data: the personas a target model is told to play, the neutral user messages it answers
under them, and a reader for the LatentQA reference repository's own data files.

LatentQA (Pan et al. 2024) trains a *decoder* to answer questions about a *target* model's
activations. One training item is (hidden instruction, stimulus, question, answer): the target
reads a system prompt (the persona) and a neutral user message, its activations are captured, and
the decoder learns to answer the question about the persona from those activations alone.

Packaged data, in ``data/`` (authored for this project; the file format of
:mod:`dit_engine.tasks.datafiles`, so errors name the file and the record):

* ``personas.json``: ``{"format": 1, "personas": [...]}``. A record holds ``id`` (a slug),
  ``label`` (a short noun phrase naming the persona, "a retired sea captain"), ``category`` (one
  of :data:`CATEGORIES` in the packaged file; user files may use their own), ``system`` (the
  hidden system prompt), ``split`` ("train" or "test", fixed per persona) and ``qa``: at least
  :data:`MIN_QA` ``{"q": question, "a": answer}`` objects, no question twice. ids and labels are
  unique (case-folded) across the file.
* ``stimuli.json``: ``{"format": 1, "stimuli": [{"text": ..., "split": ...}, ...]}``, texts unique.

Reference format (github.com/aypan17/latentqa, ``data/train/`` and ``data/eval/``, checked against
its files and its loader ``lit/utils/dataset_utils.py``): :func:`read_reference`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import read_json
from ..tasks.datafiles import TaskDataError, check_split, read_records

DATA_DIR = Path(__file__).resolve().parent / "data"
PERSONAS_FILE = DATA_DIR / "personas.json"
STIMULI_FILE = DATA_DIR / "stimuli.json"
MIN_QA = 3
CATEGORIES = ("profession", "historical", "fiction", "animal", "hobbyist", "mood", "expertise", "style",
              "life-stage", "place", "values", "object")

# The reference's instruction files, in the order its loader concatenates them, and the fields one
# record may carry (its loader reads each with a default of "").
REFERENCE_FILES = ("system", "stimulus_completion", "stimulus", "control")
REFERENCE_FIELDS = ("system", "control_user", "control_thought", "control_model", "stimulus_user",
                    "stimulus_thought", "stimulus_model")
REFERENCE_QA_FILE = "qa.json"

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


@dataclass(frozen=True)
class QA:
    q: str
    a: str


@dataclass(frozen=True)
class Persona:
    id: str
    label: str  # a short noun phrase: "a retired sea captain"
    category: str
    system: str  # the hidden system prompt the target model is given
    split: str  # "train" or "test"
    qa: tuple[QA, ...]


@dataclass(frozen=True)
class Stimulus:
    text: str  # a neutral user message
    split: str  # "train" or "test"


@dataclass(frozen=True)
class ReferenceDialog:
    """One record of a reference system / stimulus / control file: what the target model read.
    Fields the record leaves out are empty, as the reference's loader reads them."""

    source: str  # the file it came from, one of REFERENCE_FILES
    system: str = ""
    control_user: str = ""
    control_thought: str = ""
    control_model: str = ""
    stimulus_user: str = ""
    stimulus_thought: str = ""
    stimulus_model: str = ""


@dataclass(frozen=True)
class ReferenceLabel:
    """A reference label with everything its files say about it: the Persona-like unit of that data."""

    id: str  # the reference's label, e.g. "persona-..." or "goal-..."
    category: str  # the label's prefix before the first "-" (the reference filters on it)
    split: str
    dialogs: tuple[ReferenceDialog, ...]  # in file order: system, stimulus_completion, stimulus, control
    qa: tuple[QA, ...]


# ---- packaged (or user) files in this project's format ----------------------------------------------------
def load_personas(split: str | None = None, *, path: Path | str | None = None) -> list[Persona]:
    """The personas of ``split`` ("train", "test", or None for all), in file order."""
    check_split(split, "latentqa.load_personas")
    return [p for p in _read_personas(str(path or PERSONAS_FILE)) if split is None or p.split == split]


def load_stimuli(split: str | None = None, *, path: Path | str | None = None) -> list[Stimulus]:
    """The stimulus user messages of ``split`` ("train", "test", or None for all), in file order."""
    check_split(split, "latentqa.load_stimuli")
    return [s for s in _read_stimuli(str(path or STIMULI_FILE)) if split is None or s.split == split]


# ---- the reference repository's files ---------------------------------------------------------------------
def read_reference(directory: Path | str, *, split: str | None = None) -> list[ReferenceLabel]:
    """The labels of one LatentQA reference data directory (its ``data/train`` or ``data/eval``).

    Format, as its files and loader have it:

    * ``system.json``, ``stimulus_completion.json``, ``stimulus.json``, ``control.json``: each a JSON
      list of objects with a ``label`` and some of :data:`REFERENCE_FIELDS` (``system.json``:
      ``system`` + ``stimulus_user``; ``control.json``: ``control_user``; ``stimulus.json``:
      ``control_user``, ``control_thought``, ``control_model``, ``stimulus_user``). Every file is
      optional (the reference skips one given as ""), but at least one must be there.
    * ``qa.json``: a JSON object, label -> list of ``[question, answer]`` pairs.

    Assumed, not seen: the public mirror holds ``stimulus_completion.json`` only as a large-file
    pointer, so its field set is taken from the loader (the same seven fields for every file; it
    presumably adds ``stimulus_model``). Any of the seven is accepted in any file.

    Checks beyond the reference's: every record names a label with QA pairs in ``qa.json``, carries
    a non-empty ``system`` or ``control_user`` (the instruction the decoder is asked about), and has
    no other fields. The reference's equal-count asserts (as many records per label in a file, as
    many pairs per label) are not required here. Labels of ``qa.json`` that no file uses are left
    out. Order: first appearance across the files in :data:`REFERENCE_FILES` order.

    ``split`` defaults to the directory's name: "train" -> "train", "eval" or "test" -> "test".
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskDataError(f"{directory}: not a directory (expected a LatentQA data directory holding "
                            f"{REFERENCE_QA_FILE} and some of {[f + '.json' for f in REFERENCE_FILES]})")
    split = _reference_split(directory, split)
    qa_path = directory / REFERENCE_QA_FILE
    qa = _reference_qa(qa_path)
    dialogs: dict[str, list[ReferenceDialog]] = {}
    present = [directory / f"{stem}.json" for stem in REFERENCE_FILES if (directory / f"{stem}.json").exists()]
    if not present:
        raise TaskDataError(f"{directory}: no LatentQA instruction file (expected one or more of "
                            f"{[f + '.json' for f in REFERENCE_FILES]})")
    for path in present:
        for label, dialog in _reference_dialogs(path, qa, qa_path):
            dialogs.setdefault(label, []).append(dialog)
    return [ReferenceLabel(label, label.split("-")[0], split, tuple(found), qa[label])
            for label, found in dialogs.items()]


# ---- internals ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _read_personas(path: str) -> tuple[Persona, ...]:
    # datafiles checks the flat fields (qa is typed `object` there: it is a list of objects, which
    # datafiles' field types do not describe); the id form, unique labels and the qa list are checked here.
    fields = {"id": str, "label": str, "category": str, "system": str, "split": str, "qa": object}
    records = read_records(Path(path), "personas", fields, unique="id")
    labels: dict[str, int] = {}
    out = []
    for i, r in enumerate(records):
        where = f"{path}: personas[{i}] (id {r['id']!r})"
        if not _SLUG.fullmatch(r["id"]):
            raise TaskDataError(f"{where}: id must be a slug (lowercase letters and digits joined by single "
                                f"hyphens), found {r['id']!r}")
        key = r["label"].casefold()
        if key in labels:
            raise TaskDataError(f"{where}: repeats label {r['label']!r} of personas[{labels[key]}]; every label "
                                f"must be unique")
        labels[key] = i
        out.append(Persona(r["id"], r["label"], r["category"], r["system"], r["split"], _persona_qa(where, r["qa"])))
    return tuple(out)


def _persona_qa(where: str, qa: Any) -> tuple[QA, ...]:
    if not isinstance(qa, list):
        raise TaskDataError(f"{where}: field 'qa' must be a list of {{\"q\", \"a\"}} objects, found "
                            f"{type(qa).__name__}")
    pairs = []
    for j, item in enumerate(qa):
        if not (isinstance(item, dict) and set(item) == {"q", "a"}
                and all(isinstance(v, str) and v.strip() for v in item.values())):
            raise TaskDataError(f"{where}: qa[{j}]: expected an object with non-empty strings \"q\" and \"a\" "
                                f"and nothing else, found {item!r}")
        if any(p.q.casefold() == item["q"].casefold() for p in pairs):
            raise TaskDataError(f"{where}: qa[{j}]: repeats the question {item['q']!r}")
        pairs.append(QA(item["q"], item["a"]))
    if len(pairs) < MIN_QA:
        raise TaskDataError(f"{where}: has {len(pairs)} question/answer pairs, expected at least {MIN_QA}")
    return tuple(pairs)


@functools.lru_cache(maxsize=8)
def _read_stimuli(path: str) -> tuple[Stimulus, ...]:
    records = read_records(Path(path), "stimuli", {"text": str, "split": str}, unique="text")
    return tuple(Stimulus(r["text"], r["split"]) for r in records)


def _reference_split(directory: Path, split: str | None) -> str:
    if split is None:
        split = {"train": "train", "eval": "test", "test": "test"}.get(directory.name)
        if split is None:
            raise ValueError(f"latentqa.read_reference: cannot tell the split of {directory} from its name "
                             f"(expected train, eval or test); pass split='train' or split='test'")
    check_split(split, "latentqa.read_reference")
    return split


def _reference_qa(path: Path) -> dict[str, tuple[QA, ...]]:
    doc = read_json(path, "a LatentQA qa.json (an object: label -> list of [question, answer])", kind=dict,
                    error=TaskDataError)
    out = {}
    for label, pairs in doc.items():
        where = f"{path}: label {label!r}"
        if not isinstance(pairs, list) or not pairs:
            raise TaskDataError(f"{where}: expected a non-empty list of [question, answer] pairs, found {pairs!r}")
        for j, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and s.strip() for s in pair)):
                raise TaskDataError(f"{where}: pair {j}: expected [question, answer] (two non-empty strings), "
                                    f"found {pair!r}")
        out[label] = tuple(QA(q, a) for q, a in pairs)
    return out


def _reference_dialogs(path: Path, qa: dict[str, tuple[QA, ...]], qa_path: Path) -> list[tuple[str, ReferenceDialog]]:
    doc = read_json(path, "a LatentQA instruction file (a list of objects with a label)", kind=list,
                    error=TaskDataError)
    out = []
    for i, rec in enumerate(doc):
        label = rec.get("label") if isinstance(rec, dict) else None
        if not isinstance(label, str) or not label.strip():
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise TaskDataError(f"{path}: item {i}: expected an object with a non-empty string 'label', found {found}")
        where = f"{path}: item {i} (label {label!r})"
        unknown = sorted(set(rec) - {"label", *REFERENCE_FIELDS})
        if unknown:
            raise TaskDataError(f"{where}: unknown fields {unknown}; expected 'label' and some of "
                                f"{list(REFERENCE_FIELDS)}")
        bad = [k for k in REFERENCE_FIELDS if not isinstance(rec.get(k, ""), str)]
        if bad:
            raise TaskDataError(f"{where}: fields {bad} must be strings")
        if not (rec.get("system", "").strip() or rec.get("control_user", "").strip()):
            raise TaskDataError(f"{where}: needs a non-empty 'system' or 'control_user' (the instruction the "
                                f"target model was given)")
        if label not in qa:
            raise TaskDataError(f"{where}: no question/answer pairs for this label in {qa_path}")
        out.append((label, ReferenceDialog(path.stem, **{k: rec.get(k, "") for k in REFERENCE_FIELDS})))
    return out
