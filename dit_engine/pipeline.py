"""The whole DIT loop in one resumable job: diff zoos -> DIT adapter -> interpretation -> report.

Stages write into one run directory and each is skipped when its output is complete, so a rerun
after a kill continues where it stopped:

    zoo-train/        diffs on train-split topics (rank ``rank``)
    zoo-test/         diffs on held-out topics, never seen in DIT training
    zoo-test-r{R}/    held-out diffs of other ranks (rank generalisation), when asked
    dit/              the DIT adapter (adapter.safetensors + adapter.json), training log
    results.jsonl     answers on held-out diffs: DIT and the baselines (and DIT on other ranks)
    results-train.jsonl  DIT's answers on a sample of its training diffs (what it fits on seen topics)
    dit-n{N}/, results-n{N}.jsonl  DIT trained on N train diffs only (data-scaling curve), when asked
    report/           held-out evaluation: report.html, report.md, metrics.json
    report-train/     the same for the training sample
    timings.json      wall time of every stage
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .diffgen import HIDING_RECIPE, RECIPE_RANK, DiffGenConfig, generate_zoo  # noqa: F401 (re-exported)
from .diffgen import verification_summary
from .dit import DitAdapter, DitTrainConfig, interpret, train_dit
from .dit.adapter import SHIPPED, shipped_available
from .engine import Engine
from .evaluate import METHODS, evaluate_rows, load_results, summarize
from .files import write_json
from .jobs import StageTimings
from .provenance import provenance
from .report import load_training, write_report
from .tasks import get_task
from .zoo import BaseIdentity, Zoo


@dataclasses.dataclass
class PipelineConfig:
    """What the run makes (zoo sizes, ranks, evaluation) plus the two jobs' own configs.

    ``diffs`` and ``dit`` are the very configs ``dit zoo generate`` and ``dit train`` take; the
    pipeline sets their per-stage fields (``task``, ``n``, ``split``, ``rank``, ``seed``, ``max_diffs``)
    itself, so only the recipe fields of those two matter here."""

    task: str = "hidden-topic"
    n_train: int = 24
    n_test: int = 8
    rank: int = 1
    test_ranks: tuple[int, ...] = ()  # extra held-out zoos at these ranks
    n_test_other_ranks: int = 8
    interpret_batch_size: int = 64
    n_train_eval: int = 16  # train diffs also interpreted (shows what DIT fits on seen topics)
    scaling: tuple[int, ...] = ()  # also train DIT on the first N train diffs, for a data-scaling curve
    seed: int = 0
    # "shipped": interpret with the DIT adapter this package ships (no training zoo, no DIT training);
    # when the install carries none, the run trains its own. None: always train.
    adapter: str | None = None
    diffs: DiffGenConfig = dataclasses.field(default_factory=lambda: DiffGenConfig(
        epochs=2, n_backdoor=6, n_kl=4, rows_per_diff=1))
    dit: DitTrainConfig = dataclasses.field(default_factory=lambda: DitTrainConfig(val_fraction=0.0))



PRESETS = {
    # About ten minutes on a 2-core laptop CPU with the default model. With the shipped adapter for
    # this base, only the held-out zoo is made and read (no DIT training).
    "laptop": PipelineConfig(
        n_train=16, n_test=16, n_train_eval=8, adapter=SHIPPED, rank=RECIPE_RANK,
        diffs=dataclasses.replace(HIDING_RECIPE, chunk_diffs=8),
        dit=DitTrainConfig(lr=1e-3, epochs=6, batch_size=8, val_fraction=0.0)),
    # One background run of about 80 minutes on a 2-core CPU (measured: results/medium/): 128 + 64
    # diffs, 16 a chunk; 64 held-out topics; DIT early-stopped on held-out loss; a data-scaling curve.
    # The package's shipped adapter is this run's.
    "medium": PipelineConfig(
        n_train=128, n_test=64, n_train_eval=32, scaling=(40, 80), interpret_batch_size=64, rank=RECIPE_RANK,
        diffs=HIDING_RECIPE,
        dit=DitTrainConfig(lr=5e-4, epochs=8, batch_size=16, val_fraction=0.1, patience=2, eval_diffs=32)),
    # The full-size run (a GPU): >= 2000 rank-1 diffs, >= 100 held-out topics, rank generalisation.
    "full": PipelineConfig(
        n_train=2000, n_test=100, test_ranks=(4, 16), n_test_other_ranks=100, scaling=(125, 500),
        interpret_batch_size=256, n_train_eval=100,
        diffs=DiffGenConfig(epochs=3, n_backdoor=12, n_kl=8, chunk_diffs=128, rows_per_diff=2),
        dit=DitTrainConfig(lr=1e-4, epochs=2, batch_size=32, val_fraction=0.0)),
}


def run_pipeline(engine: Engine, out_dir: str | Path, cfg: PipelineConfig, *, progress: bool = True) -> Path:
    """Run (or resume) every stage; returns the report's HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pipeline_config.json", dataclasses.asdict(cfg), indent=1)
    stage = StageTimings(out / "timings.json").run
    base = BaseIdentity.from_model(engine.model)

    def zoo_stage(name: str, split: str, n: int, rank: int) -> Zoo:
        zoo = Zoo.create(out / name, base, engine.config, exist_ok=True)
        gcfg = dataclasses.replace(cfg.diffs, task=cfg.task, n=n, split=split, rank=rank, seed=cfg.seed)
        return stage(name, lambda: generate_zoo(engine, zoo, gcfg, progress=progress))

    adapter = _shipped_for(base, engine) if cfg.adapter == SHIPPED else None
    shipped = adapter is not None
    if cfg.adapter == SHIPPED and not shipped:
        print("dit pipeline: this install ships no trained DIT adapter for this base model; training one "
              "(the whole loop)", file=sys.stderr)
    train_zoo = None if shipped else zoo_stage("zoo-train", "train", cfg.n_train, cfg.rank)
    test_zoos = {cfg.rank: zoo_stage("zoo-test", "test", cfg.n_test, cfg.rank)}
    for r in cfg.test_ranks:
        test_zoos[r] = zoo_stage(f"zoo-test-r{r}", "test", cfg.n_test_other_ranks, r)

    def dit_stage(name: str, max_diffs: int | None) -> DitAdapter:
        d = out / name
        if (d / "adapter.json").exists():
            return DitAdapter.load(d, device=engine.model.device, dtype=engine.model.dtype)
        tcfg = dataclasses.replace(cfg.dit, task=cfg.task, seed=cfg.seed, max_diffs=max_diffs)
        return stage(f"{name}-train", lambda: train_dit(engine, train_zoo, d, tcfg, progress=progress))

    if not shipped:
        adapter = dit_stage("dit", None)
    made = provenance(str(engine.model.device) if engine.model.device.type == "cuda" else None)
    heldout_title = f"DIT on held-out diffs, never seen in training ({cfg.task})"
    zoo_checks = {(f"held-out, rank {r}" if r != cfg.rank else "held-out"): verification_summary(z.rows)
                  for r, z in test_zoos.items()}
    if train_zoo is not None:
        zoo_checks["training"] = verification_summary(train_zoo.rows)

    results = out / "results.jsonl"
    for r, zoo in test_zoos.items():
        methods = METHODS if r == cfg.rank else ("dit",)
        stage(f"interpret-test-r{r}", lambda: interpret(engine, zoo, results, adapter=adapter, methods=methods,
                                                        batch_size=cfg.interpret_batch_size, progress=progress))
    if shipped:  # no training zoo here: the shipped adapter's own report holds its training view
        return stage("evaluate", lambda: evaluate_run(results, out / "report", cfg.task,
                                                      f"{heldout_title}, shipped adapter", provenance=made,
                                                      training=adapter.recipe.get("epochs"), diffs=zoo_checks))
    train_ids = train_zoo.ids()[: cfg.n_train_eval]
    seen = out / "results-train.jsonl"
    stage("interpret-train", lambda: interpret(engine, train_zoo, seen, adapter=adapter, methods=("dit",),
                                               ids=train_ids, batch_size=cfg.interpret_batch_size,
                                               progress=progress))
    scaling = []
    for n in sorted(cfg.scaling):
        if n >= cfg.n_train:
            raise ValueError(f"scaling point {n} is not below the {cfg.n_train} training diffs")
        small, res_n = dit_stage(f"dit-n{n}", n), out / f"results-n{n}.jsonl"
        stage(f"interpret-test-n{n}", lambda: interpret(engine, test_zoos[cfg.rank], res_n, adapter=small,
                                                        methods=("dit",), batch_size=cfg.interpret_batch_size,
                                                        progress=progress))
        scaling.append((n, res_n))
    stage("evaluate-train", lambda: evaluate_run(seen, out / "report-train", cfg.task,
                                                 f"DIT on {len(train_ids)} of its training diffs ({cfg.task})",
                                                 provenance=made, diffs={"training": zoo_checks["training"]}))
    if scaling:
        scaling.append((cfg.n_train, results))
    return stage("evaluate", lambda: evaluate_run(results, out / "report", cfg.task, heldout_title,
                                                  scaling=scaling, training=out / "dit" / "epochs.jsonl",
                                                  provenance=made, diffs=zoo_checks))


def _shipped_for(base: BaseIdentity, engine: Engine) -> DitAdapter | None:
    """The DIT adapter the install ships, when it was trained on this very base (architecture and
    weights); None otherwise."""
    if not shipped_available():
        return None
    adapter = DitAdapter.load(SHIPPED, device=engine.model.device, dtype=engine.model.dtype)
    return adapter if BaseIdentity(**adapter.base).matches(base) else None


def evaluate_run(results, report_dir: Path, task: str, title: str | None = None,
                 scaling: list[tuple[int, Path]] | None = None,
                 training: str | Path | Sequence[Mapping[str, Any]] | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 diffs: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Score results file(s) against every label of the task's splits and write the report;
    ``scaling``: (number of training diffs, results file of that DIT run) for the data-scaling curve;
    ``training``: DIT's per-epoch losses for the loss chart, as records or as the path of the
    adapter's ``epochs.jsonl`` (a missing file: no chart); ``diffs``: zoo name -> its verification
    summary, for the report's "The diffs" table."""
    metrics = _metrics(results, task)
    curve = [(n, _metrics(p, task)) for n, p in scaling] if scaling else None
    if isinstance(training, (str, Path)):
        training = load_training(training)
    path = write_report(metrics, report_dir, title or f"DIT evaluation ({task})", scaling=curve, training=training,
                        provenance=provenance, diffs=diffs)
    print(summarize(metrics))
    return path


def _metrics(results, task: str):
    rows = load_results(results)
    candidates = task_candidates(task)
    return evaluate_rows(rows, {s: c for s, c in candidates.items() if any(r.get("split") == s for r in rows)})


def task_candidates(task: str) -> dict[str, list[str]]:
    """All labels of each split: the candidate set retrieval accuracy ranks the true label in."""
    t = get_task(task)
    return {s: [row[t.label_key] for row in t.load_labels(s)] for s in ("train", "test")}
