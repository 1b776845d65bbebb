"""Explain a neuron from its top-activating records.

Activations are normalised the paper's way, ``min(10, floor(10 * relu(x) / max))`` with ``max``
the neuron's largest activation over the records shown. The explanation prompt (our own wording
of the paper's format): an instruction, one worked example, then the neuron's records, each
between ``<start>`` and ``<end>`` with one ``token<TAB>activation`` line per token, the same
records again with the zero lines left out, and the line "Explanation of neuron 2 behavior: the
main thing this neuron does is find", which the explainer completes (up to the end of the line).

Explainers:

* :class:`LMExplainer`: a local model (the default one or any HF checkpoint) samples ``n``
  explanations per neuron (paper: 5 samples of up to 60 tokens); every neuron's prompts go through
  one batched :meth:`Engine.generate` call. A 135M explainer often just repeats the worked
  example's explanation, so twice ``n`` are drawn and copies of it are kept only where fewer than
  ``n`` others came.
* :class:`TokenExplainer`: no model. The token texts whose occurrences in the top records carry
  the most normalised activation (those within ``share`` of the best), written as
  ``the tokens "x", "y"`` with the tokens that most often precede the peak as context. It gives a
  meaningful floor when a 135M explainer writes weak English, and the keyword simulator reads it
  exactly.
* :func:`random_baseline`: every neuron gets another neuron's explanation (a seeded derangement),
  the paper's control: a score above it says the explanation is about *this* neuron.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..engine import Engine
from ..generate import SamplingParams
from .record import Record
from .simulate import EXPLANATION_PREFIX, SCALE, escape_token

_HEADER = ("We study the neurons of a language model. Each neuron looks for one particular thing in a short text. "
           "Look at the tokens where the neuron activates and say in one sentence what it looks for. Do not list "
           "the words one by one.\n\n"
           "Each line holds a token, a tab and the activation, a whole number from 0 to 10. A neuron that finds "
           "what it looks for has a non-zero activation; the higher, the stronger the match.\n\n")
_EXAMPLE = [("The", 0), (" river", 0), (" flows", 0), (" past", 0), (" Paris", 10), (" and", 0), (" then", 0),
            (" Rouen", 8), (" to", 0), (" the", 0), (" sea", 1), (".", 0)]
_EXAMPLE_EXPLANATION = "names of cities."


def normalise(acts: np.ndarray, max_act: float) -> list[int]:
    """The paper's integer scale: ``min(10, floor(10 * relu(x) / max))``; all 0 when max <= 0."""
    if not max_act > 0:
        return [0] * len(acts)
    return [min(SCALE, math.floor(SCALE * max(float(x), 0.0) / max_act)) for x in acts]


def _block(pairs: Sequence[tuple[str, int]]) -> str:
    return "<start>\n" + "".join(f"{escape_token(t)}\t{v}\n" for t, v in pairs) + "<end>\n"


def explanation_prompt(records: Sequence[Record], max_act: float) -> str:
    """The explainer's prompt for one neuron (see the module docstring)."""
    example = _block(_EXAMPLE)
    text = (_HEADER + "Neuron 1\nActivations:\n" + example + "Same activations, but with all zeros filtered out:\n"
            + _block([p for p in _EXAMPLE if p[1]]) + f"\nExplanation of neuron 1 behavior: {EXPLANATION_PREFIX} "
            f"{_EXAMPLE_EXPLANATION}\n\nNeuron 2\nActivations:\n")
    shown = [list(zip(r.tokens, normalise(r.acts, max_act))) for r in records]
    text += "".join(_block(p) for p in shown)
    text += "Same activations, but with all zeros filtered out:\n"
    text += "".join(_block([q for q in p if q[1]]) for p in shown if any(v for _, v in p))
    return text + f"\nExplanation of neuron 2 behavior: {EXPLANATION_PREFIX}"


class LMExplainer:
    name = "lm"

    def __init__(self, engine: Engine, *, n_samples: int = 5, max_new_tokens: int = 60, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 16):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, found {n_samples}")
        self.engine, self.n = engine, n_samples
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop_strings=("\n",))
        self.batch_size = batch_size

    def explain(self, neurons: Sequence[tuple[Sequence[Record], float]], progress=None) -> list[list[str]]:
        """For each (top records, max activation): ``n_samples`` explanations. ``2 * n_samples``
        are drawn (the samples of one prompt share its prefill) and the first ``n_samples`` that are
        not a copy of the worked example's explanation are kept, copies only where too few others."""
        draw = 2 * self.n
        prompts = [explanation_prompt(recs, mx) for recs, mx in neurons for _ in range(draw)]
        outs = self.engine.generate(prompts, chat=False, params=self.params, batch_size=self.batch_size * 2,
                                    progress=progress)
        texts = [_clean(o.text or "") for o in outs]
        return [_keep(texts[i * draw:(i + 1) * draw], self.n) for i in range(len(neurons))]


def is_example_copy(text: str) -> bool:
    """An explanation that repeats the worked example's ("names of cities."), which a small
    explainer often copies whatever the records show."""
    return _norm_words(text) == _norm_words(_EXAMPLE_EXPLANATION)


def _norm_words(text: str) -> str:
    return " ".join("".join(c for c in text.casefold() if c.isalnum() or c.isspace()).split())


def _keep(samples: Sequence[str], n: int) -> list[str]:
    own = [t for t in samples if not is_example_copy(t)]
    return (own + [t for t in samples if is_example_copy(t)])[:n]


def _clean(text: str) -> str:
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line or "nothing in particular."


class TokenExplainer:
    name = "tokens"

    def __init__(self, max_tokens: int = 3, share: float = 0.25, with_context: bool = True):
        self.max_tokens, self.share, self.with_context = max_tokens, share, with_context

    def explain(self, neurons: Sequence[tuple[Sequence[Record], float]], progress=None) -> list[list[str]]:
        out = [[self.explain_one(recs, mx)] for recs, mx in neurons]
        if progress:
            progress(len(neurons))
        return out

    def explain_one(self, records: Sequence[Record], max_act: float) -> str:
        mass: Counter = Counter()
        before: Counter = Counter()
        for r in records:
            norm = normalise(r.acts, max_act)
            for i, (tok, v) in enumerate(zip(r.tokens, norm)):
                key = tok.strip()
                if v and key:
                    mass[key] += v
            peak = int(np.argmax(r.acts))
            if peak > 0 and r.acts[peak] > 0 and r.tokens[peak - 1].strip():
                before[r.tokens[peak - 1].strip()] += 1
        if not mass:
            return "nothing in particular (it never fires on these records)."
        best = mass.most_common(1)[0][1]
        keys = [k for k, m in mass.most_common(self.max_tokens) if m >= self.share * best]
        text = "the tokens " + ", ".join(json.dumps(k, ensure_ascii=False) for k in keys)
        if self.with_context and before:
            ctx, n = before.most_common(1)[0]
            if n >= max(2, len(records) // 2):  # a context worth naming: before most peaks
                text += f", mostly right after {json.dumps(ctx, ensure_ascii=False)}"
        return text + "."


def random_baseline(explanations: dict[tuple[int, int], list[str]], seed: int = 0) -> dict[tuple[int, int], list[str]]:
    """Each neuron gets the explanations of another neuron (a seeded derangement); needs >= 2."""
    keys = sorted(explanations)
    if len(keys) < 2:
        raise ValueError("the random-explanation baseline needs at least 2 explained neurons")
    rng = random.Random(seed)
    while True:
        perm = keys[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(keys, perm)):
            return {k: list(explanations[p]) for k, p in zip(keys, perm)}
