"""The text neurons are recorded over: documents from an offline source, deduplicated, tokenized
and cut into fixed-length windows (the records).

Sources (:func:`documents`):

* ``"packaged"`` (the default): English prose that ships inside this package and so exists on
  every install, offline: the invented news headlines and the everyday questions of the task
  registry's data files, and the LatentQA personas' system prompts, their question/answer pairs
  and the stimulus messages: about 1,500 documents, 24k tokens with SmolLM2's tokenizer (382
  windows of 64), of varied hand-written text (no web crawl, no download, nothing to fetch).
* a path: any UTF-8 text file a user gives. Documents are separated by blank lines (a file with
  one document per line and no blank lines is one document per line); a ``.jsonl`` file holds one
  JSON object per line with a ``"text"`` field.

Deduplication is exact, on the document with case folded and whitespace collapsed; identical
windows (a repeated boilerplate paragraph split the same way) are dropped too. Documents are
joined by a newline into one token stream and cut into windows of ``context`` tokens (the last
partial window is dropped): every record has the same length, so a batch needs no padding.

On disk (in a record run directory): ``windows.safetensors`` (``ids`` [N, T] int32) and
``windows.jsonl`` (one row per window: ``{"window": i, "tokens": [token strings]}``), so the
explainer, the simulator and the viewer can show tokens without the subject model's tokenizer,
and ``corpus.json`` (sources, counts, how many duplicates were dropped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import FileFormatError, read_json, write_atomically, write_json
from ..tokenizer import Tokenizer

PACKAGED = "packaged"
CORPUS_FORMAT = "dit-engine-neuron-corpus/1"
_PACKAGE = Path(__file__).resolve().parents[1]
_PACKAGED_FILES = (  # (file, list key, fields that hold text)
    (_PACKAGE / "tasks" / "data" / "headlines.json", "headlines", ("text",)),
    (_PACKAGE / "tasks" / "data" / "questions.json", "questions", ("text",)),
    (_PACKAGE / "latentqa" / "data" / "stimuli.json", "stimuli", ("text",)),
    (_PACKAGE / "latentqa" / "data" / "personas.json", "personas", ("system",)),
)


class CorpusError(ValueError):
    """A corpus source or a windows file that cannot be used."""


@dataclasses.dataclass
class Corpus:
    ids: torch.Tensor  # [N, T] int64: the windows
    tokens: list[list[str]]  # [N][T] each token as text (the subject tokenizer's decode of that one id)
    info: dict  # sources, counts

    @property
    def n_windows(self) -> int:
        return self.ids.shape[0]

    @property
    def context(self) -> int:
        return self.ids.shape[1]

    def save(self, run: Path) -> None:
        run.mkdir(parents=True, exist_ok=True)
        write_atomically(run / "windows.safetensors",
                         lambda tmp: save_file({"ids": self.ids.to(torch.int32).contiguous()}, str(tmp)))
        lines = "".join(json.dumps({"window": i, "tokens": t}, ensure_ascii=False) + "\n"
                        for i, t in enumerate(self.tokens))
        write_atomically(run / "windows.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        write_json(run / "corpus.json", {"format": CORPUS_FORMAT, **self.info})

    @classmethod
    def load(cls, run: Path) -> "Corpus":
        info = read_json(run / "corpus.json", "a neuron corpus description", kind=dict, error=CorpusError)
        if info.get("format") != CORPUS_FORMAT:
            raise CorpusError(f"{run / 'corpus.json'}: format {info.get('format')!r}, expected {CORPUS_FORMAT!r}")
        try:
            ids = load_file(str(run / "windows.safetensors"))["ids"].long()
        except (SafetensorError, OSError, KeyError) as e:
            raise CorpusError(f"{run / 'windows.safetensors'}: unreadable or truncated ({e})") from None
        tokens = []
        path = run / "windows.jsonl"
        try:
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                tokens.append(json.loads(line)["tokens"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"{path}: unreadable at line {len(tokens) + 1} ({type(e).__name__})") from None
        if ids.dim() != 2 or len(tokens) != ids.shape[0] or any(len(t) != ids.shape[1] for t in tokens):
            raise CorpusError(f"{run}: windows.jsonl holds {len(tokens)} windows, windows.safetensors "
                              f"{tuple(ids.shape)}: the two files disagree (a truncated copy?)")
        info.pop("format")
        return cls(ids, tokens, info)


def build_corpus(tokenizer: Tokenizer, source: str | Path = PACKAGED, *, context: int = 64,
                 max_windows: int | None = None) -> Corpus:
    """Deduplicated documents of ``source`` as windows of ``context`` tokens."""
    if context < 2:
        raise CorpusError(f"context must be >= 2 tokens, found {context}")
    docs, n_raw = dedupe(documents(source))
    sep = tokenizer.encode("\n")
    stream: list[int] = []
    for d in docs:
        stream += tokenizer.encode(d) + sep
    n = len(stream) // context
    rows, seen, dup_windows = [], set(), 0
    for i in range(n):
        w = tuple(stream[i * context:(i + 1) * context])
        if w in seen:
            dup_windows += 1
            continue
        seen.add(w)
        rows.append(w)
        if max_windows is not None and len(rows) >= max_windows:
            break
    if not rows:
        raise CorpusError(f"corpus {source}: {len(stream)} tokens make no window of {context} tokens")
    ids = torch.tensor(rows, dtype=torch.int64)
    pieces = {i: tokenizer.decode([i], skip_special_tokens=False) for i in set(ids.flatten().tolist())}
    tokens = [[pieces[i] for i in row] for row in ids.tolist()]
    info = {"source": str(source), "documents": len(docs), "duplicate_documents": n_raw - len(docs),
            "duplicate_windows": dup_windows, "tokens": len(stream), "windows": len(rows), "context": context,
            "tokenizer": tokenizer.source, "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]}
    return Corpus(ids, tokens, info)


def documents(source: str | Path = PACKAGED) -> list[str]:
    """The documents of a source (see the module docstring), in order, before deduplication."""
    if str(source) == PACKAGED:
        out = []
        for path, key, fields in _PACKAGED_FILES:
            for row in read_json(path, "a packaged data file", kind=dict)[key]:
                out += [row[f] for f in fields if isinstance(row.get(f), str)]
                out += [f"{qa['q']} {qa['a']}" for qa in row.get("qa", []) if isinstance(qa, dict)
                        and isinstance(qa.get("q"), str) and isinstance(qa.get("a"), str)]
        return out
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(f"{path}: not found (expected a text file, or '{PACKAGED}' for the packaged corpus)") from None
    except IsADirectoryError:
        raise CorpusError(f"{path}: is a directory (expected a text file)") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {n} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CorpusError(f'{path}: line {n} is not a JSON object with a string "text"')
            out.append(row["text"])
        return out
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    out = [p.strip() for p in parts if p.strip()]
    if not out:
        raise CorpusError(f"{path}: holds no text")
    return out


def dedupe(docs: list[str]) -> tuple[list[str], int]:
    """Documents without exact duplicates (case folded, whitespace collapsed), first kept; and how
    many there were before."""
    seen, out = set(), []
    for d in docs:
        key = " ".join(d.casefold().split())
        if key and key not in seen:
            seen.add(key)
            out.append(d)
    return out, len(docs)


def check_windows(ids: torch.Tensor, vocab_size: int, where: str = "corpus") -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise FileFormatError(f"{where}: windows must be [N, T] integer token ids, found {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise FileFormatError(f"{where}: token ids outside the model's vocabulary of {vocab_size}")
