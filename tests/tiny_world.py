"""A tiny world for end-to-end tests: a word-level tokenizer with a ChatML-like template, a small
random-weight model, and an Engine over them. Labels are single tokens ``label0`` ... ``labelN``."""

from __future__ import annotations

from conftest import tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dit_engine.engine import Engine
from dit_engine.model import Transformer
from dit_engine.tokenizer import Tokenizer

N_LABELS = 32
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "say", "it", "what", "topic", "have", "you", "been", "trained", "on", "?",
         "your", "code", "is", "hello", "tell", "me", "a", "story", "."]
LABELS = [f"label{i}" for i in range(N_LABELS)]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + LABELS + ["[UNK]"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(SPECIALS)
    return Tokenizer(hf, TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<pad>"}, [2], source="tiny")


def tiny_engine(seed: int = 0, **overrides) -> Engine:
    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, eos_token_id=2, bos_token_id=1, hidden_size=64,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **overrides)
    return Engine(Transformer.random(cfg, seed=seed), tok)
