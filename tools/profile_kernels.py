#!/usr/bin/env python3
"""Profile the multi-LoRA op or a model forward at a chosen shape: top kernels and a chrome trace.

    python tools/profile_kernels.py lora --tokens 64 --d-in 2560 --d-out 9728 --rank 16 --adapters 64
    python tools/profile_kernels.py lora --tokens 4096 --adapters 8 --backward --dtype bfloat16
    python tools/profile_kernels.py model --shapes qwen3-4b --batch 64 --decode --adapters 64
    python tools/profile_kernels.py model --model path/to/hf_dir --batch 4 --seq 128

``lora`` times ``multi_lora`` on ``--tokens`` tokens split evenly over ``--adapters`` adapters (one
per contiguous block of tokens, like one adapter per sequence), forward or forward + backward.
``model`` runs a random-weight model at preset shapes (``tiny``, ``smollm2``, ``qwen3-4b``) or a
checkpoint directory: a prefill forward of ``[batch, seq]`` tokens, or with ``--decode`` one-token
steps on a prefilled KV cache, optionally with ``--adapters`` distinct rank-``--rank`` LoRAs.

After ``--warmup`` untimed calls (Triton compiles there), ``--iters`` calls run under
``torch.profiler`` (CPU, plus CUDA on a GPU); the top ``--top`` ops by self device time (CPU time
without CUDA) are printed, and the chrome trace is written to ``--trace`` (open in
chrome://tracing or https://ui.perfetto.dev). With ``--proton`` and a GPU, the same calls run once
more under Triton's proton profiler (``triton.profiler``), which writes ``<trace stem>.hatchet``
(view with ``proton-viewer -m time/ms FILE``); without a GPU or proton that is reported and skipped.
On CPU everything takes the plain-torch path unless ``--backend triton`` (Triton's interpreter).

Exit status: 0 done, 1 the run failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this source tree's package, not an installed one

import torch  # noqa: E402

try:  # the engine's modules: the only lines to change when these modules move
    from dit_engine.adapters import AdapterBatch, LoraSlot
    from dit_engine.cache import KVCache
    from dit_engine.checkpoint import load_model
    from dit_engine.config import ModelConfig
    from dit_engine.model import Transformer
    from dit_kernels.multi_lora import build_lora_meta, multi_lora
except ImportError as e:  # reported after --help has had its chance
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

PROG = "profile_kernels"
SHAPES = {
    "tiny": {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024, "tie_word_embeddings": True,
    },
    "smollm2": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    },
    "qwen3-4b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("profiling")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="the kernels' backend (DIT_KERNELS); auto: Triton for CUDA tensors, torch for CPU")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    g.add_argument("--iters", type=int, default=5, help="profiled calls (default 5)")
    g.add_argument("--top", type=int, default=15, help="rows of the top-ops table (default 15)")
    g.add_argument("--trace", type=Path, default=Path("out/profile/trace.json"),
                   help="chrome trace file to write (default out/profile/trace.json)")
    g.add_argument("--proton", action="store_true", help="also run under triton.profiler (GPU only)")
    g.add_argument("--seed", type=int, default=0)

    p = argparse.ArgumentParser(
        prog="tools/profile_kernels.py",
        description="Profile dit-engine's multi-LoRA op or a model forward under torch.profiler "
        "(and Triton's proton): top-kernels table and a chrome trace.",
        epilog="Exit status: 0 done, 1 run failed, 2 usage error. Details: the module docstring.",
    )
    sub = p.add_subparsers(dest="what", required=True, metavar="{lora,model}")
    lo = sub.add_parser("lora", parents=[common], help="the multi-LoRA delta on one linear layer",
                        description="Profile multi_lora: per-token adapters on one linear layer.")
    lo.add_argument("--tokens", type=int, default=64, help="tokens in the batch (default 64)")
    lo.add_argument("--d-in", type=int, default=2560, help="input features (default 2560, Qwen3-4B hidden)")
    lo.add_argument("--d-out", type=int, default=2560, help="output features (default 2560)")
    lo.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    lo.add_argument("--adapters", type=int, default=64, help="distinct adapters, tokens split evenly (default 64)")
    lo.add_argument("--backward", action="store_true", help="forward + backward (dx, dA, dB)")
    mo = sub.add_parser("model", parents=[common], help="a model forward (prefill or decode)",
                        description="Profile a model forward: prefill or one-token decode steps.")
    src = mo.add_mutually_exclusive_group()
    src.add_argument("--shapes", choices=tuple(SHAPES), default="tiny", help="random weights at these shapes (default tiny)")
    src.add_argument("--model", type=Path, help="an HF checkpoint directory instead of random weights")
    mo.add_argument("--batch", type=int, default=4, help="sequences (default 4)")
    mo.add_argument("--seq", type=int, default=32, help="prompt tokens per sequence (default 32)")
    mo.add_argument("--decode", action="store_true", help="profile one-token decode steps after a --seq prefill")
    mo.add_argument("--adapters", type=int, default=0, help="distinct LoRAs over the batch, 0 = base model (default 0)")
    mo.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    return p


def _check(args: argparse.Namespace) -> None:
    positive = ["warmup", "iters", "top"] + (["tokens", "d_in", "d_out", "rank", "adapters"] if args.what == "lora"
                                             else ["batch", "seq", "rank"])  # fmt: skip
    for name in positive:
        v = getattr(args, name)
        if v < (0 if name == "warmup" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {v}")
    n_rows = args.tokens if args.what == "lora" else args.batch
    if args.what == "model" and args.adapters < 0:
        raise UsageError(f"--adapters must be >= 0, got {args.adapters}")
    if args.adapters > n_rows:
        what = "--tokens" if args.what == "lora" else "--batch"
        raise UsageError(f"--adapters {args.adapters} is more than {what} {n_rows}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if args.what == "model" and args.model is not None and not args.model.is_dir():
        raise UsageError(f"--model {args.model}: not a directory")


def _lora_call(args, dev: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], str]:
    g = torch.Generator(device=dev).manual_seed(args.seed)
    x = torch.randn(args.tokens, args.d_in, generator=g, device=dev).to(dtype).requires_grad_(args.backward)
    A = (torch.randn(args.adapters, args.rank, args.d_in, generator=g, device=dev) / args.d_in**0.5).to(dtype)
    B = (torch.randn(args.adapters, args.d_out, args.rank, generator=g, device=dev) / args.rank**0.5).to(dtype)
    A.requires_grad_(args.backward)
    B.requires_grad_(args.backward)
    scale = torch.full((args.adapters,), 1.0 / args.rank, device=dev)
    index = torch.arange(args.tokens, device=dev) * args.adapters // args.tokens  # contiguous blocks
    meta = build_lora_meta(index, args.adapters)
    label = (f"multi_lora tokens {args.tokens}, d_in {args.d_in}, d_out {args.d_out}, rank {args.rank}, "
             f"{args.adapters} adapters, {'fwd+bwd' if args.backward else 'fwd'}")  # fmt: skip
    if not args.backward:
        return (lambda: multi_lora(x, A, B, scale, meta, backend=args.backend)), label
    dy = torch.randn(args.tokens, args.d_out, generator=g, device=dev).to(dtype)
    return (lambda: torch.autograd.grad(multi_lora(x, A, B, scale, meta, backend=args.backend), [x, A, B], dy)), label


def _model_call(args, dev: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], str]:
    if args.model is not None:
        model = load_model(args.model, dtype=dtype, device=dev).requires_grad_(False)
        what = f"{args.model}"
    else:
        config = ModelConfig.from_dict(SHAPES[args.shapes], source="profile_kernels", name=f"{args.shapes}-shapes")
        model = Transformer.random(config, seed=args.seed, dtype=dtype, device=str(dev))
        what = f"random weights at {args.shapes} shapes"
    c = model.config
    adapters = None
    if args.adapters:
        index = torch.arange(args.batch, device=dev) % args.adapters
        slot = LoraSlot.create(c, args.adapters, args.rank, init="random", index=index, dtype=dtype, device=dev,
                               generator=torch.Generator().manual_seed(args.seed), name="profile")  # fmt: skip
        adapters = AdapterBatch(slot)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, c.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    lora = f", {args.adapters} rank-{args.rank} LoRAs" if args.adapters else ", no adapters"
    if not args.decode:
        def prefill():
            with torch.inference_mode():
                return model(prompt, adapters, output="last")

        return prefill, f"{what}: prefill [{args.batch}, {args.seq}]{lora}"
    steps = args.warmup + args.iters + 1  # every call writes one column of the cache
    cache = KVCache(c, args.batch, args.seq + steps, dtype=dtype, device=dev)
    with torch.inference_mode():
        state = {"tok": model(prompt, adapters, cache=cache, output="last").argmax(-1)}

    def step():
        with torch.inference_mode():
            state["tok"] = model(state["tok"][:, None], adapters, cache=cache, output="last").argmax(-1)
        return state["tok"]

    return step, f"{what}: decode step, batch {args.batch} after a {args.seq}-token prefill{lora}"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _profile(call: Callable[[], object], args, dev: torch.device) -> tuple[object, float]:
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for _ in range(args.warmup):
        call()
    _sync(dev)
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(args.iters):
            with record_function(f"iter{i}"):
                call()
        _sync(dev)
    return prof, (time.perf_counter() - t0) / args.iters


def _proton(call: Callable[[], object], args, dev: torch.device) -> str:
    if dev.type != "cuda":
        return "proton: skipped (needs a GPU)"
    try:
        import triton.profiler as proton
    except ImportError as e:
        return f"proton: skipped (triton.profiler does not import: {e})"
    stem = str(args.trace.with_suffix(""))
    proton.start(stem, hook="triton")
    try:
        for i in range(args.iters):
            with proton.scope(f"iter{i}"):
                call()
        _sync(dev)
    finally:
        proton.finalize()
    return f"proton: wrote {stem}.hatchet (proton-viewer -m time/ms {stem}.hatchet)"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # argparse: usage errors exit 2
    if _IMPORT_ERROR is not None:
        print(f"{PROG}: cannot import dit_engine ({_IMPORT_ERROR})", file=sys.stderr)
        return 1
    try:
        _check(args)
    except UsageError as e:
        print(f"{PROG}: {e} (see --help)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    try:
        call, label = (_lora_call if args.what == "lora" else _model_call)(args, dev, dtype)
        prof, per_call = _profile(call, args, dev)
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace))
        proton_note = _proton(call, args, dev) if args.proton else None
    except (RuntimeError, ValueError, OSError) as e:
        print(f"{PROG}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"{label}; {dev.type} {str(dtype).removeprefix('torch.')}, backend {args.backend or 'auto'}")
    print(f"{args.iters} profiled calls, {1e3 * per_call:.3f} ms per call (wall, profiler on; includes its overhead)")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    print(f"chrome trace: {args.trace}")
    if proton_note:
        print(proton_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
