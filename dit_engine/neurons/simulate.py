"""Simulate a neuron from its explanation alone: "all at once", one forward per (explanation, record).

The prompt (our own wording of the paper's format): a short instruction, one worked example neuron
with its explanation and activations, then the neuron to simulate: "the main thing this neuron
does is find <explanation>", and one line per record token, ``token<TAB>unknown``. The prompt is
assembled from separately encoded pieces, so the position of every token's line is known exactly;
at the last token before each ``unknown`` the simulator's next-token distribution is read,
restricted to the number tokens ``"0" .. "N"`` and renormalised (a softmax over those logits only,
the same numbers as the full softmax renormalised), and the simulated activation is its expected
value. Causal attention makes each position see only the prompt up to its own line, so one forward
gives what one forward per position would (:meth:`LMSimulator.simulate_one_at_a_time`, the
reference the tests compare against).

**The number tokens** come from the simulator's tokenizer: ``"0" .. "9"`` must each encode as one
token (:class:`SimulatorError` otherwise). Tokenizers that split numbers into digits (SmolLM2,
Llama 3, Qwen) have no single token ``"10"``; then the scale is 0..9: the worked example's
activations are written on that scale and the expected value (0..9) is rescaled by 10/9 to the
paper's 0..10, so ``P("1")`` stands for "1" alone, never for the first digit of "10".

Many prompts go in one batch (sorted by length, up to ``batch_tokens`` new tokens a forward); the
instruction and worked example that open every prompt run once a batch, and the rest of each
prompt (right-padded) reads their keys and values from a KV cache. Only the rows of the number
tokens of the output layer are multiplied.

:class:`KeywordSimulator` is the non-LLM simulator: a token gets 10 where its text matches one of
the explanation's quoted strings, else 0. It reads the token-statistics explainer's explanations
exactly and gives a floor that does not depend on how well a small model reads English.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..model import Transformer
from ..tokenizer import Tokenizer

SCALE = 10  # the paper's activation scale, 0..10
EXPLANATION_PREFIX = "the main thing this neuron does is find"
_HEADER = ("We study the neurons of a language model. Each neuron looks for one particular thing in a short text. "
           "Read the explanation of what a neuron does, then predict its activation on each token.\n\n"
           "Each line holds a token, a tab and the activation, a whole number from 0 to {top}. "
           '"unknown" marks an activation to predict. Most activations are 0.\n\n')
# The worked example: (token, activation on the 0..10 scale); rescaled to the simulator's scale.
_EXAMPLE_EXPLANATION = "words for fruit."
_EXAMPLE = [("She", 0), (" bought", 0), (" apples", 10), (",", 0), (" two", 0), (" ripe", 1), (" pears", 9),
            (" and", 0), (" a", 0), (" loaf", 0), (" of", 0), (" bread", 0), (".", 0)]


class SimulatorError(ValueError):
    """A simulator that cannot read activations (its tokenizer lacks the number tokens)."""


def escape_token(text: str) -> str:
    """A token's text on one line of a prompt: newlines and tabs written as ``\\n`` and ``\\t``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def number_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids of "0", "1", ... up to "10" when that is one token, else up to "9"."""
    ids = []
    for d in range(SCALE + 1):
        enc = tokenizer.encode(str(d))
        if len(enc) != 1:
            if d == SCALE:
                break
            raise SimulatorError(f"simulator tokenizer {tokenizer.source}: {str(d)!r} encodes to {len(enc)} tokens "
                                 f"{enc}; the all-at-once simulator needs each of '0'..'9' as one token")
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise SimulatorError(f"simulator tokenizer {tokenizer.source}: the numbers 0..{len(ids) - 1} share token ids "
                             f"{ids} (an unknown-token fallback?)")
    return ids


class LMSimulator:
    """A local language model as the simulator (the default model or any HF checkpoint)."""

    name = "lm"

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, batch_tokens: int = 8192):
        self.model, self.tokenizer = model, tokenizer
        self.digits = number_token_ids(tokenizer)
        self.top = len(self.digits) - 1  # 10, or 9 when "10" is not one token
        self.batch_tokens = batch_tokens
        self._pieces: dict[str, list[int]] = {}
        self._prefix = self._enc(_HEADER.format(top=self.top))
        self._prefix += self._enc(f"Neuron 1\nExplanation of neuron 1 behavior: {EXPLANATION_PREFIX} "
                                  f"{_EXAMPLE_EXPLANATION}\nActivations:\n<start>\n")
        for tok, act in _EXAMPLE:
            value = act if self.top == SCALE else math.floor(act * self.top / SCALE)
            self._prefix += self._enc(escape_token(tok)) + self._enc("\t") + [self.digits[value]] + self._enc("\n")
        self._prefix += self._enc("<end>\n\n")

    def _enc(self, text: str) -> list[int]:
        if text not in self._pieces:
            self._pieces[text] = self.tokenizer.encode(text)
        return self._pieces[text]

    def prompt(self, explanation: str, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
        """(prompt ids, the position read for each record token)."""
        ids = self._prefix + self._enc(f"Neuron 2\nExplanation of neuron 2 behavior: {EXPLANATION_PREFIX} "
                                       f"{explanation.strip()}\nActivations:\n<start>\n")
        ids = list(ids)
        read = []
        unknown, tab, nl = self._enc("unknown"), self._enc("\t"), self._enc("\n")
        for tok in tokens:
            ids += self._enc(escape_token(tok)) + tab
            read.append(len(ids) - 1)  # the last token before "unknown": its next-token distribution
            ids += unknown + nl
        ids += self._enc("<end>\n")
        ctx = self.model.config.max_position_embeddings
        if len(ids) > ctx:
            raise SimulatorError(f"a simulator prompt of {len(ids)} tokens exceeds the simulator's context of {ctx}; "
                                 "use shorter records (--context) or a model with a longer context")
        return ids, read

    @torch.no_grad()
    def distributions(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        """For each (explanation, record tokens): [T, top + 1] probabilities of the number tokens."""
        prompts = [self.prompt(e, toks) for e, toks in items]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
        out: list[np.ndarray | None] = [None] * len(prompts)
        w = self.model.lm_weight[self.digits]  # [D, h]
        dev = self.model.device
        n_pre = len(self._prefix)  # every prompt starts with it: its keys and values are computed once a batch
        s = 0
        while s < len(order):
            e = s + 1
            while e < len(order) and (e - s + 1) * (len(prompts[order[e]][0]) - n_pre) <= self.batch_tokens:
                e += 1
            chunk = order[s:e]
            longest = len(prompts[chunk[-1]][0]) - n_pre
            ids = torch.zeros(len(chunk), longest, dtype=torch.int64)
            mask = torch.zeros(len(chunk), longest, dtype=torch.bool)
            for r, i in enumerate(chunk):
                p = prompts[i][0][n_pre:]
                ids[r, :len(p)] = torch.tensor(p)
                mask[r, :len(p)] = True
            cache = KVCache(self.model.config, 1, n_pre + longest, dtype=self.model.dtype, device=dev)
            self.model(torch.tensor([self._prefix], device=dev), cache=cache, output="last")
            cache.keep(torch.zeros(len(chunk), dtype=torch.int64))  # the prefix, copied to every row
            # Right-padded after the shared prefix; positions continue from it.
            hidden = self.model(ids.to(dev), attention_mask=mask.to(dev), cache=cache, output="hidden")  # [b, S, h]
            rows = torch.tensor([r for r, i in enumerate(chunk) for _ in prompts[i][1]], dtype=torch.int64)
            cols = torch.tensor([p - n_pre for i in chunk for p in prompts[i][1]], dtype=torch.int64)
            logits = F.linear(hidden[rows.to(dev), cols.to(dev)].float(), w.float())  # [reads, D]
            probs = torch.softmax(logits.double(), -1).cpu().numpy()
            at = 0
            for i in chunk:
                n = len(prompts[i][1])
                out[i] = probs[at:at + n].astype(np.float64)
                at += n
            s = e
        return out  # type: ignore[return-value]

    def simulate(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        """Expected activation per token on the 0..10 scale, all positions of all items at once."""
        return [self._expected(p) for p in self.distributions(items)]

    @torch.no_grad()
    def simulate_one_at_a_time(self, explanation: str, tokens: Sequence[str]) -> np.ndarray:
        """The reference: one forward per token over the prompt cut after that token's tab, the
        full-vocabulary softmax at its last position, renormalised over the number tokens."""
        ids, read = self.prompt(explanation, tokens)
        dist = []
        for pos in read:
            x = torch.tensor([ids[:pos + 1]], device=self.model.device)
            p = torch.softmax(self.model(x, output="last").double(), -1)[0, self.digits].cpu().numpy()
            dist.append(p / p.sum())
        return self._expected(np.array(dist))

    def _expected(self, probs: np.ndarray) -> np.ndarray:
        return probs @ np.arange(self.top + 1, dtype=np.float64) * (SCALE / self.top)


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


class KeywordSimulator:
    """10 on a token whose text (stripped, case folded) is one of the explanation's double-quoted
    strings (those before a context clause "... after ..."), 0 elsewhere; no model."""

    name = "keyword"

    def simulate(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        out = []
        for explanation, tokens in items:
            named = explanation.split(" after ")[0]  # a context ("mostly right after "x"") is not a keyword
            keys = {_norm(_unquote(m)) for m in _QUOTED.findall(named)} - {""}
            out.append(np.array([SCALE if _norm(t) in keys else 0 for t in tokens], dtype=np.float64))
        return out


def _unquote(body: str) -> str:
    """The text of a JSON-style double-quoted string (as the token explainer writes them)."""
    try:
        return json.loads(f'"{body}"')
    except json.JSONDecodeError:
        return body


def _norm(text: str) -> str:
    return text.strip().casefold()
