"""Tokenizer: a ``tokenizers.Tokenizer`` from ``tokenizer.json`` plus the model's jinja2 chat template.

The chat template comes from ``chat_template.jinja`` when the dir has one, else from the
``chat_template`` field of ``tokenizer_config.json``; it renders in a sandboxed jinja2 environment
set up the way Hugging Face renders templates (trim_blocks, lstrip_blocks, ``raise_exception``,
``bos_token``/``eos_token``). Special tokens written in the rendered text (``<|im_start|>``...)
encode to their own ids.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .files import read_json

# Tokens that close a chat turn in common templates; used only when the template cannot tell.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_SENTINEL = "DITENGINESENTINEL"


class TokenizerError(ValueError):
    """A tokenizer dir or chat the engine cannot use: names the file and what was wrong."""


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 special: dict[str, str | None] | None = None, config_eos_ids: list[int] | None = None,
                 source: str = "tokenizer"):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.source = source
        special = special or {}
        self.bos_token: str | None = special.get("bos_token")
        self.eos_token: str | None = special.get("eos_token")
        self.pad_token: str | None = special.get("pad_token")
        self._config_eos_ids = list(config_eos_ids or [])
        self._template = _compile_template(chat_template, source) if chat_template else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``, and the eos
        ids of ``config.json``/``generation_config.json`` when present) from a model dir."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: not found (the engine reads tokenizers from tokenizer.json)")
        try:
            tokenizer = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception with a multi-line message
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{tok_file}: does not parse as a tokenizers JSON file: {first_line}") from None

        tok_config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else _pick_template(
            tok_config.get("chat_template"), path / "tokenizer_config.json")
        special = {key: _token_content(tok_config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
        eos_ids: list[int] = []
        for name in ("config.json", "generation_config.json"):
            eos = _read_json(path / name).get("eos_token_id")
            eos_ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
        return cls(tokenizer, template, special, [int(i) for i in eos_ids], source=str(path))

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the model's template.
        Extra keyword arguments reach the template (e.g. ``enable_thinking`` for Qwen3)."""
        if self._template is None:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat template "
                                 "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
        _check_messages(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **kwargs)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    # ---- ids the engine needs ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int | None:
        for token in (self.pad_token, self.eos_token):
            if token is not None and self.token_to_id(token) is not None:
                return self.token_to_id(token)
        return self._config_eos_ids[0] if self._config_eos_ids else None

    @cached_property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn (``<|im_end|>`` in ChatML): DIT's loss covers it.

        Read off the template itself: render an assistant turn and take the first special token
        after its content; without a template, fall back to well-known names, then the eos token."""
        if self._template is not None:
            text = self.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                add_generation_prompt=False)
            after = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
            for token in self._tok.encode(after, add_special_tokens=False).tokens:
                if token in self._special_tokens:
                    return self._tok.token_to_id(token)
        for token in (*_KNOWN_END_OF_TURN, self.eos_token):
            if token is not None and self.token_to_id(token) is not None:
                return self.token_to_id(token)
        if self._config_eos_ids:
            return self._config_eos_ids[0]
        raise TokenizerError(f"{self.source}: cannot tell which token ends an assistant turn "
                             "(no chat template, no eos token)")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the configured eos ids and the end-of-turn token."""
        ids = list(self._config_eos_ids)
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            ids.append(self.token_to_id(self.eos_token))
        ids.append(self.end_of_turn_id)
        return list(dict.fromkeys(ids))

    @cached_property
    def _special_tokens(self) -> set[str]:
        return {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}


# ---- helpers ---------------------------------------------------------------------------------------
def _compile_template(source_text: str, source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source_text)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{source}: chat template is not valid jinja2 (line {e.lineno}): {e.message}") from None


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _pick_template(value: Any, source: Path) -> str | None:
    """HF allows one template string or a list of named ones; the engine uses 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise TokenizerError(f"{source}: chat_template lists {sorted(map(str, named))} but no 'default'")
    raise TokenizerError(f"{source}: chat_template must be a string or a list, found {type(value).__name__}")


def _token_content(value: Any) -> str | None:
    """tokenizer_config tokens are strings or AddedToken dicts ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TokenizerError(f"chat message {i} must be a dict with str 'role' and 'content', found {m!r}")


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file: ``{}`` when absent, one clear error when unreadable."""
    if not path.is_file():
        return {}
    return read_json(path, "a JSON object", kind=dict, error=TokenizerError)
