"""Batched generation and scoring: a padded batch behaves like one prompt at a time, stops are exact,
sampling is reproducible and its filters keep only the allowed tokens, and ``score`` equals the
log-softmax of a plain full forward.

Oracles: the model run on one unpadded sequence without a cache (greedy argmax of each step is
recomputed from scratch), and for adapters a model whose weights are merged ``W + scale * B @ A``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.config import ModelConfig
from dit_engine.generate import SamplingParams, _sample_top_p, generate, score
from dit_engine.model import Transformer

_NO_STOP = ()  # stop_token_ids that never fire, so rows run to max_new_tokens


def _cfg(model_type: str = "llama", **overrides) -> ModelConfig:
    """Untied embeddings: a tied random model mostly repeats its last token, a weak greedy test."""
    return tiny_config(model_type, **{"tie_word_embeddings": False, **overrides})


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def family_cfg(request) -> ModelConfig:
    return _cfg(request.param)


def _model(config: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer.random(config, seed=seed)


def _prompts(config: ModelConfig, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _decode(ids: list[int]) -> str:
    """A tiny detokenizer: one lowercase letter per id."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_token_ids=kw.pop("stop_token_ids", _NO_STOP), **kw)


def _full_logprobs(model: Transformer, seq: list[int], adapters: AdapterBatch | None = None) -> torch.Tensor:
    """log_softmax of the plain forward over one whole sequence: [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq]), adapters)[0].double(), -1)


def _slots(cfg: ModelConfig, index0: list[int]) -> AdapterBatch:
    g = torch.Generator().manual_seed(3)
    s0 = LoraSlot.create(cfg, 3, 4, init="random", generator=g, index=torch.tensor(index0), scale=0.5)
    n = len(index0)
    s1 = LoraSlot.create(cfg, 1, 2, init="random", generator=g, targets=("q_proj", "up_proj"),
                         index=torch.zeros(n, dtype=torch.int64), scale=0.8)
    return AdapterBatch(s0, s1)


def _merged(model: Transformer, adapters: AdapterBatch, row: int) -> Transformer:
    st = {k: v.clone().double() for k, v in model.state_dict().items()}
    for slot in adapters.slots:
        a = int(slot.index[row])
        if a < 0:
            continue
        for name in slot.A:
            st[name + ".weight"] += slot.scale[a].double() * (slot.B[name][a].double() @ slot.A[name][a].double())
    m = Transformer(model.config)
    m.load_state_dict({k: v.float() for k, v in st.items()})
    return m.eval().requires_grad_(False)


# ---- padded batch == one prompt at a time -------------------------------------------------------


def test_padded_batch_equals_one_prompt_at_a_time(family_cfg):
    cfg = family_cfg
    m = _model(cfg)
    prompts = _prompts(cfg, [3, 11, 1, 7, 5])
    params = _greedy(8)
    batched = generate(m, prompts, params, batch_size=3)  # two chunks, sorted by length inside
    for p, g in zip(prompts, batched):
        alone = generate(m, [p], params)[0]
        assert g.prompt_ids == p
        assert g.token_ids == alone.token_ids
        assert g.finish_reason == alone.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5)


def test_greedy_tokens_are_the_argmax_of_a_full_recompute():
    cfg = _cfg("qwen3")
    m = _model(cfg)
    prompt = _prompts(cfg, [6])[0]
    g = generate(m, [prompt], _greedy(6))[0]
    seq = list(prompt)
    for tok in g.token_ids:
        assert tok == int(m(torch.tensor([seq]))[0, -1].argmax())
        seq.append(tok)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_padded_batch_with_per_row_adapters_equals_merged_model_alone(model_type):
    cfg = _cfg(model_type)
    m = _model(cfg)
    prompts = _prompts(cfg, [4, 9, 2, 6], seed=1)
    index0 = [2, -1, 0, 1]
    ad = _slots(cfg, index0)
    params = _greedy(6)
    batched = generate(m, prompts, params, adapters=ad, batch_size=3)
    plain = generate(m, prompts, params)
    for i, (p, g) in enumerate(zip(prompts, batched)):
        assert g.token_ids == generate(_merged(m, ad, i), [p], params)[0].token_ids, i
        assert g.token_ids == generate(m, [p], params, adapters=ad.select_rows(torch.tensor([i])))[0].token_ids
    # The adapters change what is generated (otherwise the comparison above proves nothing).
    assert any(g.token_ids != q.token_ids for g, q in zip(batched, plain))


# ---- stopping -----------------------------------------------------------------------------------


def test_eos_stops_each_row_at_its_first_stop_token():
    cfg = _cfg("llama")
    m = _model(cfg)
    prompts = _prompts(cfg, [5, 3, 8, 4], seed=2)
    free = generate(m, prompts, _greedy(12))
    stop = next(t for t in free[0].token_ids[2:] if t not in free[0].token_ids[:2])
    stopped = generate(m, prompts, _greedy(12, stop_token_ids=(stop, 96)))
    for f, s in zip(free, stopped):
        hits = [k for k, t in enumerate(f.token_ids) if t in (stop, 96)]
        if hits:
            assert s.token_ids == f.token_ids[: hits[0] + 1]  # the stop token is kept
            assert s.finish_reason == "eos"
        else:
            assert s.token_ids == f.token_ids
            assert s.finish_reason == "length"
        assert s.logprobs == pytest.approx(f.logprobs[: len(s.token_ids)], abs=1e-5)
    assert stopped[0].finish_reason == "eos" and len(stopped[0].token_ids) >= 3


def test_default_stop_tokens_come_from_the_config():
    cfg = _cfg("qwen2")
    m = _model(cfg)
    prompt = _prompts(cfg, [5], seed=3)[0]
    free = generate(m, [prompt], _greedy(10))[0].token_ids
    k = next(k for k in range(1, len(free)) if free[k] not in free[:k])
    cfg_eos = _cfg("qwen2", eos_token_id=[free[k], 95])
    m_eos = Transformer.random(cfg_eos, seed=0)  # same weights: eos does not shape parameters
    g = generate(m_eos, [prompt], SamplingParams(max_new_tokens=10))[0]
    assert g.token_ids == free[: k + 1]
    assert g.finish_reason == "eos"


def test_stop_strings_cut_generation_and_text():
    cfg = _cfg("llama")
    m = _model(cfg)
    prompts = _prompts(cfg, [4, 7], seed=4)
    free = generate(m, prompts, _greedy(12), decode=_decode)
    stop = free[0].text[4:6]
    assert len(stop) == 2 and free[0].text == _decode(free[0].token_ids)
    got = generate(m, prompts, _greedy(12, stop_strings=(stop,)), decode=_decode)
    for f, g in zip(free, got):
        ks = [k for k in range(1, len(f.token_ids) + 1) if stop in _decode(f.token_ids[:k])]
        if ks:
            assert g.token_ids == f.token_ids[: ks[0]]
            assert g.finish_reason == "stop"
            full = _decode(g.token_ids)
            assert g.text == full[: full.find(stop)]
        else:
            assert g.token_ids == f.token_ids and g.finish_reason == "length"
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 6


def test_stop_strings_need_a_decode_function():
    cfg = _cfg()
    with pytest.raises(ValueError, match="stop_strings need a decode function"):
        generate(_model(cfg), [[1, 2]], _greedy(3, stop_strings=("x",)))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_max_new_tokens_is_exact(n):
    cfg = _cfg("qwen3")
    gens = generate(_model(cfg), _prompts(cfg, [3, 6]), _greedy(n))
    for g in gens:
        assert len(g.token_ids) == len(g.logprobs) == n
        assert g.finish_reason == "length"


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        SamplingParams(max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        SamplingParams(top_p=0.0)


# ---- sampling -----------------------------------------------------------------------------------


def _sampled(m, prompts, seed, **kw):
    return [g.token_ids for g in generate(m, prompts, _greedy(16, temperature=1.0, seed=seed, **kw))]


def test_sampling_is_reproducible_with_a_seed():
    cfg = _cfg()
    m = _model(cfg)
    prompts = _prompts(cfg, [3, 5, 2], seed=5)
    a, b, c = _sampled(m, prompts, 123), _sampled(m, prompts, 123), _sampled(m, prompts, 124)
    assert a == b
    assert a != c  # near-uniform 97-way draws over 48 tokens: a different seed must differ somewhere
    assert a != [g.token_ids for g in generate(m, prompts, _greedy(16))]


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "top_p=tiny"])
def test_degenerate_filters_equal_greedy(kw):
    cfg = _cfg("qwen2")
    m = _model(cfg)
    prompts = _prompts(cfg, [4, 8], seed=6)
    greedy = [g.token_ids for g in generate(m, prompts, _greedy(10))]
    got = generate(m, prompts, _greedy(10, temperature=1.0, seed=7, **kw))
    assert [g.token_ids for g in got] == greedy


def test_top_k_samples_only_among_the_k_most_likely():
    cfg = _cfg("llama")
    m = _model(cfg)
    prompt = _prompts(cfg, [5], seed=8)[0]
    g = generate(m, [prompt], _greedy(20, temperature=2.0, top_k=3, seed=9))[0]
    lp = _full_logprobs(m, prompt + g.token_ids)
    for k, tok in enumerate(g.token_ids):
        top3 = torch.topk(lp[len(prompt) - 1 + k], 3).indices.tolist()
        assert tok in top3, k
    assert len(set(g.token_ids)) > 1  # temperature 2 over 3 candidates: not a greedy run in disguise


def test_top_p_samples_only_inside_the_nucleus():
    cfg = _cfg("qwen3")
    m = _model(cfg)
    prompt = _prompts(cfg, [5], seed=10)[0]
    top_p = 0.3
    g = generate(m, [prompt], _greedy(20, temperature=1.0, top_p=top_p, seed=11))[0]
    lp = _full_logprobs(m, prompt + g.token_ids)
    for k, tok in enumerate(g.token_ids):
        p = lp[len(prompt) - 1 + k].exp()
        # Inside the nucleus: the mass of strictly more likely tokens is below top_p.
        assert float(p[p > p[tok]].sum()) < top_p + 1e-9, k


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_sampler_draws_the_renormalised_nucleus_of_a_wide_distribution(top_p):
    """The CPU sampler's candidates come from a growing top-k: with a nucleus inside the first top-k or
    of thousands of tokens past it, it must draw exactly the nucleus, renormalised. Reference:
    the nucleus from a full sort, and a chi-square test of 20000 draws against its probabilities."""
    v, n = 5000, 20000
    g = torch.Generator().manual_seed(0)
    probs = 1.0 / (torch.arange(v, dtype=torch.float64) + 10.0)
    probs = (probs / probs.sum())[torch.randperm(v, generator=g)].float()
    sp, si = torch.sort(probs.double(), descending=True)
    inside = si[(sp.cumsum(0) - sp) <= top_p]  # the reference nucleus
    assert (len(inside) > 256) == (top_p > 0.5)  # 0.9, 0.99: past the first top-k, which must grow
    draws = _sample_top_p(probs.expand(n, v), top_p, torch.Generator().manual_seed(1))
    assert torch.isin(draws, inside).all()
    p = probs.double()[inside] / probs.double()[inside].sum()
    counts = torch.bincount(draws, minlength=v).double()[inside]
    head = p * n >= 20  # cells large enough for the chi-square approximation; the tail pooled
    obs = torch.cat([counts[head], counts[~head].sum()[None]])
    exp = torch.cat([p[head], p[~head].sum()[None]]) * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ~5 sigma


def test_nucleus_sampler_keeps_the_token_that_crosses_top_p():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]]).expand(2000, 4)  # nucleus at 0.65: 0.4 and 0.3 (0.4 < 0.65)
    draws = _sample_top_p(probs, 0.65, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}
    assert abs(float((draws == 1).double().mean()) - 4 / 7) < 0.05


# ---- scoring ------------------------------------------------------------------------------------


def test_score_equals_log_softmax_of_full_forward(family_cfg):
    cfg = family_cfg
    m = _model(cfg)
    seqs = _prompts(cfg, [6, 2, 9], seed=12)
    plens = [2, 1, 5]
    scores = score(m, seqs, prompt_lengths=plens, batch_size=2)
    for s, seq, p in zip(scores, seqs, plens):
        lp = _full_logprobs(m, seq)
        want = [float(lp[k - 1, seq[k]]) for k in range(p, len(seq))]
        assert s.token_ids == seq[p:]
        assert s.logprobs == pytest.approx(want, abs=1e-5)
        assert s.total == pytest.approx(sum(want), abs=1e-4)
    default = score(m, seqs)  # without prompt lengths every token after the first is scored
    assert [d.token_ids for d in default] == [q[1:] for q in seqs]


def test_score_with_adapters_equals_merged_model():
    cfg = _cfg("qwen2")
    m = _model(cfg)
    seqs = _prompts(cfg, [5, 7, 3], seed=13)
    ad = _slots(cfg, [1, -1, 2])
    scores = score(m, seqs, adapters=ad, prompt_lengths=[1, 3, 2])
    for i, (s, seq) in enumerate(zip(scores, seqs)):
        lp = _full_logprobs(_merged(m, ad, i), seq)
        p = [1, 3, 2][i]
        assert s.logprobs == pytest.approx([float(lp[k - 1, seq[k]]) for k in range(p, len(seq))], abs=1e-5)


@pytest.mark.parametrize("with_adapters", [False, True])
def test_score_of_a_generation_equals_its_logprobs(with_adapters):
    cfg = _cfg("qwen3")
    m = _model(cfg)
    prompts = _prompts(cfg, [3, 6, 4], seed=14)
    ad = _slots(cfg, [0, 2, -1]) if with_adapters else None
    gens = generate(m, prompts, _greedy(8, temperature=1.0, seed=15), adapters=ad)
    scores = score(m, [p + g.token_ids for p, g in zip(prompts, gens)], prompt_lengths=[len(p) for p in prompts],
                   adapters=ad)
    for g, s in zip(gens, scores):
        assert s.token_ids == g.token_ids
        assert s.logprobs == pytest.approx(g.logprobs, abs=1e-5)


# ---- errors and bookkeeping ---------------------------------------------------------------------


def test_prompt_longer_than_context_errors_clearly():
    cfg = _cfg()
    m = _model(cfg)
    long = [1] * cfg.max_position_embeddings
    with pytest.raises(ValueError, match=r"prompt 1 has 128 tokens; the model's context is 128 tokens"):
        generate(m, [[1, 2], long], _greedy(2))


def test_empty_prompt_errors_clearly():
    cfg = _cfg()
    with pytest.raises(ValueError, match=r"prompt 0 is empty"):
        generate(_model(cfg), [[], [3]], _greedy(2))


def test_score_rejects_bad_sequences():
    cfg = _cfg()
    m = _model(cfg)
    with pytest.raises(ValueError, match=r"sequence 0 has 129 tokens; the model's context is 128"):
        score(m, [[1] * 129])
    with pytest.raises(ValueError, match=r"sequence 0: prompt length 4 outside \[1, 3\]"):
        score(m, [[1, 2, 3]], prompt_lengths=[4])
    with pytest.raises(ValueError, match=r"1 prompt lengths for 2 sequences"):
        score(m, [[1, 2], [3, 4]], prompt_lengths=[1])


def test_progress_counts_every_prompt_once():
    cfg = _cfg()
    m = _model(cfg)
    prompts = _prompts(cfg, [2, 5, 3, 4, 6], seed=16)
    free = generate(m, prompts, _greedy(6))
    stop = free[1].token_ids[1]
    seen: list[int] = []
    generate(m, prompts, _greedy(6, stop_token_ids=(stop,)), batch_size=2, progress=seen.append)
    assert sum(seen) == len(prompts) and all(n > 0 for n in seen)


def test_batch_composition_does_not_change_results_near_the_context_limit():
    cfg = _cfg()  # context 128
    m = _model(cfg)
    short, long = _prompts(cfg, [5, 120], seed=17)
    params = _greedy(20)
    alone = generate(m, [short], params)[0]
    together = generate(m, [short, long], params)[0]
    assert len(alone.token_ids) == 20
    assert together.token_ids == alone.token_ids


def test_the_api_refuses_what_the_cli_refuses():
    """Bad sampling values and batch sizes are one clear ValueError at the API too, not a failure deep
    inside sampling (a NaN temperature) or a silently accepted value (a negative top_k)."""
    from tiny_world import tiny_engine

    eng = tiny_engine()
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        SamplingParams(top_k=-5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        eng.generate(["hello"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        eng.score(["hello"], batch_size=0)
    with pytest.raises(ValueError, match=r"text 1 \('hello'\) has no token to score"):
        eng.score(["say it", "hello"])
    with pytest.raises(ValueError, match=r"text 0 \(''\) has no token to score \(after its prompt\)"):
        eng.score([""], prompts=["hello"])


# ---- identical prompts prefill once ---------------------------------------------------------------


def _prefill_rows(monkeypatch, m: Transformer) -> list[int]:
    """Records the batch size of every multi-token forward (the prefills) of ``m``."""
    rows: list[int] = []
    forward = Transformer.forward

    def spy(self, input_ids, *a, **kw):
        if input_ids.shape[1] > 1:
            rows.append(input_ids.shape[0])
        return forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(Transformer, "forward", spy)
    return rows


def test_samples_of_one_prompt_share_its_prefill_and_equal_unshared_sampling(monkeypatch):
    import dit_engine.generate as gen_mod

    cfg = _cfg("qwen3")
    m = _model(cfg)
    p, q = _prompts(cfg, [5, 7], seed=8)
    prompts = [p, q, p, p, q]
    params = _greedy(12, temperature=1.0, seed=9)
    rows = _prefill_rows(monkeypatch, m)
    shared = generate(m, prompts, params)
    assert rows == [2]  # one prefill row per distinct prompt
    monkeypatch.setattr(gen_mod, "_shared_prefill", lambda *a: None)
    unshared = generate(m, prompts, params)
    assert rows == [2, 5]
    for a, b in zip(shared, unshared):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    # Each sample is its own draw: the three samples of p do not all repeat one sequence.
    assert len({tuple(shared[i].token_ids) for i in (0, 2, 3)}) > 1


def test_one_prompt_under_different_adapters_is_not_shared(monkeypatch):
    cfg = _cfg("llama")
    m = _model(cfg)
    p = _prompts(cfg, [6], seed=10)[0]
    ad = _slots(cfg, [0, 1, 0, -1])
    rows = _prefill_rows(monkeypatch, m)
    got = generate(m, [p] * 4, _greedy(6), adapters=ad)
    assert rows == [3]  # rows 0 and 2 share (same prompt, same adapters); 1 and 3 differ in adapter
    for i in range(4):
        assert got[i].token_ids == generate(_merged(m, ad, i), [p], _greedy(6))[0].token_ids, i
