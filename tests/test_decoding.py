"""The static decode step (``qkvlab.models.decoding.StaticDecoder``) against the dynamic one,
and the decode-backend registry that both reach.

The static step is what a CUDA graph captures: a device position, ``index_copy_`` writes and
attention over the whole allocated cache with per-row lengths. On CPU it runs eagerly (the
graph itself is checked in ``test_gpu.py``); under the Triton interpreter it also takes the
decode kernel, for shared and separate caches.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import qkvlab
from conftest import INTERPRETER_PROBLEM, needs_interpreter
from qkvlab import GPT, GPTConfig
from qkvlab.attention import Attention
from qkvlab.attention import backends as backends_mod
from qkvlab.errors import ConfigError
from qkvlab.models.decoding import StaticDecoder
from qkvlab.models.sampling import Sampling, apply_repetition_penalty, chunked_argmax, sample

VARIANTS = ["q_k_v", "q_kv", "qk_v", "qkv", "q_k_v+gqa2", "q_kv+gqa2", "q_kv+mqa"]


def small_gpt(variant: str, recipe: str, dtype=torch.float64, **kw) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=41, max_seq_len=48)
    cfg = GPTConfig(recipe=recipe, variant=variant, **{**shape, **kw})
    return GPT(cfg).to(dtype).eval()


def set_decode_backend(model: GPT, choice: str) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.decode_backend = choice


def run_both(model: GPT, prompt: torch.Tensor, tokens: torch.Tensor, max_len: int):
    """Logits of each decode step, dynamic vs static, from the same prefilled prompt."""
    out = {}
    for mode in ("dynamic", "static"):
        cache = model.new_cache(prompt.shape[0], max_len)
        model.prefill(prompt, cache)
        dec = StaticDecoder(model, cache, cuda_graph=False) if mode == "static" else None
        steps = []
        for t in range(tokens.shape[1]):
            tok = tokens[:, t]
            steps.append(dec.step(tok) if dec is not None else model.decode_one(tok, cache))
        assert cache.length == prompt.shape[1] + tokens.shape[1]
        out[mode] = torch.stack(steps, 1)
    return out["dynamic"], out["static"]


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_static_step_equals_dynamic_decode(variant, recipe):
    model = small_gpt(variant, recipe)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 41, (2, 7), generator=g)
    tokens = torch.randint(0, 41, (2, 5), generator=g)
    dyn, sta = run_both(model, prompt, tokens, max_len=20)  # 8 unused positions past the end
    torch.testing.assert_close(sta, dyn, rtol=1e-10, atol=1e-10)


def test_static_step_with_qk_norm_and_rope_equals_dynamic():
    model = small_gpt("q_kv+rope+qknorm", "llama")
    prompt = torch.randint(0, 41, (3, 4))
    tokens = torch.randint(0, 41, (3, 6))
    dyn, sta = run_both(model, prompt, tokens, max_len=12)
    torch.testing.assert_close(sta, dyn, rtol=1e-10, atol=1e-10)


def test_static_step_ignores_stale_entries_past_the_length():
    """Garbage beyond the current length (an earlier, longer generation) must not leak in."""
    model = small_gpt("q_kv", "llama")
    prompt = torch.randint(0, 41, (1, 5))
    tok = torch.randint(0, 41, (1,))
    cache = model.new_cache(1, 30)
    for layer in cache.layers:
        layer.k.normal_()  # stale values everywhere
    model.prefill(prompt, cache)
    got = StaticDecoder(model, cache, cuda_graph=False).step(tok)
    fresh = model.new_cache(1, 30)
    model.prefill(prompt, fresh)
    torch.testing.assert_close(got, model.decode_one(tok, fresh), rtol=1e-10, atol=1e-10)


def test_generate_with_static_steps_matches_recompute():
    model = small_gpt("q_kv+gqa2", "llama")
    idx = torch.randint(0, 41, (2, 6))
    cache = model.new_cache(2, 16)
    ref = model.generate(idx, 10, use_cache=False)
    # cuda_graph="auto" on CPU is the dynamic path; the static path, eager, through the decoder:
    assert torch.equal(model.generate(idx, 10, cuda_graph="auto"), ref)
    model.prefill(idx, cache)
    dec = StaticDecoder(model, cache, cuda_graph=False)
    logits = model(idx)[:, -1]
    out = [idx]
    for _ in range(10):
        nxt = logits.argmax(-1)
        out.append(nxt[:, None])
        logits = dec.step(nxt)
    assert torch.equal(torch.cat(out, 1), ref)


def writes_into(target: torch.Tensor, op, fn) -> int:
    """How many times ``fn()`` calls the in-place ``op`` on ``target``'s memory."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is op and args[0].data_ptr() == target.data_ptr():
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def copies_into(dec: StaticDecoder, fn) -> int:
    """How many copies ``fn()`` makes into the decoder's token (its input)."""
    return writes_into(dec.token, torch.ops.aten.copy_.default, fn)


def plain_and_picking(model: GPT, ragged: bool, **pick) -> tuple[StaticDecoder, StaticDecoder]:
    """A plain eager decoder and one that picks its next token (``pick``: ``greedy=True`` or
    ``sampling=...``), each over its own cache holding one prompt (ragged: one position per row)."""
    prompt = torch.randint(0, 41, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # a ragged cache: one position per row
    decs = []
    for kw in ({}, pick):
        cache = model.new_cache(2, 20)
        model.prefill(prompt, cache, attention_mask=mask if ragged else None)
        decs.append(StaticDecoder(model, cache, cuda_graph=False, **kw))
    return decs[0], decs[1]


@pytest.mark.parametrize("ragged", [False, True])
def test_a_greedy_decoder_picks_the_next_token_inside_the_step(ragged):
    """greedy=True: each step also writes the argmax of its logits into the decoder's input, so
    ``step(dec.next_token)`` continues with no copy of its own (the one copy into the input is the
    step's pick); the logits are those of a plain decoder fed the argmax tokens."""
    model = small_gpt("q_kv+gqa2", "llama")
    plain, greedy = plain_and_picking(model, ragged, greedy=True)
    assert greedy.ragged is ragged
    tok = torch.tensor([5, 9])
    ref = plain.step(tok)
    assert copies_into(greedy, lambda: torch.testing.assert_close(greedy.step(tok), ref, rtol=0, atol=0)) == 2
    got = []
    for _ in range(4):
        assert torch.equal(greedy.next_token, ref.argmax(-1))
        ref = plain.step(ref.argmax(-1))
        assert copies_into(greedy, lambda: got.append(greedy.step(greedy.next_token))) == 1
        torch.testing.assert_close(got[-1], ref, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="kept by decoders that pick the next token"):
        plain.next_token  # noqa: B018
    with pytest.raises(ConfigError, match="greedy must be True or False"):
        StaticDecoder(model, model.new_cache(1, 4), cuda_graph=False, greedy="yes")


@pytest.mark.parametrize("ragged", [False, True])
def test_a_sampling_decoder_draws_what_sampling_between_steps_draws(ragged):
    """Eager, the step's own draw is the draw ``sample`` makes from its logits between two steps,
    from the same default generator: the same tokens, step after step; the logits are a plain
    decoder's fed those tokens."""
    spec = Sampling(0.9, top_k=12, top_p=0.9)
    plain, sampler = plain_and_picking(small_gpt("q_kv+gqa2", "llama"), ragged, sampling=spec)
    assert sampler.picks and not plain.picks
    tok = torch.tensor([5, 9])
    torch.manual_seed(3)
    ref, want = plain.step(tok), []
    for _ in range(6):
        want.append(sample(ref, temperature=0.9, top_k=12, top_p=0.9))
        ref = plain.step(want[-1])
    torch.manual_seed(3)
    got = sampler.step(tok)
    picks = []
    for _ in range(6):
        picks.append(sampler.next_token.clone())
        got = sampler.step(sampler.next_token)
    assert torch.equal(torch.stack(picks), torch.stack(want))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_decoder_applies_a_repetition_penalty_before_it_picks(sampled):
    """penalty=: the step penalises the tokens marked seen, picks, and marks its pick: the tokens
    a plain decoder gives with the penalty, the pick and the marks made between steps."""
    spec = dict(sampling=Sampling(0.9, top_k=12)) if sampled else dict(greedy=True)
    model = small_gpt("q_kv+gqa2", "llama")
    plain, picker = plain_and_picking(model, True, penalty=1.7, **spec)
    prompt_marks = torch.zeros(2, 41, dtype=torch.bool)
    prompt_marks[:, :3] = True
    picker.mark_seen(torch.tensor([[0, 1, 2], [0, 1, 2]]), reset=True)
    assert torch.equal(picker.seen, prompt_marks)
    seen = prompt_marks.clone()
    tok = torch.tensor([5, 9])
    picker.mark_seen(tok)
    seen[[0, 1], tok] = True
    torch.manual_seed(3)
    ref, want = plain.step(tok), []
    for i in range(7):
        scores = apply_repetition_penalty(ref, seen, 1.7)
        want.append(sample(scores, temperature=0.9, top_k=12) if sampled else scores.argmax(-1))
        seen[[0, 1], want[-1]] = True
        if i < 6:
            ref = plain.step(want[-1])
    torch.manual_seed(3)
    picker.step(tok)
    picks = []
    for _ in range(6):
        picks.append(picker.next_token.clone())
        picker.step(picker.next_token)
    picks.append(picker.next_token)  # the last step's pick, marked by that step
    assert torch.equal(torch.stack(picks), torch.stack(want))
    assert torch.equal(picker.seen, seen)


def test_a_penalty_needs_a_decoder_that_picks():
    model = small_gpt("q_kv", "llama")
    cache = model.new_cache(1, 8)
    with pytest.raises(ConfigError, match="is applied by a decoder that picks its next token"):
        StaticDecoder(model, cache, cuda_graph=False, penalty=1.2)
    with pytest.raises(ConfigError, match="repetition_penalty must be a finite number > 0"):
        StaticDecoder(model, cache, cuda_graph=False, greedy=True, penalty=-1.0)
    with pytest.raises(ConfigError, match="mark_seen is for decoders with a repetition penalty"):
        StaticDecoder(model, cache, cuda_graph=False, greedy=True).mark_seen(torch.tensor([1]))


def position_fills(dec: StaticDecoder, fn) -> int:
    """How many times ``fn()`` fills the decoder's position tensor."""
    return writes_into(dec.pos, torch.ops.aten.fill_.Scalar, fn)


def test_a_uniform_step_advances_its_own_position():
    """A step after a step sets no position (the step advanced it on the device); a cache moved
    by anything else since (a reset and a shorter prompt, a prompt exactly as long as the
    position held, a decode_one) is followed. Every step equals the dynamic decode."""
    model = small_gpt("q_kv+gqa2", "llama")
    g = torch.Generator().manual_seed(3)
    prompt, tokens = torch.randint(0, 41, (2, 6), generator=g), torch.randint(0, 41, (2, 12), generator=g)
    cache, ref = model.new_cache(2, 24), model.new_cache(2, 24)
    dec = StaticDecoder(model, cache, cuda_graph=False)

    def both(t):
        torch.testing.assert_close(dec.step(t), model.decode_one(t, ref), rtol=1e-10, atol=1e-10)

    def restart(p):
        for c in (cache, ref):
            c.reset()
            model.prefill(p, c)

    restart(prompt)
    assert position_fills(dec, lambda: [both(t) for t in tokens[:, :4].T]) == 1
    restart(prompt[:, :3])
    assert position_fills(dec, lambda: [both(t) for t in tokens[:, 4:6].T]) == 1
    restart(prompt[:, :5])  # exactly as long as the position the steps left: it holds already
    assert position_fills(dec, lambda: both(tokens[:, 6])) == 0
    restart(torch.cat([prompt, tokens[:, :4]], 1))
    assert position_fills(dec, lambda: both(tokens[:, 7])) == 1
    for c in (cache, ref):
        model.decode_one(tokens[:, 8], c)
    assert position_fills(dec, lambda: [both(t) for t in tokens[:, 9:].T]) == 1


@needs_interpreter
@pytest.mark.parametrize(
    "variant,recipe",
    [
        ("q_kv", "llama"),
        ("q_k_v", "llama"),
        ("q_kv+mqa", "llama"),
        ("q_kv+rope+qknorm", "llama"),
        ("k_v", "llama"),  # Q = K: the query is the key role, rotated in the kernel
        ("kv", "llama"),  # Q = K = V
        ("q_k_v", "gpt2"),  # learned positions: nothing to rotate
        ("q_kv", "gpt2"),
    ],
)
def test_static_step_takes_the_decode_kernel_under_the_interpreter(variant, recipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls, steps = [], []
    real = qkvlab.kernels.decode_attention
    real_step = qkvlab.kernels.kv_decode.decode_attention_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("shared_kv"))
        return real(*args, **kwargs)

    def spy_step(*args, **kwargs):  # (q, k_new, v_new, k_cache, v_cache, ...): v_cache None if shared
        steps.append(args[4] is None)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(qkvlab.kernels, "decode_attention", spy)
    monkeypatch.setattr(qkvlab.kernels.kv_decode, "decode_attention_step", spy_step)
    model = small_gpt(variant, recipe, dtype=torch.float32, n_heads=2)  # head dim 16: the kernel's minimum
    prompt = torch.randint(0, 41, (2, 9))
    tokens = torch.randint(0, 41, (2, 3))
    set_decode_backend(model, "torch")
    dyn, _ = run_both(model, prompt, tokens, max_len=16)
    calls.clear()
    set_decode_backend(model, "triton")
    _, sta = run_both(model, prompt, tokens, max_len=16)
    torch.testing.assert_close(sta, dyn, rtol=2e-4, atol=2e-4)
    # the static steps (3 steps x 2 layers) took the whole-step kernel (cache write and RoPE in
    # the same launch); the dynamic run of the same call takes the attention kernel too for a
    # shared cache with a key transform, so count only what must be there
    shared = model.config.variant.kv_shared
    assert steps == [shared] * (2 * 3)
    assert set(calls) <= {shared}


def test_static_decoder_errors():
    model = small_gpt("q_kv", "gpt2")
    cache = model.new_cache(2, 8)
    with pytest.raises(ConfigError, match="prefill"):
        StaticDecoder(model, cache, cuda_graph=False).step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="CUDA device"):
        StaticDecoder(model, cache, cuda_graph=True)
    with pytest.raises(ConfigError, match="cuda_graph must be"):
        StaticDecoder(model, cache, cuda_graph="yes")
    model.prefill(torch.zeros(2, 7, dtype=torch.long), cache)
    dec = StaticDecoder(model, cache, cuda_graph=False)
    with pytest.raises(ConfigError, match="one per row"):
        dec.step(torch.zeros(3, dtype=torch.long))
    dec.step(torch.zeros(2, dtype=torch.long))  # fills position 7, the last one
    with pytest.raises(ConfigError, match="KV cache full"):
        dec.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="one token per row"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache, position=torch.tensor(3))
    with pytest.raises(ConfigError, match="0-d integer"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache, position=torch.tensor([3]))
    with pytest.raises(ConfigError, match="cuda_graph must be"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, cuda_graph="sometimes")


def test_static_decoder_refuses_a_linear_state():
    model = small_gpt("q_kv+learned+linear", "gpt2")
    state = model.new_cache(1, 8)
    with pytest.raises(ConfigError, match="KVCache"):
        StaticDecoder(model, state)


needs_cc = pytest.mark.skipif(
    sys.platform == "win32" or not any(map(shutil.which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_cc)])
def test_a_decoder_goes_with_its_last_reference_not_at_a_garbage_collection(compile):
    """A decoder is no reference cycle: with its graph it is freed when dropped. A cycle would
    leave it to a collection, which may come while another decoder's graph is being captured
    and invalidate that capture (see the CUDA test of a capture beside cyclic garbage)."""
    import gc
    import weakref

    torch._dynamo.reset()
    model = small_gpt("q_kv", "llama", dtype=torch.float32)
    cache = model.new_cache(1, 8)
    model.prefill(torch.tensor([[1, 2, 3]]), cache)
    dec = StaticDecoder(model, cache, cuda_graph=False, compile=compile)
    dec.step(torch.tensor([4]))
    gone = weakref.ref(dec)
    was = gc.isenabled()
    gc.disable()
    try:
        del dec
        assert gone() is None
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("variant,recipe", [("q_kv", "llama"), ("q_kv+learned+linear", "gpt2")], ids=["kv", "linear"])
def test_a_dropped_cache_is_freed_at_once_not_at_a_garbage_collection(variant, recipe):
    """A cache's layers refer back to it weakly: dropped (also after a generate over it), a cache
    and its tensors are freed at once. A cycle would hold a GPU's cache memory until a collection.
    A layer whose cache is gone says so."""
    import gc
    import weakref

    model = small_gpt(variant, recipe, dtype=torch.float32)
    linear = "linear" in variant
    was = gc.isenabled()
    gc.disable()
    try:
        for run in (False, True):
            cache = model.new_cache(1) if linear else model.new_cache(1, 12)
            if run:
                model.generate(torch.tensor([[1, 2, 3]]), 4, cache=cache)
            layer, gone = cache.layers[0], weakref.ref(cache)
            del cache
            assert gone() is None
            with pytest.raises(ConfigError, match="cache or state was freed"):
                layer.owner  # noqa: B018
    finally:
        if was:
            gc.enable()


def test_no_gc_keeps_collections_out_and_restores_the_setting():
    import gc

    from qkvlab.models.decoding import no_gc

    was = gc.isenabled()
    try:
        for before in (True, False):
            (gc.enable if before else gc.disable)()
            with no_gc():
                assert not gc.isenabled()
            assert gc.isenabled() is before
            with pytest.raises(KeyError), no_gc():
                raise KeyError("an error inside")
            assert gc.isenabled() is before
    finally:
        (gc.enable if was else gc.disable)()


def run_static(model: GPT, prompt: torch.Tensor, tokens: torch.Tensor, max_len: int, **kw) -> torch.Tensor:
    cache = model.new_cache(prompt.shape[0], max_len)
    model.prefill(prompt, cache)
    dec = StaticDecoder(model, cache, cuda_graph=False, **kw)
    return torch.stack([dec.step(tokens[:, t]) for t in range(tokens.shape[1])], 1)


@needs_cc
@pytest.mark.parametrize(("variant", "mode"), [("q_kv+rope+qknorm", True), ("q_k_v+gqa2", "default")])
def test_compiled_static_step_equals_the_eager_one(variant, mode):
    """compile=True (or a mode): one graph (fullgraph) whose logits match the eager static step's."""
    torch._dynamo.reset()
    model = small_gpt(variant, "llama", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 41, (2, 5), generator=g)
    tokens = torch.randint(0, 41, (2, 4), generator=g)
    eager = run_static(model, prompt, tokens, max_len=12)
    compiled = run_static(model, prompt, tokens, max_len=12, compile=mode)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@needs_cc
@pytest.mark.parametrize(("vocab", "dtype"), [(41, torch.float32), (5000, torch.float64)], ids=["argmax", "chunked"])
def test_a_compiled_greedy_decoder_picks_what_the_eager_one_picks(vocab, dtype):
    """The argmax traced into the compiled step (fullgraph, the input written in place; over a
    wide vocabulary in two stages) picks the tokens the eager greedy step picks, step after step."""
    torch._dynamo.reset()
    model = small_gpt("q_kv+rope+qknorm", "llama", dtype=dtype, vocab_size=vocab)
    prompt = torch.randint(0, 41, (2, 5), generator=torch.Generator().manual_seed(3))
    picks = {}
    for compile in (False, True):
        cache = model.new_cache(2, 14)
        model.prefill(prompt, cache)
        dec = StaticDecoder(model, cache, cuda_graph=False, compile=compile, greedy=True)
        dec.step(torch.tensor([1, 2]))
        picks[compile] = [dec.next_token.clone()]
        for _ in range(5):
            dec.step(dec.next_token)
            picks[compile].append(dec.next_token.clone())
    assert torch.equal(torch.stack(picks[True]), torch.stack(picks[False]))


@needs_cc
@needs_interpreter
@pytest.mark.parametrize("variant,shared", [("q_kv+rope", True), ("q_k_v+gqa2", False)], ids=["k=v", "k,v"])
def test_compiled_static_step_calls_the_decode_kernel_as_an_operator(variant, shared, monkeypatch):
    """Under compile the whole-step kernel is torch.ops.qkvlab.decode_attention_step, traced as
    opaque (it writes the caches in place) and run as is."""
    from qkvlab.kernels import kv_decode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    calls = []
    real = kv_decode.decode_attention_step

    def spy(*args, **kwargs):
        calls.append(args[4] is None)  # a shared cache passes no v_cache
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_decode, "decode_attention_step", spy)  # what the operator calls at run time
    model = small_gpt(variant, "llama", dtype=torch.float32, n_heads=2)  # head dim 16
    prompt = torch.randint(0, 41, (2, 6))
    tokens = torch.randint(0, 41, (2, 3))
    set_decode_backend(model, "torch")
    ref = run_static(model, prompt, tokens, max_len=12)
    set_decode_backend(model, "triton")
    got = run_static(model, prompt, tokens, max_len=12, compile=True)
    # equal logits at every step: each step's entry reached the caches (two of them for K,V) in place
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)
    assert calls == [shared] * (2 * 3)  # 2 layers x 3 steps, all through the operator


def test_generate_compile_needs_a_kv_cache():
    model = small_gpt("q_kv+learned+linear", "gpt2")
    with pytest.raises(ConfigError, match="compile=True"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, compile=True)
    with pytest.raises(ConfigError, match="use_cache=False"):
        small_gpt("q_kv", "gpt2").generate(torch.zeros(1, 2, dtype=torch.long), 2, compile=True, use_cache=False)
    with pytest.raises(ConfigError, match="compile must be"):
        StaticDecoder(model, small_gpt("q_kv", "gpt2").new_cache(1, 4), compile="yes")


# ----------------------------------------------------------------------------- decode backends
def _fake_backend(monkeypatch, supported: bool):
    """Register decode backend ``fake`` (on CPU too) that records its steps; it answers with the
    reference, so a model that takes it decodes as the PyTorch path does."""
    from qkvlab.kernels import decode_attention_reference

    steps = []

    def fake(step):
        steps.append(step)
        return decode_attention_reference(
            step.q, step.k_cache, step.v_cache, step.lengths, scale=step.scale, eps=step.eps, **step.key_role
        )

    fake.supports = lambda step: supported
    fake.auto_devices = ("cpu",)
    monkeypatch.setitem(backends_mod._DECODE_BACKENDS, "fake", fake)
    return steps


@pytest.mark.parametrize("choice", ["fake", "auto"])
@pytest.mark.parametrize("variant", ["q_kv+rope+qknorm", "q_k_v+gqa2"])
def test_decode_registry_falls_back_when_unsupported(variant, choice, monkeypatch):
    """A decode backend whose supports() is False is never called: the step takes the PyTorch path."""
    model = small_gpt(variant, "llama")
    prompt, tokens = torch.randint(0, 41, (2, 6)), torch.randint(0, 41, (2, 3))
    dyn, sta = run_both(model, prompt, tokens, max_len=12)
    steps = _fake_backend(monkeypatch, supported=False)
    set_decode_backend(model, choice)
    dyn2, sta2 = run_both(model, prompt, tokens, max_len=12)
    assert steps == []
    assert torch.equal(dyn2, dyn) and torch.equal(sta2, sta)


@pytest.mark.parametrize("choice", ["fake", "auto"])
def test_decode_registry_runs_a_supporting_backend(choice, monkeypatch):
    """Dynamic and static steps reach a backend that supports them, with per-row lengths on the
    device (and the host length of an eager step); its answer is the layer's attention."""
    model = small_gpt("q_kv+rope+qknorm", "llama")
    prompt, tokens = torch.randint(0, 41, (2, 6)), torch.randint(0, 41, (2, 3))
    dyn, sta = run_both(model, prompt, tokens, max_len=12)
    steps = _fake_backend(monkeypatch, supported=True)
    set_decode_backend(model, choice)
    dyn2, sta2 = run_both(model, prompt, tokens, max_len=12)
    torch.testing.assert_close(dyn2, dyn, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sta2, sta, rtol=1e-10, atol=1e-10)
    assert len(steps) == 2 * 2 * 3  # dynamic and static runs x 2 layers x 3 steps
    first = steps[0]  # the first dynamic step: 6 cached + 1 new token in a cache of 12
    assert first.shared_kv and first.length == 7 and first.lengths.tolist() == [7, 7]
    assert first.k_cache.shape[2] == 12 and first.rope_cos is not None and first.k_norm_weight is not None
    assert steps[6].length is None and steps[6].lengths.tolist() == [7, 7]  # the first static step


def test_decode_choices_and_the_compatible_switch(monkeypatch):
    """Unknown decode choices are refused by name; decode_kernel maps onto decode_backend."""
    from qkvlab.attention import VariantSpec

    spec = VariantSpec.parse("q_kv+rope")
    with pytest.raises(ConfigError, match=r"'flash'.*auto, torch, triton"):
        Attention(32, 4, spec, decode_backend="flash")
    attn = Attention(32, 4, spec)
    assert attn.decode_backend == "auto" and attn.decode_kernel == "auto"
    for flag, choice in ((True, "triton"), (False, "torch"), ("auto", "auto")):
        attn.decode_kernel = flag
        assert attn.decode_backend == choice and attn.decode_kernel == flag
    with pytest.raises(ConfigError, match="decode_kernel must be"):
        attn.decode_kernel = "yes"
    # "auto" leaves Triton to CUDA: on a CPU, even under the interpreter, the PyTorch path runs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 4, 8, 16)
    step = backends_mod.DecodeStep(q, k, k, torch.full((2,), 8, dtype=torch.int32), 0.25)
    assert backends_mod.select_decode_backend("auto", step) is None
    assert backends_mod.select_decode_backend("torch", step) is None
    if INTERPRETER_PROBLEM is None:
        assert backends_mod.select_decode_backend("triton", step) is backends_mod.triton_decode
    # a separate K/V cache with a host-known length is SDPA's (flash decoding over the prefix)
    sep = backends_mod.DecodeStep(q, k, k.clone(), step.lengths, 0.25, length=8)
    assert backends_mod.select_decode_backend("triton", sep) is None


@pytest.mark.parametrize("V", [7, 4096, 4097, 50304, 65536 + 3])
def test_the_chunked_argmax_is_argmax(V):
    """The two-stage pick equals ``argmax`` index for index: random rows, ties (the first of
    equal maxima), a maximum in the last (padded) chunk, rows of -inf, NaN (the first NaN), in
    float32 and bfloat16, eager and compiled."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(8, V, generator=g)
    x[1, :] = 0.0  # all tied: index 0
    x[2, [V // 3, V // 2, V - 1]] = 50.0  # tied maxima in different chunks: the first
    x[3, V - 1] = 50.0  # the maximum in the last chunk, next to its padding
    x[4, :] = float("-inf")
    x[5, [V // 2, V - 1]] = float("nan")  # the first NaN, as argmax gives
    x[6, 1:] = float("-inf")
    torch._dynamo.reset()  # each width and dtype compiles afresh, not against the recompile limit
    for dtype in (torch.float32, torch.bfloat16):
        y = x.to(dtype)
        want = y.argmax(-1)
        assert torch.equal(chunked_argmax(y), want)
        assert torch.equal(torch.compile(chunked_argmax, fullgraph=True, dynamic=False)(y), want)
