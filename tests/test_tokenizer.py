"""Tokenizer: round trips, special tokens, the ChatML template, end-of-turn and eos ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from dit_engine.tokenizer import Tokenizer, TokenizerError

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. What is the capital of Germany? Berlin!",
    "Numbers like 12345 and 2025 are split into digits: 0 1 2 3 4 5 6 7 8 9.",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🙂 and tabs\tand\nnewlines.",
] * 20


def _write_tokenizer_dir(path: Path, template: str | None = CHATML, config_eos: int | None = 0) -> Path:
    """A small byte-level BPE trained here (SmolLM's pre-tokenizer), saved as an HF dir."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[AddedToken(s, special=True, normalized=False)
                                                                   for s in SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    tok_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    if template is not None:
        tok_config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    if config_eos is not None:
        (path / "config.json").write_text(json.dumps({"eos_token_id": config_eos}))
    return path


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    return Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "tok"))


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "héllo wörld, naïve café, 日本語 🙂",
    "digits 0123456789 and 3.14159",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_special_tokens_encode_to_their_ids(tok):
    text = "<|im_start|>user\nhi 42<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1
    assert ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhi 42"


def test_encode_batch_matches_encode(tok):
    texts = ["a b c", "héllo 123", "<|im_end|>"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    ids = tok.encode_chat(msgs)
    assert ids == tok.encode(tok.apply_chat_template(msgs))
    im_start = tok.token_to_id("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3


def test_end_of_turn_eos_and_pad_ids(tok):
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.end_of_turn_id == im_end
    assert tok.eos_token_ids == [0, im_end]  # config.json eos first, then the end of turn
    assert tok.pad_token_id == im_end
    vocab = json.loads((Path(tok.source) / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.vocab_size == len(vocab) == max(vocab.values()) + 1


def test_end_of_turn_read_from_the_template(tmp_path):
    # A template whose turns end in <|endoftext|>: the id comes from the template, not from eos.
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "t", template=template, config_eos=None))
    assert tok.end_of_turn_id == tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]


def test_chat_template_file_wins_and_bos_eos_variables(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "t")
    (path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok = Tokenizer.from_dir(path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"


def test_template_list_uses_default(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "t", template=None)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(path).apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_raise_exception_in_template(tmp_path):
    template = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}{% endif %}ok"
    tok = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "t", template=template))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TokenizerError, match="chat template failed: must start with user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_attribute_escape(tmp_path):
    template = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "t", template=template))
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template_and_bad_messages(tmp_path):
    tok = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "t", template=None))
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert tok.end_of_turn_id == tok.token_to_id("<|im_end|>")  # known name, no template needed
    tok = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "u"))
    with pytest.raises(TokenizerError, match="chat message 1 must be a dict"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user"}])
    with pytest.raises(TokenizerError, match="non-empty list"):
        tok.apply_chat_template([])


def test_bad_files_are_one_line_errors(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "t")
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: does not parse") as err:
        Tokenizer.from_dir(path)
    assert "\n" not in str(err.value)
    (path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found"):
        Tokenizer.from_dir(path)
    path = _write_tokenizer_dir(tmp_path / "u")
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(path)
    path = _write_tokenizer_dir(tmp_path / "v", template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="not valid jinja2"):
        Tokenizer.from_dir(path)


@pytest.mark.slow
def test_default_model_tokenizer():
    from dit_engine.model_store import resolve_model

    tok = Tokenizer.from_dir(resolve_model("default"))
    ids = tok.encode("What is the capital of France?")
    assert [tok.id_to_token(i) for i in ids] == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    for text in ["héllo 日本語 🙂", "2025-11-22: 3.14159", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert [tok.decode([i]) for i in tok.encode("2025")] == ["2", "0", "2", "5"]
    assert tok.vocab_size == 49152
    assert tok.end_of_turn_id == tok.token_to_id("<|im_end|>") == 2
    assert tok.eos_token_ids == [2]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
