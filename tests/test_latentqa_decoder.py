"""The LatentQA decoder: its placeholder and prompt come from the tokenizer and template; the loss
of ``batch_loss`` with the patch equals a cross-entropy computed by hand from a forward whose
block-0 output is overwritten by a torch module hook (not the probes' code path); the LIT adapter
file round-trips, names its base and refuses what is not one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_world import tiny_engine

import dit_engine.latentqa.decoder as decoder_mod
from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.latentqa.decoder import (PLACEHOLDER_TEXT, LitAdapter, decoder_batch, decoder_prompt, placeholder_id,
                                         reading)
from dit_engine.latentqa.dialogs import LatentQAError
from dit_engine.train import batch_loss
from dit_engine.zoo import BaseIdentity

QUESTION = "what topic have you been trained on ?"


def test_the_placeholder_and_the_prompt_come_from_the_tokenizer_and_template(monkeypatch):
    tok = tiny_engine().tokenizer
    ph = placeholder_id(tok)
    assert [ph] == tok.encode(PLACEHOLDER_TEXT) and tok.id_to_token(ph) == "?"
    ids, pos = decoder_prompt(tok, 5, QUESTION)
    assert pos == list(range(pos[0], pos[0] + 5)) and all(ids[p] == ph for p in pos)
    rest = ids[: pos[0]] + ids[pos[-1] + 1 :]
    assert rest == tok.encode_chat([{"role": "user", "content": QUESTION}])  # the run sits before the question
    assert tok.decode(ids, skip_special_tokens=False).split() == (
        ["<|im_start|>", "user"] + ["?"] * 5 + QUESTION.split() + ["<|im_end|>", "<|im_start|>", "assistant"])
    r = reading(tok, 3, QUESTION, "label7")
    assert r.target_ids == [tok.token_to_id("label7"), tok.end_of_turn_id] and len(r.positions) == 3
    with pytest.raises(LatentQAError, match="at least one activation"):
        decoder_prompt(tok, 0, QUESTION)
    monkeypatch.setattr(decoder_mod, "PLACEHOLDER_TEXT", "? ?")
    with pytest.raises(LatentQAError, match="encodes to 2 tokens"):
        placeholder_id(tok)


@pytest.mark.parametrize("write_at, mode", [(1, "replace"), (0, "replace"), (1, "add_norm")])
def test_the_patched_decoder_loss_equals_a_cross_entropy_computed_by_hand(write_at, mode):
    """Three rows of different lengths (right padding), random LIT adapter: batch_loss's loss is the
    mean over rows of each row's mean token cross-entropy over answer + end-of-turn, from logits of
    a forward where a module hook writes the values over the placeholders."""
    eng = tiny_engine(seed=3)
    tok, m, cfg = eng.tokenizer, eng.model, eng.config
    g = torch.Generator().manual_seed(0)
    readings = [reading(tok, n, QUESTION, a) for n, a in ((4, "label1"), (7, "label2 label3"), (2, "story"))]
    values = [torch.randn(len(r.positions), cfg.hidden_size, generator=g) for r in readings]
    lit = LoraSlot.create(cfg, 1, 4, init="random", generator=g, scale=2.0, name="lit")
    batch, probes = decoder_batch(readings, values, f"hidden.{write_at}", mode, pad_id=tok.pad_token_id)
    ad = AdapterBatch(lit.with_index(torch.zeros(3, dtype=torch.int64)))
    with torch.no_grad():
        loss, groups = batch_loss(m, batch, ad, group_reduce="mean", probes=probes)

    per_row = []
    for r, v in zip(readings, values):
        seq = torch.tensor([r.prompt_ids + r.target_ids])
        pos = torch.tensor(r.positions)

        def write(x):
            x = x.clone()
            if mode == "replace":
                x[0, pos] = v
            else:
                old = x[0, pos]
                x[0, pos] = old + v * old.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True)
            return x

        module = m.model.layers[write_at - 1] if write_at else m.model.embed_tokens
        hook = module.register_forward_hook(lambda mod, i, o: write(o))
        with torch.no_grad():
            logits = m(seq, AdapterBatch(lit.with_index(torch.zeros(1, dtype=torch.int64))))[0]
        hook.remove()
        p = len(r.prompt_ids)
        per_row.append(F.cross_entropy(logits[p - 1 : -1], torch.tensor(r.target_ids)))
    want = torch.stack(per_row).mean()
    assert abs(float(loss) - float(want)) < 1e-5
    assert [round(groups[i][0], 4) for i in range(3)] == [round(float(x), 4) for x in per_row]
    # the values matter: other values, another loss
    _, other = decoder_batch(readings, [v * 0 for v in values], f"hidden.{write_at}", mode, pad_id=tok.pad_token_id)
    with torch.no_grad():
        assert abs(float(batch_loss(m, batch, ad, probes=other)[0]) - float(loss)) > 1e-4
    with pytest.raises(LatentQAError, match="need values of shape"):
        decoder_batch(readings, [values[1], values[1], values[2]], "hidden.1")


def test_the_lit_adapter_round_trips_names_its_base_and_refuses_other_files(tmp_path):
    eng = tiny_engine()
    slot = LoraSlot.create(eng.config, 1, 4, init="random", generator=torch.Generator().manual_seed(1), scale=2.0)
    base = BaseIdentity.from_model(eng.model)
    a = LitAdapter(slot, "hidden.0.5", "hidden.1", "replace", {"name": base.name, "config_hash": base.config_hash,
                                                               "weights_fingerprint": base.weights_fingerprint},
                   {"note": 1})
    a.save(tmp_path / "lit")
    b = LitAdapter.load(tmp_path / "lit")
    assert (b.read_point, b.write_point, b.patch_mode, b.recipe) == ("hidden.0.5", "hidden.1", "replace", {"note": 1})
    assert all(torch.equal(b.slot.A[k], slot.A[k]) and torch.equal(b.slot.B[k], slot.B[k]) for k in slot.A)
    assert float(b.slot.scale[0]) == 2.0
    b.check_base(base)
    other = BaseIdentity.from_model(tiny_engine(seed=1).model)
    with pytest.raises(LatentQAError, match="trained on base"):
        b.check_base(other)
    with pytest.raises(FileNotFoundError, match="not a LatentQA adapter directory"):
        LitAdapter.load(tmp_path / "nowhere")
    meta = json.loads((tmp_path / "lit" / "adapter.json").read_text())
    (tmp_path / "lit" / "adapter.json").write_text(json.dumps(meta | {"format": "dit-engine-adapter/1"}))
    with pytest.raises(LatentQAError, match="expected 'dit-engine-lit-adapter/1'"):
        LitAdapter.load(tmp_path / "lit")
    (tmp_path / "lit" / "adapter.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "read_point"}))
    with pytest.raises(LatentQAError, match="unreadable LatentQA adapter"):
        LitAdapter.load(tmp_path / "lit")
