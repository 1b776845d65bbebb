"""The ``dit`` commands: each calls the Python API and prints; no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..adapters import AdapterBatch
from ..diffgen import RECIPES as DIFFGEN_RECIPES
from ..diffgen import RECIPES, DiffGenConfig, generate_zoo, verification_summary
from ..dit import DitAdapter, DitTrainConfig, diff_slot, interpret, interpret_peft, train_dit
from ..dit.adapter import SHIPPED, shipped_available
from ..engine import Engine
from .. import find as find_room
from ..generate import SamplingParams
from ..latentqa import PRESETS as LATENTQA_PRESETS
from ..latentqa import LatentQAConfig, LitAdapter, evaluate, format_table, load_dialogs, train_decoder
from ..latentqa.report import write_latentqa_report
from ..latentqa.steer import SteerConfig, decoder_personas, train_steering
from ..latentqa.steer import format_table as steer_table
from ..latentqa.training import DIALOGS
from ..model_store import default_model_dir, fetch_default_model
from ..neurons import RecordConfig, build_corpus, parse_layers, record_neurons
from ..neurons import pipeline as neuron_pipeline
from ..neurons.diff import moved_run, read_moved
from ..neurons.explain import LMExplainer, TokenExplainer
from ..neurons.run import explain_run, read_rows, score_run, simulate_run
from ..neurons.simulate import KeywordSimulator, LMSimulator
from ..neurons.viewer import write_viewer
from ..pipeline import PRESETS, evaluate_run, run_pipeline
from ..provenance import provenance
from ..zoo import BaseIdentity, Zoo, ZooError, export_peft, import_dit_file, import_peft
from ..zoo.labels import adapter_dirs, read_labels_file
from .args import UsageError, apply_settings

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
_PEFT_METHODS = ("dit", "diff", "base")  # diff+trigger needs a zoo row's trigger


def _config(cls, args: argparse.Namespace):
    """The job config from the flags named after its fields (the parser takes its defaults from the
    same dataclass, so the config is the one source of every default)."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


def _command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


# ---- the commands --------------------------------------------------------------------------------
@_command("fetch-model")
def _fetch_model(args) -> int:
    if args.force and default_model_dir().exists():
        shutil.rmtree(default_model_dir())
    print(fetch_default_model())
    return 0


def _load_engine(args) -> Engine:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return Engine.load(args.model, dtype=args.dtype, device=args.device)


def _peft_adapters(engine: Engine, peft_dir: Path | None, n: int) -> AdapterBatch | None:
    if peft_dir is None:
        return None
    diff = import_peft(peft_dir, engine.config)
    return AdapterBatch(diff_slot(diff, n, device=engine.model.device, dtype=engine.model.dtype))


@_command("generate")
def _generate(args) -> int:
    # Plain prompts as text; --chat messages as one user turn each (rendered with the chat template).
    prompts: list = list(args.prompts) + [[{"role": "user", "content": t}] for t in args.chat]
    if not prompts:
        raise UsageError("give at least one PROMPT or --chat MESSAGE")
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
        raise UsageError(f"{len(args.prompt)} --prompt for {len(args.texts)} TEXT: give one prompt per text")
    if args.chat and args.prompt is None:
        raise UsageError("--chat scores TEXT as the answer to a --prompt: give one --prompt per TEXT")
    eng = _load_engine(args)
    if args.prompt is None:
        empty = [t for t in args.texts if not eng.tokenizer.encode(t, add_special_tokens=True)]
        if empty:
            raise ValueError(f"TEXT {empty[0]!r} encodes to no tokens with {eng.tokenizer.source}; "
                             "expected a text with at least one token")
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
    if args.zoo_cmd == "info":
        zoo = Zoo.open(args.zoo, verify=args.verify)
        info = zoo.info()
        info["verification"] = verification_summary(zoo.rows)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for k, v in info.items():
                print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        return 0
    if args.zoo_cmd == "export":
        zoo = Zoo.open(args.zoo)
        missing = [did for did in args.id if did not in zoo]
        if missing:
            raise ValueError(f"{args.zoo}: no diff with id {', '.join(map(repr, missing))} "
                             f"(the zoo holds {len(zoo)}: {', '.join(zoo.ids()[:3])}{', ...' if len(zoo) > 3 else ''})")
        for did in args.id:
            print(export_peft(zoo.get(did), args.out / did, zoo.config, args.base_model_name))
        return 0
    if args.zoo_cmd == "generate":
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DiffGenConfig)
                 if getattr(args, f.name, None) is not None}
        recipe = DIFFGEN_RECIPES[args.recipe]
        if "n_kl" in given and "n_wrong" not in given and recipe.n_wrong is not None:  # keep the recipe's share
            given["n_wrong"] = round(recipe.n_wrong * given["n_kl"] / max(1, recipe.n_kl))
        cfg = dataclasses.replace(recipe, **given)
        eng = _load_engine(args)
        zoo = Zoo.create(args.out, BaseIdentity.from_model(eng.model), eng.config, targets=cfg.targets,
                         exist_ok=True)
        generate_zoo(eng, zoo, cfg)
        print(json.dumps(verification_summary(zoo.rows)))
        return 0
    return _zoo_import(args)


def _zoo_import(args) -> int:
    if not args.peft and not args.dit_file:
        raise UsageError("nothing to import: give --peft DIR or --dit-file PT")
    if (args.label or args.labels) and not args.peft:
        raise UsageError("--label/--labels label --peft adapters; a --dit-file carries its own labels")
    if args.index_csv and not args.dit_file:
        raise UsageError("--index-csv goes with --dit-file")
    dirs = [d for given in args.peft for d in _named_arg("--peft", adapter_dirs, given)]
    per_dir = _named_arg("--labels", read_labels_file, args.labels) if args.labels else None
    if per_dir is not None:
        unlabelled = [d for d in dirs if d.name not in per_dir]
        if unlabelled:
            raise ValueError(f"--labels {args.labels}: no labels for adapter dir(s) {', '.join(d.name for d in unlabelled)} "
                             f"(it has {len(per_dir)}: {', '.join(sorted(per_dir)[:5])}"
                             f"{', ...' if len(per_dir) > 5 else ''})")
    eng = _load_engine(args)
    common = dict(args.label)
    diffs = []
    for d in dirs:
        labels = {**common, **(per_dir[d.name] if per_dir is not None else {})}
        diffs.append(import_peft(d, eng.config, labels=labels, split=args.split))
    if args.dit_file:
        diffs += import_dit_file(args.dit_file, args.index_csv, eng.config)
    zoo = Zoo.create(args.out, BaseIdentity.from_model(eng.model), eng.config, exist_ok=True)
    zoo.append(diffs)
    print(f"imported {len(diffs)} diffs into {args.out} ({len(zoo)} in all)")
    return 0


def _named_arg(flag: str, read, path: Path):
    """``read(path)``, its errors prefixed with the flag that named the file."""
    try:
        return read(path)
    except ZooError as e:
        raise ValueError(f"{flag} {e}") from None


@_command("train")
def _train(args) -> int:
    eng = _load_engine(args)
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    cfg = _config(DitTrainConfig, args)
    adapter = train_dit(eng, zoo, args.out, cfg)
    if args.export_peft:
        print(adapter.export_peft(args.export_peft, eng.config, args.base_model_name))
    print(args.out)
    return 0


@_command("interpret")
def _interpret(args) -> int:
    methods = list(args.methods)
    if "dit" in methods and args.adapter is None:
        if not shipped_available():
            raise UsageError("method 'dit' needs the trained DIT adapter: give --adapter DIT_DIR (this install "
                             "ships none), or --methods without dit")
        args.adapter = Path(SHIPPED)  # the adapter this package ships
    if args.peft:
        unfit = [m for m in methods if m not in _PEFT_METHODS]
        if unfit:
            raise UsageError(f"--methods {','.join(unfit)} needs a zoo row (its trigger); with --peft use "
                             f"{', '.join(_PEFT_METHODS)}")
        if args.out or args.split or args.id:
            raise UsageError("--out, --split and --id go with --zoo; --peft prints its answers")
    elif not args.out:
        raise UsageError("--out RESULTS.jsonl is required with --zoo")
    eng = _load_engine(args)
    adapter = DitAdapter.load(args.adapter, device=eng.model.device, dtype=eng.model.dtype) if args.adapter else None
    if args.peft:
        for m, ans in interpret_peft(eng, args.peft, adapter=adapter, methods=methods, question=args.question,
                                     task=args.task, max_new_tokens=args.max_new_tokens).items():
            print(f"{m}\t{ans}")
        return 0
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    print(interpret(eng, zoo, args.out, adapter=adapter, methods=methods, split=args.split, ids=args.id,
                    question=args.question, task=args.task, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens))
    return 0


@_command("evaluate")
def _evaluate(args) -> int:
    # The answers were made by dit interpret (wherever that ran); this records where they were scored.
    print(evaluate_run(args.results, args.out, args.task, args.title, provenance={**provenance(), "verb": "Scored"}))
    return 0


@_command("pipeline")
def _pipeline(args) -> int:
    cfg = PRESETS[args.preset]
    if args.recipe is not None:
        cfg = dataclasses.replace(cfg, diffs=dataclasses.replace(RECIPES[args.recipe], chunk_diffs=cfg.diffs.chunk_diffs))
    overrides = dict(args.settings)
    for name in ("n_train", "n_test", "scaling"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = apply_settings(cfg, overrides)
    bad = [n for n in cfg.scaling if n >= cfg.n_train]
    if bad:
        given = "" if "scaling" in overrides else f" (from --preset {args.preset}; set others with --scaling)"
        raise UsageError(f"--scaling {','.join(map(str, bad))}{given}: each point must be below the "
                         f"{cfg.n_train} training diffs (--n-train)")
    print(run_pipeline(_load_engine(args), args.out, cfg))
    return 0


@_command("latentqa")
def _latentqa(args) -> int:
    if args.latentqa_cmd == "interpret":
        return _latentqa_interpret(args)
    if args.latentqa_cmd == "steer":
        return _latentqa_steer(args)
    if args.latentqa_cmd == "train":
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LatentQAConfig)
                 if getattr(args, f.name, None) is not None}
        for name in ("personas_file", "stimuli_file"):
            if name in given:
                given[name] = str(given[name])
        cfg = dataclasses.replace(LATENTQA_PRESETS[args.preset], **given)
        train_decoder(_load_engine(args), args.out, cfg)
        print(args.out)
        return 0
    eng = _load_engine(args)
    adapter = _decoder(args, eng, plain_target="read it through the Python API (dit_engine.latentqa.evaluate with "
                                              "target=...)")
    dialogs, personas, _ = load_dialogs(args.adapter / DIALOGS)
    held_out = [d for d in dialogs if d.split == "test"]
    if not held_out:
        raise ValueError(f"{args.adapter / DIALOGS}: no held-out dialogs to read (trained with --test-personas 0?)")
    question = args.question or adapter.recipe.get("config", {}).get("read_question") or LatentQAConfig.read_question
    result = evaluate(eng, adapter, held_out, personas, question=question, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, progress=True)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    if args.out is not None:
        dev = eng.model.device
        made = provenance(str(dev) if dev.type == "cuda" else None)
        report = write_latentqa_report(result, args.out, recipe=adapter.recipe, provenance=made)
        if not args.json:
            print(report)
    return 0


def _decoder(args, eng: Engine, plain_target: str | None = None) -> LitAdapter:
    """The LatentQA decoder of ``--adapter`` for this model (its base checked); with
    ``plain_target`` (what to do instead), one trained on a target with adapters is refused."""
    adapter = LitAdapter.load(args.adapter, device=eng.model.device, dtype=eng.model.dtype)
    adapter.check_base(BaseIdentity.from_model(eng.model))
    if plain_target and adapter.recipe.get("target_adapted"):
        raise ValueError(f"{args.adapter}: the decoder was trained on a target with adapters; {plain_target}")
    return adapter


def _latentqa_interpret(args) -> int:
    from ..latentqa.finetunes import read_finetunes

    eng = _load_engine(args)
    adapter = _decoder(args, eng)
    zoo = Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config)
    print(read_finetunes(eng, adapter, zoo, args.out, methods=args.methods, split=args.split, ids=args.id,
                         question=args.question, stimulus=args.stimulus, dialogs=args.dialogs, task=args.task,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         max_answer_tokens=args.max_answer_tokens))
    return 0


def _latentqa_steer(args) -> int:
    eng = _load_engine(args)
    adapter = _decoder(args, eng, plain_target="steer it through the Python API (dit_engine.latentqa.train_steering)")
    recipe = adapter.recipe.get("config", {})
    cfg = dataclasses.replace(_config(SteerConfig, args), stimuli_file=recipe.get("stimuli_file"))
    result = train_steering(eng, adapter, args.out, cfg, personas=decoder_personas(args.adapter, adapter))
    print(json.dumps(result, indent=1) if args.json else steer_table(result))
    return 0


@_command("neurons")
def _neurons(args) -> int:
    cmd = args.neurons_cmd
    if cmd == "pipeline":
        summary = neuron_pipeline.run_pipeline(_load_engine(args), args.out, neuron_pipeline.PRESETS[args.preset],
                                               corpus=args.corpus, seed=args.seed)
        _print_neuron_scores(summary, args.json)
        if not args.json:
            print(args.out / "viewer.html")
        return 0
    if cmd in ("record", "diff"):
        if cmd == "diff" and (args.zoo is None) != (args.id is None):
            raise UsageError("--zoo and --id go together (or give --peft DIR)")
        eng = _load_engine(args)
        cfg = RecordConfig(layers=parse_layers(args.layers, eng.config.num_hidden_layers), top_k=args.top_k,
                           sample_k=args.sample_k, batch_size=args.batch_size, seed=args.seed,
                           checkpoint_every_s=args.checkpoint_every_s)
        corpus = build_corpus(eng.tokenizer, args.corpus, context=args.context, max_windows=args.max_windows)
        if cmd == "diff":
            diff = (import_peft(args.peft, eng.config) if args.peft else
                    Zoo.open(args.zoo, base=BaseIdentity.from_model(eng.model), config=eng.config).get(args.id))
            moved_run(eng.model, diff, corpus, args.out, cfg, top=args.top)
            moved = read_moved(args.out)
            if args.json:
                print(json.dumps(moved, indent=1))
            else:
                for m in moved[:10]:
                    print(f"{m['layer']}/{m['neuron']}\tmean |shift| {m['abs_shift']:.4g}\tmean shift {m['shift']:+.4g}")
                print(f"{len(moved)} moved neurons in {args.out / 'moved.json'}; records of base + {diff.id} in {args.out}")
            return 0
        desc = record_neurons(eng.model, corpus, args.out, cfg).describe()
        print(json.dumps(desc, indent=1) if args.json else f"recorded {len(desc['layers'])} layers x "
              f"{desc['neurons_per_layer']} neurons over {desc['windows']} windows into {args.out}")
        return 0
    if cmd == "explain":
        explainer = (TokenExplainer() if args.explainer == "tokens" else
                     LMExplainer(_load_engine(args), n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed))
        neurons = None
        if args.moved:
            neurons = [(m["layer"], m["neuron"]) for m in read_moved(args.run)]
            if not neurons:
                raise ValueError(f"{args.run}: no moved.json (make the run with 'dit neurons diff')")
        path = explain_run(args.run, explainer, per_layer=args.per_layer, seed=args.seed, neurons=neurons,
                           batch_neurons=args.batch_size, checkpoint_every_s=args.checkpoint_every_s)
        n = sum(r["explainer"] == explainer.name for r in read_rows(path))
        print(json.dumps({"explanations": str(path), "explainer": explainer.name, "neurons": n}) if args.json
              else f"{n} neurons explained by {explainer.name} in {path}")
        return 0
    if cmd == "simulate":
        if args.simulator == "keyword":
            sim = KeywordSimulator()
        else:
            eng = _load_engine(args)
            sim = LMSimulator(eng.model, eng.tokenizer, batch_tokens=args.batch_tokens)
        names = [x.strip() for x in args.explainers.split(",") if x.strip()] if args.explainers else None
        path = simulate_run(args.run, sim, explainers=names, batch_neurons=args.batch_size,
                            checkpoint_every_s=args.checkpoint_every_s)
        n = sum(r["simulator"] == sim.name for r in read_rows(path))
        print(json.dumps({"simulations": str(path), "simulator": sim.name, "rows": n}) if args.json
              else f"{n} explanation sets simulated by {sim.name} in {path}")
        return 0
    if cmd == "score":
        _print_neuron_scores(score_run(args.run), args.json)
        return 0
    path = write_viewer(args.run, per_layer=args.per_layer)
    print(json.dumps({"viewer": str(path)}) if args.json else path)
    return 0


def _print_neuron_scores(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    print(f"{'explainer / simulator':32} {'neurons':>7} {'corr':>7} {'R2':>7} {'absdev':>7}  per layer (corr)")
    for name, g in summary.items():
        layers = " ".join(f"{k}:{v['correlation']:.3f}" for k, v in g["layers"].items())
        print(f"{name:32} {g['neurons']:7d} {g['correlation']:7.3f} {g['r2']:7.3f} "
              f"{g['abs_dev_explained']:7.3f}  {layers}")


def _print_find_summaries(summaries: dict) -> None:
    cats = list(dict.fromkeys(c for s in summaries.values() for c in s))
    print(f"{'category':20s} " + " ".join(f"{a:>10s}" for a in summaries))
    for c in cats:
        print(f"{c:20s} " + " ".join(f"{s[c]['accuracy']:10.3f}" if c in s else f"{'-':>10s}"
                                     for s in summaries.values()))


_FIND_SETTINGS = {"search": ("n_probes", "probe_corpus"),
                  "lm": ("rounds", "calls_per_round", "max_new_tokens", "batch_size")}


@_command("find")
def _find(args) -> int:
    if args.find_cmd == "pipeline":
        summaries = find_room.run_pipeline(_load_engine(args), args.out, find_room.PRESETS[args.preset], seed=args.seed,
                                           corpus=args.corpus, zoo=args.zoo, zoo_split=args.zoo_split, task=args.task)
        if args.json:
            print(json.dumps(summaries, indent=1))
        else:
            _print_find_summaries(summaries)
            print(args.out / "report" / "report.html")
        return 0
    if args.find_cmd == "generate":
        fns = find_room.build_suite(args.seed, args.n_numeric, args.n_string)
        if args.zoo is not None:
            fns += find_room.diff_functions(args.zoo, split=args.zoo_split, task=args.task)
        if args.neurons is not None:
            fns += find_room.neuron_functions(args.neurons, per_layer=args.neurons_per_layer, seed=args.seed,
                                              min_reference=args.neuron_min_reference)
        find_room.save_suite(args.out, fns, seed=args.seed)
        counts: dict[str, int] = {}
        for f in fns:
            counts[f.category] = counts.get(f.category, 0) + 1
        print(json.dumps({"suite": str(args.out), "n": len(fns), "by_category": counts}) if args.json else args.out)
        return 0
    if args.find_cmd == "run":
        settings = {k: getattr(args, k) for k in _FIND_SETTINGS.get(args.agent, ()) if getattr(args, k) is not None}
        given = [k for names in _FIND_SETTINGS.values() for k in names
                 if getattr(args, k) is not None and k not in _FIND_SETTINGS.get(args.agent, ())]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} does not apply to --agent {args.agent}")
        model_backed = args.agent == "search" and any(f.kind in find_room.MODEL_KINDS
                                                      for f in find_room.load_suite(args.suite))
        engine = _load_engine(args) if args.agent == "lm" or model_backed else None
        header = find_room.run_agent(args.suite, args.out, args.agent, settings=settings, engine=engine,
                                     limit=args.limit)
        print(json.dumps(header) if args.json else args.out)
        return 0
    if args.find_cmd == "score":
        limits = find_room.Limits(wall_s=args.timeout_s, cpu_s=max(1, int(args.timeout_s)), memory_mb=args.memory_mb)
        summary = find_room.score_run(args.suite, args.run, limits=limits)
        if args.json:
            print(json.dumps(summary["summary"]))
        else:
            for cat, s in summary["summary"].items():
                print(f"{cat:20s} n={s['n']:4d}  accuracy {s['accuracy']:.3f}  mean calls {s['mean_calls']:.1f}")
        return 0
    if args.find_cmd == "diffs":
        result = find_room.describe_diffs(_load_engine(args), args.zoo, args.agent, args.out, task=args.task,
                                          split=args.split, limit=args.limit, mode=args.mode, rounds=args.rounds,
                                          max_new_tokens=args.max_new_tokens, dit_results=args.dit_results)
        print(json.dumps(result) if args.json else find_room.format_diff_table(result))
        return 0
    path = find_room.write_report(args.suite, args.run, args.out)
    print(json.dumps(json.loads((args.out / "report.json").read_text())) if args.json else path)
    return 0
