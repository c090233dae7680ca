"""Equivalences over the whole variant grid on tiny models (CPU, seconds).

Every sharing x {MHA, GQA, MQA where valid} x {none, learned, rope} x {gpt2, llama}:
cached decode == full forward, cache layout and bytes, sdpa == reference, and the exact
K=V semantics (value never rotated, one tensor reaches the kernel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import GRID, N_HEADS, grid_ids, variant_id
from qkvlab import GPT, EncoderConfig, GPTConfig, KVCache, SequenceEncoder
from qkvlab.attention import Attention, VariantSpec
from qkvlab.attention import backends as backends_mod


def tiny_gpt(variant: str, recipe: str = "gpt2", **kw) -> GPT:
    cfg = GPTConfig(
        n_layers=2, d_model=32, n_heads=N_HEADS, head_dim=8, vocab_size=64, max_seq_len=32, recipe=recipe,
        variant=variant, **kw,
    )  # fmt: skip
    return GPT(cfg).double().eval()


def tokens(B: int, T: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T))


@pytest.mark.parametrize("case", GRID, ids=grid_ids)
def test_cached_decode_matches_full_forward(case):
    sharing, heads, pos, recipe = case
    model = tiny_gpt(variant_id(sharing, heads, pos, qk_norm=recipe == "llama"), recipe)
    idx = tokens(2, 12)
    full = model(idx)
    cache = model.new_cache(2, 12)
    assert cache.dtype == torch.float64
    steps = [model(idx[:, :5], cache=cache)]  # prefill
    steps.append(model(idx[:, 5:8], cache=cache))  # a chunk at an offset (explicit causal mask)
    for t in range(8, 12):  # one token at a time
        steps.append(model(idx[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)
    assert cache.length == 12


@pytest.mark.parametrize("case", GRID, ids=grid_ids)
def test_cache_layout_and_bytes(case):
    sharing, heads, pos, recipe = case
    model = tiny_gpt(variant_id(sharing, heads, pos), recipe).float()
    spec = model.config.variant
    B, max_len = 3, 20
    cache = model.new_cache(B, max_len, dtype=torch.bfloat16)
    n_kv = spec.kv_heads(N_HEADS)
    per_layer = 1 if spec.kv_shared else 2
    assert cache.n_tensors == model.config.n_layers * per_layer
    for layer in cache.layers:
        assert (layer.k is layer.v) == spec.kv_shared
        assert layer.k.shape == (B, n_kv, max_len, 8)
    analytic = model.config.n_layers * per_layer * n_kv * 8 * 2  # bf16
    assert cache.bytes_per_token == analytic
    assert cache.nbytes == analytic * B * max_len
    assert cache.measured_bytes_per_token == analytic


def test_kv_shared_cache_is_exactly_half():
    qkv, shared = tiny_gpt("q_k_v").new_cache(1, 16), tiny_gpt("q_kv").new_cache(1, 16)
    assert shared.nbytes * 2 == qkv.nbytes


@pytest.mark.parametrize("case", [c for c in GRID if c[3] == "gpt2"], ids=grid_ids)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_sdpa_matches_reference(case, causal, padded):
    sharing, heads, pos, _ = case
    variant = variant_id(sharing, heads, pos)
    if causal:
        model = tiny_gpt(variant)
        x = tokens(2, 10)
    else:
        cfg = EncoderConfig(n_layers=2, d_model=32, n_heads=N_HEADS, head_dim=8, vocab_size=16, max_seq_len=32,
                            variant=variant)  # fmt: skip
        model = SequenceEncoder(cfg).double().eval()
        x = tokens(2, 10, 16)
    mask = None
    if padded:
        mask = torch.ones(2, 10, dtype=torch.bool)
        mask[1, 7:] = False  # right padding on row 1
        mask[0, 0] = False  # and one masked key on row 0
    outs = {}
    for name in ("sdpa", "reference"):
        for m in model.modules():
            if isinstance(m, Attention):
                m.backend = name
        outs[name] = model(x, padding_mask=mask)
    torch.testing.assert_close(outs["sdpa"], outs["reference"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["q_kv+gqa2+rope", "qkv+learned", "(Q=K-V)+", "q_k_v+mqa+rope+qknorm"])
def test_sdpa_matches_reference_gradients(variant):
    causal = "(" not in variant
    kw = dict(d_model=32, n_heads=N_HEADS, head_dim=8, max_seq_len=16)
    attn = Attention(variant=_resolved(variant), causal=causal, **kw).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name in ("sdpa", "reference"):
        attn.backend = name
        attn.zero_grad()
        x.grad = None
        attn(x).pow(2).sum().backward()
        grads[name] = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    for a, b in zip(grads["sdpa"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def assert_symmetric(logits: torch.Tensor) -> None:
    """Symmetric up to float64 rounding (the GEMM may sum s_ij and s_ji in another order)."""
    torch.testing.assert_close(logits, logits.transpose(-1, -2), rtol=0, atol=1e-13 * logits.abs().max().item())


def _resolved(text: str) -> VariantSpec:
    spec = VariantSpec.parse(text)
    return spec if spec.pos else spec.replace(pos="learned")


def _attention_logits(variant: str, causal: bool = False, T: int = 9) -> tuple[Attention, torch.Tensor, torch.Tensor]:
    attn = Attention(32, N_HEADS, _resolved(variant), head_dim=8, causal=causal, max_seq_len=16).double()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    _, info = attn(x, need_weights=True)
    return attn, x, info.logits


@pytest.mark.parametrize("sharing", ["qk_v", "qkv"])
@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_q_eq_k_logits_are_symmetric(sharing, pos, qk_norm):
    _, _, logits = _attention_logits(variant_id(sharing, "mha", pos, qk_norm))
    assert_symmetric(logits)


def test_q_eq_k_symmetric_in_a_full_model_with_learned_positions():
    """Learned positions are added to the input: layer-1 logits stay symmetric."""
    cfg = EncoderConfig(n_layers=2, d_model=32, n_heads=N_HEADS, vocab_size=16, variant="qk_v+learned")
    model = SequenceEncoder(cfg).double()
    _, infos = model(tokens(2, 10, 16), need_weights=True)
    for info in infos:
        assert_symmetric(info.logits)


@pytest.mark.parametrize("variant", ["q_k_v", "q_kv+rope", "qv_k+rope"])
def test_separate_query_gives_asymmetric_logits(variant):
    _, _, logits = _attention_logits(variant)
    assert (logits - logits.transpose(-1, -2)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["(Q=K-V)+", "(Q=K=V)+", "qk_v+rope+2d"])
def test_pos2d_fix_breaks_symmetry_and_matches_materialised_reference(variant):
    attn, x, logits = _attention_logits(variant)
    with torch.no_grad():  # make the mix non-trivial
        attn.pos2d.weight.copy_(torch.linspace(-0.5, 1.0, attn.pos2d.weight.numel()))
        attn.pos2d.bias.fill_(0.3)
    _, info = attn(x, need_weights=True)
    logits = info.logits
    assert (logits - logits.transpose(-1, -2)).abs().max() > 1e-3
    # Materialised: S[..., None] + P, mixed by the 1x1 conv (m weights + bias).
    _, k_raw, _ = attn.qkv(x)
    k = attn.key_role(attn._heads(k_raw, attn.n_kv_heads), 0)
    S = (k @ k.transpose(-1, -2)) * attn.scale  # Q = K
    T = x.shape[1]
    P = attn.pos2d.materialized(T).double()  # (T, T, m)
    expected = ((S[..., None] + P) * attn.pos2d.weight).sum(-1) + attn.pos2d.bias
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["q_kv+rope", "q_kv+rope+qknorm", "qkv+rope", "q_kv+gqa2+rope+qknorm"])
def test_value_path_is_never_rotated_or_normalised(variant):
    attn = Attention(32, N_HEADS, VariantSpec.parse(variant), head_dim=8, causal=True, max_seq_len=16).double()
    if attn.k_norm is not None:
        with torch.no_grad():
            attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out = attn(x)
    group = "kv" if "q_kv" in variant else "qkv"
    s = attn._heads(attn.qkv.proj[group](x), attn.n_kv_heads)  # raw shared projection
    k = attn.key_role(s, 0)
    q = k if attn.qk_shared else attn.query_role(attn._heads(attn.qkv.proj["q"](x), N_HEADS), 0)
    G = N_HEADS // attn.n_kv_heads

    def attend(v):
        kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        return attn.o_proj(y.transpose(1, 2).reshape(2, 7, 32))

    torch.testing.assert_close(out, attend(s), rtol=1e-10, atol=1e-10)  # value = raw s
    assert (out - attend(k)).abs().max() > 1e-3  # the test can tell a rotated value apart

    # The cache stores the raw shared tensor, before RoPE / norm.
    cache = KVCache(attn_layout(attn), 2, 16, dtype=torch.float64)
    attn(x, cache=cache.layers[0])
    torch.testing.assert_close(cache.layers[0].k[:, :, :7], s, rtol=0, atol=0)


def attn_layout(attn: Attention):
    from qkvlab.attention import CacheLayout

    return CacheLayout(1, attn.n_kv_heads, attn.head_dim, attn.kv_shared)


class _SpySDPA:
    def __init__(self):
        self.calls: list[tuple[bool, int, int]] = []
        self.real = F.scaled_dot_product_attention

    def __call__(self, q, k, v, **kw):
        self.calls.append((k is v, q.shape[1], k.shape[1]))
        return self.real(q, k, v, **kw)


@pytest.mark.parametrize(
    "variant, same_tensor, kv_heads",
    [
        ("q_kv+learned", True, 4),
        ("qkv+none", True, 4),
        ("q_kv+gqa2+learned", True, 2),
        ("q_kv+mqa+none", True, 1),
        ("q_k_v+gqa2+rope", False, 2),
        ("q_kv+rope", False, 4),  # the key role is rotated: a different tensor by design
    ],
)
def test_kernel_gets_one_tensor_and_fewer_heads(monkeypatch, variant, same_tensor, kv_heads):
    spy = _SpySDPA()
    monkeypatch.setattr(backends_mod.F, "scaled_dot_product_attention", spy)
    model = tiny_gpt(variant)
    idx = tokens(1, 6)
    model(idx)  # training-style forward
    cache = model.new_cache(1, 8)
    model(idx, cache=cache)  # prefill from the cache
    model(idx[:, :1], cache=cache)  # decode
    assert spy.calls and all(c == (same_tensor, N_HEADS, kv_heads) for c in spy.calls)


@pytest.mark.parametrize("variant", ["q_kv+rope", "q_k_v+gqa2+learned", "qkv+learned", "k_v+mqa+rope"])
def test_generate_cached_equals_uncached(variant):
    model = tiny_gpt(variant)
    prompt = tokens(2, 5)
    greedy = model.generate(prompt, 10)
    torch.testing.assert_close(greedy, model.generate(prompt, 10, use_cache=False), rtol=0, atol=0)
    sampled = [
        model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert torch.equal(sampled[0][:, :5], prompt)


def test_top_k_one_equals_greedy():
    model = tiny_gpt("q_kv")
    prompt = tokens(1, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1, generator=g), model.generate(prompt, 8))


def test_attention_dropout_is_active_only_in_training():
    model = tiny_gpt("q_kv", attn_dropout=0.5)
    idx = tokens(2, 8)
    ref = model(idx)
    assert torch.equal(ref, model(idx))
    model.train()
    assert not torch.allclose(model(idx), ref)


def test_cache_reset_reuses_memory():
    model = tiny_gpt("q_kv")
    cache = model.new_cache(1, 12)
    ptr = cache.layers[0].k.data_ptr()
    a = model.generate(tokens(1, 4), 6, cache=cache)
    b = model.generate(a[:, :4], 6, cache=cache)
    assert torch.equal(a, b) and cache.layers[0].k.data_ptr() == ptr


def test_generate_under_autocast_uses_an_autocast_dtype_cache():
    model = tiny_gpt("q_kv+rope", "llama").float()
    prompt = tokens(1, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 12)
        out = model.generate(prompt, 7, cache=cache)
    assert cache.dtype == torch.bfloat16 and cache.length == 11
    assert out.shape == (1, 12)


def test_cache_for_a_meta_model_counts_tensors_by_identity():
    from qkvlab.costs import build_on_meta

    for variant, per_layer in (("q_k_v", 2), ("q_kv", 1)):
        model = build_on_meta(GPTConfig(n_layers=3, d_model=32, n_heads=4, vocab_size=64, variant=variant))
        cache = KVCache.for_model(model, 2, 8)
        assert cache.device.type == "meta"
        assert cache.n_tensors == 3 * per_layer
        assert cache.nbytes == cache.bytes_per_token * 2 * 8


def test_gqa_equal_to_n_heads_warns_and_builds_mha():
    with pytest.warns(UserWarning, match="that is MHA"):
        cfg = GPTConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=64, variant="GQA-4")
    assert cfg.variant.n_kv_heads is None and cfg.variant.paper_name == "QKV"
