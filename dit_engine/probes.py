"""Capture and patch activations at named points of one forward pass.

Points (``Point.parse``):

* ``"hidden.K"``: the residual stream after K blocks, before block K (Hugging Face's
  ``hidden_states[K]`` numbering: ``hidden.0`` is the token embeddings, ``hidden.L`` the last
  block's output *before* the final norm). ``K`` may be negative (from the end) or a relative
  depth in [0, 1] written with a point (``"hidden.0.5"`` is ``round(0.5 * L)``).
* ``"mlp.I"``: block I's MLP neurons, the SwiGLU product that enters ``down_proj`` ([.., intermediate]).

A :class:`Probes` says what one forward captures and patches; the model calls :meth:`Probes.at` at
every point it passes (one dictionary lookup where nothing is asked). Positions are a bool mask
over the forward's block of tokens, ``[B, T]`` (``None``: every position). Captured values are
``x[mask]``, ``[P, d]`` in row-major order, and keep their autograd graph (a decoder or a steering
loss can back-propagate through them); patches replace ``x[mask]`` with given values, or add them
norm-matched (each added vector rescaled to the norm of the activation it lands on, as Activation
Oracles inject), out of place so autograd sees the patch. A capture at a patched point sees the
patched values.

Used with a KV cache, a Probes acts on the block of tokens of that one forward (a prompt's
prefill in :func:`dit_engine.generate.generate`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

KINDS = ("hidden", "mlp")
PatchMode = Literal["replace", "add_norm"]


class ProbeError(ValueError):
    """A point, mask or value that does not fit the model or the forward."""


@dataclasses.dataclass(frozen=True)
class Point:
    kind: str  # "hidden" | "mlp"
    index: int  # hidden: 0..L (after that many blocks); mlp: 0..L-1 (the block)

    @classmethod
    def parse(cls, spec: str | Point, n_layers: int) -> Point:
        """``"hidden.15"``, ``"hidden.-1"``, ``"hidden.0.5"`` (relative depth), ``"mlp.3"`` -> a Point."""
        if isinstance(spec, Point):
            return cls._checked(spec.kind, spec.index, n_layers, str(spec))
        kind, _, where = str(spec).partition(".")
        if kind not in KINDS or not where:
            raise ProbeError(f"probe point {spec!r}: expected one of {', '.join(k + '.N' for k in KINDS)}")
        top = n_layers if kind == "hidden" else n_layers - 1
        try:
            num = float(where) if "." in where else int(where)
        except ValueError:
            raise ProbeError(f"probe point {spec!r}: {where!r} is not a layer number or a relative depth") from None
        if isinstance(num, float) and not 0.0 <= num <= 1.0:
            raise ProbeError(f"probe point {spec!r}: a relative depth must lie in [0, 1]")
        index = round(num * top) if isinstance(num, float) else num
        if index < 0:
            index += top + 1
        return cls._checked(kind, index, n_layers, spec)

    @classmethod
    def _checked(cls, kind: str, index: int, n_layers: int, spec) -> Point:
        top = n_layers if kind == "hidden" else n_layers - 1
        if kind not in KINDS or not 0 <= index <= top:
            raise ProbeError(f"probe point {spec!r}: outside this model's {kind}.0 .. {kind}.{top}")
        return cls(kind, index)

    def __str__(self) -> str:
        return f"{self.kind}.{self.index}"


@dataclasses.dataclass
class _Patch:
    mask: Tensor | None
    values: Tensor
    mode: PatchMode


class Probes:
    """What one forward captures (``capture``) and patches (``patch``); read ``captured`` after it.

    Points are given as strings (``"hidden.15"``) and resolved against the model at the forward
    (:meth:`bind`), so one Probes description serves any model depth with relative points.
    """

    def __init__(self) -> None:
        self._capture: dict[str, Tensor | None] = {}
        self._patch: dict[str, _Patch] = {}
        self._bound: dict[tuple[str, int], tuple[list[str], list[str]]] | None = None
        self.captured: dict[str, Tensor] = {}  # spec as given -> [P, d]

    def capture(self, point: str, positions: Tensor | None = None) -> Probes:
        self._capture[point] = positions
        return self

    def patch(self, point: str, positions: Tensor | None, values: Tensor, mode: PatchMode = "replace") -> Probes:
        if mode not in ("replace", "add_norm"):
            raise ProbeError(f"patch mode must be 'replace' or 'add_norm', found {mode!r}")
        if values.dim() != 2:
            raise ProbeError(f"patch at {point}: values must be [positions, width], found shape {tuple(values.shape)}")
        self._patch[point] = _Patch(positions, values, mode)
        return self

    def bind(self, n_layers: int) -> Probes:
        """Resolve every point for a model of ``n_layers`` blocks; clears earlier captures."""
        bound: dict[tuple[str, int], tuple[list[str], list[str]]] = {}
        for spec in self._patch:
            p = Point.parse(spec, n_layers)
            bound.setdefault((p.kind, p.index), ([], []))[0].append(spec)
        for spec in self._capture:
            p = Point.parse(spec, n_layers)
            bound.setdefault((p.kind, p.index), ([], []))[1].append(spec)
        for patches, _ in bound.values():
            if len(patches) > 1:
                raise ProbeError(f"probe points {' and '.join(patches)} patch the same place")
        self._bound = bound
        self.captured = {}
        return self

    def blocks_needed(self) -> int:
        """After :meth:`bind`: how many blocks a forward must run to pass every point this Probes
        names (``hidden.K``: K blocks; ``mlp.I``: I + 1, the block holding it). What
        ``Transformer.forward(..., output="probes")`` runs."""
        if self._bound is None:
            raise ProbeError("Probes.blocks_needed: bind the probes to a model first")
        return max((index + (kind == "mlp") for kind, index in self._bound), default=0)

    def at(self, kind: str, index: int, x: Tensor) -> Tensor:
        """Called by the model at every point: x ``[B, T, d]`` -> x patched; records captures."""
        hit = self._bound.get((kind, index)) if self._bound is not None else None
        if hit is None:
            return x
        patches, captures = hit
        for spec in patches:
            x = self._apply(spec, self._patch[spec], x)
        for spec in captures:
            mask = self._capture[spec]
            self.captured[spec] = x.reshape(-1, x.shape[-1]) if mask is None else x[self._mask(spec, mask, x)]
        return x

    def _apply(self, spec: str, p: _Patch, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        mask = None if p.mask is None else self._mask(spec, p.mask, x).reshape(-1)
        old = flat if mask is None else flat[mask]  # what the patch lands on
        n = old.shape[0]
        if p.values.shape != (n, x.shape[-1]):
            raise ProbeError(f"patch at {spec}: {n} positions of width {x.shape[-1]} need values of shape "
                             f"({n}, {x.shape[-1]}), found {tuple(p.values.shape)}")
        v = p.values.to(device=x.device, dtype=x.dtype)
        if p.mode == "add_norm":
            scale = old.float().norm(dim=-1, keepdim=True) / v.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
            v = old + v * scale.to(x.dtype)
        return v.view_as(x) if mask is None else flat.index_put((mask,), v).view_as(x)

    @staticmethod
    def _mask(spec: str, mask: Tensor, x: Tensor) -> Tensor:
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            raise ProbeError(f"probe at {spec}: positions must be a bool mask of shape {tuple(x.shape[:2])} "
                             f"(batch, tokens of this forward), found {mask.dtype} {tuple(mask.shape)}")
        return mask.to(x.device)


def positions_mask(lengths: list[int], positions: list[list[int]], *, left_pad: bool = False) -> Tensor:
    """A ``[B, T]`` bool mask from per-row token positions (indices into each row's own tokens),
    for rows of ``lengths`` padded to the longest on the right (or the left, as generation pads)."""
    if len(lengths) != len(positions):
        raise ProbeError(f"{len(positions)} position lists for {len(lengths)} rows")
    t = max(lengths) if lengths else 0
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, (n, pos) in enumerate(zip(lengths, positions)):
        for p in pos:
            if not -n <= p < n:
                raise ProbeError(f"row {i}: position {p} outside its {n} tokens")
            p = p % n
            mask[i, (t - n + p) if left_pad else p] = True
    return mask
