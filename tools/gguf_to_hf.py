#!/usr/bin/env python3
"""Convert a llama-architecture GGUF (llama.cpp) into a Hugging Face checkpoint directory.

    python tools/gguf_to_hf.py model.gguf --out models/my-model [--verify]

Wraps the engine's converter: every tensor dequantized to fp32 ``model.safetensors``, the q/k rotary
rows put back in HF order, ``config.json``, ``tokenizer.json`` (rebuilt from the GGUF vocabulary),
``tokenizer_config.json`` (with the chat template) and ``generation_config.json``. The result is a
``--model`` directory for every ``dit`` command. Supported: GGUF architecture ``llama`` (Llama,
SmolLM, TinyLlama, Mistral-style files converted as llama), byte-level BPE tokenizers (``gpt2``
model, ``gpt2`` / ``smollm`` pre-tokenizer), no llama3 rope scaling tensor. Anything else is refused
with one line saying what the file has. ``--verify`` loads the new directory into the engine and runs
one forward pass on a few tokens of a test sentence.

Exit status: 0 done, 1 the conversion or the check failed, 2 usage error (bad arguments, missing input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this source tree's package, not an installed one

try:  # the engine's converter and loader: the only lines to change when these modules move
    from dit_engine.checkpoint import CheckpointError, load_model
    from dit_engine.gguf_import import convert_gguf
except ImportError as e:  # reported after --help has had its chance
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

PROG = "gguf_to_hf"
_GGUF_MAGIC = b"GGUF"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/gguf_to_hf.py",
        description="Convert a llama-architecture GGUF file into a Hugging Face checkpoint directory "
        "(fp32 safetensors, config.json, tokenizer.json, chat template) that dit-engine loads.",
        epilog="Exit status: 0 done, 1 conversion failed, 2 usage error.",
    )
    p.add_argument("gguf", type=Path, help="the .gguf file (llama architecture, any quantization gguf can dequantize)")
    p.add_argument("--out", type=Path, required=True, help="the new HF directory (must not exist yet)")
    p.add_argument("--verify", action="store_true", help="load the result into the engine and run one forward pass")
    return p


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse: usage errors exit 2
    if _IMPORT_ERROR is not None:
        return _fail(f"cannot import dit_engine ({_IMPORT_ERROR}); install its dependencies (torch, gguf, tokenizers)")
    src: Path = args.gguf
    if not src.is_file():
        return _fail(f"{src}: no such file", 2)
    with open(src, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            return _fail(f"{src}: not a GGUF file (it does not start with the GGUF magic bytes)", 2)
    if args.out.exists():
        return _fail(f"{args.out}: already exists; convert into a new directory", 2)
    try:
        out = convert_gguf(src, args.out)
    except CheckpointError as e:
        return _fail(str(e).splitlines()[0])
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.verify:
        return _verify(out)
    return 0


def _verify(path: Path) -> int:
    import torch

    from dit_engine.tokenizer import Tokenizer  # the tokenizer the engine pairs with a checkpoint dir

    try:
        model = load_model(path)
        tok = Tokenizer.from_dir(path)
        ids = tok.encode("The capital of France is")
    except Exception as e:  # any failure here means the directory is not usable as converted
        return _fail(f"{path}: converted, but the engine cannot use it: {type(e).__name__}: {e}".splitlines()[0])
    if not ids:
        return _fail(f"{path}: converted, but the tokenizer encodes the test sentence to no tokens")
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), output="last")
    if not torch.isfinite(logits).all():
        return _fail(f"{path}: converted, but a forward pass gives non-finite logits")
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"verified: {n:,} parameters, {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}; "
          f"{len(ids)} test tokens -> finite logits, top next token id {int(logits[0].argmax())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
