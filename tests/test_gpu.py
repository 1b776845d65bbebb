"""On CUDA: the compiled Triton path against the plain-torch path, at bf16 with real tolerances.

Skipped without CUDA (never silently passed). What the interpreter tests cannot show: the compiled
kernels' tensor-core arithmetic (bf16 operands, TF32 for fp32 intermediates), the device-side
routes on a real device, and int64 offsets at sizes past 2^31 elements.

- fused ops (RMSNorm, RoPE, SwiGLU, linear cross-entropy): forward and gradients in bf16 against
  the fp32 reference, within 2e-2 relative (the design's bf16 tolerance);
- a whole Transformer, two adapter slots (a frozen diff per row with some rows none, a trainable
  shared DIT adapter): the loss and the DIT adapter's gradients on the Triton path against the
  fp32 torch path; the Triton bf16 error may not exceed twice the torch bf16 path's error (+1e-3);
- greedy generation with the same adapters: identical tokens on the Triton and torch paths (fp32,
  where both are exact to ~1e-6 and an argmax flip would be a bug, not rounding);
- int64: a multi-LoRA expand whose output has more than 2^31 elements, checked on sampled rows;
- no host sync in a decode step (CUDA's sync debug mode at "error"), and one multi-LoRA call
  captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_config

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.cache import KVCache
from dit_engine.generate import SamplingParams, generate
from dit_engine.model import Transformer
from dit_kernels import backend
from dit_kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from dit_kernels.multi_lora import RowRouting, multi_lora_sum
from dit_kernels.rms_norm import rms_norm, rms_norm_ref
from dit_kernels.rope import apply_rope, apply_rope_ref
from dit_kernels.swiglu import swiglu, swiglu_ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
BF16 = 2e-2


def _pair(*shape, g, dtype=torch.bfloat16):
    """The same values as a CUDA leaf in ``dtype`` and an fp32 CPU leaf (the reference's input)."""
    t = torch.randn(*shape, generator=g)
    return t.to(dtype).cuda().requires_grad_(), t.to(dtype).float().requires_grad_()


def _grads_close(got, want, tol=BF16):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and not torch.isnan(a).any(), f"grad {i}"
        assert rel_err(a.float().cpu(), b) < tol, f"grad {i}: {rel_err(a.float().cpu(), b):.2e}"


def test_fused_ops_bf16_match_the_fp32_references():
    g = torch.Generator().manual_seed(0)
    x, xr = _pair(37, 2560, g=g)
    w, wr = _pair(2560, g=g)
    y, yr = rms_norm(x, w, 1e-6, backend="triton"), rms_norm_ref(xr, wr, 1e-6)
    assert rel_err(y.float().cpu(), yr) < BF16
    dy = torch.randn(yr.shape, generator=g)
    _grads_close(torch.autograd.grad(y, (x, w), dy.to(y.dtype).cuda()), torch.autograd.grad(yr, (xr, wr), dy))

    q, qr = _pair(2, 8, 33, 128, g=g)
    ang = torch.randn(2, 33, 64, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    y = apply_rope(q, cos.to(q.dtype).cuda(), sin.to(q.dtype).cuda(), backend="triton")
    yr = apply_rope_ref(qr, cos.to(torch.bfloat16).float(), sin.to(torch.bfloat16).float())
    assert rel_err(y.float().cpu(), yr) < BF16
    dy = torch.randn(yr.shape, generator=g)
    _grads_close(torch.autograd.grad(y, q, dy.to(y.dtype).cuda()), torch.autograd.grad(yr, qr, dy))

    gate, gr = _pair(41, 9728, g=g)
    up, ur = _pair(41, 9728, g=g)
    y, yr = swiglu(gate, up, backend="triton"), swiglu_ref(gr, ur)
    assert rel_err(y.float().cpu(), yr) < BF16
    dy = torch.randn(yr.shape, generator=g)
    _grads_close(torch.autograd.grad(y, (gate, up), dy.to(y.dtype).cuda()), torch.autograd.grad(yr, (gr, ur), dy))

    h, hr = _pair(64, 256, g=g)
    lm, lmr = _pair(5000, 256, g=g)
    labels = torch.randint(0, 5000, (64,), generator=g)
    labels[::9] = -100
    y = linear_cross_entropy(h, lm, labels.cuda(), chunk_size=16, backend="triton")
    yr = linear_cross_entropy_ref(hr, lmr, labels)
    assert rel_err(y.cpu(), yr) < BF16
    _grads_close(torch.autograd.grad(y.sum(), (h, lm)), torch.autograd.grad(yr.sum(), (hr, lmr)))


def _adapters(cfg, rows: int, device: str, dtype: torch.dtype, *, trainable_dit: bool) -> AdapterBatch:
    g = torch.Generator().manual_seed(5)
    idx = torch.arange(rows) % 7
    idx[1::5] = -1  # some rows without a diff
    diffs = LoraSlot.create(cfg, 7, 4, init="random", generator=g, index=idx, name="diffs")
    dit = LoraSlot.create(cfg, 1, 16, init="random", generator=g, index=torch.zeros(rows, dtype=torch.int64), name="dit")
    return AdapterBatch(diffs.to(device, dtype), dit.to(device, dtype, trainable=trainable_dit))


def _loss_and_dit_grads(model, adapters, ids):
    logits = model(ids, adapters)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    dit = adapters.slots[1]
    return loss, torch.autograd.grad(loss, dit.parameters())


def test_transformer_forward_backward_two_slots_triton_matches_torch(monkeypatch):
    cfg = tiny_config("qwen3", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=32, num_hidden_layers=3, vocab_size=1000)
    rows, seq = 6, 37
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(1)).cuda()
    results = {}
    for name, kernels, dtype in (("ref", "torch", torch.float32), ("torch", "torch", torch.bfloat16),
                                 ("triton", "triton", torch.bfloat16)):
        monkeypatch.setenv(backend.ENV_BACKEND, kernels)
        model = Transformer.random(cfg, seed=0, dtype=dtype, device="cuda")
        results[name] = _loss_and_dit_grads(model, _adapters(cfg, rows, "cuda", dtype, trainable_dit=True), ids)
    ref_loss, ref_grads = results["ref"][0].detach(), results["ref"][1]
    for name in ("torch", "triton"):
        loss = results[name][0].detach()
        assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < BF16, name
    for i, (want, t_grad, k_grad) in enumerate(zip(ref_grads, results["torch"][1], results["triton"][1])):
        err_torch, err_triton = rel_err(t_grad.float(), want), rel_err(k_grad.float(), want)
        assert err_triton < BF16 * 3, f"grad {i}: {err_triton:.2e}"
        assert err_triton <= 2 * err_torch + 1e-3, f"grad {i}: triton {err_triton:.2e} vs torch {err_torch:.2e}"


@torch.no_grad()
def test_greedy_generation_identical_on_triton_and_torch_paths(monkeypatch):
    cfg = tiny_config("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=500,
                      max_position_embeddings=256)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 3)]
    params = SamplingParams(max_new_tokens=24, stop_token_ids=())
    out = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv(backend.ENV_BACKEND, kernels)
        model = Transformer.random(cfg, seed=3, device="cuda")
        adapters = _adapters(cfg, len(prompts), "cuda", torch.float32, trainable_dit=False)
        out[kernels] = [r.token_ids for r in generate(model, prompts, params, adapters=adapters, batch_size=4)]
    assert out["triton"] == out["torch"]


@torch.no_grad()
def test_multi_lora_expand_past_2_to_the_31_elements():
    """y [N, d_out] with N * d_out > 2^31: row offsets must be int64 (an int32 overflow writes the
    last rows into the first ones or faults)."""
    n_tok, d_in, d_out, n, r = 65_600, 64, 32_800, 3, 16
    assert n_tok * d_out > 2**31
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(n_tok, d_in, device="cuda", generator=g).to(torch.bfloat16)
    A = (torch.randn(n, r, d_in, device="cuda", generator=g) / d_in**0.5).to(torch.bfloat16)
    B = (torch.randn(n, d_out, r, device="cuda", generator=g) / r**0.5).to(torch.bfloat16)
    scale = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    rows = torch.arange(16, device="cuda") % n
    rows[3] = -1
    routing = RowRouting(rows, n)  # 16 sequences of 4100 tokens
    y = multi_lora_sum(x, [(A, B, scale, routing)], backend="triton")
    check = torch.cat([torch.arange(0, 64), torch.arange(n_tok - 64, n_tok), torch.randint(0, n_tok, (64,))]).cuda()
    ids = rows[check // (n_tok // 16)]
    safe = ids.clamp_min(0)
    s = torch.einsum("trd,td->tr", A[safe].double(), x[check].double())
    want = torch.einsum("tor,tr->to", B[safe].double(), s) * (scale[safe].double() * (ids >= 0))[:, None]
    assert rel_err(y[check].cpu(), want.cpu()) < BF16
    assert torch.count_nonzero(y[check][ids < 0]) == 0


@torch.no_grad()
def test_decode_step_on_cuda_does_not_sync(monkeypatch):
    """The real counterpart of tests/test_host_syncs.py: with CUDA's sync debug mode at "error",
    any synchronising call in a decode step (after the prefill) raises."""
    monkeypatch.setenv(backend.ENV_BACKEND, "triton")
    cfg = tiny_config("qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=500,
                      head_dim=32)
    model = Transformer.random(cfg, seed=0, device="cuda")
    adapters = _adapters(cfg, 6, "cuda", torch.float32, trainable_dit=False)
    ids = torch.randint(0, cfg.vocab_size, (6, 11), generator=torch.Generator().manual_seed(0)).cuda()
    cache = KVCache(cfg, 6, 32, device="cuda")
    tok = model(ids, adapters, cache=cache, output="last").argmax(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tok = model(tok[:, None], adapters, cache=cache, output="last").argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_multi_lora_call_replays_in_a_cuda_graph():
    """After the batch's first call (routes and plans built), one adapted linear's multi-LoRA
    call captures into a CUDA graph and replays with new activations, matching an eager call."""
    g = torch.Generator(device="cuda").manual_seed(6)
    n_tok, d, n, r = 256, 1024, 64, 16
    A = (torch.randn(n, r, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    B = (torch.randn(n, d, r, device="cuda", generator=g) / r**0.5).to(torch.bfloat16)
    A1 = (torch.randn(1, r, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    B1 = (torch.randn(1, d, r, device="cuda", generator=g) / r**0.5).to(torch.bfloat16)
    slots = [(A, B, torch.full((n,), 1 / r, device="cuda"), RowRouting(torch.arange(n_tok, device="cuda") % n, n)),
             (A1, B1, torch.ones(1, device="cuda"), RowRouting(torch.zeros(n_tok, dtype=torch.int64, device="cuda"), 1))]
    x = torch.randn(n_tok, d, device="cuda", generator=g).to(torch.bfloat16)
    with torch.no_grad():
        multi_lora_sum(x, slots, backend="triton")  # first call of the batch: routes and plans
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = multi_lora_sum(x, slots, backend="triton")
        x.copy_(torch.randn(n_tok, d, device="cuda", generator=g).to(torch.bfloat16))
        graph.replay()
        want = multi_lora_sum(x, slots, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(y, want)
