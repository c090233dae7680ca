"""Picking tokens inside the static step: the sync-free draw, the Sampling spec, a sampling
StaticDecoder (eager and compiled) and generate's use of it."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from conftest import spy_decoders
from qkvlab import GPT, GPTConfig
from qkvlab.errors import ConfigError
from qkvlab.models.decoding import StaticDecoder
from qkvlab.models.sampling import Sampling, draw, draw_nucleus, sample, top_k_filter, top_p_filter

V = 41
needs_cc = pytest.mark.skipif(
    sys.platform == "win32" or not any(map(shutil.which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)


def small_gpt(variant: str = "q_kv+gqa2", dtype=torch.float64, vocab: int = V) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=vocab, max_seq_len=48)
    cfg = GPTConfig(recipe="llama", variant=variant, **shape)
    return GPT(cfg).to(dtype).eval()


def test_draw_is_multinomial_with_the_same_draws():
    """``draw`` picks what ``torch.multinomial(probs, 1)`` picks from the same generator state,
    and leaves the generator where multinomial leaves it."""
    probs = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)).softmax(-1)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        assert torch.equal(draw(probs, a), torch.multinomial(probs, 1, generator=b).squeeze(-1))
    assert torch.equal(a.get_state(), b.get_state())


def test_a_chunked_draw_picks_what_a_plain_one_picks():
    """The compiled step's draw ends in the two-stage argmax: from one generator state, over a
    vocabulary wide enough to be chunked, the same tokens as the plain draw."""
    probs = torch.randn(8, 50_304, generator=torch.Generator().manual_seed(2)).softmax(-1)
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(draw(probs, a, chunked=True), draw(probs, b))
    logits = probs.log()
    assert torch.equal(sample(logits, chunked=True), logits.argmax(-1))  # temperature 0: greedy


def test_draw_follows_the_probabilities():
    """20,000 independent rows of one distribution: the counts fit it (chi-square, fixed seed)."""
    stats = pytest.importorskip("scipy.stats", reason="the chi-square test needs scipy (the dev extra)")
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    picks = draw(p.expand(20_000, -1).contiguous(), torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=len(p))
    assert counts[-1] == 0  # a zero probability is never drawn
    assert stats.chisquare(counts[:-1].numpy(), (p[:-1] * 20_000).numpy()).pvalue > 1e-3


def test_draw_of_a_nan_row_picks_like_argmax():
    probs = torch.tensor([[0.2, float("nan"), 0.8], [0.1, 0.2, 0.7]])
    assert draw(probs, torch.Generator().manual_seed(0))[0] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nucleus_draw_follows_the_kept_probabilities(dtype):
    """Top-p drawn in sorted order: 20,000 rows of one distribution never pick a token
    top_p_filter drops, and the counts of the kept ones fit their renormalised probabilities at
    the temperature (chi-square, fixed seed), with the logits in float32 or in bfloat16."""
    stats = pytest.importorskip("scipy.stats", reason="the chi-square test needs scipy (the dev extra)")
    logits = torch.tensor([0.0, 2.0, -1.0, 1.5, 0.5, -3.0, 1.0, -0.5]).to(dtype)
    t, p = 0.7, 0.8
    kept = top_p_filter(logits.float()[None] / t, p)[0]
    want = kept.double().softmax(-1)
    assert 1 < int((want > 0).sum()) < len(want)  # a cut that keeps several tokens and drops some
    picks = draw_nucleus(logits.expand(20_000, -1).contiguous(), t, p, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=len(want))
    assert counts[want == 0].sum() == 0
    assert stats.chisquare(counts[want > 0].numpy(), (want[want > 0] * 20_000).numpy()).pvalue > 1e-3


def test_sampling_with_top_k_and_top_p_keeps_what_both_filters_keep():
    """sample with both filters on half-precision logits: each row's picks lie in the set the
    two filters keep from the float32 logits at the temperature, and reach more than one token."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 300, generator=gen) * 3).to(torch.bfloat16)
    scaled = logits.float() / 0.9
    allowed = top_p_filter(top_k_filter(scaled, 12), 0.7) > float("-inf")
    picks = torch.stack([sample(logits, temperature=0.9, top_k=12, top_p=0.7, generator=gen) for _ in range(300)], 1)
    assert allowed.gather(1, picks).all()
    assert all(len(set(row)) > 1 for row, ok in zip(picks.tolist(), allowed.sum(1).tolist(), strict=True) if ok > 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "temperature 0 is greedy"),
        (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
        (dict(temperature=1.0, top_p=1.5), "top_p must lie in"),
        (dict(temperature=1.0, top_k=0), "top_k must be >= 1"),
    ],
)
def test_a_bad_sampling_spec_is_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Sampling(**kwargs)


def test_a_decoder_samples_or_picks_greedily_not_both():
    model = small_gpt()
    cache = model.new_cache(1, 8)
    with pytest.raises(ConfigError, match="not both"):
        StaticDecoder(model, cache, cuda_graph=False, greedy=True, sampling=Sampling(1.0))
    with pytest.raises(ConfigError, match=r"sampling must be a qkvlab\.models\.sampling\.Sampling"):
        StaticDecoder(model, cache, cuda_graph=False, sampling={"temperature": 1.0})


@needs_cc
@pytest.mark.parametrize("vocab", [V, 5000], ids=["argmax", "chunked"])
def test_a_compiled_sampling_decoder_draws_from_the_kept_tokens_and_repeats_with_the_seed(vocab):
    """Compiled, the draw is Inductor's own (other numbers than eager's): each pick lies among the
    logits' top-k, a new decoder from the same seed picks the same tokens, and from another seed
    others."""
    torch._dynamo.reset()
    model = small_gpt(dtype=torch.float32, vocab=vocab)
    spec = Sampling(1.3, top_k=5)
    prompt = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(3))
    runs = []
    for seed in (11, 11, 12):
        cache = model.new_cache(3, 16)
        model.prefill(prompt, cache)
        dec = StaticDecoder(model, cache, cuda_graph=False, compile=True, sampling=spec)
        torch.manual_seed(seed)
        logits, picks = dec.step(torch.tensor([1, 2, 3])), []
        for _ in range(6):
            kept = top_k_filter(logits, 5) > float("-inf")
            assert kept.gather(1, dec.next_token[:, None]).all()
            picks.append(dec.next_token.clone())
            logits = dec.step(dec.next_token)
        runs.append(torch.stack(picks))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@needs_cc
def test_a_compiled_top_p_decoder_draws_from_the_nucleus():
    """Compiled, the nucleus draw (sort, softmax of the sorted row, running mass, chunked pick) keeps
    to the set top_p_filter keeps at the temperature, over a vocabulary wide enough to chunk."""
    torch._dynamo.reset()
    model = small_gpt(dtype=torch.float32, vocab=5000)
    cache = model.new_cache(3, 16)
    model.prefill(torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(3)), cache)
    dec = StaticDecoder(model, cache, cuda_graph=False, compile=True, sampling=Sampling(1.3, top_p=0.5))
    torch.manual_seed(5)
    logits, picks = dec.step(torch.tensor([1, 2, 3])), []
    for _ in range(6):
        kept = top_p_filter(logits.float() / 1.3, 0.5) > float("-inf")
        assert kept.gather(1, dec.next_token[:, None]).all()
        picks.append(dec.next_token.clone())
        logits = dec.step(dec.next_token)
    assert len(set(torch.stack(picks).flatten().tolist())) > 1


@needs_cc
def test_generate_samples_inside_the_step_where_it_can(monkeypatch):
    """Sampled generate over a static step lets the step draw from the default generator (after
    its repetition penalty, if any), unless a caller's generator asks to sample between steps;
    the draws repeat with the seed and change with it."""
    torch._dynamo.reset()
    decoders = spy_decoders(monkeypatch)
    model = small_gpt(dtype=torch.float32)
    rows = [[5, 6, 7, 8], [9, 10]]
    kw = dict(temperature=0.8, top_k=4, compile=True, return_dict=True)
    torch.manual_seed(1)
    a = model.generate(rows, 10, **kw)
    torch.manual_seed(1)
    b = model.generate(rows, 10, **kw)
    torch.manual_seed(2)
    c = model.generate(rows, 10, **kw)
    assert a.tokens == b.tokens != c.tokens and a.lengths == [10, 10]
    built = [kw for _, kw in decoders]
    assert built[0]["sampling"] == Sampling(0.8, top_k=4) and not built[0]["greedy"]
    model.generate(rows, 4, generator=torch.Generator().manual_seed(0), **kw)
    model.generate(rows, 4, repetition_penalty=1.2, **kw)
    # each call its own cache, so its own decoder: the caller's generator samples outside the
    # step, the penalty inside it
    built = [kw for _, kw in decoders]
    assert [(d["sampling"], d["penalty"]) for d in built[3:]] == [(None, None), (Sampling(0.8, top_k=4), 1.2)]
    stream = model.stream(rows, 10, temperature=0.8, top_k=4, compile=True)
    torch.manual_seed(1)
    assert torch.stack([s.tokens for s in stream], 1).tolist() == a.tokens
