"""The DIT adapter's file format: one shared LoRA with its question, task and base identity.

A directory with ``adapter.safetensors`` (per module ``{module}.lora_A`` [r, d_in] and
``{module}.lora_B`` [d_out, r]; fp32, or bf16 for a shipped adapter) and ``adapter.json`` (format,
rank, scale, question, task, base identity, modules, and the recipe it was trained with). Exports
as a PEFT LoRA directory for other tools.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..adapters import LoraSlot, load_single, save_single
from ..checkpoint import weights_fingerprint
from ..files import write_json
from ..zoo import BaseIdentity, Diff, export_peft

SHIPPED = "shipped"  # the name that loads the adapter this package ships (dit interpret --adapter shipped)
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"  # package data: adapter.json + adapter.safetensors


def shipped_available() -> bool:
    """Whether this install carries a trained DIT adapter."""
    return (SHIPPED_DIR / "adapter.json").is_file() and (SHIPPED_DIR / "adapter.safetensors").is_file()


@dataclasses.dataclass
class DitAdapter:
    """A trained DIT adapter: one LoRA (n = 1) with its question and base identity."""

    slot: LoraSlot
    question: str
    task: str
    base: dict
    recipe: dict = dataclasses.field(default_factory=dict)  # how it was trained (config, zoo, best epoch)

    def save(self, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_single(self.slot, out / "adapter.safetensors", dtype)
        meta = {"format": "dit-engine-adapter/1", "rank": self.slot.rank, "scale": float(self.slot.scale[0]),
                "question": self.question, "task": self.task, "base": self.base, "modules": sorted(self.slot.A),
                "recipe": self.recipe}
        write_json(out / "adapter.json", meta, indent=1)
        return out

    @classmethod
    def load(cls, path: str | Path, *, device="cpu", dtype=torch.float32) -> "DitAdapter":
        """Read an adapter directory written by :meth:`save` (or ``"shipped"``: the adapter this
        package ships); one clear error when it is missing, incomplete or corrupt."""
        if str(path) == SHIPPED:
            if not shipped_available():
                raise FileNotFoundError(f"{SHIPPED_DIR}: this install ships no trained DIT adapter; train one with "
                                        "'dit train' or 'dit pipeline --preset medium' and pass its directory")
            path = SHIPPED_DIR
        path = Path(path)
        try:
            meta = json.loads((path / "adapter.json").read_text())
            slot = load_single(path / "adapter.safetensors", meta["modules"], meta["scale"], name="dit",
                               device=device, dtype=dtype)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: not a DIT adapter directory ({Path(e.filename).name} missing)") from None
        except Exception as e:  # corrupt JSON or safetensors, a missing tensor or field
            raise ValueError(f"{path}: unreadable DIT adapter ({type(e).__name__}: {e})") from None
        return cls(slot, meta["question"], meta["task"], meta["base"], meta.get("recipe", {}))

    def fingerprint(self) -> str:
        """A short hash of the adapter's weights (module names, shapes, a sample of values rounded to
        bf16, so the fp32 adapter and its bf16 copy share it): which adapter made a DIT answer."""
        return weights_fingerprint({f"{m}.{side}": t for side, ts in (("A", self.slot.A), ("B", self.slot.B))
                                    for m, t in ts.items()})

    def export_peft(self, out_dir: str | Path, config, base_model_name: str) -> Path:
        """Write the adapter as a PEFT LoRA directory (for other tools: merge it, serve it, ...)."""
        diff = Diff(id="dit-adapter", A={m: a[0].float().cpu() for m, a in self.slot.A.items()},
                    B={m: b[0].float().cpu() for m, b in self.slot.B.items()}, scale=float(self.slot.scale[0]),
                    labels={}, split="", meta={"question": self.question, "task": self.task})
        return export_peft(diff, out_dir, config, base_model_name)

    def check_base(self, base: BaseIdentity) -> None:
        if self.base.get("config_hash") != base.config_hash:
            raise ValueError(f"DIT adapter was trained on base {self.base.get('name')!r} "
                             f"(config {self.base.get('config_hash')}), this model is {base.name!r} ({base.config_hash})")
