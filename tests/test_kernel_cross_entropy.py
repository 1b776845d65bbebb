"""Chunked cross-entropy / KL-to-teacher: Triton row kernels (interpreted) and the CPU torch path,
both against the fp64 materialised loss, values and gradients of hidden and weight."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err as _rel

from dit_kernels import cross_entropy as ce
from dit_kernels.cross_entropy import linear_cross_entropy, linear_kl_to_teacher

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("kernel_poison")




def _ce_oracle(h, w, labels):
    logits = h.double() @ w.double().T
    loss = torch.logsumexp(logits, -1) - logits.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(labels != -100, loss, torch.zeros_like(loss))


def _kl_oracle(h, th, w, divergence="forward"):
    log_q = torch.log_softmax(h.double() @ w.double().T, -1)
    log_p = torch.log_softmax(th.double() @ w.detach().double().T, -1)
    fwd = (log_p.exp() * (log_p - log_q)).sum(-1)
    rev = (log_q.exp() * (log_q - log_p)).sum(-1)
    return {"forward": fwd, "reverse": rev, "symmetric": fwd + rev}[divergence]


def _problem(n, d, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) / d**0.25).to(dtype).requires_grad_()
    th = (h.detach().float() + 0.7 * torch.randn(n, d, generator=g)).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    up = torch.randn(n, generator=g, dtype=torch.float64)  # per-token upstream gradient
    return h, w, th, labels, up


def _check_grads(loss, want, leaves, up, tol):
    got = torch.autograd.grad(loss, leaves, up.to(loss.dtype))
    ref = torch.autograd.grad(want, leaves, up)
    for a, b, leaf in zip(got, ref, leaves):
        assert a.dtype == leaf.dtype and not torch.isnan(a).any()
        assert _rel(a, b) < tol


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("chunk", [8, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_entropy(backend, chunk, dtype):
    h, w, _, labels, up = _problem(63, 24, 577, dtype, seed=chunk)
    loss = linear_cross_entropy(h, w, labels, chunk_size=chunk, backend=backend)
    want = _ce_oracle(h, w, labels)
    assert loss.dtype == torch.float32 and loss.shape == (63,)
    assert torch.all(loss[labels == -100] == 0)
    assert _rel(loss, want) < TOL[dtype]
    _check_grads(loss, want, (h, w), up, TOL[dtype])


@pytest.mark.parametrize("divergence", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kl_to_teacher(backend, dtype, divergence):
    h, w, th, _, up = _problem(45, 24, 577, dtype, seed=3)
    kl = linear_kl_to_teacher(h, th, w, chunk_size=16, divergence=divergence, backend=backend)
    want = _kl_oracle(h, th, w, divergence)
    assert kl.dtype == torch.float32 and bool((want > 0).all())
    assert _rel(kl, want) < TOL[dtype]
    _check_grads(kl, want, (h, w), up, TOL[dtype])


@pytest.mark.parametrize("divergence", ["forward", "reverse", "symmetric"])
def test_kl_is_zero_when_student_is_teacher(divergence):
    h, w, _, _, _ = _problem(10, 16, 123, torch.float32, seed=4)
    kl = linear_kl_to_teacher(h, h.detach(), w, chunk_size=4, divergence=divergence, backend="triton")
    assert float(kl.detach().abs().max()) < 1e-5
    (g,) = torch.autograd.grad(kl.sum(), (h,))
    assert float(g.abs().max()) < 1e-5  # the minimum: no gradient either


def test_the_reverse_kl_charges_mass_the_teacher_does_not_have():
    """The reason the divergences differ: a student putting half its mass on a token the teacher
    gives ~e^-20 pays ~log 2 in the forward KL and ~10 nats in the reverse one."""
    V = 50
    w = torch.eye(V)
    t = torch.zeros(1, V)
    t[0, 0] = -20.0
    s = torch.zeros(1, V)
    s[0, 0] = float(torch.log(torch.tensor(V - 1.0)))  # q(0) = 1/2
    fwd, rev = (float(linear_kl_to_teacher(s, t, w, divergence=d, backend="torch")) for d in ("forward", "reverse"))
    assert abs(fwd - float(_kl_oracle(s, t, w, "forward"))) < 1e-5 and fwd < 0.75
    assert abs(rev - float(_kl_oracle(s, t, w, "reverse"))) < 1e-4 and rev > 9.0


def test_an_unknown_divergence_is_refused():
    h, w, _, _, _ = _problem(4, 8, 17, torch.float32, seed=4)
    with pytest.raises(ValueError, match="divergence must be one of forward, reverse, symmetric"):
        linear_kl_to_teacher(h, h.detach(), w, divergence="js")


def test_frozen_weight_gets_no_grad_and_teacher_none(monkeypatch):
    h, w, th, labels, _ = _problem(20, 16, 123, torch.float32, seed=5)
    w = w.detach()
    th = th.requires_grad_()
    kl = linear_kl_to_teacher(h, th, w, chunk_size=8, backend="triton")
    (gh,) = torch.autograd.grad(kl.sum(), (h,))
    assert _rel(gh, torch.autograd.grad(_kl_oracle(h, th, w).sum(), (h,))[0]) < 1e-5
    assert not kl.grad_fn.next_functions[1][0]  # the teacher is detached: no edge to it


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["ce", "kl", "kl-reverse", "kl-symmetric"])
def test_a_frozen_weight_takes_the_hidden_gradient_from_the_forward(op, dtype, backend, monkeypatch):
    """With the weight frozen (a LoRA's training) the gradient w.r.t. hidden comes from the
    forward's own logits, scaled per token by the upstream gradient in the backward: no logits
    are recomputed there, and it is the fp64 oracle's gradient."""
    h, w, th, labels, up = _problem(37, 24, 577, dtype, seed=9)
    w = w.detach()
    gemms = []
    real = ce._compute_weight
    monkeypatch.setattr(ce, "_compute_weight", lambda *a, **k: gemms.append(1) or real(*a, **k))
    if op == "ce":
        out, want = linear_cross_entropy(h, w, labels, chunk_size=8, backend=backend), _ce_oracle(h, w, labels)
    else:
        div = op.split("-")[1] if "-" in op else "forward"
        out = linear_kl_to_teacher(h, th, w, chunk_size=8, divergence=div, backend=backend)
        want = _kl_oracle(h, th, w, div)
    assert _rel(out, want) < TOL[dtype]
    (got,) = torch.autograd.grad(out, (h,), up.float())
    (ref,) = torch.autograd.grad(want, (h,), up)
    assert got.dtype == dtype and _rel(got, ref) < TOL[dtype]
    assert len(gemms) == 1  # the forward's weight only: the backward recomputed nothing


def test_bf16_losses_without_a_gradient_keep_fp32_logits_on_the_cpu():
    """Training a bf16 model runs its logits GEMMs in bf16 on the CPU; a loss evaluated without
    a gradient (verification, scoring) keeps them in fp32: exactly the fp32 reference's value."""
    h, w, th, labels, _ = _problem(30, 24, 577, torch.bfloat16, seed=10)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_size=8, backend="torch")
        kl = linear_kl_to_teacher(h, th, w, chunk_size=8, backend="torch")
    torch.testing.assert_close(loss, ce.linear_cross_entropy_ref(h.detach(), w.detach(), labels), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, ce.linear_kl_to_teacher_ref(h.detach(), th, w.detach()), rtol=1e-5, atol=1e-6)
    assert ce._compute_weight(h, w, False, training=True).dtype == torch.bfloat16
    assert ce._compute_weight(h, w, False).dtype == torch.float32


def test_chunks_never_exceed_chunk_size(monkeypatch):
    """The [tokens, V] logits exist only one chunk at a time."""
    seen = []
    real = ce._ce_rows_fwd
    monkeypatch.setattr(ce, "_ce_rows_fwd", lambda logits, *a: (seen.append(logits.shape), real(logits, *a))[1])
    h, w, _, labels, _ = _problem(37, 8, 50, torch.float32, seed=6)
    linear_cross_entropy(h, w, labels, chunk_size=10, backend="torch")
    assert seen == [(10, 50), (10, 50), (10, 50), (7, 50)]


def test_bad_inputs_are_named():
    h, w, _, labels, _ = _problem(6, 8, 30, torch.float32, seed=7)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 30\) or be -100; found \[30\]"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 30, 2, -100, 3]))
    with pytest.raises(ValueError, match="hidden \\[N, d\\] and weight \\[V, d\\]"):
        linear_cross_entropy(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_kl_to_teacher(h, h, w, chunk_size=0)
    with pytest.raises(ValueError, match="teacher_hidden"):
        linear_kl_to_teacher(h, h[:3], w)
