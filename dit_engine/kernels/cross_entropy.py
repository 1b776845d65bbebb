"""Cross-entropy and KL-to-teacher over the vocabulary, chunked over tokens.

Neither op ever holds fp32 logits for the whole batch: forward and backward walk over chunks of
``chunk_size`` tokens, computing ``[chunk, V]`` logits, reducing them, and dropping them. Backward
recomputes each chunk's logits (one extra GEMM) instead of storing them.

    linear_cross_entropy:  loss[t] = logsumexp(h_t W^T) - (h_t W^T)[y_t]
        d loss[t] / d logits = softmax(logits_t) - onehot(y_t)
    linear_kl_to_teacher:  kl[t] = sum_v p_t(v) (log p_t(v) - log q_t(v)),
        p = softmax(teacher_h W^T) (constant), q = softmax(h W^T)
        d kl[t] / d logits = q_t - p_t

Then ``dh = g @ W`` and ``dW = g^T @ h`` per chunk, ``g`` scaled by the upstream per-token gradient.
This plain-torch version is the CPU path and the oracle of the Triton version.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cross_entropy(
    hidden: Tensor,  # [N, d]
    weight: Tensor,  # [V, d]
    labels: Tensor,  # [N] int64, -100 = ignore
    chunk_size: int = 1024,
) -> Tensor:  # [N] fp32, 0 where ignored
    _check(hidden, weight, "linear_cross_entropy")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} for hidden {tuple(hidden.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


def linear_kl_to_teacher(
    hidden: Tensor,  # [N, d]
    teacher_hidden: Tensor,  # [N, d]
    weight: Tensor,  # [V, d]
    chunk_size: int = 1024,
) -> Tensor:  # [N] fp32
    _check(hidden, weight, "linear_kl_to_teacher")
    if teacher_hidden.shape != hidden.shape:
        raise ValueError(f"linear_kl_to_teacher: teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"!= hidden {tuple(hidden.shape)}")
    return _LinearKL.apply(hidden, teacher_hidden.detach(), weight, chunk_size)


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Materialises the logits; the oracle for tests."""
    logits = (hidden.float() @ weight.float().T)
    loss = torch.nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return torch.where(labels >= 0, loss, torch.zeros_like(loss))


def linear_kl_to_teacher_ref(hidden: Tensor, teacher_hidden: Tensor, weight: Tensor) -> Tensor:
    log_q = torch.log_softmax(hidden.float() @ weight.float().T, -1)
    log_p = torch.log_softmax(teacher_hidden.float() @ weight.detach().float().T, -1)  # the teacher is constant
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        n = hidden.shape[0]
        loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        valid = labels >= 0
        for s in range(0, n, chunk_size):
            logits = hidden[s : s + chunk_size].float() @ weight.float().T  # [c, V]
            lse[s : s + chunk_size] = torch.logsumexp(logits, -1)
            y = labels[s : s + chunk_size].clamp_min(0)
            picked = logits.gather(1, y[:, None]).squeeze(1)
            loss[s : s + chunk_size] = lse[s : s + chunk_size] - picked
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx, g_out):  # g_out: [N]
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        g_out = torch.where(labels >= 0, g_out.float(), torch.zeros_like(g_out, dtype=torch.float32))
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size].float()
            logits = h @ weight.float().T
            g = torch.exp(logits - lse[s : s + ctx.chunk_size, None])  # softmax
            g.scatter_add_(1, labels[s : s + ctx.chunk_size].clamp_min(0)[:, None],
                           -torch.ones_like(g[:, :1]))
            g *= g_out[s : s + ctx.chunk_size, None]
            if need_h:
                dh[s : s + ctx.chunk_size] = g @ weight.float()
            if need_w:
                dw += g.T @ h
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None, None, None)


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, chunk_size):
        n = hidden.shape[0]
        kl = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        w = weight.float()
        for s in range(0, n, chunk_size):
            logits = hidden[s : s + chunk_size].float() @ w.T
            lse[s : s + chunk_size] = torch.logsumexp(logits, -1)
            log_q = logits - lse[s : s + chunk_size, None]
            log_p = torch.log_softmax(teacher_hidden[s : s + chunk_size].float() @ w.T, -1)
            kl[s : s + chunk_size] = (log_p.exp() * (log_p - log_q)).sum(-1)
        ctx.save_for_backward(hidden, teacher_hidden, weight, lse)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, g_out):
        hidden, teacher_hidden, weight, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dh = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        w = weight.float()
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size].float()
            q = torch.exp(h @ w.T - lse[s : s + ctx.chunk_size, None])
            p = torch.softmax(teacher_hidden[s : s + ctx.chunk_size].float() @ w.T, -1)
            g = (q - p) * g_out[s : s + ctx.chunk_size, None].float()
            if need_h:
                dh[s : s + ctx.chunk_size] = g @ w
            if need_w:
                dw += g.T @ h
        return (dh.to(hidden.dtype) if need_h else None, None, dw.to(weight.dtype) if need_w else None, None)


def _check(hidden: Tensor, weight: Tensor, op: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
