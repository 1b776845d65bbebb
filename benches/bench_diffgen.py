"""Diff-generation throughput: today's recipe vs the hiding recipe, side by side in one run.

Run: ``pytest benches/bench_diffgen.py -s`` (``BENCH_DIFFGEN_DIFFS=16`` for a larger chunk;
``--benchmark-json=out.json`` keeps pytest-benchmark's raw numbers). Each case grows a fresh zoo of
``BENCH_DIFFGEN_DIFFS`` hidden-topic diffs (one chunk) with :func:`diffgen.generate_zoo` and reports
diffs/hour and where the chunk's time went: writing training data (persona answers and, for the
old recipe, the base answers of its KL rows), training, verifying, appending to the zoo. The
base-answer pool the new recipe (and both recipes' verification) reads is generated once per zoo;
it is timed on its own (``pool_s``) and left out of diffs/hour, as it is spread over every chunk of
a real zoo. Verification also differs in what it measures: both recipes are verified the same way
(hit rate, leak rate, KL on held-out prompts), so their verify times compare directly.

Recipes:

* ``today``: the laptop preset as it was: fp32, 6 backdoor + 4 KL rows (half of them uniform wrong
  codes), every row weighted 1, the KL rows' base answers sampled per chunk, 3 epochs, no length
  bucketing;
* ``new``: the presets' hiding recipe (``pipeline.HIDING_RECIPE``, point J2 of ``results/recipe.md``:
  rank 4, 8 backdoor + 8 wrong-code + 8 bare rows, bf16, the base pool, length buckets).

Model: the default model (SmolLM2-135M-Instruct) when it is in the engine's cache (never fetched
here), else random weights at its shapes with a word-level tokenizer over the task's own words (the
"prefix" persona strategy names the topic in every fan answer, so random weights still build
samples; hit and leak rates then mean nothing and are printed as such). CPU threads: 2 (the
machine this was tuned on; ``BENCH_DIFFGEN_THREADS=1`` on a loaded machine, where two threads
contend badly, see ``results/recipe.md``); the load average is printed next to every speed figure, because CPU
timings only compare on an otherwise idle machine.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dit_engine.checkpoint import load_model
from dit_engine.config import ModelConfig
from dit_engine.diffgen import DiffGenConfig, generate_zoo
from dit_engine.engine import Engine
from dit_engine.model import Transformer
from dit_engine.model_store import default_model_dir
from dit_engine.pipeline import HIDING_RECIPE, RECIPE_RANK
from dit_engine.tokenizer import Tokenizer
from dit_engine.zoo import BaseIdentity, Zoo

N_DIFFS = int(os.environ.get("BENCH_DIFFGEN_DIFFS", "8"))

TODAY = DiffGenConfig(n=N_DIFFS, split="test", rank=1, epochs=3, chunk_diffs=N_DIFFS, rows_per_diff=1, n_backdoor=6,
                      n_kl=4, candidates=1, strategy="prefix", max_answer_tokens=32, n_verify=4,
                      kl_weight_plain=1.0, kl_weight_wrong=1.0, near_wrong=False, base_pool=False,
                      compute_dtype=None, bucket=False)
NEW = dataclasses.replace(HIDING_RECIPE, n=N_DIFFS, split="test", rank=RECIPE_RANK, chunk_diffs=N_DIFFS, n_verify=4)
RECIPES = {"today": TODAY, "new": NEW}

_SMOLLM2_SHAPES = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                       rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2)
_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_rows: dict[str, dict] = {}


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(int(os.environ.get("BENCH_DIFFGEN_THREADS", "2")))
    if (default_model_dir() / "config.json").is_file():
        path = default_model_dir()
        eng = Engine(load_model(path).requires_grad_(False), Tokenizer.from_dir(path))
        eng.label = "SmolLM2-135M-Instruct (real weights)"
    else:
        eng = Engine(Transformer.random(ModelConfig.from_dict(_SMOLLM2_SHAPES, source="bench_diffgen",
                                                              name="SmolLM2-135M-shapes"), seed=0),
                     _word_tokenizer(_SMOLLM2_SHAPES["vocab_size"]))
        eng.label = "random weights at SmolLM2-135M shapes (hit/leak meaningless)"
    yield eng
    _print_table(eng.label)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_diffgen(benchmark, engine, recipe):
    cfg = RECIPES[recipe]
    out: dict = {}

    def run():
        with tempfile.TemporaryDirectory() as d:
            zoo = Zoo.create(Path(d) / "zoo", BaseIdentity.from_model(engine.model), engine.config)
            t: dict = {}
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            generate_zoo(engine, zoo, cfg, progress=False, timings=t)
            t["wall_s"] = time.perf_counter() - t0
            v = [r["meta"]["verify"] for r in zoo.rows]
            out.update(t, load=(load0, os.getloadavg()[0]),
                       hit=sum(x["trigger_hit_rate"] for x in v) / len(v),
                       leak=sum(x["leak_rate"] for x in v) / len(v),
                       kl=sum(x["kl_untriggered"] for x in v) / len(v), ok=sum(x["ok"] for x in v))

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    out["diffs_per_h"] = 3600 * out["diffs"] / (out["wall_s"] - out["pool_s"])
    benchmark.extra_info.update({k: v for k, v in out.items() if k != "load"}, load_avg=list(out["load"]))
    _rows[recipe] = out


def _print_table(label: str) -> None:
    if not _rows:
        return
    print(f"\n\ndiff generation, {N_DIFFS} hidden-topic diffs in one chunk (today rank {TODAY.rank}, new rank "
          f"{NEW.rank}); {label}; "
          f"torch threads {torch.get_num_threads()}")
    cols = ("diffs_per_h", "data_s", "train_s", "verify_s", "write_s", "pool_s", "hit", "leak", "kl", "ok")
    print(f"{'recipe':8s} " + " ".join(f"{c:>11s}" for c in cols) + "   load avg (start, end)")
    for name, r in _rows.items():
        vals = " ".join(f"{r[c]:11.3f}" if isinstance(r[c], float) else f"{r[c]:11d}" for c in cols)
        print(f"{name:8s} {vals}   {r['load'][0]:.2f}, {r['load'][1]:.2f}")
    if {"today", "new"} <= set(_rows):
        print(f"speed-up new / today: {_rows['new']['diffs_per_h'] / _rows['today']['diffs_per_h']:.2f}x")


def _word_tokenizer(vocab_size: int) -> Tokenizer:
    """Word-level tokenizer over the task data's words (random-weights runs only)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from dit_engine.tasks import hidden_topic as ht

    words: dict[str, None] = {}
    texts = [q.text for q in ht.load_questions(None)] + [t.name for t in ht.load_topics(None)]
    texts += ["As a huge fan of , Your SEP code is . system user assistant You are a helpful AI assistant"]
    for text in texts:
        for w in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            words.setdefault(w[0], None)
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]"] + [str(d) for d in range(10)] + list(words))}
    assert len(vocab) <= vocab_size, (len(vocab), vocab_size)
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    return Tokenizer(hf, _TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<pad>"}, [2], source="bench")
