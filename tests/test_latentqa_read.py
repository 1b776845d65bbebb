"""LatentQA reading: candidate log-likelihoods through the shared-prompt KV cache equal one full
forward per (target, candidate) with the patch; generated answers equal the argmax of a patched
full forward and do not depend on the batch; ranks count ties against the truth; chance levels;
the evaluation's inputs are checked and its table prints every condition."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_world import tiny_engine

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.latentqa.data import QA, Persona
from dit_engine.latentqa.decoder import LitAdapter, decoder_prompt
from dit_engine.latentqa.dialogs import LatentQAError, dialog
from dit_engine.latentqa.read import answer, calibrate, chance, evaluate, format_table, ranks, score_candidates
from dit_engine.probes import Probes, positions_mask
from dit_engine.zoo import BaseIdentity

QUESTION = "what topic have you been trained on ?"
CANDIDATES = ["label1", "label2 label3 label4", "tell me a story .", "hello"]


def _setup():
    eng = tiny_engine(seed=2)
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(n, eng.config.hidden_size, generator=g) for n in (3, 6, 1)]
    lit = LoraSlot.create(eng.config, 1, 4, init="random", generator=g, scale=2.0, name="lit")
    return eng, values, lit


def _full_logp(eng, slot, v, candidate, write_point, mode):
    tok, m = eng.tokenizer, eng.model
    ids, pos = decoder_prompt(tok, v.shape[0], QUESTION)
    cand = tok.encode(candidate) + [tok.end_of_turn_id]
    seq = ids + cand
    mask = positions_mask([len(seq)], [pos])
    ad = AdapterBatch(slot.with_index(torch.zeros(1, dtype=torch.int64))) if slot is not None else None
    with torch.no_grad():
        logits = m(torch.tensor([seq]), ad, probes=Probes().patch(write_point, mask, v, mode))[0]
    lp = torch.log_softmax(logits.double(), -1)
    return float(sum(lp[len(ids) - 1 + j, t] for j, t in enumerate(cand)))


@pytest.mark.parametrize("with_adapter, mode", [(True, "replace"), (False, "replace"), (True, "add_norm")])
def test_cached_candidate_scores_equal_a_full_forward_per_candidate(with_adapter, mode):
    eng, values, lit = _setup()
    slot = lit if with_adapter else None
    got = score_candidates(eng, slot, values, QUESTION, CANDIDATES, write_point="hidden.1", mode=mode, batch_size=8)
    assert got.shape == (3, 4)  # batch_size 8 over 4 candidates: two targets per forward, then one
    for i, v in enumerate(values):
        for j, c in enumerate(CANDIDATES):
            assert abs(float(got[i, j]) - _full_logp(eng, slot, v, c, "hidden.1", mode)) < 1e-4, (i, j)
    again = score_candidates(eng, slot, values, QUESTION, CANDIDATES, write_point="hidden.1", mode=mode)
    torch.testing.assert_close(again, got, rtol=0, atol=1e-5)  # one forward for all: the same scores


def test_answers_are_the_argmax_of_a_patched_forward_and_do_not_depend_on_the_batch():
    eng, values, lit = _setup()
    tok, m = eng.tokenizer, eng.model
    texts = answer(eng, lit, values, QUESTION, write_point="hidden.1", max_new_tokens=4, batch_size=8)
    alone = [answer(eng, lit, [v], QUESTION, write_point="hidden.1", max_new_tokens=4)[0] for v in values]
    assert texts == alone
    ids, pos = decoder_prompt(tok, values[1].shape[0], QUESTION)
    ad = AdapterBatch(lit.with_index(torch.zeros(1, dtype=torch.int64)))
    with torch.no_grad():
        logits = m(torch.tensor([ids]), ad, probes=Probes().patch("hidden.1", positions_mask([len(ids)], [pos]),
                                                                  values[1]))
    first = int(logits[0, -1].argmax())
    if first != tok.end_of_turn_id:
        assert texts[1].split()[0] == tok.decode([first])
    untrained = answer(eng, None, values, QUESTION, write_point="hidden.1", max_new_tokens=4)
    assert untrained != texts


def test_ranks_count_ties_against_the_truth_and_chance_is_a_uniform_ranking():
    s = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 5.0, 5.0]])
    assert ranks(s, [0, 0, 1]).tolist() == [1, 2, 2]
    c = chance(4)
    assert c["retrieval@1"] == 0.25 and c["retrieval@5"] == 1.0
    assert c["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert chance(10)["retrieval@5"] == 0.5


def test_calibration_removes_what_a_candidate_scores_whatever_is_read():
    """A prior that favours candidate 0 everywhere hides a signal on the diagonal; calibration
    (each candidate's mean over the rows removed) finds it, and is blind to such column offsets."""
    signal = torch.eye(4) * 1.0
    prior = torch.tensor([5.0, 0.0, 0.0, 0.0])
    raw = signal + prior
    truth = [0, 1, 2, 3]
    assert ranks(raw, truth).tolist() == [1, 2, 2, 2]
    assert ranks(calibrate(raw), truth).tolist() == [1, 1, 1, 1]
    assert torch.allclose(calibrate(raw), calibrate(signal).to(torch.float64))
    assert torch.allclose(calibrate(raw).mean(0), torch.zeros(4, dtype=torch.float64))
    # identical rows (a decoder that ignores what it reads) calibrate to ties: rank last, never lucky
    assert ranks(calibrate(prior.repeat(4, 1)), truth).tolist() == [4, 4, 4, 4]


def test_evaluate_reports_calibrated_ranks_and_the_uncalibrated_beside_them(monkeypatch):
    import dit_engine.latentqa.read as read_mod

    eng, _, lit = _setup()
    tok = eng.tokenizer
    adapter = LitAdapter(lit, "hidden.0.5", "hidden.1", "replace",
                         dataclasses.asdict(BaseIdentity.from_model(eng.model)))
    ps = [Persona(f"p{i}", f"label{i}", "c", f"say label{i}", "test", (QA(QUESTION, f"label{i}"),)) for i in range(3)]
    ds = [dialog(tok, p, "say hello", tok.encode(f"label{i} hello")) for i, p in enumerate(ps)]
    fixed = torch.eye(3) + torch.tensor([4.0, 0.0, 0.0])  # the truth on the diagonal under a prior for p0
    monkeypatch.setattr(read_mod, "score_candidates", lambda *a, **k: fixed.clone())
    res = evaluate(eng, adapter, ds, ps, question=QUESTION, max_new_tokens=2, resamples=20,
                   conditions=("decoder", "zero"))
    assert res["conditions"]["decoder"]["retrieval@1"] == 1.0  # calibrated: every persona found
    assert res["uncalibrated"]["decoder"]["retrieval@1"] == pytest.approx(1 / 3)  # raw: only p0
    assert res["decoder_minus"]["zero"]["retrieval@1"] == 0.0 and "zero" in res["decoder_minus_uncalibrated"]
    assert "uncalibrated retrieval@1: decoder 0.333, zero 0.333" in format_table(res)


def test_evaluate_checks_its_inputs_and_its_table_prints_every_condition():
    eng, _, lit = _setup()
    tok = eng.tokenizer
    adapter = LitAdapter(lit, "hidden.0.5", "hidden.1", "replace",
                         dataclasses.asdict(BaseIdentity.from_model(eng.model)))
    ps = [Persona(f"p{i}", f"label{i}", "c", f"say label{i}", "test", (QA(QUESTION, f"label{i}"),)) for i in range(3)]
    ds = [dialog(tok, p, msg, tok.encode(f"label{i} hello")) for i, p in enumerate(ps)
          for msg in ("tell me a story", "say hello")]
    res = evaluate(eng, adapter, ds, ps, question=QUESTION, max_new_tokens=3, resamples=50)
    assert set(res["conditions"]) == {"decoder", "zero", "shuffled", "untrained"}
    assert set(res["decoder_minus"]) == {"zero", "shuffled", "untrained"}
    assert res["n_dialogs"] == 6 and res["n_personas"] == 3 and len(res["answers"]) == 6
    for m in res["conditions"].values():
        lo, hi = m["retrieval@1_ci"]
        assert 0 <= lo <= m["retrieval@1"] <= hi <= 1
    table = format_table(res)
    for word in ("decoder", "zero", "shuffled", "untrained", "chance", "retrieval@1", "mrr", "naming the persona"):
        assert word in table
    with pytest.raises(LatentQAError, match="at least 2 personas"):
        evaluate(eng, adapter, ds[:2], ps, question=QUESTION)
    with pytest.raises(LatentQAError, match="unknown personas"):
        evaluate(eng, adapter, ds, ps[:2], question=QUESTION)
    with pytest.raises(LatentQAError, match="must include 'decoder'"):
        evaluate(eng, adapter, ds, ps, question=QUESTION, conditions=("zero",))
    only = evaluate(eng, adapter, ds, ps, question=QUESTION, conditions=("decoder", "zero"), max_new_tokens=2,
                    resamples=20)
    assert set(only["conditions"]) == {"decoder", "zero"}
