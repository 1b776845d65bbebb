"""Ship a finished ``dit pipeline`` run: its DIT adapter into the package, its record into results/.

usage: python tools/ship_run.py RUN_DIR [--results results/medium] [--adapter-out DIR] [--max-mb 10]
                                        [--reinterpret] [--model default]

1. The run's DIT adapter (``RUN_DIR/dit``), in bf16, goes to the package's shipped-adapter directory
   (``dit_engine/dit/shipped/``, what ``--adapter shipped`` and the laptop preset load). Its
   ``adapter.json`` recipe gains what a user of the shipped adapter needs to know: the diff recipe it
   was trained on (the run's ``pipeline_config.json``), the held-out scores of the run's report, and
   where and when it was trained. Refused when it would exceed ``--max-mb``.
2. The run's record goes to ``--results``: ``report/`` and ``report-train/`` (Markdown, HTML, charts,
   metrics), ``timings.json``, ``pipeline_config.json``, DIT's ``epochs.jsonl``, every answer
   (``results*.jsonl``) and each zoo's index (labels and per-diff verification; no weights).
3. With ``--reinterpret``: the shipped (bf16) adapter reads the run's held-out zoo again
   (``results-shipped.jsonl``, ``report-shipped/``), so the committed figures are those of the
   adapter as shipped, which a slow test reproduces.

Run it from the repository root; it overwrites the shipped adapter and the results directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/ship_run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished 'dit pipeline' run directory")
    p.add_argument("--results", type=Path, default=None, help="copy the run's record here (e.g. results/medium)")
    p.add_argument("--adapter-out", type=Path, default=None,
                   help="where the bf16 adapter goes (default: the package's shipped-adapter directory)")
    p.add_argument("--max-mb", type=float, default=10.0, help="refuse an adapter larger than this (MB, 1e6 bytes)")
    p.add_argument("--reinterpret", action="store_true",
                   help="interpret the run's held-out zoo with the shipped (bf16) adapter (results-shipped.jsonl)")
    p.add_argument("--model", default="default", help="the run's base model (for --reinterpret)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from dit_engine.dit.adapter import SHIPPED_DIR, DitAdapter
    from dit_engine.files import read_json

    run = args.run_dir
    for need in ("dit/adapter.json", "report/metrics.json", "pipeline_config.json"):
        if not (run / need).is_file():
            p.exit(1, f"ship_run: {run / need} is missing: not a finished 'dit pipeline' run\n")
    adapter = DitAdapter.load(run / "dit")
    config = read_json(run / "pipeline_config.json", "the run's pipeline config", kind=dict)
    metrics = read_json(run / "report/metrics.json", "the run's held-out metrics", kind=dict)
    adapter.recipe = {**adapter.recipe, "pipeline": config, "provenance": metrics.get("provenance"),
                      "held_out": {m: {k: v for k, v in s["overall"].items() if k != "ci"}
                                   for m, s in metrics.get("methods", {}).items()}}
    out = args.adapter_out or SHIPPED_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save(tmp, dtype=torch.bfloat16)
    size = sum(f.stat().st_size for f in tmp.iterdir())
    if size > args.max_mb * 1e6:
        shutil.rmtree(tmp)
        p.exit(1, f"ship_run: the bf16 adapter is {size / 1e6:.1f} MB, over --max-mb {args.max_mb:g}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"adapter: {out} ({size / 1e6:.2f} MB, bf16, rank {adapter.slot.rank})")
    if args.reinterpret:
        _reinterpret(run, out, args.model, config)
    if args.results is not None:
        _copy_record(run, args.results)
        print(f"record: {args.results}")
    return 0


def _reinterpret(run: Path, adapter_dir: Path, model: str, config: dict) -> None:
    from dit_engine.dit import DitAdapter, interpret
    from dit_engine.engine import Engine
    from dit_engine.pipeline import evaluate_run
    from dit_engine.provenance import provenance
    from dit_engine.zoo import Zoo

    engine = Engine.load(model)
    adapter = DitAdapter.load(adapter_dir, device=engine.model.device, dtype=engine.model.dtype)
    out = run / "results-shipped.jsonl"
    out.unlink(missing_ok=True)
    interpret(engine, Zoo.open(run / "zoo-test"), out, adapter=adapter, methods=("dit",),
              task=config["task"], batch_size=config.get("interpret_batch_size", 64))
    evaluate_run(out, run / "report-shipped", config["task"],
                 f"The shipped (bf16) DIT adapter on the run's held-out diffs ({config['task']})",
                 provenance=provenance())


def _copy_record(run: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for d in ("report", "report-train", "report-shipped"):
        if (run / d).is_dir():
            shutil.rmtree(dest / d, ignore_errors=True)
            shutil.copytree(run / d, dest / d)
    files = ["timings.json", "pipeline_config.json"] + sorted(f.name for f in run.glob("results*.jsonl"))
    for name in files:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    if (run / "dit" / "epochs.jsonl").is_file():
        shutil.copy2(run / "dit" / "epochs.jsonl", dest / "epochs.jsonl")
    from dit_engine.zoo import Zoo

    for zoo in sorted(run.glob("zoo-*")):
        if (zoo / "manifest.json").is_file():
            keep = [{k: r[k] for k in ("id", "labels", "split", "rank", "meta") if k in r} for r in Zoo.open(zoo).rows]
            (dest / f"{zoo.name}-index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))


if __name__ == "__main__":
    sys.exit(main())
