"""Shard files of a zoo: naming, header checks, memory-mapped reads, digests, atomic writes.

A shard ``shards/shard-NNNNNN.safetensors`` holds one append chunk of k diffs: per module
``{module}.A`` [k, r_shard, d_in] and ``{module}.B`` [k, d_out, r_shard], each diff zero-padded to
the shard's max rank; its header metadata repeats the chunk's rows, so a shard written by a killed
job can be adopted later. A shard is never rewritten, so checked headers and mapped views are cached.
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..adapters import LoraSlot
from ..files import TMP_MARK, write_atomically
from .format import DTYPES, FORMAT, FORMAT_VERSION, SHARDS, Diff, ZooError, check_row

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_PREFIX, _SUFFIX = "shard-", ".safetensors"
_SHARD_FORMAT = f"{FORMAT}-shard/{FORMAT_VERSION}"
_OPEN_SHARDS = 16  # memory-mapped shard files kept per zoo


class ShardSet:
    """The shard files of one zoo directory, checked against its manifest (modules, shapes, dtype)."""

    def __init__(self, root: Path, modules: tuple[str, ...], shapes: Mapping[str, tuple[int, int]],
                 dtype_name: str, base_description: str):
        self.dir = root / SHARDS
        self.modules = modules
        self.shapes = dict(shapes)  # module -> (d_in, d_out)
        self.dtype_name = dtype_name
        self.dtype = DTYPES[dtype_name]
        self._base = base_description
        self._headers: dict[str, tuple[int, list[dict]]] = {}  # checked headers: shard -> (rank, rows)
        self._views: collections.OrderedDict[str, dict[str, Tensor]] = collections.OrderedDict()

    def files(self) -> list[Path]:
        """Complete shard files (no temp files), in name order."""
        return shard_files(self.dir.parent)

    def next_name(self) -> str:
        numbers = [_shard_number(p.name) for p in self.files()]
        return f"{_PREFIX}{max(numbers, default=0) + 1:06d}{_SUFFIX}"

    def header(self, shard: str) -> tuple[int, list[dict]]:
        """Check one shard file's header against the manifest; return its rank and the rows it
        carries (cached: a shard is never rewritten)."""
        if shard in self._headers:
            return self._headers[shard]
        where = self.dir / shard
        try:
            with safe_open(str(where), framework="pt") as f:
                meta = f.metadata() or {}
                slices = {k: f.get_slice(k) for k in f.keys()}
                shapes = {k: (s.get_shape(), s.get_dtype()) for k, s in slices.items()}
        except FileNotFoundError:
            raise ZooError(f"{where}: shard file is missing") from None
        except (SafetensorError, OSError) as e:
            raise ZooError(f"{where}: shard file is truncated or corrupted ({e})") from None
        if meta.get("format") != _SHARD_FORMAT or "rows" not in meta:
            raise ZooError(f"{where}: not a {FORMAT} shard (header metadata {sorted(meta)})")
        try:
            rows = [check_row(dict(r, shard=shard), str(where)) for r in json.loads(meta["rows"])]
        except (json.JSONDecodeError, TypeError, ZooError) as e:
            raise ZooError(f"{where}: header rows are unreadable ({e})") from None
        k = len(rows)
        r_shard = max((r["rank"] for r in rows), default=0)
        want_keys = {f"{m}.{s}" for m in self.modules for s in "AB"}
        if set(shapes) != want_keys:
            extra, missing = sorted(set(shapes) - want_keys), sorted(want_keys - set(shapes))
            raise ZooError(
                f"{where}: tensors do not match the zoo's modules (extra {extra[:3]}, missing {missing[:3]})"
            )
        st_dtype = _ST_DTYPES[self.dtype_name]
        for m in self.modules:
            d_in, d_out = self.shapes[m]
            for side, want in (("A", [k, r_shard, d_in]), ("B", [k, d_out, r_shard])):
                shape, dt = shapes[f"{m}.{side}"]
                if list(shape) != want or dt != st_dtype:
                    raise ZooError(
                        f"{where}: {m}.{side} is {dt}{list(shape)}, expected {st_dtype}{want} "
                        f"for {k} diffs of max rank {r_shard} on base {self._base}"
                    )
        if [r["offset"] for r in rows] != list(range(k)):
            raise ZooError(f"{where}: header rows have offsets {[r['offset'] for r in rows][:8]}, expected 0..{k - 1}")
        self._headers[shard] = (r_shard, rows)
        return r_shard, rows

    def views(self, shard: str) -> dict[str, Tensor]:
        """Zero-copy tensors over the memory-mapped shard (header checked first): a read touches
        only the pages of the rows it takes."""
        views = self._views.get(shard)
        if views is not None:
            self._views.move_to_end(shard)
            return views
        self.header(shard)
        where = self.dir / shard
        try:
            with open(where, "rb") as fh:
                # ACCESS_COPY: a private, writable mapping (torch wants a writable buffer); never written.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise ZooError(f"{where}: cannot map shard ({e})") from None
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        raw = torch.frombuffer(mm, dtype=torch.uint8)
        start = 8 + n
        views = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            lo, hi = spec["data_offsets"]
            views[name] = raw[start + lo : start + hi].view(self.dtype).view(spec["shape"])
        self._views[shard] = views
        if len(self._views) > _OPEN_SHARDS:
            self._views.popitem(last=False)
        return views

    def gather(self, rows: list[dict], device: torch.device, dtype: torch.dtype) -> LoraSlot:
        """The diffs of ``rows`` (from any shards) as one slot: A [k, r_max, d_in], B [k, d_out, r_max]
        (ranks zero-padded), scale [k], index arange(k). Per module, the rows taken from one shard
        are gathered in one copy."""
        k = len(rows)
        r_max = max(r["rank"] for r in rows)
        by_shard: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # shard -> (offset, pos)
        for pos, r in enumerate(rows):
            by_shard[r["shard"]].append((r["offset"], pos))
        plan = []  # per shard: views, rank to read, shard rows to take, batch positions to fill
        for shard, pairs in by_shard.items():
            offsets, positions = [o for o, _ in pairs], [p for _, p in pairs]
            # Rows beyond each diff's own rank are zeros in the shard, so one rank cut serves all.
            r = min(r_max, self.header(shard)[0])
            plan.append((self.views(shard), r, _as_slice(offsets) or torch.tensor(offsets),
                         _as_slice(positions) or torch.tensor(positions)))
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        for m in self.modules:
            d_in, d_out = self.shapes[m]
            a = torch.zeros(k, r_max, d_in, dtype=self.dtype)
            b = torch.zeros(k, d_out, r_max, dtype=self.dtype)
            for views, r, take, put in plan:
                src_a, src_b = views[f"{m}.A"][:, :r], views[f"{m}.B"][:, :, :r]
                src_a = src_a[take] if isinstance(take, slice) else src_a.index_select(0, take)
                src_b = src_b[take] if isinstance(take, slice) else src_b.index_select(0, take)
                # index_copy_ rather than a[idx] = ...: advanced-index assignment is far slower on CPU
                if isinstance(put, slice):
                    a[put, :r] = src_a
                    b[put, :, :r] = src_b
                else:
                    a[:, :r].index_copy_(0, put, src_a)
                    b[:, :, :r].index_copy_(0, put, src_b)
            A[m] = a.to(device=device, dtype=dtype)
            B[m] = b.to(device=device, dtype=dtype)
        scale = torch.tensor([float(r["scale"]) for r in rows], dtype=torch.float32, device=device)
        return LoraSlot(A=A, B=B, scale=scale, index=torch.arange(k, device=device), name="zoo")

    def check_digests(self, shard: str, rows: list[dict]) -> list[str]:
        """Problems (empty if none) of ``rows`` of one shard: sha256 mismatch, NaN/Inf, unreadable."""
        try:
            views = self.views(shard)
            k = next(iter(views.values())).shape[0]
            A = {m: views[f"{m}.A"] for m in self.modules}  # [k, r_shard, d_in]
            B = {m: views[f"{m}.B"] for m in self.modules}  # [k, d_out, r_shard]
            digests = row_digests(A, B, self.modules, k)
            bad_rows = set()
            for t in (*A.values(), *B.values()):
                if not bool(torch.isfinite(t).all()):
                    bad_rows |= {i for i in range(k) if not bool(torch.isfinite(t[i]).all())}
        except (OSError, ValueError, RuntimeError) as e:  # ZooError is a ValueError
            return [f"{shard} unreadable ({e})"]
        problems = []
        for r in rows:
            if digests[r["offset"]] != r["sha256"]:
                problems.append(f"{r['id']!r} in {shard} (offset {r['offset']}) fails its sha256 check")
            elif r["offset"] in bad_rows:
                problems.append(f"{r['id']!r} in {shard} holds NaN or Inf")
        return problems

    def stack(self, diffs: list[Diff]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The diffs as the shard's tensors in the zoo's dtype: per module A [k, r_shard, d_in] and
        B [k, d_out, r_shard], zero-padded (modules a diff lacks stay zero)."""
        k = len(diffs)
        r_shard = max(d.rank for d in diffs)
        A = {m: torch.zeros(k, r_shard, self.shapes[m][0], dtype=self.dtype) for m in self.modules}
        B = {m: torch.zeros(k, self.shapes[m][1], r_shard, dtype=self.dtype) for m in self.modules}
        for m in self.modules:
            if all(m in d.A and d.A[m].shape[0] == r_shard for d in diffs):  # the common case: one copy
                torch.stack([d.A[m].detach().to("cpu", self.dtype) for d in diffs], out=A[m])
                torch.stack([d.B[m].detach().to("cpu", self.dtype) for d in diffs], out=B[m])
                continue
            for i, d in enumerate(diffs):
                if m in d.A:
                    rm = d.A[m].shape[0]
                    A[m][i, :rm] = d.A[m].detach().to("cpu", self.dtype)
                    B[m][i, :, :rm] = d.B[m].detach().to("cpu", self.dtype)
        return A, B

    def write(self, shard: str, diffs: list[Diff], A: dict[str, Tensor], B: dict[str, Tensor]) -> list[dict]:
        """Write one shard file atomically from :meth:`stack`'s tensors; return its rows (without
        ``shard``)."""
        digests = row_digests(A, B, self.modules, len(diffs))
        rows = [
            {"id": d.id, "offset": i, "rank": d.rank, "scale": float(d.scale), "labels": d.labels,
             "split": d.split, "n_params": d.n_params, "meta": d.meta, "sha256": digests[i]}
            for i, d in enumerate(diffs)
        ]
        tensors = {f"{m}.{s}": t[m] for m in self.modules for s, t in (("A", A), ("B", B))}
        meta = {"format": _SHARD_FORMAT, "rows": json.dumps(rows, allow_nan=False)}
        write_atomically(self.dir / shard, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        rows = json.loads(meta["rows"])  # what a reader gets back; shares no dicts with the caller's diffs
        self._headers[shard] = (max(d.rank for d in diffs), [dict(r, shard=shard) for r in rows])
        return rows

    def close(self) -> None:
        self._views.clear()


def shard_files(root: Path) -> list[Path]:
    """Complete shard files of the zoo at ``root`` (no temp files), in name order."""
    d = root / SHARDS
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir()
        if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX) and TMP_MARK not in p.name
        and _shard_number(p.name) >= 0
    )


def row_digests(A: Mapping[str, Tensor], B: Mapping[str, Tensor], modules: Iterable[str], k: int) -> list[str]:
    """sha256 per shard row: per module, the row's A block then its B block, as stored bytes.
    Works on byte views of whole tensors, so hashing k rows costs no per-row tensor ops."""
    hashes = [hashlib.sha256() for _ in range(k)]
    for m in modules:
        for t in (A[m], B[m]):
            raw = _raw_bytes(t)
            step = len(raw) // k
            for i, h in enumerate(hashes):
                h.update(raw[i * step : (i + 1) * step])
    return [h.hexdigest() for h in hashes]


def _as_slice(positions: list[int]) -> slice | None:
    """``positions`` as a slice when they are consecutive (the common, in-order case)."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return None


def _raw_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes in its own dtype (bf16 too), without a copy when contiguous."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _shard_number(name: str) -> int:
    digits = name[len(_PREFIX) : -len(_SUFFIX)]
    return int(digits) if digits.isdigit() else -1
