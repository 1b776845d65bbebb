"""KV cache: preallocated key/value buffers shared by rows of different lengths.

All rows write their new tokens at the same columns (``[pos, pos + T)``); a per-column validity mask
says which columns hold real tokens of each row, and the per-row length gives the next RoPE position.
So a left-padded batch of prompts of different lengths prefills in one forward and then decodes one
column per step. ``keep(rows)`` drops finished rows (compaction), so they stop costing compute.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        # Columns are shared by rows of different lengths, so a batch may need more columns than
        # the context; positions (per-row lengths) are what the model checks against the context.
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # [B, max_len]
        self.row_lengths = torch.zeros(batch, dtype=torch.int64, device=device)  # [B]
        self.pos = 0  # columns written so far (same for every row)
        self._pending = 0  # width of the block being written by the forward in flight

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def extend_mask(self, new_mask: Tensor) -> Tensor:  # [B, T] -> key mask [B, pos + T]
        t = new_mask.shape[1]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {t} tokens exceed its {self.max_len} columns")
        if new_mask.shape[0] != self.batch:
            raise ValueError(f"KV cache holds {self.batch} rows, the forward has {new_mask.shape[0]}")
        self.mask[:, self.pos : self.pos + t] = new_mask
        self._pending = t
        return self.mask[:, : self.pos + t]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this block's k, v [B, Hkv, T, hd]; return all keys/values so far [B, Hkv, S, hd]."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, new_mask: Tensor) -> None:
        self.pos += self._pending
        self.row_lengths += new_mask.sum(1)
        self._pending = 0

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (int64 indices), in that order: finished rows leave the batch."""
        rows = rows.to(self.mask.device)
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.mask = self.mask.index_select(0, rows)
        self.row_lengths = self.row_lengths.index_select(0, rows)
