"""The small Python API for embedding: a loaded model with its tokenizer.

    from dit_engine import Engine
    eng = Engine.load("default")                      # or a path to an HF checkpoint directory
    out = eng.generate(["What is the capital of France?"], chat=True)
    print(out[0].text)
    s = eng.score(["Paris."], prompts=["What is the capital of France?"], chat=True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .adapters import AdapterBatch
from .checkpoint import load_model
from .model_store import resolve_model
from .generate import Generation, SamplingParams, Score, generate, score
from .model import Transformer
from .tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}

Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, spec: str = "default", *, dtype: str | torch.dtype = "float32", device: str = "cpu") -> "Engine":
        path = resolve_model(spec)
        model = load_model(path, dtype=parse_dtype(dtype), device=device)
        return cls(model, Tokenizer.from_dir(path))

    @property
    def config(self):
        return self.model.config

    def encode_prompt(self, prompt: Prompt, *, chat: bool = True, system: str | None = None,
                      assistant_prefix: str = "") -> list[int]:
        """Token ids of a prompt; with ``chat`` a string becomes one user turn in the chat template."""
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if system is not None:
                messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
            return ids + (self.tokenizer.encode(assistant_prefix) if assistant_prefix else [])
        return self.tokenizer.encode(prompt)

    def stop_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_id)))

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        chat: bool = True,
        system: str | None = None,
        params: SamplingParams | None = None,
        adapters: AdapterBatch | None = None,
        batch_size: int = 64,
        progress=None,
        **sampling,
    ) -> list[Generation]:
        """Generate for each prompt. Sampling options (max_new_tokens, temperature, top_p, top_k,
        seed, stop_strings) go in ``params`` or as keywords."""
        if params is None:
            params = SamplingParams(**sampling)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if params.stop_token_ids is None:
            params = dataclasses.replace(params, stop_token_ids=self.stop_ids())
        ids = [self.encode_prompt(p, chat=chat, system=system) for p in prompts]
        return generate(self.model, ids, params, adapters=adapters, decode=self.tokenizer.decode,
                        batch_size=batch_size, progress=progress)

    def score(
        self,
        texts: Sequence[str],
        *,
        prompts: Sequence[Prompt] | None = None,
        chat: bool = False,
        adapters: AdapterBatch | None = None,
        batch_size: int = 16,
    ) -> list[Score]:
        """log p of each token of ``texts`` after the first; given ``prompts``, of every token of the
        text as the continuation (with ``chat``, as the assistant's answer to the prompt)."""
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        seqs, plen = [], []
        for i, t in enumerate(texts):
            if prompts is None:
                # The tokenizer's own special tokens (a BOS where it adds one); the first token is context.
                seqs.append(self.tokenizer.encode(t, add_special_tokens=True))
                plen.append(1)
            else:
                p = self.encode_prompt(prompts[i], chat=chat)
                seqs.append(p + self.tokenizer.encode(t))
                plen.append(len(p))
            if len(seqs[-1]) <= plen[-1]:
                what = "its first token is context" if prompts is None else "after its prompt"
                raise ValueError(f"text {i} ({t!r}) has no token to score ({what})")
        return score(self.model, seqs, prompt_lengths=plen, adapters=adapters, batch_size=batch_size)
