"""A tiny world for the neuron tests: a word-level tokenizer whose numbers 0..10 are single tokens
(so the all-at-once simulator can read them), a small random model with a long enough context for
simulator prompts, and a corpus text over its words."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from conftest import tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dit_engine.checkpoint import save_checkpoint
from dit_engine.engine import Engine
from dit_engine.model import Transformer
from dit_engine.neurons.simulate import number_token_ids
from dit_engine.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "river", "stone", "house", "road", "cloud"]
VERBS = ["sees", "likes", "finds", "follows", "jumps", "sleeps"]
OTHER = ["the", "a", "and", "near", "over", "blue", "red", "old", "small", ".", ","]
PROMPT_WORDS = ["neuron", "explanation", "of", "behavior", "activations", "unknown", "<", ">", "start", "end", "main",
                "thing", "this", "does", "is", "find", "tokens", "\"", ":", "words", "for", "fruit"]
NUMBERS = [str(d) for d in range(11)]
WORDS = NOUNS + VERBS + OTHER + PROMPT_WORDS + NUMBERS


def neuron_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(WORDS)) + ["[UNK]"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(SPECIALS)
    return Tokenizer(hf, None, {"eos_token": "<|im_end|>", "pad_token": "<pad>"}, [2], source="neuron-tiny")


def neuron_engine(seed: int = 0, layers: int = 2) -> Engine:
    tok = neuron_tokenizer()
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=24,
                      num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
                      max_position_embeddings=2048)
    return Engine(Transformer.random(cfg, seed=seed), tok)


def corpus_text(n_sentences: int = 120, seed: int = 0) -> str:
    """Sentences over the tiny vocabulary, one paragraph each (blank-line separated)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(OTHER[:2]), rng.choice(OTHER[4:8]), rng.choice(NOUNS), rng.choice(VERBS),
                 rng.choice(OTHER[2:4]), rng.choice(OTHER[:2]), rng.choice(NOUNS), "."]
        out.append(" ".join(words))
    return "\n\n".join(out) + "\n"


def write_neuron_model(out: Path, seed: int = 0) -> Path:
    eng = neuron_engine(seed)
    save_checkpoint(eng.model.state_dict(), eng.config, out)
    eng.tokenizer._tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    return out


def test_the_world_has_single_token_numbers():
    tok = neuron_tokenizer()
    ids = number_token_ids(tok)
    assert len(ids) == 11 and len(set(ids)) == 11
    assert [tok.decode([i]) for i in ids] == NUMBERS


PLANTED = {3: ("cat", "dog"), 7: ("bird", "fish"), 11: ("tree", "river"), 15: ("stone", "house"),
           19: ("sees", "likes"), 22: ("jumps", "sleeps")}  # layer-0 neuron -> the tokens it fires on


def plant_neurons(eng: Engine, planted: dict[int, tuple[str, ...]] = PLANTED, strength: float = 0.5) -> Engine:
    """Give layer-0 neuron n of ``planted`` a known behaviour: it fires on its tokens. Each set gets
    its own embedding axis (the tokens' embeddings move along it) and the neuron's gate and up rows
    read that axis only, so after the RMSNorm the SwiGLU product is ~30 on those tokens, ~1 elsewhere."""
    with torch.no_grad():
        emb = eng.model.model.embed_tokens.weight
        mlp = eng.model.model.layers[0].mlp
        for axis, (n, words) in enumerate(planted.items()):
            for w in words:
                emb[eng.tokenizer.token_to_id(w), axis] += strength
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[n].zero_()
                proj.weight[n, axis] = 1.0
    return eng


def planted_record_run(d: Path, *, sentences: int, seed: int, top_k: int, sample_k: int,
                       extra_text: str = "") -> tuple[Engine, Path]:
    """The planted engine's record run over a corpus of ``sentences`` (16-token windows) in ``d/run``."""
    from dit_engine.neurons import RecordConfig, build_corpus, record_neurons

    eng = plant_neurons(neuron_engine(seed=0))
    (d / "c.txt").write_text(corpus_text(sentences, seed=seed) + extra_text)
    corpus = build_corpus(eng.tokenizer, d / "c.txt", context=16)
    record_neurons(eng.model, corpus, d / "run", RecordConfig(top_k=top_k, sample_k=sample_k), progress=False)
    return eng, d / "run"
