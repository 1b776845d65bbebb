"""Cross-entropy and KL-to-teacher over the vocabulary, chunked over tokens.

Neither op ever holds fp32 logits for the whole batch: forward and backward walk over chunks of
``chunk_size`` tokens, computing ``[chunk, V]`` logits with one GEMM, reducing them, and dropping them.
When only ``hidden`` needs a gradient (the weight frozen: every LoRA's training) the forward turns
each chunk's logits, in place, into the gradient w.r.t. the logits for a unit upstream gradient and
keeps ``g @ W`` ([N, d]); the backward scales its rows by the upstream gradient (each token's loss
depends on its own row only) and recomputes nothing (Liger-Kernel's fused linear cross-entropy does
the same). When the weight needs a gradient too, the forward keeps only the log-sum-exp per token
and the backward recomputes each chunk's logits (one extra GEMM) to reduce ``dW``.

    linear_cross_entropy:  loss[t] = logsumexp(h_t W^T) - (h_t W^T)[y_t]       (0 where y_t = -100)
        d loss[t] / d logits = softmax(logits_t) - onehot(y_t)
    linear_kl_to_teacher:  p = softmax(teacher_h W^T) (constant), q = softmax(h W^T), per token
        "forward":   KL(p || q) = sum_v p (log p - log q),    d / d logits = q - p
        "reverse":   KL(q || p) = sum_v q (log q - log p),    d / d logits = q * (log q - log p - KL(q || p))
        "symmetric": KL(p || q) + KL(q || p) (Jeffreys),     the sum of both gradients
    The forward KL is mass-covering: it barely charges the student for putting mass where the
    teacher has none; the reverse KL charges exactly that (a finetune starting its answer with a
    word the base model would not write), which is what keeping a hidden behaviour hidden needs.

Then ``dh = g @ W`` and ``dW += g^T @ h`` per chunk, ``g`` scaled by the upstream per-token gradient.

The GEMMs are torch's (cuBLAS); the per-row reductions are Triton kernels on the Triton path (one
online pass over the row for the forward, one for the gradient) and plain torch on the CPU path,
where the chunk's logits are fp32, except while a bf16 model trains (see :func:`_compute_weight`).
On the Triton path the logits are in the inputs' dtype, as a Hugging Face model computes them.

Size: one room, a little over 500 lines: the two ops share their chunked autograd plumbing, and each
reduction has its torch rows next to its Triton kernel, which must compute the same thing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import backend as _backend

IGNORE_INDEX = -100
DIVERGENCES = ("forward", "reverse", "symmetric")


def linear_cross_entropy(
    hidden: Tensor,  # [N, d]
    weight: Tensor,  # [V, d]
    labels: Tensor,  # [N] int64, -100 = ignore
    chunk_size: int = 1024,
    *,
    backend: str | None = None,
) -> Tensor:  # [N] fp32, 0 where ignored
    """Per-token cross-entropy of ``hidden @ weight^T`` against ``labels``, chunked over tokens."""
    _check(hidden, weight, chunk_size, "linear_cross_entropy")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} for hidden {tuple(hidden.shape)}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: labels must lie in [0, {weight.shape[0]}) or be {IGNORE_INDEX}; "
                         f"found {labels[bad][:5].tolist()}")
    triton_rows = _backend.use_triton(hidden, weight, backend=backend)
    return _LinearCrossEntropy.apply(hidden, weight, labels.to(torch.int64), chunk_size, triton_rows,
                                     torch.is_grad_enabled())


def linear_kl_to_teacher(
    hidden: Tensor,  # [N, d]
    teacher_hidden: Tensor,  # [N, d]
    weight: Tensor,  # [V, d]
    chunk_size: int = 1024,
    *,
    divergence: str = "forward",
    backend: str | None = None,
) -> Tensor:  # [N] fp32
    """Per-token divergence of the student from the teacher, both read through the same ``weight``;
    the teacher gets no grad. ``divergence``: "forward" KL(teacher || student), "reverse"
    KL(student || teacher) or "symmetric" (their sum); see the module docstring."""
    _check(hidden, weight, chunk_size, "linear_kl_to_teacher")
    if teacher_hidden.shape != hidden.shape:
        raise ValueError(f"linear_kl_to_teacher: teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"!= hidden {tuple(hidden.shape)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"linear_kl_to_teacher: divergence must be one of {', '.join(DIVERGENCES)}, "
                         f"got {divergence!r}")
    triton_rows = _backend.use_triton(hidden, weight, backend=backend)
    return _LinearKL.apply(hidden, teacher_hidden.detach(), weight, chunk_size, triton_rows, torch.is_grad_enabled(),
                           DIVERGENCES.index(divergence))


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Materialises the fp32 logits; the oracle for tests."""
    logits = hidden.float() @ weight.float().T
    loss = torch.nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return torch.where(labels != IGNORE_INDEX, loss, torch.zeros_like(loss))


def linear_kl_to_teacher_ref(hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                             divergence: str = "forward") -> Tensor:
    """Materialises the fp32 logits; the oracle for tests."""
    log_q = torch.log_softmax(hidden.float() @ weight.float().T, -1)
    log_p = torch.log_softmax(teacher_hidden.detach().float() @ weight.detach().float().T, -1)
    fwd, rev = (log_p.exp() * (log_p - log_q)).sum(-1), (log_q.exp() * (log_q - log_p)).sum(-1)
    return {"forward": fwd, "reverse": rev, "symmetric": fwd + rev}[divergence]


# ---- chunked autograd Functions ---------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, triton_rows, grad):
        n = hidden.shape[0]
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        eager = need_h and not need_w  # d loss / d hidden from the forward's own logits
        w = _compute_weight(hidden, weight, triton_rows, training=need_h or need_w)
        loss = _backend.empty((n,), torch.float32, hidden.device)
        lse = _backend.empty((n,), torch.float32, hidden.device)
        dh = _backend.empty((n, hidden.shape[1]), w.dtype, hidden.device) if eager else None
        ones = torch.ones(n, dtype=torch.float32, device=hidden.device) if eager else None
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            logits = hidden[c].to(w.dtype) @ w.T  # [chunk, V]
            _ce_rows_fwd(logits, labels[c], lse[c], loss[c], triton_rows)
            if eager:  # per-token gradient for a unit upstream gradient; backward scales it
                _ce_rows_bwd(logits, labels[c], lse[c], ones[c], triton_rows)
                dh[c] = logits @ w
        ctx.eager, ctx.chunk_size, ctx.triton_rows, ctx.hidden_dtype = eager, chunk_size, triton_rows, hidden.dtype
        if eager:
            ctx.save_for_backward(dh)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):  # dloss: [N]
        if ctx.eager:
            (dh,) = ctx.saved_tensors
            return _scaled_rows(dh, dloss, ctx.hidden_dtype), None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = _compute_weight(hidden, weight, ctx.triton_rows, training=True)
        dh = _backend.empty(tuple(hidden.shape), hidden.dtype, hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        dloss = dloss.float().contiguous()  # a broadcast upstream grad (loss.sum()) has stride 0
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            c = slice(s, s + ctx.chunk_size)
            h = hidden[c].to(w.dtype)
            logits = h @ w.T  # [chunk, V], becomes d loss / d logits in place
            _ce_rows_bwd(logits, labels[c], lse[c], dloss[c], ctx.triton_rows)
            if need_h:
                dh[c] = logits @ w
            if need_w:
                dw += (logits.T @ h).float()
        return dh, dw.to(weight.dtype) if need_w else None, None, None, None, None


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, chunk_size, triton_rows, grad, mode):
        n = hidden.shape[0]
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[2]
        eager = need_h and not need_w
        w = _compute_weight(hidden, weight, triton_rows, training=need_h or need_w)
        kl = _backend.empty((n,), torch.float32, hidden.device)
        lse = _backend.empty((n,), torch.float32, hidden.device)
        lse_t = _backend.empty((n,), torch.float32, hidden.device)
        mean_d = _backend.empty((n,), torch.float32, hidden.device)  # E_q[s - t], the reverse KL's gradient needs it
        dh = _backend.empty((n, hidden.shape[1]), w.dtype, hidden.device) if eager else None
        ones = torch.ones(n, dtype=torch.float32, device=hidden.device) if eager else None
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            logits = hidden[c].to(w.dtype) @ w.T  # [chunk, V]
            teacher = teacher_hidden[c].to(w.dtype) @ w.T
            _kl_rows_fwd(logits, teacher, lse[c], lse_t[c], mean_d[c], kl[c], mode, triton_rows)
            if eager:
                _kl_rows_bwd(logits, teacher, lse[c], lse_t[c], mean_d[c], ones[c], mode, triton_rows)
                dh[c] = logits @ w
        ctx.eager, ctx.chunk_size, ctx.triton_rows, ctx.hidden_dtype = eager, chunk_size, triton_rows, hidden.dtype
        ctx.mode = mode
        if eager:
            ctx.save_for_backward(dh)
        else:
            ctx.save_for_backward(hidden, teacher_hidden, weight, lse, lse_t, mean_d)
        return kl

    @staticmethod
    def backward(ctx, dkl):  # dkl: [N]
        if ctx.eager:
            (dh,) = ctx.saved_tensors
            return _scaled_rows(dh, dkl, ctx.hidden_dtype), None, None, None, None, None, None
        hidden, teacher_hidden, weight, lse, lse_t, mean_d = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        w = _compute_weight(hidden, weight, ctx.triton_rows, training=True)
        dh = _backend.empty(tuple(hidden.shape), hidden.dtype, hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        dkl = dkl.float().contiguous()
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            c = slice(s, s + ctx.chunk_size)
            h = hidden[c].to(w.dtype)
            logits = h @ w.T  # [chunk, V], becomes d kl / d logits in place
            teacher = teacher_hidden[c].to(w.dtype) @ w.T
            _kl_rows_bwd(logits, teacher, lse[c], lse_t[c], mean_d[c], dkl[c], ctx.mode, ctx.triton_rows)
            if need_h:
                dh[c] = logits @ w
            if need_w:
                dw += (logits.T @ h).float()
        return dh, None, dw.to(weight.dtype) if need_w else None, None, None, None, None


def _scaled_rows(dh_unit: Tensor, upstream: Tensor, dtype: torch.dtype) -> Tensor:
    """The gradient w.r.t. hidden from the forward's unit-gradient rows: row t scaled by the
    upstream gradient of token t (each token's loss depends on its own row only)."""
    return (dh_unit * upstream.to(dh_unit.dtype)[:, None]).to(dtype)


def _compute_weight(hidden: Tensor, weight: Tensor, triton_rows: bool, *, training: bool = False) -> Tensor:
    """The weight in the dtype the chunk GEMMs run in (converted once per pass, not per chunk).

    On the Triton path the inputs' dtype. On the CPU path fp32, except for a bf16 model being
    trained (``training``, bf16 hidden and weight): its chunk GEMMs then run in bf16 as the rest of
    its step does (2.7x faster than fp32 on an avx512_bf16 CPU for 512 x 576 @ 576 x 49152; the
    logits rounded to bf16, the reductions over them still in fp32). Losses evaluated without a
    gradient keep fp32 logits on the CPU whatever the model's dtype."""
    if triton_rows:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    elif training and hidden.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return weight.detach().to(dtype)


# ---- per-row reductions over one chunk of logits ----------------------------------------------------


def _ce_rows_fwd(
    logits: Tensor,  # [C, V]
    labels: Tensor,  # [C] int64
    lse_out: Tensor,  # [C] fp32
    loss_out: Tensor,  # [C] fp32
    triton_rows: bool,
) -> None:
    if not triton_rows:
        lf = logits.float()
        lse = torch.logsumexp(lf, -1)
        picked = lf.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        lse_out.copy_(lse)
        loss_out.copy_(torch.where(labels != IGNORE_INDEX, lse - picked, torch.zeros_like(lse)))
        return
    C, V = logits.shape
    kernel = _backend.on_device(_ce_fwd_kernel, logits.device)
    block_v = _block_v(V, logits.device)
    with _backend.device_guard(logits):
        kernel[(C,)](logits, labels, lse_out, loss_out, V, logits.stride(0), IGNORE=IGNORE_INDEX, BLOCK_V=block_v)


def _ce_rows_bwd(
    logits: Tensor,  # [C, V], overwritten with d loss / d logits
    labels: Tensor,  # [C] int64
    lse: Tensor,  # [C] fp32
    dloss: Tensor,  # [C] fp32
    triton_rows: bool,
) -> None:
    if not triton_rows:
        valid = labels != IGNORE_INDEX
        g = torch.exp(logits.float() - lse[:, None])
        g.scatter_add_(1, labels.clamp_min(0)[:, None], -valid.float()[:, None])
        logits.copy_(g * torch.where(valid, dloss, torch.zeros_like(dloss))[:, None])
        return
    C, V = logits.shape
    kernel = _backend.on_device(_ce_bwd_kernel, logits.device)
    block_v = _block_v(V, logits.device)
    with _backend.device_guard(logits):
        kernel[(C,)](logits, labels, lse, dloss, V, logits.stride(0), IGNORE=IGNORE_INDEX, BLOCK_V=block_v)


def _kl_rows_fwd(
    logits: Tensor,  # [C, V] student
    teacher: Tensor,  # [C, V]
    lse_out: Tensor,  # [C] fp32
    lse_t_out: Tensor,  # [C] fp32
    mean_d_out: Tensor,  # [C] fp32: E_q[s - t] (for the reverse KL's gradient)
    kl_out: Tensor,  # [C] fp32
    mode: int,  # DIVERGENCES.index: 0 forward, 1 reverse, 2 symmetric
    triton_rows: bool,
) -> None:
    if not triton_rows:
        lf, tf = logits.float(), teacher.float()
        lse, lse_t = torch.logsumexp(lf, -1), torch.logsumexp(tf, -1)
        lse_out.copy_(lse)
        lse_t_out.copy_(lse_t)
        kl = torch.zeros_like(lse)
        if mode != 1:  # forward: sum p (log p - log q)
            log_p = tf - lse_t[:, None]
            kl += (log_p.exp() * (log_p - (lf - lse[:, None]))).sum(-1)
        if mode != 0:  # reverse: sum q (log q - log p) = E_q[s - t] - lse + lse_t
            mean_d = (torch.exp(lf - lse[:, None]) * (lf - tf)).sum(-1)
            mean_d_out.copy_(mean_d)
            kl += mean_d - lse + lse_t
        kl_out.copy_(kl)
        return
    C, V = logits.shape
    kernel = _backend.on_device(_kl_fwd_kernel, logits.device)
    with _backend.device_guard(logits):
        kernel[(C,)](
            logits, teacher, lse_out, lse_t_out, mean_d_out, kl_out, V, logits.stride(0), teacher.stride(0),
            MODE=mode, BLOCK_V=_block_v(V, logits.device),
        )


def _kl_rows_bwd(
    logits: Tensor,  # [C, V] student, overwritten with d kl / d logits
    teacher: Tensor,  # [C, V]
    lse: Tensor,  # [C] fp32
    lse_t: Tensor,  # [C] fp32
    mean_d: Tensor,  # [C] fp32 (read in modes 1 and 2)
    dkl: Tensor,  # [C] fp32
    mode: int,
    triton_rows: bool,
) -> None:
    if not triton_rows:
        lf, tf = logits.float(), teacher.float()
        q = torch.exp(lf - lse[:, None])
        if mode == 0:
            g = q - torch.exp(tf - lse_t[:, None])
        else:  # reverse: q * (log q - log p - KL(q||p)) = q * (s - t - E_q[s - t]); symmetric adds forward's
            g = q * (lf - tf - mean_d[:, None])
            if mode == 2:
                g += q - torch.exp(tf - lse_t[:, None])
        logits.copy_(g * dkl[:, None])
        return
    C, V = logits.shape
    kernel = _backend.on_device(_kl_bwd_kernel, logits.device)
    block_v = _block_v(V, logits.device)
    with _backend.device_guard(logits):
        kernel[(C,)](logits, teacher, lse, lse_t, mean_d, dkl, V, logits.stride(0), teacher.stride(0),
                     MODE=mode, BLOCK_V=block_v)


def _block_v(V: int, device: torch.device) -> int:
    # Small blocks under the interpreter so that test vocabularies take several online-softmax steps.
    return min(_backend.next_power_of_2(V), 256 if _backend.interpreted(device) else 4096)


# ---- kernels: one program per row, one online pass over the vocabulary --------------------------------


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,  # [C, V]
    labels_ptr,  # [C] int64
    lse_ptr,  # [C] fp32
    loss_ptr,  # [C] fp32
    V,
    stride_l,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    p_row = logits_ptr + i_row * stride_l
    # Online log-sum-exp: running max m and running sum s of exp(logit - m).
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        b_l = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(b_l, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(b_l - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + i_row)
    valid = label != IGNORE
    picked = tl.load(p_row + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(lse_ptr + i_row, lse)
    tl.store(loss_ptr + i_row, tl.where(valid, lse - picked, 0.0))


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,  # [C, V], overwritten with the gradient
    labels_ptr,  # [C] int64
    lse_ptr,  # [C] fp32
    dloss_ptr,  # [C] fp32
    V,
    stride_l,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    p_row = logits_ptr + i_row * stride_l
    label = tl.load(labels_ptr + i_row)
    lse = tl.load(lse_ptr + i_row)
    dloss = tl.where(label != IGNORE, tl.load(dloss_ptr + i_row), 0.0)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_l = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.exp(b_l - lse) - tl.where(o_v == label, 1.0, 0.0)
        tl.store(p_row + o_v, (b_g * dloss).to(logits_ptr.dtype.element_ty), mask=m_v)


@triton.jit
def _kl_fwd_kernel(
    s_ptr,  # [C, V] student logits
    t_ptr,  # [C, V] teacher logits
    lse_s_ptr,  # [C] fp32
    lse_t_ptr,  # [C] fp32
    mean_d_ptr,  # [C] fp32: E_q[s - t] (written in modes 1 and 2)
    kl_ptr,  # [C] fp32
    V,
    stride_s,
    stride_t,
    MODE: tl.constexpr,  # 0 forward, 1 reverse, 2 symmetric
    BLOCK_V: tl.constexpr,
):
    # forward KL = sum_v p (t - s) - lse_t + lse_s; reverse KL = sum_v q (s - t) - lse_s + lse_t. One
    # pass: online log-sum-exp of s and of t, and the running sums acc_t = sum exp(t - m_t) (t - s)
    # and acc_s = sum exp(s - m_s) (s - t), each rescaled with its own running max.
    i_row = tl.program_id(0).to(tl.int64)
    p_s = s_ptr + i_row * stride_s
    p_t = t_ptr + i_row * stride_t
    m_s = float("-inf")
    sum_s = 0.0
    m_t = float("-inf")
    sum_t = 0.0
    acc_t = 0.0
    acc_s = 0.0
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_s = tl.load(p_s + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_t = tl.load(p_t + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_diff = b_t - b_s  # 0 past the row's end
        b_s = tl.where(m_v, b_s, float("-inf"))
        b_t = tl.where(m_v, b_t, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(b_s, axis=0))
        b_es = tl.exp(b_s - ms_new)
        rescale_s = tl.exp(m_s - ms_new)
        sum_s = sum_s * rescale_s + tl.sum(b_es, axis=0)
        acc_s = acc_s * rescale_s - tl.sum(b_es * b_diff, axis=0)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(b_t, axis=0))
        b_e = tl.exp(b_t - mt_new)
        rescale = tl.exp(m_t - mt_new)
        sum_t = sum_t * rescale + tl.sum(b_e, axis=0)
        acc_t = acc_t * rescale + tl.sum(b_e * b_diff, axis=0)
        m_t = mt_new
    lse_s = m_s + tl.log(sum_s)
    lse_t = m_t + tl.log(sum_t)
    tl.store(lse_s_ptr + i_row, lse_s)
    tl.store(lse_t_ptr + i_row, lse_t)
    fwd = acc_t / sum_t - lse_t + lse_s
    mean_d = acc_s / sum_s
    rev = mean_d - lse_s + lse_t
    if MODE != 0:
        tl.store(mean_d_ptr + i_row, mean_d)
    if MODE == 0:
        tl.store(kl_ptr + i_row, fwd)
    elif MODE == 1:
        tl.store(kl_ptr + i_row, rev)
    else:
        tl.store(kl_ptr + i_row, fwd + rev)


@triton.jit
def _kl_bwd_kernel(
    s_ptr,  # [C, V] student logits, overwritten with the gradient
    t_ptr,  # [C, V] teacher logits
    lse_s_ptr,  # [C] fp32
    lse_t_ptr,  # [C] fp32
    mean_d_ptr,  # [C] fp32 (read in modes 1 and 2)
    dkl_ptr,  # [C] fp32
    V,
    stride_s,
    stride_t,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    p_s = s_ptr + i_row * stride_s
    p_t = t_ptr + i_row * stride_t
    lse_s = tl.load(lse_s_ptr + i_row)
    lse_t = tl.load(lse_t_ptr + i_row)
    dkl = tl.load(dkl_ptr + i_row)
    mean_d = 0.0
    if MODE != 0:
        mean_d = tl.load(mean_d_ptr + i_row)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_s = tl.load(p_s + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_t = tl.load(p_t + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_q = tl.exp(b_s - lse_s)
        if MODE == 0:
            b_g = b_q - tl.exp(b_t - lse_t)
        elif MODE == 1:
            b_g = b_q * (b_s - b_t - mean_d)
        else:
            b_g = b_q - tl.exp(b_t - lse_t) + b_q * (b_s - b_t - mean_d)
        tl.store(p_s + o_v, (b_g * dkl).to(s_ptr.dtype.element_ty), mask=m_v)


def _check(hidden: Tensor, weight: Tensor, chunk_size: int, op: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
