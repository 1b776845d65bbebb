"""The LatentQA decoder: its prompt (placeholders, then a question), the patch that writes a
target's activations over the placeholders, and the LIT adapter's file format.

Decoder prompt: one user turn in the chat template whose content is a run of ``n`` placeholder
tokens, one per activation vector read from the target, then a space and the question; the
generation prompt follows, and in training the answer and the end-of-turn token (the loss covers
both). The placeholder is the one token the tokenizer gives for :data:`PLACEHOLDER_TEXT` ("?", as
the reference's run of "? " tokens), found by encoding it, never a hard-coded id; the run is
inserted as ids between the encoded text before and after it, so no merge across the run changes
the question's tokens.

Write point (:data:`WRITE_POINT`, ``"hidden.1"``): the output of the decoder's block 0, where the
reference writes (Activation Oracles inject at layer 1 too), rather than over the embeddings
(``"hidden.0"``, also accepted): block 0 processes the placeholders as ordinary tokens, and blocks
1.. read the target's vectors, which are residual states from the middle of a model, in their
place. Read point
(:data:`READ_POINT`, ``"hidden.0.5"``): the residual at half depth, the reference's layer 15 of 32
(the output of block 15 is ``hidden.16``, half of 32). Mode ``replace`` overwrites the placeholder
positions (the reference); ``add_norm`` adds each vector rescaled to the norm of the activation it
lands on (Activation Oracles).

LIT adapter directory: ``adapter.safetensors`` laid out as the DIT adapter's (per module
``{module}.lora_A`` [r, d_in], ``{module}.lora_B`` [d_out, r]) and ``adapter.json`` (format
:data:`LIT_FORMAT`, rank, scale, modules, read and write points, patch mode, placeholder, base
identity, and the recipe it was trained with).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..adapters import LoraSlot, load_single, save_single
from ..files import write_json
from ..probes import PatchMode, Probes, positions_mask
from ..tokenizer import Tokenizer
from ..train import Batch, Example, collate
from ..zoo import BaseIdentity
from .dialogs import LatentQAError

PLACEHOLDER_TEXT = "?"
READ_POINT = "hidden.0.5"
WRITE_POINT = "hidden.1"
LIT_FORMAT = "dit-engine-lit-adapter/1"
_MARK = "DITENGINEPLACEHOLDERS"


def placeholder_id(tokenizer: Tokenizer) -> int:
    """The placeholder token: what :data:`PLACEHOLDER_TEXT` encodes to (it must be one token)."""
    ids = tokenizer.encode(PLACEHOLDER_TEXT)
    if len(ids) != 1:
        raise LatentQAError(f"{tokenizer.source}: the placeholder {PLACEHOLDER_TEXT!r} encodes to {len(ids)} tokens "
                            f"{ids}; the decoder needs it to be one token")
    return ids[0]


@dataclasses.dataclass(frozen=True)
class Reading:
    """One decoder row: the prompt with its placeholder positions, and (in training) the answer."""

    prompt_ids: list[int]
    positions: list[int]  # the placeholder positions in prompt_ids, ascending
    target_ids: list[int] = dataclasses.field(default_factory=list)  # answer + end-of-turn (empty: prompt only)


def decoder_prompt(tokenizer: Tokenizer, n: int, question: str) -> tuple[list[int], list[int]]:
    """(prompt ids, placeholder positions) of a question about ``n`` activation vectors."""
    if n < 1:
        raise LatentQAError(f"a decoder prompt needs at least one activation to read, found {n}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{_MARK} {question}"}],
                                         add_generation_prompt=True)
    if text.count(_MARK) != 1:
        raise LatentQAError(f"{tokenizer.source}: the chat template does not keep the user's text as given; "
                            "cannot place the placeholder run")
    before, after = text.split(_MARK)
    head = tokenizer.encode(before)
    return head + [placeholder_id(tokenizer)] * n + tokenizer.encode(after), list(range(len(head), len(head) + n))


def reading(tokenizer: Tokenizer, n: int, question: str, answer: str | None = None) -> Reading:
    """A :class:`Reading` of ``n`` vectors; with ``answer``, its tokens + end-of-turn as the target."""
    ids, pos = decoder_prompt(tokenizer, n, question)
    target = tokenizer.encode(answer) + [tokenizer.end_of_turn_id] if answer is not None else []
    return Reading(ids, pos, target)


def decoder_batch(readings: Sequence[Reading], values: Sequence[Tensor], write_point: str,
                  mode: PatchMode = "replace", *, pad_id: int = 0) -> tuple[Batch, Probes]:
    """Training rows (right-padded, one loss group per row) and the Probes that write ``values[i]``
    ([n_i, d], n_i = the row's placeholders) over row i's placeholder positions."""
    for i, (r, v) in enumerate(zip(readings, values, strict=True)):
        if v.dim() != 2 or v.shape[0] != len(r.positions):
            raise LatentQAError(f"decoder row {i}: {len(r.positions)} placeholders need values of shape "
                                f"({len(r.positions)}, width), found {tuple(v.shape)}")
    batch = collate([Example(r.prompt_ids, r.target_ids, "ce", group=i) for i, r in enumerate(readings)],
                    pad_id=pad_id)
    lens = [len(r.prompt_ids) + len(r.target_ids) for r in readings]
    mask = positions_mask(lens, [r.positions for r in readings])
    return batch, Probes().patch(write_point, mask, torch.cat(list(values)), mode)


@dataclasses.dataclass
class LitAdapter:
    """A trained LatentQA decoder adapter (one LoRA, n = 1) with where it reads and writes."""

    slot: LoraSlot
    read_point: str
    write_point: str
    patch_mode: str
    base: dict  # BaseIdentity as a dict: the decoder and the target are this model
    recipe: dict = dataclasses.field(default_factory=dict)

    def save(self, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_single(self.slot, out / "adapter.safetensors", dtype)
        meta = {"format": LIT_FORMAT, "rank": self.slot.rank, "scale": float(self.slot.scale[0]),
                "read_point": self.read_point, "write_point": self.write_point, "patch_mode": self.patch_mode,
                "placeholder": PLACEHOLDER_TEXT, "base": self.base, "modules": sorted(self.slot.A),
                "recipe": self.recipe}
        write_json(out / "adapter.json", meta, indent=1)
        return out

    @classmethod
    def load(cls, path: str | Path, *, device="cpu", dtype=torch.float32) -> "LitAdapter":
        """Read a directory written by :meth:`save`; one clear error when missing or corrupt."""
        path = Path(path)
        try:
            meta = json.loads((path / "adapter.json").read_text())
            if meta.get("format") != LIT_FORMAT:
                raise LatentQAError(f"{path}: adapter format {meta.get('format')!r}, expected {LIT_FORMAT!r} "
                                    "(a directory from 'dit latentqa train')")
            slot = load_single(path / "adapter.safetensors", meta["modules"], meta["scale"], name="lit",
                               device=device, dtype=dtype)
            fields = (meta["read_point"], meta["write_point"], meta["patch_mode"], meta["base"])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: not a LatentQA adapter directory ({Path(e.filename).name} missing)") \
                from None
        except LatentQAError:
            raise
        except Exception as e:  # corrupt JSON or safetensors, a missing tensor or field
            raise LatentQAError(f"{path}: unreadable LatentQA adapter ({type(e).__name__}: {e})") from None
        return cls(slot, *fields, meta.get("recipe", {}))

    def check_base(self, base: BaseIdentity) -> None:
        mine = BaseIdentity(**self.base)
        if not mine.matches(base):
            raise LatentQAError(f"LatentQA adapter was trained on base {mine.describe()}; this model is "
                                f"{base.describe()}")
