"""Probes: captures equal what torch's own module hooks see, patching captured values back is the
identity, a patch changes nothing before its position (values and gradients), norm-matched adds
follow their formula, and generation with patched prompts equals a plain forward with the patch.

Oracles: ``register_forward_hook`` / ``register_forward_pre_hook`` on the model's modules (torch's
mechanism, not the probes' code path); the unpatched forward; a cache-free full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.generate import PromptPatch, SamplingParams, generate
from dit_engine.model import Transformer
from dit_engine.probes import Point, ProbeError, Probes, positions_mask


def _setup(kind: str = "llama", b: int = 3, t: int = 7):
    cfg = tiny_config(kind, tie_word_embeddings=False)
    m = Transformer.random(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    slot = LoraSlot.create(cfg, b, 4, init="random", generator=g, index=torch.arange(b), scale=0.5)
    return cfg, m, ids, AdapterBatch(slot)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_captures_equal_module_hooks_in_a_forward_with_adapters(kind):
    cfg, m, ids, ad = _setup(kind)
    L = cfg.num_hidden_layers
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.model.embed_tokens.register_forward_hook(lambda mod, i, o: seen.__setitem__("hidden.0", o))]
    for k, layer in enumerate(m.model.layers):
        hooks.append(layer.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(f"hidden.{k + 1}", o)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, k=k: seen.__setitem__(f"mlp.{k}", args[0])))
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 2] = mask[2, 5] = mask[2, 6] = True
    pr = Probes().capture("hidden.0").capture(f"hidden.{L}").capture("hidden.1", mask).capture("mlp.-1", mask)
    with torch.no_grad():
        m(ids, ad, probes=pr)
    for h in hooks:
        h.remove()
    d = cfg.hidden_size
    assert torch.equal(pr.captured["hidden.0"], seen["hidden.0"].reshape(-1, d))
    assert torch.equal(pr.captured[f"hidden.{L}"], seen[f"hidden.{L}"].reshape(-1, d))
    assert torch.equal(pr.captured["hidden.1"], seen["hidden.1"][mask])
    assert torch.equal(pr.captured["mlp.-1"], seen[f"mlp.{L - 1}"][mask])
    assert pr.captured["mlp.-1"].shape == (3, cfg.intermediate_size)


def test_patching_captured_values_back_is_the_identity():
    cfg, m, ids, ad = _setup()
    with torch.no_grad():
        ref = m(ids, ad)
        for point, mask in (("hidden.1", None), ("hidden.0.5", torch.rand(ids.shape) < 0.5), ("mlp.0", None)):
            cap = Probes().capture(point, mask)
            m(ids, ad, probes=cap)
            out = m(ids, ad, probes=Probes().patch(point, mask, cap.captured[point]))
            assert (out - ref).abs().max() <= 1e-5, point


def test_a_patch_changes_nothing_before_its_position_values_and_gradients():
    cfg, m, ids, _ = _setup(b=2, t=8)
    p = 4
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, p] = True
    noise = torch.randn(2, cfg.hidden_size) * 3
    with torch.no_grad():
        ref = m(ids)
        out = m(ids, probes=Probes().patch("hidden.1", mask, noise))
    assert torch.equal(out[:, :p], ref[:, :p])
    assert (out[:, p:] - ref[:, p:]).abs().amax(-1).min() > 1e-4
    # gradients: a loss on a capture at hidden.2 reaches adapters of block 0-1 only
    slot = LoraSlot.create(cfg, 1, 2, init="random", trainable=True, generator=torch.Generator().manual_seed(5))
    pr = Probes().capture("hidden.2")
    m(ids, AdapterBatch(slot.with_index(torch.zeros(2, dtype=torch.int64))), probes=pr)
    pr.captured["hidden.2"].pow(2).sum().backward()
    for name, a in slot.A.items():
        block = int(name.split(".")[2])
        assert (a.grad.abs().sum() > 0) == (block < 2), name


def test_norm_matched_add_follows_its_formula():
    cfg, m, ids, _ = _setup()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[1, 3] = mask[2, 0] = True
    v = torch.randn(2, cfg.hidden_size)
    with torch.no_grad():
        before = Probes().capture("hidden.1", mask)
        m(ids, probes=before)
        after = Probes().patch("hidden.1", mask, v, mode="add_norm").capture("hidden.1", mask)
        m(ids, probes=after)
    x = before.captured["hidden.1"]
    want = x + v * x.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True)
    assert torch.allclose(after.captured["hidden.1"], want, atol=1e-6)


def test_points_parse_relative_and_negative_depths_and_refuse_bad_ones():
    assert Point.parse("hidden.0.5", 32) == Point("hidden", 16)
    assert Point.parse("hidden.15", 32) == Point("hidden", 15)
    assert Point.parse("hidden.-1", 32) == Point("hidden", 32)
    assert Point.parse("mlp.-1", 32) == Point("mlp", 31)
    assert Point.parse("mlp.1.0", 32) == Point("mlp", 31)
    for bad, msg in (("resid.3", "expected one of"), ("hidden.33", "outside"), ("mlp.32", "outside"),
                     ("hidden.x", "not a layer number"), ("hidden.1.5", "relative depth must lie")):
        with pytest.raises(ProbeError, match=msg):
            Point.parse(bad, 32)
    cfg, m, ids, _ = _setup()
    with pytest.raises(ProbeError, match="bool mask of shape"):
        m(ids, probes=Probes().capture("hidden.1", torch.zeros(2, 2, dtype=torch.bool)))
    with pytest.raises(ProbeError, match="need values of shape"):
        m(ids, probes=Probes().patch("hidden.1", None, torch.zeros(3, cfg.hidden_size)))
    with pytest.raises(ProbeError, match="patch the same place"):
        m(ids, probes=Probes().patch("hidden.1", None, torch.zeros(21, 32)).patch("hidden.-2", None, torch.zeros(21, 32)))
    assert positions_mask([3, 5], [[0, -1], [1]], left_pad=True).tolist() == [
        [False, False, True, False, True], [False, True, False, False, False]]


def test_generate_with_patched_prompts_equals_a_full_forward_with_the_patch():
    """Two prompts of different lengths (left padding), one patched at two positions given out of
    order, one not: every greedy token equals the argmax of a cache-free forward over the prompt and
    the tokens so far with the same patch; the unpatched row equals its own unpatched generation."""
    cfg, m, _, _ = _setup()
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (6, 9)]
    vals = torch.randn(2, cfg.hidden_size, generator=g) * 2
    patch = PromptPatch("hidden.1", [4, 1], vals)
    sp = SamplingParams(max_new_tokens=5, stop_token_ids=())
    out = generate(m, prompts, sp, patches=[None, patch])
    alone = generate(m, [prompts[0]], sp)[0]
    assert out[0].token_ids == alone.token_ids
    seq = list(prompts[1])
    mask_row = [False] * len(seq)
    mask_row[1] = mask_row[4] = True
    for tok in out[1].token_ids:
        mask = torch.tensor([mask_row + [False] * (len(seq) - len(mask_row))])
        with torch.no_grad():
            logits = m(torch.tensor([seq]), probes=Probes().patch("hidden.1", mask, vals[[1, 0]]))
        assert int(logits[0, -1].argmax()) == tok
        seq.append(tok)
    plain = generate(m, [prompts[1]], sp)[0]
    assert plain.token_ids != out[1].token_ids  # the patch mattered
    with pytest.raises(ValueError, match="one point and mode"):
        generate(m, prompts, sp, patches=[patch, PromptPatch("hidden.2", [0], vals[:1])])
    with pytest.raises(ValueError, match="distinct and inside"):
        generate(m, prompts, sp, patches=[PromptPatch("hidden.1", [0, 6], vals), None])


def test_training_loss_through_a_patch_reaches_the_patched_values():
    """batch_loss with probes: patching captured values back leaves the loss unchanged, and the loss
    is differentiable in the patched values (what decoder training and steering back-propagate)."""
    from dit_engine.train import Example, batch_loss, collate

    cfg, m, _, _ = _setup()
    batch = collate([Example([3, 4, 5, 6], [7, 8], "ce"), Example([9, 10, 11], [12, 13, 14], "ce")])
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    cap = Probes().capture("hidden.1", mask)
    with torch.no_grad():
        ref, _ = batch_loss(m, batch, None, probes=cap)
    v = cap.captured["hidden.1"].clone().requires_grad_(True)
    loss, _ = batch_loss(m, batch, None, probes=Probes().patch("hidden.1", mask, v))
    assert abs(float(loss) - float(ref)) < 1e-6
    loss.backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0



@pytest.mark.parametrize("points, blocks", [(("hidden.1",), 1), (("mlp.0",), 1), (("hidden.0", "mlp.1"), 2),
                                            (("hidden.2", "hidden.0.5"), 2), (("hidden.0",), 0)])
def test_a_forward_that_stops_after_the_deepest_point_captures_what_a_full_forward_does(points, blocks):
    """output="probes": the same captures (values, and gradients into a trainable adapter) as a full
    forward, from only the blocks up to the deepest point (counted with forward hooks)."""
    cfg = tiny_config("llama", tie_word_embeddings=False, num_hidden_layers=3)
    m = Transformer.random(cfg, seed=1)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
    mask = torch.rand(ids.shape, generator=g) < 0.5
    slot = LoraSlot.create(cfg, 3, 4, init="random", generator=g, index=torch.arange(3), scale=0.5, trainable=True)
    ran = []
    hooks = [layer.register_forward_hook(lambda mod, i, o, k=k: ran.append(k))
             for k, layer in enumerate(m.model.layers)]

    def run(output):
        ran.clear()
        pr = Probes()
        for p in points:
            pr.capture(p, mask)
        out = m(ids, AdapterBatch(slot), output=output, probes=pr)
        loss = sum((v.double() ** 2).sum() for v in pr.captured.values())
        grads = torch.autograd.grad(loss, slot.parameters(), allow_unused=True) if blocks else ()
        return out, pr.captured, list(ran), grads

    out, early, ran_early, g_early = run("probes")
    _, full, ran_full, g_full = run("hidden")
    for h in hooks:
        h.remove()
    assert out is None and ran_early == list(range(blocks)) and ran_full == [0, 1, 2]
    assert set(early) == set(points)
    for p in points:
        assert torch.equal(early[p], full[p]), p
    for a, b in zip(g_early, g_full, strict=True):  # blocks past the deepest point get no gradient either way
        if a is None:
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(a is not None for a in g_early) == (blocks > 0)


def test_the_early_stopping_forward_refuses_a_cache_and_a_missing_probes():
    from dit_engine.cache import KVCache

    cfg, m, ids, _ = _setup()
    with pytest.raises(ValueError, match="give probes"):
        m(ids, output="probes")
    cache = KVCache(cfg, ids.shape[0], ids.shape[1], dtype=m.dtype)
    with pytest.raises(ValueError, match="KV cache filled for some layers only"):
        m(ids, cache=cache, output="probes", probes=Probes().capture("hidden.1"))
    assert cache.pos == 0  # refused before anything was written
