"""CUDA checks of the core path: cached decode, backends, cache allocation. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkvlab import GPT, GPTConfig, KVCache
from qkvlab.attention import Attention
from qkvlab.attention import backends as backends_mod

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VARIANTS = ["q_k_v", "q_kv", "qk_v", "qkv", "q_k_v+gqa2", "q_kv+gqa2", "q_kv+mqa"]
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2}


def cuda_gpt(variant: str, recipe: str, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=128, n_heads=4, vocab_size=512, max_seq_len=256, recipe=recipe, variant=variant)
    return GPT(cfg).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_cached_decode_matches_full_forward(variant, recipe, dtype):
    model = cuda_gpt(variant, recipe, dtype)
    idx = torch.randint(0, 512, (2, 40), device="cuda")
    with torch.no_grad():
        full = model(idx).float()
        cache = model.new_cache(2, 40)
        steps = [model(idx[:, :32], cache=cache)]
        steps += [model(idx[:, t : t + 1], cache=cache) for t in range(32, 40)]
    got = torch.cat(steps, 1).float()
    scale = full.abs().max().item()
    assert (got - full).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["q_kv+rope", "q_kv+gqa2+learned", "qkv+rope+qknorm", "(Q=K-V)+"])
def test_cuda_sdpa_matches_reference(variant, dtype):
    from qkvlab.attention import VariantSpec

    spec = VariantSpec.parse(variant)
    spec = spec if spec.pos else spec.replace(pos="learned")
    attn = Attention(128, 4, spec, causal="(" not in variant, max_seq_len=256).to("cuda", dtype)
    x = torch.randn(2, 100, 128, device="cuda", dtype=dtype)
    outs = {}
    for name in ("sdpa", "reference"):
        attn.backend = name
        outs[name] = attn(x).float()
    scale = outs["reference"].abs().max().item()
    assert (outs["sdpa"] - outs["reference"]).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("variant, halves", [("q_k_v", False), ("q_kv", True), ("q_kv+mqa", True)])
def test_cuda_cache_allocation_is_measured(variant, halves):
    model = cuda_gpt(variant, "gpt2", torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = KVCache.for_model(model, 4, 256)
    after = torch.cuda.memory_allocated()
    assert after - before == cache.nbytes == cache.bytes_per_token * 4 * 256
    assert cache.n_tensors == 2 * (1 if halves else 2)


def test_cuda_shared_kv_reaches_sdpa_as_one_tensor(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((k is v, k.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(backends_mod.F, "scaled_dot_product_attention", spy)
    model = cuda_gpt("q_kv+gqa2", "gpt2", torch.bfloat16)
    with torch.no_grad():
        model.generate(torch.randint(0, 512, (1, 16), device="cuda"), 8)
    assert seen and all(s == (True, 2) for s in seen)


def test_cuda_generate_under_autocast():
    model = cuda_gpt("q_kv+rope", "llama", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cache = model.new_cache(1, 64)
        out = model.generate(torch.randint(0, 512, (1, 16), device="cuda"), 16, cache=cache)
    assert cache.dtype == torch.bfloat16 and out.shape == (1, 32)


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", [*VARIANTS, "q_kv+rope+qknorm"])
def test_cuda_graph_decode_matches_eager(variant, recipe):
    """StaticDecoder captured as a CUDA graph gives the eager decode's logits, step after step."""
    from qkvlab.models.decoding import StaticDecoder

    model = cuda_gpt(variant, recipe, torch.float32)
    idx = torch.randint(0, 512, (2, 30), device="cuda")
    steps = torch.randint(0, 512, (2, 8), device="cuda")
    outs = {}
    for graph in (False, True):
        cache = model.new_cache(2, 64)
        model.prefill(idx, cache)
        dec = StaticDecoder(model, cache, cuda_graph=graph)
        outs[graph] = torch.stack([dec.step(steps[:, t]) for t in range(steps.shape[1])], 1)
        assert (dec.graph is not None) == graph and cache.length == 38
    eager = model.new_cache(2, 64)
    model.prefill(idx, eager)
    ref = torch.stack([model.decode_one(steps[:, t], eager) for t in range(steps.shape[1])], 1)
    torch.testing.assert_close(outs[False], ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(outs[True], ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("variant", ["q_k_v", "q_kv+rope+qknorm", "q_kv+gqa2"])
def test_cuda_compiled_graph_decode_matches_eager(variant):
    """compile=True + CUDA graph: Inductor's fused step around the kernel operator, captured and replayed."""
    from qkvlab.models.decoding import StaticDecoder

    torch._dynamo.reset()
    model = cuda_gpt(variant, "llama", torch.float32)
    idx = torch.randint(0, 512, (2, 30), device="cuda")
    steps = torch.randint(0, 512, (2, 8), device="cuda")
    cache = model.new_cache(2, 64)
    model.prefill(idx, cache)
    dec = StaticDecoder(model, cache, compile=True)
    got = torch.stack([dec.step(steps[:, t]) for t in range(steps.shape[1])], 1)
    assert dec.graph is not None and cache.length == 38
    eager = model.new_cache(2, 64)
    model.prefill(idx, eager)
    ref = torch.stack([model.decode_one(steps[:, t], eager) for t in range(steps.shape[1])], 1)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("route", ["kernel", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["q_kv", "q_k_v+gqa2"])
def test_cuda_gemv_step_matches_cublas_step(variant, dtype, route, monkeypatch):
    """StaticDecoder(gemv=route), compiled and graphed at batch 1: the logits equal the cuBLAS
    step's, and the kernel route runs every one-row product of the step (counted)."""
    from qkvlab.kernels import gemv as gemv_mod
    from qkvlab.models.decoding import StaticDecoder

    torch._dynamo.reset()
    model = cuda_gpt(variant, "llama", dtype)
    idx = torch.randint(0, 512, (1, 30), device="cuda")
    steps = torch.randint(0, 512, (1, 6), device="cuda")
    launches = []
    real = gemv_mod.gemv
    monkeypatch.setattr(
        gemv_mod, "gemv", lambda x, w, b=None, config=None, **kw: launches.append(w.shape) or real(x, w, b, **kw)
    )
    outs = {}
    for use in (False, route):
        cache = model.new_cache(1, 64)
        model.prefill(idx, cache)
        dec = StaticDecoder(model, cache, compile=True, fuse=True, gemv=use)
        outs[use] = torch.stack([dec.step(steps[:, t]) for t in range(steps.shape[1])], 1).float()
        assert dec.graph is not None
    # per layer: fused projections, output, fused gate+up, down; then the head (once per traced call)
    assert len(launches) >= 2 * 4 + 1 if route == "kernel" else not launches
    tol = TOL[dtype] * max(outs[False].abs().max().item(), 1.0)
    assert (outs[route] - outs[False]).abs().max().item() <= tol


@pytest.mark.parametrize("fold", [1, 8])
@pytest.mark.parametrize("what", ["norm", "residual", "glu", "plain"])
def test_cuda_gemv_folded_products_equal_the_definition(what, fold):
    """The one-row product in each variant the step launches (norm in the loop, residual after,
    SwiGLU's input with the residual, plain), its tile's products folded or not, against the
    float32 definition: launch shapes whose rows and tiles do not divide the weight's."""
    from qkvlab.kernels.gemv import GemvConfig, gemv, gemv_reference

    g = torch.Generator(device="cuda").manual_seed(fold)
    n, k = 1001, 2048 + 64
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    x = torch.randn(1, 2 * k if what == "glu" else k, device="cuda", generator=g).bfloat16()
    extra = {}
    if what == "norm":
        extra = dict(norm_weight=(torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16(), eps=1e-5)
    elif what in ("residual", "glu"):
        extra = dict(residual=torch.randn(n, device="cuda", generator=g).bfloat16(), glu=what == "glu")
    ref = gemv_reference(x, w, **extra).float()
    for cfg in (GemvConfig(2, 1024, 4, 3, fold), GemvConfig(8, 512, 4, 1, fold), GemvConfig(4, 2048, 8, 1, fold)):
        err = (gemv(x, w, config=cfg, **extra).float() - ref).abs().max().item()
        assert err < 0.05, (cfg, err)  # bf16 outputs of size about 1 (3 with the residual): a few ulps


@pytest.mark.parametrize(("variant", "kernel"), [("q_kv+rope+qknorm", True), ("q_kv+gqa2", True), ("q_k_v", False)])
def test_cuda_auto_decode_backend(variant, kernel, monkeypatch):
    """On CUDA the default ("auto") decode step reaches the Triton kernel through the registry for a
    shared K=V cache (a separate cache with a host-known length stays with SDPA), and agrees with the
    PyTorch path ("torch")."""
    import qkvlab.kernels

    calls = []
    real = qkvlab.kernels.decode_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("shared_kv"))
        return real(*args, **kwargs)

    monkeypatch.setattr(qkvlab.kernels, "decode_attention", spy)
    model = cuda_gpt(variant, "llama", torch.float32)
    idx = torch.randint(0, 512, (2, 30), device="cuda")
    outs = {}
    for choice in ("torch", "auto"):
        for m in model.modules():
            if isinstance(m, Attention):
                m.decode_backend = choice
        cache = model.new_cache(2, 64)
        model.prefill(idx[:, :26], cache)
        outs[choice] = torch.stack([model.decode_one(idx[:, t], cache) for t in range(26, 30)], 1)
    assert calls == ([True] * 2 * 4 if kernel else [])  # 2 layers x 4 steps of the "auto" run
    torch.testing.assert_close(outs["auto"], outs["torch"], rtol=2e-4, atol=2e-4)


def test_cuda_graph_generate_matches_eager_generate():
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float32)
    idx = torch.randint(0, 512, (3, 17), device="cuda")
    assert torch.equal(model.generate(idx, 40, cuda_graph=True), model.generate(idx, 40, cuda_graph=False))


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled graph"])
def test_cuda_greedy_generate_with_the_pick_in_the_step_matches_eager(compile):
    """Greedy generate over a graphed step picks each token inside the step (StaticDecoder's
    greedy): plain and streamed, ragged rows, the tokens of the eager, ungraphed call; the tokens
    a stream handed out are still right after the steps that followed them."""
    from qkvlab.models.decoding import StaticDecoder

    built = []
    init = StaticDecoder.__init__

    def spy(self, *a, greedy=False, **kw):
        built.append(greedy)
        init(self, *a, greedy=greedy, **kw)

    torch._dynamo.reset()
    # compiled, float64: Inductor's reductions run in another order than eager's, and in float32
    # that could flip a near tie between two tokens
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float64 if compile else torch.float32)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ref = model.generate(rows, 24, cuda_graph=False, return_dict=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StaticDecoder, "__init__", spy)
        got = model.generate(rows, 24, cuda_graph=True, compile=compile, return_dict=True)
        handed = [step.tokens for step in model.stream(rows, 24, cuda_graph=True, compile=compile)]
    assert built == [True, True]
    assert got.tokens == ref.tokens and torch.equal(got.sequences, ref.sequences)
    assert torch.stack(handed, 1).tolist() == ref.tokens
    assert all(t.device.type == "cpu" for t in handed)  # read on the host, while the next step ran


def test_cuda_sampled_generate_draws_in_the_graph_what_an_ungraphed_call_draws():
    """Sampled generate without a generator of its own samples inside the graphed step, from the
    default generator: the capture gives back what its warmup drew, and each replay draws what
    the uncaptured call draws, so from one seed the tokens are the ungraphed call's; a second
    call over the same cache (no capture) too, and a stream."""
    from qkvlab.models.decoding import StaticDecoder

    built = []
    init = StaticDecoder.__init__

    def spy(self, *a, **kw):
        built.append(kw.get("sampling"))
        init(self, *a, **kw)

    model = cuda_gpt("q_kv+gqa2", "llama", torch.float32)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    kw = dict(**sampling, return_dict=True)
    torch.manual_seed(4)
    ref = model.generate(rows, 24, cuda_graph=False, **kw)
    cache = model.new_cache(3, 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StaticDecoder, "__init__", spy)
        got = []
        for _ in range(2):
            torch.manual_seed(4)
            got.append(model.generate(rows, 24, cache=cache, cuda_graph=True, **kw))
        torch.manual_seed(4)
        handed = [step.tokens for step in model.stream(rows, 24, cache=cache, cuda_graph=True, **sampling)]
    assert len(built) == 1 and built[0] is not None  # one sampling decoder, kept for the later calls
    assert got[0].tokens == got[1].tokens == ref.tokens and torch.equal(got[0].sequences, ref.sequences)
    assert torch.stack(handed, 1).tolist() == ref.tokens
    torch.manual_seed(5)
    assert model.generate(rows, 24, cache=cache, cuda_graph=True, **kw).tokens != ref.tokens


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled graph"])
def test_cuda_greedy_generate_applies_a_repetition_penalty_in_the_graph(compile):
    """A repetition penalty is applied inside the graphed step, which marks its picks: the tokens
    of the ungraphed call, on a first call (whose capture leaves the marks as it found them), a
    second one over the same cache (the marks made anew) and a stream."""
    torch._dynamo.reset()
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float64 if compile else torch.float32)  # (as above)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ref = model.generate(rows, 24, cuda_graph=False, repetition_penalty=1.5, return_dict=True)
    assert ref.tokens != model.generate(rows, 24, cuda_graph=False, return_dict=True).tokens
    cache = model.new_cache(3, 64)
    kw = dict(cache=cache, cuda_graph=True, compile=compile, repetition_penalty=1.5)
    got = [model.generate(rows, 24, return_dict=True, **kw) for _ in range(2)]
    handed = [step.tokens for step in model.stream(rows, 24, **kw)]
    assert got[0].tokens == got[1].tokens == ref.tokens
    assert torch.stack(handed, 1).tolist() == ref.tokens


def test_cuda_compiled_sampled_generate_draws_from_the_kept_tokens_and_repeats_with_the_seed():
    """Compiled, the step draws with Inductor's own random numbers: from one seed the same tokens
    twice (the second call replays the first one's graph), from another seed others, and every
    token among the top-k of the logits an uncompiled step gives for the row so far."""
    torch._dynamo.reset()
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float64)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    kw = dict(temperature=1.2, top_k=3, cuda_graph=True, compile=True, return_dict=True)
    cache = model.new_cache(3, 64)
    outs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        outs.append(model.generate(rows, 16, cache=cache, **kw))
    assert outs[0].tokens == outs[1].tokens != outs[2].tokens
    for row, new in zip(rows, outs[0].tokens, strict=True):
        seq = torch.tensor([row + new], device="cuda")
        logits = model(seq)[0, len(row) - 1 : -1]  # the logits each new token was drawn from
        top = logits.topk(3, dim=-1).indices
        assert (top == torch.tensor(new, device="cuda")[:, None]).any(-1).all(), (row, new)


def test_cuda_compiled_top_p_generate_draws_from_the_kept_tokens():
    """Compiled, a top-p step sorts inside the graph: every token it draws lies in the top-p
    set of the logits an uncompiled step gives."""
    from qkvlab.models.sampling import top_p_filter

    torch._dynamo.reset()
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float64)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    torch.manual_seed(3)
    out = model.generate(rows, 16, temperature=0.7, top_p=0.5, cuda_graph=True, compile=True, return_dict=True)
    for row, new in zip(rows, out.tokens, strict=True):
        seq = torch.tensor([row + new], device="cuda")
        logits = model(seq)[0, len(row) - 1 : -1].float() / 0.7
        allowed = top_p_filter(logits, 0.5) > float("-inf")
        assert allowed.gather(-1, torch.tensor(new, device="cuda")[:, None]).all(), (row, new)
        assert allowed.sum(-1).max() < logits.shape[-1]  # the cut dropped something


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled graph"])
def test_cuda_calls_over_one_cache_replay_the_first_calls_graph(compile):
    """Calls over one cache capture the step once: each later call (other prompts, ragged or
    not, greedy or sampled with its own generator) replays that graph and gives the tokens a
    fresh, ungraphed call gives."""
    from qkvlab.models.decoding import StaticDecoder

    captures = []
    capture = StaticDecoder.capture

    def counted(self):
        captures.append(self)
        capture(self)

    torch._dynamo.reset()
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float64 if compile else torch.float32)  # (as above)
    cache = model.new_cache(3, 64)
    prompts = ([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], [[1, 2], [3, 4, 5, 6, 7], [8]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StaticDecoder, "capture", counted)
        for kw in ({}, dict(temperature=0.8, top_k=50)):
            for rows in (*prompts, prompts[0]):
                seed = dict(generator=torch.Generator(device="cuda").manual_seed(2)) if kw else {}
                got = model.generate(rows, 20, cache=cache, cuda_graph=True, compile=compile, **kw, **seed)
                seed = dict(generator=torch.Generator(device="cuda").manual_seed(2)) if kw else {}
                want = model.generate(rows, 20, cuda_graph=False, **kw, **seed)
                assert torch.equal(got, want), (kw, rows)
    assert len(captures) == 2  # one greedy decoder, one sampling decoder


def test_cuda_graph_step_returns_a_copy_or_the_graphs_buffer():
    from qkvlab.models.decoding import StaticDecoder

    model = cuda_gpt("q_kv", "llama", torch.float32)
    idx = torch.randint(0, 512, (2, 12), device="cuda")
    cache = model.new_cache(2, 32)
    model.prefill(idx[:, :8], cache)
    dec = StaticDecoder(model, cache, cuda_graph=True)
    first = dec.step(idx[:, 8])
    view = dec.step(idx[:, 9], copy=False)
    assert view.data_ptr() == dec._logits.data_ptr() and first.data_ptr() != view.data_ptr()
    held = view.clone()
    copied = dec.step(idx[:, 10])
    assert copied.data_ptr() != dec._logits.data_ptr() and torch.equal(copied, dec._logits)
    assert torch.equal(view, copied) and not torch.equal(view, held)  # the buffer moved on a step
    ref = model.new_cache(2, 32)
    model.prefill(idx[:, :8], ref)
    eager = [model.decode_one(idx[:, t], ref) for t in (8, 9, 10)]
    for got, want in zip((first, held, copied), eager, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_cuda_graph_capture_survives_collections_of_cyclic_graphs():
    """A collection during a capture that frees another graph invalidates the capture (and the
    process's CUDA random state). When one lands is up to the collector's thresholds, so here a
    forward hook makes one inside every capture wherever automatic collection is on, as it may
    be after any allocation; and each decoder before is leaked in a cycle, as any object of a
    user's may hold one. Every capture must still succeed, and repeated generate calls (a
    decoder each) too."""
    import gc

    from qkvlab.models.decoding import StaticDecoder

    model = cuda_gpt("q_kv+gqa2", "llama", torch.float32)
    idx = torch.randint(0, 512, (2, 12), device="cuda")
    want = model.generate(idx, 6, cuda_graph=False)
    collected = []

    def collect_as_the_collector_may(module, args):
        if gc.isenabled() and torch.cuda.is_current_stream_capturing():
            collected.append(gc.collect())

    hook = model.register_forward_pre_hook(collect_as_the_collector_may)
    try:
        for _ in range(4):
            cache = model.new_cache(2, 32)
            model.prefill(idx, cache)
            dec = StaticDecoder(model, cache, cuda_graph=True)
            dec.step(idx[:, -1])
            assert dec.graph is not None
            dec.cycle = dec  # garbage only a collection frees
            del dec
        for _ in range(4):
            assert torch.equal(model.generate(idx, 6, cuda_graph=True), want)
        torch.randn(4, device="cuda")  # the random state is intact
    finally:
        hook.remove()
        gc.collect()
    assert not collected, f"automatic collection was on during {len(collected)} captures"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_launched_without_the_replay_prologue_steps_exactly(compile):
    """A step graph that draws no random numbers is launched directly (no seed and offset fills
    first): every step equals the dynamic decode, and the random state is left alone."""
    from qkvlab.models.decoding import StaticDecoder

    model = cuda_gpt("q_kv+gqa2", "llama", torch.float32)
    idx = torch.randint(0, 512, (2, 12), device="cuda")
    tokens = torch.randint(0, 512, (2, 5), device="cuda")
    cache, ref = model.new_cache(2, 32), model.new_cache(2, 32)
    model.prefill(idx, cache)
    model.prefill(idx, ref)
    dec = StaticDecoder(model, cache, cuda_graph=True, compile=compile)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    for t in tokens.T:
        got = dec.step(t)
        torch.testing.assert_close(got, model.decode_one(t, ref), rtol=1e-4, atol=1e-4)
    assert dec._launch != dec.graph.replay  # launched directly
    offset = gen.get_offset()
    dec.step(tokens[:, 0])
    torch.cuda.synchronize()
    assert gen.get_offset() == offset
    a, b = torch.rand(8, device="cuda"), torch.rand(8, device="cuda")
    assert not torch.equal(a, b)


def test_cuda_graph_that_draws_random_numbers_keeps_the_replay():
    """A graph whose kernels draw random numbers must advance the generator every launch: no
    direct launch for it, and its replays draw new numbers."""
    from qkvlab.models.decoding import graph_launcher

    x = torch.empty(64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x.copy_(torch.rand(64, device="cuda"))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(torch.rand(64, device="cuda"))
    assert graph_launcher(graph, x.device) is None
    first = x.clone()
    graph.replay()
    assert not torch.equal(first, x)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_cuda_stream_with_stops_gives_what_a_call_without_one_gives(sampled):
    """A stream with stops reads every token on the host while the next step runs (graphed
    steps); a call without a stream reads the rows' ends only now and then. Ragged rows, a stop
    id that ends a row early: the same tokens, lengths, finish reasons and sequences."""
    model = cuda_gpt("q_kv+gqa2", "llama", torch.float32)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    kw = dict(temperature=0.9, top_k=40, repetition_penalty=1.2) if sampled else {}

    def gen() -> torch.Generator:
        return torch.Generator(device="cuda").manual_seed(3)

    free = model.generate(rows, 24, generator=gen(), return_dict=True, **kw)
    kw["stop_token_ids"] = [free.tokens[0][4]]
    one = model.generate(rows, 24, generator=gen(), return_dict=True, **kw)
    assert one.lengths[0] <= 5 and one.finish_reasons[0] == "stop_token"
    stream = model.stream(rows, 24, generator=gen(), **kw)
    tokens, reasons = [[] for _ in rows], [None] * len(rows)
    for step in stream:
        for b, (emitted, token) in enumerate(zip(step.emitted.tolist(), step.tokens.tolist(), strict=True)):
            if emitted:
                tokens[b].append(token)
            reasons[b] = step.finished[b] or reasons[b]
    got = stream.result
    assert tokens == got.tokens == one.tokens and reasons == got.finish_reasons == one.finish_reasons
    assert got.lengths == one.lengths and torch.equal(got.sequences, one.sequences)


def test_cuda_cached_decode_does_not_use_cudnn_attention():
    """cuDNN plans a new graph for every key length (ms of host time per call): eager decode avoids it."""
    from torch.profiler import ProfilerActivity, profile

    model = cuda_gpt("q_k_v", "llama", torch.bfloat16)
    cache = model.new_cache(1, 64)
    idx = torch.randint(0, 512, (1, 8), device="cuda")
    model.prefill(idx, cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(3):
            model.decode_one(idx[:, t], cache)
    names = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in names  # the profile saw the attention calls
    assert not any("cudnn_attention" in n for n in names), sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("to, init, pool, refit", [("Q-K=V", "fit", "mean", False), ("Q-MQA", "fit", "fit", True)])
def test_cuda_conversion_matches_the_cpu_one(to, init, pool, refit):
    """convert runs its fits (and the layer-by-layer refit) on the model's device: the same model as on a CPU."""
    from qkvlab.interop.convert import attention_input_moments, convert_model, target_config

    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=64, n_heads=8, vocab_size=512, max_seq_len=64, recipe="llama", variant="GQA-4")
    src = GPT(cfg).eval()
    target = target_config(cfg, to, None)
    calib, idx = torch.randint(0, 512, (8, 32)), torch.randint(0, 512, (2, 32))
    kw = dict(init=init, pool=pool)
    if refit:
        kw.update(tokens=calib, refit_output=True)
    else:
        kw.update(moments=attention_input_moments(src, calib))
    on_cpu, _ = convert_model(src, target, **kw)
    on_gpu, _ = convert_model(src.to("cuda"), target, **kw)
    with torch.no_grad():
        want, got = on_cpu(idx), on_gpu.to("cuda")(idx.to("cuda")).cpu()
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_cuda_model_with_a_cpu_generator_gets_one_clear_error():
    """A generator on another device than the model is refused at the call, naming the fix,
    rather than failing inside the sampling's multinomial."""
    from qkvlab.errors import ConfigError

    model = cuda_gpt("q_kv", "llama", torch.float32)
    with pytest.raises(
        ConfigError, match=r"generator is on cpu but the model is on cuda; make it with torch\.Generator"
    ):
        model.generate([[1, 2, 3]], 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    out = model.generate([[1, 2, 3]], 4, temperature=1.0, generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (1, 7)
