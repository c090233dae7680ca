"""Linear attention as an option of the one attention module (variants ``+linear``).

Parallel (masked) form == recurrent form for every sharing and head sharing; under Q=K=V the
recurrent form is DESIGN.md's recurrence written out; the non-causal form is the direct
formula; decoding with the fixed-size state equals full recompute and does not grow; a tiny
GPT trains; costs and the study config know the linear rows; mistakes raise ConfigError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qkvlab import GPT, ConfigError, EncoderConfig, GPTConfig, KVCache, SequenceEncoder, parse_variant
from qkvlab.attention import Attention, CacheLayout
from qkvlab.attention.cache import LinearState
from qkvlab.attention.linear import EPS, FEATURE_MAPS
from qkvlab.costs import macs, variant_costs
from qkvlab.models import get_preset

REPO = Path(__file__).resolve().parents[1]
D_MODEL, N_HEADS, HEAD_DIM = 32, 4, 8

# Every sharing, and grouped K/V heads where the sharing allows it.
LINEAR_VARIANTS = [
    "q_k_v+linear",
    "q_kv+linear",
    "qk_v+linear",
    "qkv+linear",
    "qv_k+linear",
    "k_v+linear",
    "q_kv+gqa2+linear",
    "q_kv+mqa+linear",
    "q_k_v+gqa2+linear",
    "q_k_v+mqa+linear",
    "q_kv+gqa2+qknorm+linear",
]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layer(variant: str, *, causal: bool = True, **kw) -> Attention:
    spec = parse_variant(variant)
    spec = spec.replace(pos=spec.pos or "none")
    torch.manual_seed(0)
    attn = Attention(D_MODEL, N_HEADS, spec, head_dim=HEAD_DIM, causal=causal, max_seq_len=64, **kw)
    return attn.double().eval()


def state_for(attn: Attention, B: int, max_len: int = 64) -> LinearState:
    layout = CacheLayout(1, attn.n_kv_heads, attn.head_dim, attn.kv_shared, linear=True)
    return LinearState(layout, B, max_len, dtype=torch.float64)


def run_chunks(attn: Attention, x: torch.Tensor, sizes: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``x`` through the recurrent form in chunks of ``sizes`` tokens (1 = pure recurrence)."""
    state = state_for(attn, x.shape[0])
    outs, pos = [], 0
    with torch.no_grad():
        for n in sizes:
            pm = None if mask is None else mask[:, : pos + n]
            outs.append(attn(x[:, pos : pos + n], offset=pos, cache=state.layers[0], padding_mask=pm))
            pos += n
    assert pos == x.shape[1]
    return torch.cat(outs, dim=1)


# ============================================================ parallel == recurrent
@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_parallel_equals_recurrent(variant, decay):
    attn = layer(variant, linear_decay=decay)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x)
    one_by_one = run_chunks(attn, x, [1] * 13)
    chunked = run_chunks(attn, x, [5, 1, 4, 1, 2])  # prompt chunks and single steps mixed
    torch.testing.assert_close(one_by_one, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    assert full.abs().max() > 1e-3  # a real output, not zeros on both sides


@pytest.mark.parametrize("feature", sorted(FEATURE_MAPS))
def test_parallel_equals_recurrent_with_each_feature_map_and_a_padding_mask(feature):
    attn = layer("q_kv+gqa2+linear", linear_feature=feature)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # row 1 left-padded: its first three keys must count for nothing
    with torch.no_grad():
        full = attn(x, padding_mask=mask)
    torch.testing.assert_close(run_chunks(attn, x, [1] * 9, mask), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(run_chunks(attn, x, [4, 1, 4], mask), full, rtol=0, atol=1e-12)
    # Padding the first keys of row 1 equals removing them (positions play no part here: pos none).
    with torch.no_grad():
        alone = attn(x[1:, 3:])
    torch.testing.assert_close(full[1:, 3:], alone, rtol=0, atol=1e-12)


def test_grouped_queries_read_one_state_per_kv_head():
    attn = layer("q_kv+mqa+linear")
    state = state_for(attn, 2)
    with torch.no_grad():
        attn(torch.randn(2, 6, D_MODEL, dtype=torch.float64), cache=state.layers[0])
    assert state.layers[0].S.shape == (2, 1, HEAD_DIM, HEAD_DIM)  # one KV head, not four
    assert state.layers[0].n.shape == (2, 1, HEAD_DIM)


# ======================================================= the DESIGN.md recurrence
def design_recurrence(z: torch.Tensor, decay: float) -> torch.Tensor:
    """DESIGN.md, written out: S_t = lam S_{t-1} + phi(z_t) z_t^T, n_t = n_{t-1} + phi(z_t),
    y_t = phi(z_t)^T S_t / phi(z_t)^T n_t, per head; ``z`` is ``(B, H, T, D)``."""
    B, H, T, D = z.shape
    y = torch.empty_like(z)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(D, D, dtype=z.dtype)
            n = torch.zeros(D, dtype=z.dtype)
            for t in range(T):
                zt = z[b, h, t]
                phi = F.elu(zt) + 1
                S = decay * S + torch.outer(phi, zt)
                n = n + phi
                y[b, h, t] = (phi @ S) / (phi @ n)
    return y


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_q_eq_k_eq_v_recurrent_form_is_the_design_recurrence(decay):
    attn = layer("qkv+linear", linear_decay=decay)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        z = attn.qkv.proj["qkv"](x).view(2, 10, N_HEADS, HEAD_DIM).transpose(1, 2)  # the one projection
        y = design_recurrence(z, decay)
        expected = attn.o_proj(y.transpose(1, 2).reshape(2, 10, N_HEADS * HEAD_DIM))
        full = attn(x)
    torch.testing.assert_close(run_chunks(attn, x, [1] * 10), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-12)


# ========================================================== non-causal, direct
@pytest.mark.parametrize("variant", ["q_k_v+linear", "qkv+linear", "q_kv+gqa2+linear"])
def test_non_causal_parallel_form_is_the_direct_formula(variant):
    attn = layer(variant, causal=False)
    B, T = 2, 7
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    with torch.no_grad():
        got = attn(x, padding_mask=mask)
        q_raw, k_raw, v_raw = attn.qkv(x)
        G = N_HEADS // attn.n_kv_heads
        q = (F.elu(q_raw) + 1).view(B, T, N_HEADS, HEAD_DIM)
        k = (F.elu(k_raw) + 1).view(B, T, attn.n_kv_heads, HEAD_DIM)
        v = v_raw.view(B, T, attn.n_kv_heads, HEAD_DIM)
        y = torch.zeros(B, T, N_HEADS, HEAD_DIM, dtype=torch.float64)
        for b in range(B):
            for h in range(N_HEADS):
                for t in range(T):
                    num = sum(float(q[b, t, h] @ k[b, s, h // G]) * v[b, s, h // G] for s in range(T) if mask[b, s])
                    den = sum(float(q[b, t, h] @ k[b, s, h // G]) for s in range(T) if mask[b, s])
                    y[b, t, h] = num / den
        expected = attn.o_proj(y.reshape(B, T, N_HEADS * HEAD_DIM))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_weights_are_normalised_and_symmetric_kernel_under_q_eq_k():
    attn = layer("qk_v+linear", causal=False)
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y, info = attn(x, need_weights=True)
    torch.testing.assert_close(info.weights.sum(-1), torch.ones(1, N_HEADS, 6, dtype=torch.float64))
    torch.testing.assert_close(info.logits, info.logits.transpose(-1, -2))  # phi(k_i).phi(k_j) is symmetric
    assert torch.equal(y, attn(x))


def test_encoder_with_linear_attention_is_bidirectional():
    cfg = EncoderConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=16, max_seq_len=16, variant="Q=K=V+linear")
    model = SequenceEncoder(cfg).eval()
    idx = torch.randint(0, 16, (1, 8))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 16
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0, 0], model(changed)[0, 0])  # the last token reaches the first


# ================================================================ GPT decoding
def tiny_gpt(variant: str, max_seq_len: int = 48, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layers=2, d_model=D_MODEL, n_heads=N_HEADS, vocab_size=64, max_seq_len=max_seq_len, variant=variant, **kw
    )
    return GPT(cfg).eval()


@pytest.mark.parametrize("variant", ["Q=K=V+linear", "QKV+linear", "Q-K=V+linear", "Q=K-V+linear", "Q-GQA-2+linear"])
def test_generate_with_the_state_equals_full_recompute(variant):
    model = tiny_gpt(variant)
    prompt = torch.randint(0, 64, (2, 5))
    cached = model.generate(prompt, 25)
    assert torch.equal(cached, model.generate(prompt, 25, use_cache=False))
    state = model.new_cache(2)
    assert isinstance(state, LinearState) and state.bytes_per_token == 0
    with torch.no_grad():
        steps = [model.prefill(cached[:, :5], state)]
        steps += [model.decode_one(cached[:, t], state) for t in range(5, 29)]
        full = model(cached[:, :29])
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], rtol=1e-4, atol=1e-5)
    assert state.length == 29
    state.reset()  # generate may reuse a state: reset forgets everything
    assert state.length == 0 and all(not layer.S.any() and not layer.n.any() for layer in state.layers)
    assert torch.equal(model.generate(prompt, 25, cache=state), cached)


def test_decode_memory_does_not_grow_with_length():
    model = tiny_gpt("Q=K=V+linear", max_seq_len=256)
    state = model.new_cache(1)

    def storages() -> list[tuple[int, int]]:
        return [
            (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for la in state.layers for t in (la.S, la.n)
        ]

    before = storages()
    tok = torch.randint(0, 64, (1,))
    logits = model.prefill(tok.view(1, 1), state)
    measured = {}
    for length in range(2, 257):
        logits = model.decode_one(logits.argmax(-1), state)
        if length in (16, 256):
            measured[length] = (state.nbytes, storages())
    assert state.length == 256
    assert measured[16] == measured[256] and measured[16][1] == before  # same bytes, same storages, in place
    layout = model.cache_layout()
    assert state.nbytes == layout.state_bytes(torch.float32) == 2 * 4 * (8 * 8 + 8) * 4  # layers*H*(D^2+D)*4 B
    # The softmax model's KV cache, for comparison, grows with the length.
    kv = {n: KVCache.for_model(tiny_gpt("Q=K=V", max_seq_len=256), 1, n).nbytes for n in (16, 256)}
    assert kv[256] == 16 * kv[16] and kv[16] == 16 * 2 * 4 * 8 * 4
    assert state.nbytes < kv[256]


def test_state_is_float32_for_a_half_precision_model():
    model = tiny_gpt("Q=K=V+linear").to(torch.bfloat16)
    state = model.new_cache(1)
    assert state.dtype == torch.float32 and state.nbytes == model.cache_layout().state_bytes(torch.float32)
    prompt = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        stepped = torch.stack(
            [model.prefill(prompt[:, :3], state)] + [model.decode_one(prompt[:, t], state) for t in (3, 4, 5)], 1
        )
        full = model(prompt)[:, 2:]
    assert stepped.dtype == torch.bfloat16
    torch.testing.assert_close(stepped.float(), full.float(), rtol=0.05, atol=0.05)


# ===================================================================== training
def test_training_two_steps_through_the_trainer(tmp_path):
    from qkvlab import load_model
    from qkvlab.train import load_config, train

    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.npy"
    np.save(path, rng.integers(0, 64, size=4000).astype(np.uint16))
    cfg = load_config(
        None,
        [
            f"data.source={path}",
            f"out_dir={tmp_path / 'run'}",
            "model.n_layers=2",
            "model.d_model=32",
            "model.n_heads=4",
            "model.variant=Q=K=V+linear",
            "batch_size=4",
            "seq_len=32",
            "max_steps=2",
            "eval_every=2",
            "eval_batches=2",
            "log.progress=false",
            "log.tensorboard=false",
        ],
    )
    summary = train(cfg, verbose=False)
    assert summary["steps"] == 2 and np.isfinite(summary["val_loss"])
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.config.variant == parse_variant("qkv+learned+linear")
    assert isinstance(model.new_cache(1), LinearState)


def test_gradients_reach_every_parameter():
    model = tiny_gpt("Q-GQA-2+linear").train()
    idx = torch.randint(0, 64, (2, 16))
    loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 64), idx[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ======================================================================= costs
def test_costs_report_the_state_instead_of_a_per_token_cache():
    base = get_preset("paper-300m")
    (qkv, linear) = variant_costs(base, ["Q=K=V", "Q=K=V+linear"])
    assert linear["variant"] == "Q=K=V (linear)" and linear["id"] == "qkv+learned+linear"
    assert linear["kv_cache_bytes_per_token"] == 0 and linear["kv_cache_bytes_per_token_measured"] == 0
    state = 20 * 16 * (64 * 64 + 64) * 4  # layers * heads * (D^2 + D) * float32
    assert linear["decode_state_bytes"] == linear["kv_cache_bytes_at_context"] == state
    assert qkv["decode_state_bytes"] == 0 and qkv["kv_cache_bytes_at_context"] == 40_960 * 32768
    assert linear["cache_reduction"] == 1.0
    assert linear["params_total"] == qkv["params_total"]  # the feature map has no parameters


def test_macs_of_the_masked_form_match_torch_flop_counter():
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32, variant="Q-GQA-2+linear")
    m = macs(cfg, 12)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        GPT(cfg).eval()(torch.randint(0, 64, (1, 12)))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert sum(counts.values()) == 2 * m["total"]
    assert counts.pop("aten.bmm") == 2 * m["scores"]  # phi(q) phi(k)^T and weights @ V


# =============================================================== study config
def test_the_tiny_study_lists_the_linear_rows():
    from qkvlab.study.sweep import expand, load_sweep
    from qkvlab.train import TrainConfig

    plans = expand(load_sweep(REPO / "configs" / "studies" / "lm-variants-tiny.yaml"))
    linear = [p for p in plans if p.variant_id.endswith("+linear")]
    assert sorted({p.variant for p in linear}) == ["Q=K=V (linear)", "QKV (linear)"]
    assert len(linear) == 4 and all(p.status == "pending" for p in linear)  # two rows x two seeds
    assert len({p.run_id for p in plans}) == len(plans)
    for plan in linear:
        TrainConfig.from_dict({**plan.config, "out_dir": "unused"})


# ====================================================================== errors
@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(variant="Q=K=V+linear", recipe="llama"), ["RoPE", "'+none'"]),
        (dict(variant="qkv+rope+linear"), ["RoPE", "learned"]),
        (dict(variant="Q=K=V+linear", linear_feature="softmax"), ["'softmax'", "elu+1", "relu"]),
        (dict(variant="Q=K=V+linear", linear_decay=0.0), ["linear_decay", "(0, 1]"]),
        (dict(variant="Q=K=V+linear", linear_decay=1.5), ["linear_decay", "(0, 1]"]),
        (dict(variant="Q=K=V+linear", linear_decay=True), ["linear_decay"]),
        (dict(variant="qkv+linear+softmax"), ["twice"]),
    ],
)
def test_config_mistakes_raise_config_error(kwargs, fragments):
    with pytest.raises(ConfigError) as err:
        GPTConfig(n_layers=1, d_model=32, n_heads=4, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_structural_mistakes_raise_config_error():
    with pytest.raises(ConfigError, match="2D positional fix"):
        EncoderConfig(d_model=32, n_heads=4, variant="qkv+2d+linear")
    with pytest.raises(ConfigError, match="causal"):
        EncoderConfig(d_model=32, n_heads=4, variant="Q=K=V+linear", linear_decay=0.9)
    EncoderConfig(d_model=32, n_heads=4, variant="Q=K=V", linear_decay=0.9)  # unused without '+linear'
    model = tiny_gpt("Q=K=V+linear")
    softmax = tiny_gpt("Q=K=V")
    with pytest.raises(ConfigError, match="fixed-size state"):
        KVCache(model.cache_layout(), 1, 8)
    with pytest.raises(ConfigError, match="softmax attention"):
        LinearState(softmax.cache_layout(), 1, 8)
    with pytest.raises(ConfigError, match="allocated for"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=softmax.new_cache(1))
    with pytest.raises(ConfigError, match="allocated for"):
        softmax(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(1))
    with pytest.raises(ConfigError, match="batch_size >= 1"):
        LinearState(model.cache_layout(), 0, 8)
    state = model.new_cache(2, max_len=4)
    with pytest.raises(ConfigError, match="Batch of 1"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=state)
    model(torch.zeros(2, 3, dtype=torch.long), cache=state)
    with pytest.raises(ConfigError, match="max_len=4"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=state)
    with pytest.raises(ConfigError, match="whole sequence"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=model.new_cache(2), need_weights=True)
    attn = layer("qkv+linear")
    with pytest.raises(ConfigError, match="LinearState"):
        attn(torch.zeros(1, 2, D_MODEL, dtype=torch.float64), cache=KVCache(softmax.cache_layout(), 1, 8).layers[0])


def test_eps_guards_a_query_that_sees_nothing():
    # relu features can all vanish: the normaliser is clamped to EPS and the output is 0, not NaN.
    attn = layer("qkv+linear", linear_feature="relu")
    with torch.no_grad():
        for p in attn.qkv.parameters():
            p.zero_()
        attn.qkv.proj["qkv"].bias.fill_(-1.0)  # every feature relu(-1) = 0
        y = attn(torch.randn(1, 4, D_MODEL, dtype=torch.float64))
        y_rec = run_chunks(attn, torch.randn(1, 4, D_MODEL, dtype=torch.float64), [1, 1, 1, 1])
    expected = attn.o_proj.bias.expand(1, 4, D_MODEL)  # attention output 0, only the bias
    assert EPS == 1e-6
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y_rec, expected, rtol=0, atol=0)
