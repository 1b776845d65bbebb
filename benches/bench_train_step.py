"""One LoRA training step of the default model: the engine beside PEFT, side by side in one run.

Run: ``pytest benches/bench_train_step.py -s`` (``BENCH_STEP_THREADS`` sets the CPU threads, 2 by
default). PEFT and transformers are not dependencies of the engine: the ``peft`` rows run only where
both import (e.g. ``pip install --target DIR peft transformers accelerate`` and ``PYTHONPATH=DIR``),
and are skipped otherwise; the engine's rows always run.

The step, the same for both: a rank-8 LoRA (alpha = rank) on every attention and MLP projection of
every layer (q, k, v, o, gate, up, down), 8 rows of 128 random tokens, cross-entropy on every next
token, backward, one AdamW step. The base model is in the case's dtype; the engine keeps fp32
master copies of bf16 LoRA factors (as diff generation does); PEFT keeps its LoRA weights in fp32
on a bf16 base (its default ``autocast_adapter_dtype``). Timed: ``BENCH_STEP_ROUNDS`` steps (5)
after two warm-up steps. Printed at the end: tokens/s per (implementation, dtype) and engine/PEFT
in each dtype, with the load average, because CPU timings only compare on an otherwise idle machine.

Model: the default model (SmolLM2-135M-Instruct) from the engine's cache; skipped when it is not
there (never fetched here).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.checkpoint import load_model
from dit_engine.config import TARGET_MODULES
from dit_engine.model_store import default_model_dir
from dit_engine.train import Example, Trainer, batch_loss, collate

ROWS, SEQ, RANK = 8, 128, 8
ROUNDS = int(os.environ.get("BENCH_STEP_ROUNDS", "5"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_rows: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _setup():
    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("the default model is not cached")
    torch.set_num_threads(int(os.environ.get("BENCH_STEP_THREADS", "2")))
    yield
    _print_table()


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 49000, (ROWS, SEQ), generator=g)


def _time(step) -> dict:
    for _ in range(2):
        step()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    for _ in range(ROUNDS):
        step()
    dt = (time.perf_counter() - t0) / ROUNDS
    return {"step_s": dt, "tok_s": ROWS * SEQ / dt, "load": (load0, os.getloadavg()[0])}


def _engine_step(dtype: torch.dtype):
    model = load_model(default_model_dir()).to(dtype).requires_grad_(False)
    model.init_buffers(model.device)
    g = torch.Generator().manual_seed(0)
    slot = LoraSlot.create(model.config, 1, RANK, targets=TARGET_MODULES, init="random", generator=g,
                           scale=1.0, name="bench").to("cpu", dtype, trainable=True)
    trainer = Trainer(slot.parameters(), lr=1e-4, master_fp32=dtype != torch.float32)
    ids = _tokens()
    batch = collate([Example(r[:1].tolist(), r[1:].tolist()) for r in ids], pad_id=0)
    ad = AdapterBatch(slot.with_index(torch.zeros(ROWS, dtype=torch.int64)))

    def step():
        loss, _ = batch_loss(model, batch, ad)
        trainer.backward(loss)

    return step


def _peft_step(dtype: torch.dtype):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=dtype)
    short = sorted({m.split(".")[-1] for m in TARGET_MODULES})
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=short,
                                                       lora_dropout=0.0, init_lora_weights=False))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _tokens()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["engine", "peft"])
def test_train_step(benchmark, impl, dtype):
    step = (_engine_step if impl == "engine" else _peft_step)(DTYPES[dtype])
    out: dict = {}
    benchmark.pedantic(lambda: out.update(_time(step)), rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(step_s=out["step_s"], tok_s=out["tok_s"], load_avg=list(out["load"]))
    _rows[impl, dtype] = out


def _print_table() -> None:
    if not _rows:
        return
    print(f"\n\nLoRA training step (rank {RANK}, all projections, {ROWS} x {SEQ} tokens, AdamW), "
          f"SmolLM2-135M-Instruct, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'impl':8s} {'dtype':6s} {'step s':>8s} {'tok/s':>8s}   load avg (start, end)")
    for (impl, dtype), r in _rows.items():
        print(f"{impl:8s} {dtype:6s} {r['step_s']:8.3f} {r['tok_s']:8.1f}   {r['load'][0]:.2f}, {r['load'][1]:.2f}")
    for dtype in DTYPES:
        if ("engine", dtype) in _rows and ("peft", dtype) in _rows:
            ratio = _rows["engine", dtype]["tok_s"] / _rows["peft", dtype]["tok_s"]
            print(f"engine / peft, {dtype}: {ratio:.2f}x tokens/s")
