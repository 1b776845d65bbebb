"""Model-backed FIND functions on the tiny model: a neuron's max activation and a diff's KL match
computations done here without the probes or the batching; a zero diff moves nothing; the LM
agent probes them; descriptions are scored by label retrieval."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_world import tiny_engine

from dit_engine.config import TARGET_MODULES
from dit_engine.find.lm_agent import LMAgent
from dit_engine.find.model_backed import AskAgent, DiffBox, NeuronBox
from dit_engine.find.score import retrieval
from dit_engine.find.suite import BudgetExceeded
from dit_engine.zoo import Diff


@pytest.fixture(scope="module")
def eng():
    return tiny_engine(seed=1, max_position_embeddings=512)


def _diff(eng, scale=2.0, zero=False) -> Diff:
    g = torch.Generator().manual_seed(0)
    shapes = eng.config.linear_shapes()
    A, B = {}, {}
    for m in eng.config.module_names(TARGET_MODULES):
        d_in, d_out = shapes[m.rsplit(".", 1)[1]]
        A[m] = torch.randn(2, d_in, generator=g)
        B[m] = torch.zeros(d_out, 2) if zero else torch.randn(d_out, 2, generator=g)
    return Diff(id="d0", A=A, B=B, scale=scale, labels={"topic": "label3"})


def test_neuron_box_is_the_max_of_the_down_proj_input(eng):
    layer, unit = 1, 5
    texts = ["hello tell me a story", "what topic", "you have been trained on code ."]
    got = NeuronBox(eng, layer, unit)(texts)
    seen = []
    hook = eng.model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        want = []
        for t in texts:  # one text per forward: no padding, no probes
            seen.clear()
            eng.model(torch.tensor([eng.tokenizer.encode(t)]))
            want.append(float(seen[0][0, :, unit].max()))
    finally:
        hook.remove()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_neuron_box_refuses_a_neuron_outside_the_model(eng):
    with pytest.raises(ValueError, match="outside the model"):
        NeuronBox(eng, 99, 0)


def test_diff_box_kl_matches_a_single_prompt_computation(eng):
    prompts = ["hello", "tell me a story about code ."]
    box = DiffBox(eng, _diff(eng), mode="kl")
    got = box(prompts)
    from dit_engine.adapters import AdapterBatch
    from dit_engine.dit.interpret import diff_slot
    want = []
    for p in prompts:
        ids = torch.tensor([eng.encode_prompt(p)])
        base = eng.model(ids)[0, -1].double().log_softmax(-1)
        tuned = eng.model(ids, AdapterBatch(diff_slot(_diff(eng), 1)))[0, -1].double().log_softmax(-1)
        want.append(float((tuned.exp() * (tuned - base)).sum()))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6) and min(got) > 0
    assert DiffBox(eng, _diff(eng, zero=True), mode="kl")(prompts) == pytest.approx([0.0, 0.0], abs=1e-6)
    assert box.calls == 2


def test_diff_box_text_mode_and_budget(eng):
    box = DiffBox(eng, _diff(eng), mode="text", budget=3, max_new_tokens=4)
    out = box(["hello", "what topic"])
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    with pytest.raises(BudgetExceeded):
        box(["a", "b"])
    with pytest.raises(ValueError, match="non-empty strings"):
        DiffBox(eng, _diff(eng))([""])
    with pytest.raises(ValueError, match="mode must be"):
        DiffBox(eng, _diff(eng), mode="logits")


def test_agents_probe_a_diff_and_descriptions_are_scored_by_retrieval(eng):
    box = DiffBox(eng, _diff(eng), mode="text", max_new_tokens=4)
    (ask,) = AskAgent().run([box])
    assert ask.calls == len(AskAgent.QUESTIONS) and len(ask.transcript) == 3

    @dataclasses.dataclass
    class G:
        text: str

    class Scripted:
        config = eng.config

        def encode_prompt(self, msgs):
            return [0] * 10

        def generate(self, chats, **kw):
            return [G('CALL: "hello", "what topic"') if len(c) == 1 else G("DESCRIPTION: label3") for c in chats]

    box2 = DiffBox(eng, _diff(eng), mode="kl")
    (lm,) = LMAgent(Scripted(), rounds=2).run([box2])
    assert "hidden topic" in lm.transcript[0]["content"] and lm.calls == 2 and lm.description == "label3"
    assert lm.transcript[2]["content"].startswith("f('hello') = ")
    cands = [f"label{i}" for i in range(8)]
    res = retrieval({"a": lm.description, "b": "label5 for sure"}, {"a": "label3", "b": "label6"}, cands)
    assert res["ranks"]["a"] == 1 and res["ranks"]["b"] > 1 and res["retrieval@1"] == 0.5
    with pytest.raises(ValueError, match="missing from the candidates"):
        retrieval({"a": "x"}, {"a": "label99"}, cands)
