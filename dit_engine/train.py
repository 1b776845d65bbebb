"""One multi-LoRA trainer, used by diff generation (N diffs at once, one per row group) and by
DIT training (frozen per-row diffs in slot 0, one shared trainable adapter in slot 1).

A training row is an :class:`Example`: context tokens (no loss) followed by target tokens, with an
objective: ``"ce"`` (cross-entropy on the target tokens) or ``"kl"`` (KL from the teacher's next-token
distribution to the student's on those positions; the teacher is the same model with other adapters,
by default none, run in the same step without gradients). Each example belongs to a ``group`` (a
diff); a group's loss is the mean over its target tokens, so one diff's gradient never depends on
how many tokens another diff had in the batch. Logits over the vocabulary are never materialised
for the whole batch: the losses run chunked over tokens (``kernels.cross_entropy``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dit_kernels.cross_entropy import DIVERGENCES as KL_DIVERGENCES
from dit_kernels.cross_entropy import linear_cross_entropy, linear_kl_to_teacher

from .adapters import AdapterBatch, LoraSlot
from .files import fsync_dir, named_error, write_atomically, write_json
from .model import Transformer
from .probes import Probes

Objective = Literal["ce", "kl"]


@dataclasses.dataclass
class Example:
    prompt_ids: list[int]  # context, no loss
    target_ids: list[int]  # the tokens the loss covers (they follow the prompt)
    objective: Objective = "ce"
    group: int = 0  # loss normalisation group (a diff); also the row's adapter in per-row slots
    weight: float = 1.0  # multiplies this row's token losses (the DIT paper weighs untriggered KL rows 5x)


@dataclasses.dataclass
class Batch:
    input_ids: Tensor  # [B, T] int64, right-padded
    attention_mask: Tensor  # [B, T] bool
    targets: Tensor  # [B, T] int64: targets[b, t] = token at t+1 when scored, else -100
    kl: Tensor  # [B, T] bool: position t is scored by KL to the teacher
    group: Tensor  # [B] int64
    weight: Tensor  # [B] float32: each row's loss multiplier

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))


def collate(examples: Sequence[Example], pad_id: int = 0, max_len: int | None = None) -> Batch:
    """Right-pad examples into one batch; targets are shifted so position t predicts token t+1."""
    if not examples:
        raise ValueError("collate: no examples")
    lens = [len(e.prompt_ids) + len(e.target_ids) for e in examples]
    t = max(lens)
    if max_len is not None and t > max_len:
        bad = lens.index(t)
        raise ValueError(f"example {bad} has {t} tokens, more than the limit of {max_len}")
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.int64)
    mask = torch.zeros(b, t, dtype=torch.bool)
    targets = torch.full((b, t), -100, dtype=torch.int64)
    kl = torch.zeros(b, t, dtype=torch.bool)
    for i, e in enumerate(examples):
        if not e.prompt_ids or not e.target_ids:
            raise ValueError(f"example {i}: needs a non-empty prompt and a non-empty target")
        seq = list(e.prompt_ids) + list(e.target_ids)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
        p, n = len(e.prompt_ids), len(seq)
        if e.objective == "ce":
            targets[i, p - 1 : n - 1] = torch.tensor(e.target_ids)
        elif e.objective == "kl":
            kl[i, p - 1 : n - 1] = True
        else:
            raise ValueError(f"example {i}: unknown objective {e.objective!r} (ce or kl)")
    group = torch.tensor([e.group for e in examples], dtype=torch.int64)
    weight = torch.tensor([float(e.weight) for e in examples], dtype=torch.float32)
    return Batch(ids, mask, targets, kl, group, weight)


def batch_loss(
    model: Transformer,
    batch: Batch,
    adapters: AdapterBatch | None,
    *,
    teacher_adapters: AdapterBatch | None = None,
    group_reduce: Literal["sum", "mean"] = "mean",
    chunk_size: int = 1024,
    teacher_hidden: Tensor | None = None,
    probes: Probes | None = None,
    kl_divergence: str = "forward",
) -> tuple[Tensor, dict[int, tuple[float, int]]]:
    """Scalar loss, and per group its mean token loss and scored-token count (for logs, evals).

    A group's loss is ``sum_rows weight * token losses / scored tokens``; the per-group means
    reported next to it are unweighted (what a metric wants).

    ``group_reduce="sum"``: independent diffs (each diff's gradient is that of its own mean loss);
    ``"mean"``: one shared adapter (the average over groups).

    ``teacher_hidden``: the teacher's final hidden states at the batch's KL positions ([P, h], in
    the row-major order ``batch.kl`` selects them, e.g. from :class:`TeacherCache`); computed here
    (the base model, or ``teacher_adapters`` on it) when None. ``probes`` act on the trained
    model's forward (e.g. a target's activations patched over a decoder's placeholder tokens).
    ``kl_divergence``: what a KL row charges (``linear_kl_to_teacher``'s ``divergence``: "forward"
    KL(teacher || model), "reverse" or "symmetric").
    """
    hidden = model(batch.input_ids, adapters, attention_mask=batch.attention_mask, output="hidden",
                   probes=probes)  # [B, T, h]
    h = hidden.reshape(-1, hidden.shape[-1])
    w = model.lm_weight
    tok_loss = hidden.new_zeros(h.shape[0], dtype=torch.float32)  # [B*T]
    ce_pos = (batch.targets.reshape(-1) >= 0).nonzero().flatten()
    if ce_pos.numel():
        tok_loss = tok_loss.index_add(
            0, ce_pos, linear_cross_entropy(h[ce_pos], w, batch.targets.reshape(-1)[ce_pos], chunk_size=chunk_size)
        )
    kl_rows = batch.kl.any(1).nonzero().flatten()
    if kl_rows.numel():
        kl_mask = batch.kl[kl_rows]  # [R, T]
        pos = (kl_rows[:, None] * batch.kl.shape[1] + torch.arange(batch.kl.shape[1], device=kl_rows.device))[kl_mask]
        if teacher_hidden is None:
            with torch.no_grad():
                ta = teacher_adapters.select_rows(kl_rows) if teacher_adapters is not None else None
                t_hidden = model(batch.input_ids[kl_rows], ta, attention_mask=batch.attention_mask[kl_rows],
                                 output="hidden")
            teacher_hidden = t_hidden[kl_mask]
        elif teacher_hidden.shape != (pos.numel(), h.shape[-1]):
            raise ValueError(f"batch_loss: teacher_hidden has shape {tuple(teacher_hidden.shape)}, the batch's "
                             f"{pos.numel()} KL positions need ({pos.numel()}, {h.shape[-1]})")
        kl = linear_kl_to_teacher(h[pos], teacher_hidden, w, chunk_size=chunk_size, divergence=kl_divergence)
        tok_loss = tok_loss.index_add(0, pos, kl)
    scored = (batch.targets >= 0) | batch.kl  # [B, T]
    row_sum = tok_loss.view(scored.shape).sum(1)  # [B]
    row_cnt = scored.sum(1)  # [B]
    groups, inv = torch.unique(batch.group, return_inverse=True)
    g_sum = torch.zeros(len(groups), device=row_sum.device).index_add(0, inv, row_sum)
    g_cnt = torch.zeros(len(groups), device=row_sum.device).index_add(0, inv, row_cnt.float())
    g_loss = g_sum / g_cnt.clamp_min(1)
    g_wsum = torch.zeros(len(groups), device=row_sum.device).index_add(0, inv, row_sum * batch.weight)
    g_train = g_wsum / g_cnt.clamp_min(1)
    loss = g_train.sum() if group_reduce == "sum" else g_train.mean()
    return loss, {g: (v, int(c)) for g, v, c in zip(groups.tolist(), g_loss.detach().tolist(), g_cnt.tolist())}


class TeacherCache:
    """The base model's final hidden states at every KL position of a set of examples, computed once
    (batched, no grad) and reused: a KL row's teacher depends only on its tokens, so every epoch,
    and every diff that shares a row (the same bare question and base answer), reads the same
    states instead of running the teacher's forward again. Keyed by the row's tokens."""

    def __init__(self, model: Transformer, examples: Sequence[Example], *, pad_id: int = 0, batch_size: int = 32):
        self._h: dict[tuple, Tensor] = {}
        rows = {self.key(e): e for e in examples if e.objective == "kl"}
        todo = sorted(rows.values(), key=lambda e: len(e.prompt_ids) + len(e.target_ids))
        with torch.no_grad():
            for s in range(0, len(todo), batch_size):
                part = todo[s : s + batch_size]
                batch = collate(part, pad_id=pad_id).to(model.device)
                hidden = model(batch.input_ids, None, attention_mask=batch.attention_mask, output="hidden")
                for i, e in enumerate(part):
                    self._h[self.key(e)] = hidden[i][batch.kl[i]].clone()

    @staticmethod
    def key(e: Example) -> tuple:
        return (tuple(e.prompt_ids), tuple(e.target_ids))

    def __len__(self) -> int:
        return len(self._h)

    def for_batch(self, examples: Sequence[Example]) -> Tensor | None:
        """``batch_loss``'s ``teacher_hidden`` for ``collate(examples)``; None without KL rows."""
        parts = [self._h[self.key(e)] for e in examples if e.objective == "kl"]
        return torch.cat(parts) if parts else None


class Trainer:
    """AdamW over a list of tensors with gradient accumulation, a schedule and optional fp32 masters.

    The optimizer state is element-wise, so stacked per-diff tensors get per-diff state for free.
    No global gradient clipping by default: it would couple independently trained diffs.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_accum: int = 1,
        schedule: Literal["constant", "cosine", "linear"] = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        max_grad_norm: float | None = None,
        master_fp32: bool = False,
        grad_sync: Callable[[list[Tensor]], None] | None = None,
    ):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if schedule != "constant" and not total_steps:
            raise ValueError(f"schedule {schedule!r} needs total_steps")
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params] if master_fp32 else None
        opt_params = self.masters if self.masters is not None else self.params
        self.opt = torch.optim.AdamW(opt_params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.base_lr, self.grad_accum, self.schedule = lr, grad_accum, schedule
        self.warmup_steps, self.total_steps, self.max_grad_norm = warmup_steps, total_steps, max_grad_norm
        self.grad_sync = grad_sync  # e.g. an all-reduce over data-parallel ranks, run before each step
        self.micro = 0  # micro-steps since the last optimizer step
        self.step_count = 0  # optimizer steps taken

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.base_lr
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "linear":
            return self.base_lr * (1 - frac)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * frac))

    def backward(self, loss: Tensor) -> bool:
        """Accumulate ``loss / grad_accum``; take an optimizer step every ``grad_accum`` calls.

        Returns True when a step was taken.
        """
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at optimizer step {self.step_count}: stopping")
        (loss / self.grad_accum).backward()
        self.micro += 1
        if self.micro < self.grad_accum:
            return False
        self.step()
        return True

    def step(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        if self.masters is not None:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
        opt_params = self.masters if self.masters is not None else self.params
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(opt_params, self.max_grad_norm)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_count)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        if self.masters is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        self.micro = 0
        self.step_count += 1

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Optimizer state as flat tensors (safetensors) + JSON-able scalars. No pickle.

        Taken at optimizer-step boundaries only: half-accumulated gradients are not state.
        """
        if self.micro:
            raise RuntimeError(f"checkpoint requested {self.micro} micro-steps into a gradient accumulation; "
                               f"save right after an optimizer step")
        sd = self.opt.state_dict()
        tensors = {f"opt.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
        if self.masters is not None:
            tensors.update({f"master.{i}": m.detach() for i, m in enumerate(self.masters)})
        meta = {"step_count": self.step_count, "micro": self.micro,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict) -> None:
        state: dict[int, dict[str, Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v
        groups = [dict(g, params=list(range(len(self.opt.param_groups[0]["params"]))))
                  for g in meta["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        if self.masters is not None:
            with torch.no_grad():
                for i, m in enumerate(self.masters):
                    m.copy_(tensors[f"master.{i}"])
        self.step_count, self.micro = int(meta["step_count"]), int(meta["micro"])


def save_training_state(path: str | Path, weights: dict[str, Tensor], trainer: Trainer, meta: dict) -> None:
    """Write ``weights``, the optimizer state and ``meta`` into directory ``path`` atomically.

    The new state is built in a temporary sibling directory (each file fsynced) and swapped in by
    rename, so a kill at any moment leaves either the old complete checkpoint or the new one. A
    failed write (a full disk) removes the temporary directory, keeps the old checkpoint, and
    raises an OSError naming ``path``.
    """
    path = Path(path)
    opt_t, opt_meta = trainer.state_tensors()
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    opt_t = {k: v.detach().contiguous().cpu() for k, v in opt_t.items()}
    state = {"meta": meta, "optimizer": opt_meta}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        write_atomically(tmp / "weights.safetensors", lambda f: save_file(weights, str(f)))
        write_atomically(tmp / "optimizer.safetensors", lambda f: save_file(opt_t, str(f)))
        write_json(tmp / "state.json", state, indent=1)
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise named_error(e, path, "write checkpoint") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_slot_state(path: str | Path, slot: LoraSlot, trainer: Trainer, meta: dict) -> None:
    """Checkpoint a trainable adapter slot with its optimizer (see :func:`save_training_state`)."""
    weights = {f"{n}.A": slot.A[n] for n in slot.A} | {f"{n}.B": slot.B[n] for n in slot.B}
    save_training_state(path, weights, trainer, meta)


def resume_slot_state(
    path: str | Path, slot: LoraSlot, trainer: Trainer, check: Callable[[dict], None] | None = None
) -> dict | None:
    """Load a :func:`save_slot_state` checkpoint into ``slot`` and ``trainer``; its meta, or None
    when there is none. ``check(meta)`` may refuse it (other settings) before anything is loaded."""
    path = Path(path)
    if not path.exists() and not path.with_name(path.name + ".old").exists():
        return None
    weights, opt, state = load_training_state(path)
    if check is not None:
        check(state["meta"])
    with torch.no_grad():
        for n in slot.A:
            slot.A[n].copy_(weights[f"{n}.A"])
            slot.B[n].copy_(weights[f"{n}.B"])
    trainer.load_state_tensors(opt, state["optimizer"])
    return state["meta"]


def load_training_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(weights, optimizer tensors, {"meta", "optimizer"}) from :func:`save_training_state`.

    Falls back to ``<path>.old`` when a kill hit between the two renames.
    """
    path = Path(path)
    if not (path / "state.json").exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")
    try:
        state = json.loads((path / "state.json").read_text())
        return load_file(str(path / "weights.safetensors")), load_file(str(path / "optimizer.safetensors")), state
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: incomplete training checkpoint ({e.filename} missing)") from None
