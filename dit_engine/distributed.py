"""torch.distributed plumbing shared by the trainers (diff generation, DIT) and interpretation.

Outside ``torchrun`` everything degrades to one process: rank 0 of a world of 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_grads(params: Iterable[torch.Tensor], world: int) -> None:
    """Average gradients over ranks (a parameter without a gradient takes part as zeros, so every
    rank issues the same collectives)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: every rank calls it at the same
    point); outside torchrun, ``flag`` itself."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
