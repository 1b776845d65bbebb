"""The trainer: chunked losses against materialised references, per-diff independence, checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err as _rel
from conftest import tiny_config

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.generate import SamplingParams, generate
from dit_kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_kl_to_teacher,
    linear_kl_to_teacher_ref,
)
from dit_engine.model import Transformer
from dit_engine.train import (
    Example,
    TeacherCache,
    Trainer,
    batch_loss,
    collate,
    load_training_state,
    save_training_state,
)


def test_chunked_losses_match_materialised_reference_values_and_grads():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(53, 16, generator=g, requires_grad=True)
    th = torch.randn(37, 16, generator=g)
    y = torch.randint(0, 53, (37,), generator=g)
    y[[2, 11]] = -100
    up = torch.randn(37, generator=g)
    for f, ref in ((lambda: linear_cross_entropy(h, w, y, chunk_size=8), lambda: linear_cross_entropy_ref(h, w, y)),
                   (lambda: linear_kl_to_teacher(h, th, w, chunk_size=8), lambda: linear_kl_to_teacher_ref(h, th, w))):
        a, b = f(), ref()
        assert _rel(a, b) < 1e-5
        ga = torch.autograd.grad((a * up).sum(), (h, w))
        gb = torch.autograd.grad((b * up).sum(), (h, w))
        for x, z in zip(ga, gb):
            assert _rel(x, z) < 1e-5
    assert float(linear_cross_entropy(h, w, y)[2]) == 0.0


def test_collate_shifts_targets_and_marks_kl_positions():
    b = collate([Example([5, 6], [7, 8], "ce", group=0), Example([9], [3, 4, 2], "kl", group=1)], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [9, 3, 4, 2]]
    assert b.targets.tolist() == [[-100, 7, 8, -100], [-100] * 4]
    assert b.kl.tolist() == [[False] * 4, [True, True, True, False]]
    assert b.group.tolist() == [0, 1]


def test_batch_loss_equals_per_group_mean_of_plain_cross_entropy():
    c = tiny_config("llama")
    m = Transformer.random(c, seed=1)
    ex = [Example([5, 6, 7], [8, 9], "ce", group=0), Example([4], [10, 11, 12], "ce", group=0),
          Example([3, 3], [20], "ce", group=1)]
    loss, per = batch_loss(m, collate(ex), None, group_reduce="sum")
    want = []
    for grp in (0, 1):
        tl = []
        for e in ex:
            if e.group != grp:
                continue
            ids = torch.tensor([e.prompt_ids + e.target_ids])
            logp = torch.log_softmax(m(ids)[0].double(), -1)
            p = len(e.prompt_ids)
            tl += [-logp[p - 1 + k, t] for k, t in enumerate(e.target_ids)]
        want.append(torch.stack(tl).mean())
    assert abs(per[0][0] - float(want[0])) < 1e-5 and per[0][1] == 5
    assert abs(float(loss) - float(want[0] + want[1])) < 1e-5


def test_kl_to_base_is_zero_without_adapters_and_positive_with():
    c = tiny_config("qwen2")
    m = Transformer.random(c, seed=2)
    b = collate([Example([5, 6], [7, 8, 9], "kl")])
    loss, _ = batch_loss(m, b, None)
    assert abs(float(loss)) < 1e-6
    slot = LoraSlot.create(c, 1, 4, init="random", index=torch.tensor([0]))
    loss, _ = batch_loss(m, b, AdapterBatch(slot))
    assert float(loss) > 1e-6


@pytest.mark.parametrize("divergence", ["reverse", "symmetric"])
def test_batch_loss_kl_divergence_is_the_chosen_divergence_of_the_logits(divergence):
    """``kl_divergence`` changes what a KL row charges: the mean over its positions of the chosen
    divergence between the teacher's and the model's next-token distributions (from their logits)."""
    c = tiny_config("qwen2")
    m = Transformer.random(c, seed=2)
    b = collate([Example([5, 6], [7, 8, 9], "kl")])
    g = torch.Generator().manual_seed(0)
    teacher = 40.0 * torch.randn(int(b.kl.sum()), c.hidden_size, generator=g)  # a peaked teacher, far from m
    loss, _ = batch_loss(m, b, None, teacher_hidden=teacher, kl_divergence=divergence)
    with torch.no_grad():
        hidden = m(b.input_ids, None, attention_mask=b.attention_mask, output="hidden")[b.kl]
    w = m.lm_weight.double()
    log_q = torch.log_softmax(hidden.double() @ w.T, -1)
    log_p = torch.log_softmax(teacher.double() @ w.T, -1)
    fwd = (log_p.exp() * (log_p - log_q)).sum(-1)
    rev = (log_q.exp() * (log_q - log_p)).sum(-1)
    want = (rev if divergence == "reverse" else fwd + rev).mean()
    assert abs(float(loss) - float(want)) < 1e-5 * max(1.0, float(want))
    assert abs(float(loss) - float(fwd.mean())) > 0.1 * float(fwd.mean())  # not the forward KL


def test_teacher_cache_gives_the_loss_and_grads_of_the_teacher_forward():
    """Cached teacher states (computed once, in other batches, deduplicated) give the same loss and
    gradients as batch_loss's own teacher forward, for a batch mixing CE and KL rows of 2 diffs."""
    c = tiny_config("llama")
    m = Transformer.random(c, seed=4)
    ex = [Example([5, 6, 7], [8, 9], "kl", group=0), Example([5, 6], [30, 31, 32], "ce", group=0),
          Example([11, 12, 13, 14], [15, 16, 17], "kl", group=1, weight=3.0), Example([5, 6, 7], [8, 9], "kl", group=1)]
    cache = TeacherCache(m, ex + [Example([40, 41], [42], "kl")], batch_size=2)
    assert len(cache) == 3  # the shared row once
    batch = collate(ex)
    grads = []
    for th in (None, cache.for_batch(ex)):
        slot = LoraSlot.create(c, 2, 4, init="random", trainable=True, generator=torch.Generator().manual_seed(1))
        loss, per = batch_loss(m, batch, AdapterBatch(slot.with_index(batch.group)), group_reduce="sum",
                               teacher_hidden=th)
        loss.backward()
        grads.append((loss.detach(), per, [p.grad.clone() for p in slot.parameters()]))
    (l0, p0, g0), (l1, p1, g1) = grads
    assert float(l0) > 0 and _rel(l1, l0) < 1e-5
    assert p0.keys() == p1.keys() and all(abs(p0[k][0] - p1[k][0]) < 1e-5 for k in p0)
    assert max(_rel(b, a) for a, b in zip(g0, g1)) < 1e-4
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        batch_loss(m, batch, None, teacher_hidden=cache.for_batch(ex[:1]))


def test_two_diffs_trained_in_one_batch_each_learn_their_own_target():
    """Diff 0 learns to answer 40 41 42, diff 1 learns 50 51 52, to the same prompt, in one batch."""
    c = tiny_config("llama")
    m = Transformer.random(c, seed=3)
    prompt = [7, 8, 9]
    targets = {0: [40, 41, 42, 2], 1: [50, 51, 52, 2]}
    slot = LoraSlot.create(c, 2, 4, init="dit", trainable=True, generator=torch.Generator().manual_seed(0))
    tr = Trainer(slot.parameters(), lr=1e-2)
    ex = [Example(prompt, targets[j], "ce", group=j) for j in (0, 1)]
    batch = collate(ex)
    for _ in range(60):
        loss, _ = batch_loss(m, batch, AdapterBatch(slot.with_index(batch.group)), group_reduce="sum")
        tr.backward(loss)
    frozen = LoraSlot(A={k: v.detach() for k, v in slot.A.items()}, B={k: v.detach() for k, v in slot.B.items()},
                      scale=slot.scale, index=torch.tensor([0, 1]))
    out = generate(m, [prompt, prompt], SamplingParams(max_new_tokens=4), adapters=AdapterBatch(frozen))
    assert out[0].token_ids == targets[0]
    assert out[1].token_ids == targets[1]
    base = generate(m, [prompt], SamplingParams(max_new_tokens=4))[0]
    assert base.token_ids != targets[0] and base.token_ids != targets[1]


def test_training_state_round_trips_and_resumes_identically(tmp_path):
    torch.manual_seed(0)
    p1 = torch.randn(3, 4, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_(True)
    t1 = Trainer([p1], lr=0.1, grad_accum=2, schedule="cosine", total_steps=10, warmup_steps=2)
    for i in range(4):
        t1.backward((p1 * (i + 1)).pow(2).sum())
    save_training_state(tmp_path / "ck", {"p": p1}, t1, {"i": 4})
    w, opt, state = load_training_state(tmp_path / "ck")
    t2 = Trainer([p2], lr=0.1, grad_accum=2, schedule="cosine", total_steps=10, warmup_steps=2)
    with torch.no_grad():
        p2.copy_(w["p"])
    t2.load_state_tensors(opt, state["optimizer"])
    assert state["meta"] == {"i": 4} and t2.step_count == t1.step_count and t2.micro == t1.micro
    for i in range(4, 9):
        t1.backward((p1 * (i + 1)).pow(2).sum())
        t2.backward((p2 * (i + 1)).pow(2).sum())
    assert torch.equal(p1, p2)


def test_non_finite_loss_stops_with_a_clear_error():
    p = torch.zeros(2, requires_grad=True)
    t = Trainer([p], lr=0.1)
    try:
        t.backward((p * float("nan")).sum())
    except FloatingPointError as e:
        assert "nan" in str(e)
    else:
        raise AssertionError("a NaN loss was accepted")
