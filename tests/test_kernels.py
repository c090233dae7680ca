"""The Triton decode kernel (``qkvlab.kernels.kv_decode``) against its PyTorch reference.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set per test so nothing
leaks into other test modules); skipped where Triton is missing. Shapes are tiny: the
interpreter executes every program in numpy.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qkvlab
from conftest import INTERPRETER_PROBLEM, needs_interpreter
from qkvlab.attention.positional import Rotary
from qkvlab.kernels import DecodeConfig, decode_attention, decode_attention_reference, kv_decode
from qkvlab.kernels.kv_decode import HAS_TRITON, decode_unsupported_reason

# The CUDA tests compile the kernel for the GPU: they need Triton and a GPU, whatever the
# interpreter does (a GPU image whose interpreter fails its probe still runs them).
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and a CUDA GPU")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(B, Hq, Hkv, S, D, *, shared, rope, norm, dtype=torch.float32, lengths=None, seed=0):
    """Random q, caches, lengths and key-role tensors; lengths default to a mix incl. 1 and S."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = k if shared else torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if lengths is None:
        lengths = torch.tensor([1, S, S // 2 + 3, 17][:B] + [S] * max(0, B - 4), dtype=torch.int32)
    kw = {}
    if rope:
        rot = Rotary(D, S + 7)
        kw.update(rope_cos=rot.cos, rope_sin=rot.sin)
    if norm:
        kw["k_norm_weight"] = (torch.rand(D, generator=g) + 0.5).to(dtype)
    return q, k, v, lengths, kw


def reference64(q, k, v, lengths, *, shared, **kw):
    """The reference in float64 on upcast inputs (one shared tensor stays one tensor)."""
    k64 = k.double()
    v64 = k64 if shared else v.double()
    kw64 = {name: t.double() for name, t in kw.items()}
    return decode_attention_reference(
        q.double(), k64, v64, lengths, scale=q.shape[-1] ** -0.5, shared_kv=shared, **kw64
    )


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
KEY_ROLES = {"raw": (False, False), "rope": (True, False), "qknorm": (False, True), "rope+qknorm": (True, True)}


@needs_interpreter
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("key_role", list(KEY_ROLES))
@pytest.mark.parametrize("shared", [True, False], ids=["k=v", "k,v"])
def test_kernel_matches_reference_fp32(shared, key_role, heads):
    Hq, Hkv = HEADS[heads]
    rope, norm = KEY_ROLES[key_role]
    # 4 rows: lengths 1, S, S/2+3 and 17 (none a multiple of the 16-key tile but S); 3 splits.
    q, k, v, lengths, kw = make_inputs(4, Hq, Hkv, 50, 32, shared=shared, rope=rope, norm=norm)
    out = decode_attention(
        q, k, v, lengths, scale=32**-0.5, shared_kv=shared, config=DecodeConfig(block_n=16, num_splits=3), **kw
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, reference64(q, k, v, lengths, shared=shared, **kw)) < 1e-5


TILINGS = {  # (Hq, Hkv, D): tl.dot with rows padded to 16 from D = 32, tl.sum below
    "gqa4-d64": (8, 2, 64),
    "mqa16-d32": (16, 1, 32),
    "mha-d16": (2, 2, 16),
    "gqa4-d16": (8, 2, 16),
    "mqa16-d16": (16, 1, 16),
}


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("shape", list(TILINGS))
def test_kernel_tilings(shape, splits):
    """Both score paths (tl.dot with padded rows, tl.sum), 1 split (direct store) and many."""
    Hq, Hkv, D = TILINGS[shape]
    q, k, _, lengths, kw = make_inputs(3, Hq, Hkv, 45, D, shared=True, rope=True, norm=True)
    cfg = DecodeConfig(block_n=16, num_splits=splits)
    out = decode_attention(q, k, k, lengths, scale=D**-0.5, config=cfg, **kw)
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [16, 32], ids=["sum", "dot"])
@pytest.mark.parametrize("shared", [True, False], ids=["k=v", "k,v"])
def test_kernel_half_precision(shared, D, dtype):
    q, k, v, lengths, kw = make_inputs(3, 8, 2, 40, D, shared=shared, rope=True, norm=True, dtype=dtype)
    cfg = DecodeConfig(block_n=16, num_splits=2)
    out = decode_attention(q, k, v, lengths, scale=D**-0.5, shared_kv=shared, config=cfg, **kw)
    assert out.dtype == dtype
    assert rel_err(out, reference64(q, k, v, lengths, shared=shared, **kw)) < 1.5e-2


@needs_interpreter
def test_kernel_default_plan_4d_query_and_int_length():
    """Heuristic launch, q of shape (B, Hq, 1, D) and one int length for every row."""
    q, k, _, _, kw = make_inputs(2, 4, 2, 70, 32, shared=True, rope=True, norm=False)
    out = decode_attention(q[:, :, None], k, None, 61, scale=32**-0.5, shared_kv=True, **kw)
    assert out.shape == (2, 4, 1, 32)
    lengths = torch.full((2,), 61, dtype=torch.int64)
    ref = reference64(q, k, k, lengths, shared=True, **kw)
    assert rel_err(out[:, :, 0], ref) < 1e-5


@needs_interpreter
def test_kernel_reads_an_expanded_lengths_tensor_per_row():
    """A stride-0 lengths tensor (one device position expanded to every row) is read per row."""
    q, k, _, _, kw = make_inputs(3, 4, 2, 40, 16, shared=True, rope=True, norm=False)
    lengths = torch.tensor(23, dtype=torch.int32).expand(3)
    out = decode_attention(q, k, k, lengths, scale=16**-0.5, shared_kv=True, **kw)
    ref = reference64(q, k, k, torch.full((3,), 23), shared=True, **kw)
    assert rel_err(out, ref) < 1e-5


@needs_interpreter
def test_kernel_strided_cache_view_and_length_hint():
    """A view of a longer cache (row stride > S * D) and a max_length hint smaller than S."""
    q, big, _, _, kw = make_inputs(2, 4, 2, 64, 32, shared=True, rope=True, norm=True)
    k = big[:, :, :48]  # the module's cache.read(48) view: strided in S, contiguous in D
    lengths = torch.tensor([48, 20], dtype=torch.int32)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, max_length=32, config=DecodeConfig(block_n=16), **kw)
    assert rel_err(out, reference64(q, k.contiguous(), None, lengths, shared=True, **kw)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope_qkn"])
def test_pipelining_depth_agrees(norm, stages):
    """The query rotated back per tile and the keys by held angles, at any pipelining depth."""
    q, k, _, lengths, kw = make_inputs(2, 8, 2, 40, 32, shared=True, rope=True, norm=norm)
    cfg = DecodeConfig(block_n=16, num_splits=2, num_stages=stages)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=cfg, **kw)
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-5


# ----------------------------------------------------------------------------- fallback
def _fallback_cases():
    q, k, _, lengths, kw = make_inputs(2, 4, 2, 24, 32, shared=True, rope=True, norm=False)
    cases = {
        "float64": (q.double(), k.double(), lengths, {n: t.double() for n, t in kw.items()}, "dtype"),
        "head_dim_24": (q[..., :24].contiguous(), k[..., :24].contiguous(), lengths, {}, "head dim"),
        "non_contiguous_d": (q, k.transpose(2, 3).contiguous().transpose(2, 3)[..., :24, :], lengths, kw, "contiguous"),
        "misaligned": (q, torch.empty(k.numel() + 1)[1:].view_as(k).copy_(k), lengths, kw, "aligned"),
        "mixed_dtypes": (q.half(), k, lengths, kw, "mixed"),
    }
    return cases


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_fallback_warns_once_and_is_right(case):
    q, k, lengths, kw, words = _fallback_cases()[case]
    assert words in decode_unsupported_reason(q, k, None, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_attention(q, k, None, lengths, scale=0.2, shared_kv=True, **kw)
    assert len(caught) == 1 and "falling back" in str(caught[0].message)
    ref = decode_attention_reference(q, k, None, lengths, scale=0.2, shared_kv=True, **kw)
    torch.testing.assert_close(out, ref)


def test_fallback_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, _, lengths, kw = make_inputs(2, 4, 2, 24, 32, shared=True, rope=True, norm=True)
    assert "CUDA" in decode_unsupported_reason(q, k, None, **kw)
    with pytest.warns(RuntimeWarning, match="falling back") as record:
        out = decode_attention(q, k, None, lengths, scale=0.2, shared_kv=True, **kw)
    assert len(record) == 1
    torch.testing.assert_close(out, decode_attention_reference(q, k, None, lengths, scale=0.2, shared_kv=True, **kw))


def test_an_interpreter_that_fails_its_probe_falls_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(kv_decode, "_interpreter_problem", lambda: "probe: this interpreter cannot loop")
    q, k, _, lengths, kw = make_inputs(2, 4, 2, 24, 32, shared=True, rope=True, norm=False)
    assert decode_unsupported_reason(q, k, None, **kw) == "probe: this interpreter cannot loop"
    with pytest.warns(RuntimeWarning, match="cannot loop") as record:
        out = decode_attention(q, k, None, lengths, scale=0.2, shared_kv=True, **kw)
    assert len(record) == 1
    torch.testing.assert_close(out, decode_attention_reference(q, k, None, lengths, scale=0.2, shared_kv=True, **kw))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_the_interpreter_probe_passes_where_the_interpreter_works():
    """Triton 3.9's interpreter runs the kernels (every test here); its probe must say so."""
    import triton

    problem = kv_decode._interpreter_problem()
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9):
        assert problem is None
    else:  # Triton 3.6 with numpy 2 fails it; the message then names the version
        assert problem is None or triton.__version__ in problem


@needs_interpreter
def test_supported_inputs_do_not_warn():
    q, k, _, lengths, kw = make_inputs(2, 4, 2, 24, 32, shared=True, rope=True, norm=True)
    assert decode_unsupported_reason(q, k, None, **kw) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_attention(q, k, None, lengths, scale=0.2, shared_kv=True, **kw)


def test_bad_arguments_raise():
    q, k, v, lengths, kw = make_inputs(2, 4, 2, 24, 32, shared=False, rope=True, norm=False)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], k, v, lengths, scale=0.2)
    with pytest.raises(ValueError, match="shared_kv"):
        decode_attention(q, k, v, lengths, scale=0.2, shared_kv=True)
    with pytest.raises(ValueError, match="RoPE tables"):
        decode_attention(q, k, v, lengths, scale=0.2, rope_cos=kw["rope_cos"][:, :8], rope_sin=kw["rope_sin"][:, :8])
    with pytest.raises(ValueError, match="both"):
        decode_attention(q, k, v, lengths, scale=0.2, rope_cos=kw["rope_cos"])
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k, v, lengths[:1], scale=0.2)


# ------------------------------------------------------------------ agreement with the model
def test_reference_matches_attention_module_decode():
    """Layer 0 of a Q-K=V + GQA-2 + RoPE + QK-norm model: cached decode equals the reference."""
    torch.manual_seed(0)
    cfg = qkvlab.GPTConfig(
        n_layers=1,
        d_model=64,
        n_heads=4,
        variant="q_kv+gqa2+rope+qknorm",
        recipe="llama",
        vocab_size=32,
        max_seq_len=64,
    )
    model = qkvlab.GPT(cfg).double().eval()
    attn = model.backbone.blocks[0].attn
    with torch.no_grad():  # give the norms non-trivial weights
        attn.k_norm.weight.uniform_(0.5, 1.5)
        attn.q_norm.weight.uniform_(0.5, 1.5)
    B, L = 2, 13
    idx = torch.randint(0, 32, (B, L))
    cache = model.new_cache(B, L)
    seen = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True),
        attn.o_proj.register_forward_pre_hook(lambda m, args: seen.update(attn_out=args[0])),
    ]
    with torch.no_grad():
        model.prefill(idx[:, : L - 1], cache)
        model.decode_one(idx[:, L - 1], cache)
        for h in hooks:
            h.remove()
        layer = cache.layers[0]
        assert layer.kv_shared and attn.kv_shared
        q_raw, _, _ = attn.qkv(seen["x"])
        q = attn.query_role(attn._heads(q_raw, attn.n_heads), L - 1)  # (B, Hq, 1, D)
        lengths = torch.full((B,), L, dtype=torch.int32)
        args = dict(
            scale=attn.scale,
            rope_cos=attn.rotary.cos,
            rope_sin=attn.rotary.sin,
            k_norm_weight=attn.k_norm.weight,
            eps=attn.k_norm.eps,
            shared_kv=True,
        )
        ref = decode_attention_reference(q, layer.k, layer.v, lengths, **args)  # (B, Hq, 1, D)
    want = seen["attn_out"]  # (B, 1, Hq * D), the module's attention output before o_proj
    got = ref.transpose(1, 2).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if INTERPRETER_PROBLEM is None:  # the kernel (fp32, interpreter) on the same cache agrees too
        args32 = {n: (t.float() if torch.is_tensor(t) else t) for n, t in args.items()}
        out = decode_attention(q.float(), layer.k.float(), None, lengths, **args32)
        torch.testing.assert_close(out.double().transpose(1, 2).reshape(want.shape), want, rtol=1e-4, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 3])
def test_out_buffer_is_fully_written(splits):
    """A NaN-poisoned ``out`` comes back finite and right: every element was written."""
    q, k, _, lengths, kw = make_inputs(3, 8, 2, 40, 32, shared=True, rope=True, norm=True)
    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, k, lengths, scale=32**-0.5, out=out, config=DecodeConfig(num_splits=splits), **kw)
    assert got is out
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-5


# ------------------------------------------------------------------ compiled kernel on a GPU
CUDA_CASES = [
    # (dtype, Hq, Hkv, D, shared, rope, norm, splits); D = 16 takes the tl.sum path
    (torch.float32, 4, 4, 16, True, True, True, 3),
    (torch.float32, 8, 2, 128, True, True, True, 1),
    (torch.bfloat16, 4, 4, 16, True, True, False, 4),
    (torch.bfloat16, 4, 4, 128, True, True, False, 4),
    (torch.bfloat16, 32, 8, 128, True, True, True, 7),
    (torch.bfloat16, 32, 8, 16, True, True, True, 7),
    (torch.bfloat16, 16, 1, 64, True, False, True, None),
    (torch.bfloat16, 4, 4, 128, False, False, False, 2),
    (torch.float16, 8, 2, 64, False, True, True, 1),
    (torch.float16, 32, 32, 128, True, True, False, None),
    (torch.float16, 16, 2, 16, False, True, True, None),
]


@needs_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_cuda_kernel_matches_reference(case, monkeypatch):
    """The compiled kernel (not the interpreter) on a GPU; lengths 1, S, S/2+3, 17; poisoned out."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dtype, Hq, Hkv, D, shared, rope, norm, splits = case
    q, k, v, lengths, kw = make_inputs(4, Hq, Hkv, 300, D, shared=shared, rope=rope, norm=norm, dtype=dtype)
    q, k, lengths = q.cuda(), k.cuda(), lengths.cuda()
    v = k if shared else v.cuda()
    kw = {n: t.cuda() for n, t in kw.items()}
    out = torch.full_like(q, float("nan"))
    cfg = DecodeConfig(num_splits=splits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        decode_attention(q, k, v, lengths, scale=D**-0.5, shared_kv=shared, config=cfg, out=out, **kw)
    ref = reference64(q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), shared=shared, **{n: t.cpu() for n, t in kw.items()})
    assert rel_err(out.cpu(), ref) < (2e-4 if dtype == torch.float32 else 1.5e-2)


@needs_interpreter
def test_environment_launch_overrides_reach_calls_without_a_config(monkeypatch):
    """QKVLAB_DECODE_CONFIG is the launch of every call that passes no config (a whole model's
    steps); a call's own config still wins; the result is the reference's either way."""
    seen = []
    real = kv_decode._num_splits

    def spy(B, Hkv, n_tiles, device, cfg, resident):
        seen.append(cfg)
        return real(B, Hkv, n_tiles, device, cfg, resident)

    monkeypatch.setattr(kv_decode, "_num_splits", spy)
    q, k, _, lengths, kw = make_inputs(3, 8, 2, 45, 32, shared=True, rope=True, norm=False)
    ref = reference64(q, k, k, lengths, shared=True, **kw)
    monkeypatch.setenv("QKVLAB_DECODE_CONFIG", '{"block_n": 16, "num_splits": 3, "num_stages": 6}')
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, **kw)
    assert seen[-1] == DecodeConfig(block_n=16, num_splits=3, num_stages=6)
    assert rel_err(out, ref) < 1e-5
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=DecodeConfig(block_n=32, num_splits=1), **kw)
    assert seen[-1] == DecodeConfig(block_n=32, num_splits=1)
    assert rel_err(out, ref) < 1e-5
    monkeypatch.delenv("QKVLAB_DECODE_CONFIG")
    decode_attention(q, k, k, lengths, scale=32**-0.5, **kw)
    assert seen[-1] == DecodeConfig()


@pytest.mark.parametrize(
    "value, says",
    [
        ("6", "not a JSON object"),
        ("{block_n: 64}", "is not JSON"),
        ('{"blockn": 64}', "names 'blockn', not a launch field"),
        ('{"block_n": 48}', "block_n must be a power of two >= 16 or null, got 48"),
        ('{"num_stages": "4"}', "every field takes an integer or null"),
        ('{"num_splits": true}', "every field takes an integer or null"),
        ('{"num_stages": 0}', "num_stages must be an integer >= 1"),
    ],
)
def test_environment_launch_override_mistakes_are_one_clear_error(monkeypatch, value, says):
    from qkvlab.errors import ConfigError

    monkeypatch.setenv("QKVLAB_DECODE_CONFIG", value)
    with pytest.raises(ConfigError) as e:
        kv_decode.default_config()
    msg = str(e.value)
    assert "\n" not in msg and f"QKVLAB_DECODE_CONFIG={value!r}" in msg and says in msg, msg
    monkeypatch.setenv("QKVLAB_DECODE_CONFIG", ' {"num_stages": 4, "block_n": null} ')
    assert kv_decode.default_config() == DecodeConfig(num_stages=4)
    monkeypatch.setenv("QKVLAB_DECODE_CONFIG", "{}")
    assert kv_decode.default_config() == DecodeConfig()


CUDA_CONFIGS = [
    DecodeConfig(),
    DecodeConfig(num_stages=1),
    DecodeConfig(num_stages=4, block_n=32),
    DecodeConfig(block_n=16),
    DecodeConfig(block_n=64),
    DecodeConfig(block_n=128, num_warps=8),
    DecodeConfig(block_n=64, num_stages=6),
    DecodeConfig(block_n=32, num_stages=16),
    DecodeConfig(num_splits=1),
    DecodeConfig(num_splits=5),
]


@needs_cuda
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope_qkn"])
@pytest.mark.parametrize(
    "cfg",
    CUDA_CONFIGS,
    ids=lambda c: f"n{c.block_n}-sp{c.num_splits}-w{c.num_warps}-st{c.num_stages}",
)
def test_cuda_kernel_launch_configs(cfg, norm, monkeypatch):
    """Compiled launch overrides (tile, warps, pipelining depth, splits) all match the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, _, lengths, kw = make_inputs(3, 32, 8, 1000, 128, shared=True, rope=True, norm=norm, dtype=torch.bfloat16)
    q, k, lengths = q.cuda(), k.cuda(), lengths.cuda()
    kw = {n: t.cuda() for n, t in kw.items()}
    out = torch.full_like(q, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_attention(q, k, k, lengths, scale=128**-0.5, shared_kv=True, config=cfg, out=out, **kw)
    ref = reference64(q.cpu(), k.cpu(), None, lengths.cpu(), shared=True, **{n: t.cpu() for n, t in kw.items()})
    assert rel_err(out.cpu(), ref) < 1.5e-2


@needs_interpreter
def test_lengths_past_the_cache_read_only_the_cache():
    """A length over S reads the S cached keys (as the reference does), never past the cache."""
    q, k, _, _, kw = make_inputs(2, 4, 2, 40, 32, shared=True, rope=True, norm=False)
    lengths = torch.tensor([45, 40], dtype=torch.int32)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=DecodeConfig(block_n=16), **kw)
    assert rel_err(out, reference64(q, k, k, torch.tensor([40, 40]), shared=True, **kw)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize(
    "variant", ["q_kv+rope", "q_kv+gqa2+rope+qknorm", "qkv+rope", "q_kv+mqa+qknorm+learned", "q_kv+learned"]
)
def test_model_decode_through_the_kernel_matches_the_pytorch_path(variant, monkeypatch):
    """The attention module's decode step routed through the kernel (interpreter on CPU)."""
    import qkvlab.kernels
    from qkvlab import GPT, GPTConfig
    from qkvlab.attention import Attention

    calls = []
    real = qkvlab.kernels.decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(qkvlab.kernels, "decode_attention", spy)

    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=32, max_seq_len=64, recipe="llama", variant=variant)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 32, (2, 12))
    outs = {}
    for choice in ("torch", "triton"):
        for m in model.modules():
            if isinstance(m, Attention):
                m.decode_backend = choice
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(idx[:, :9], cache=cache)
            outs[choice] = torch.cat([model(idx[:, t : t + 1], cache=cache) for t in range(9, 12)], 1)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * 3  # every layer of every decode step took the kernel (and only those)


# ----------------------------------------------------------------------------- launch planning
def test_split_waves_fills_whole_waves():
    """The wave model never leaves a nearly empty last wave and prefers fewer splits on ties."""
    from qkvlab.kernels.kv_decode import _split_waves

    # B=1, 32 KV heads, 512 tiles, 264 resident programs (2 per SM on 132 SMs): 8 splits = 256 programs
    # (one full wave); the 17 splits of a "4 programs per SM" target would need 3 waves.
    assert _split_waves(32, 512, 264) == 8
    # More pairs than slots: no splitting.
    assert _split_waves(2048, 64, 264) == 1
    # Few tiles: never more splits than tiles.
    assert _split_waves(1, 3, 264) == 3
    for pairs, tiles, slots in [(8, 512, 264), (32, 2048, 528), (512, 128, 264), (4, 40, 100)]:
        s = _split_waves(pairs, tiles, slots)
        programs = pairs * s
        assert 1 <= s <= tiles
        assert programs <= slots or programs % slots == 0 or programs % slots >= slots // 2, (pairs, tiles, s)


@pytest.mark.parametrize(
    ("field", "value"), [("block_n", 24), ("block_n", 8), ("num_splits", 0), ("num_warps", 3), ("num_stages", 0)]
)
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field} must be .* got {value}"):
        DecodeConfig(**{field: value})


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_qk_norm_sums_of_squares(dtype):
    """QK-norm's per-key sums of squares: by tl.dot for bfloat16 caches (float32 under the
    interpreter), in float32 registers for float16 and float32 caches."""
    q, k, _, lengths, kw = make_inputs(2, 8, 2, 40, 32, shared=True, rope=True, norm=True, dtype=dtype)
    cfg = DecodeConfig(block_n=16, num_splits=2)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=cfg, **kw)
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-2


@needs_interpreter
def test_qk_norm_half_cache_with_large_values():
    """A float16 cache with values past 256 (whose squares overflow float16) still normalises
    right: float16 keeps the float32 sums."""
    q, k, _, lengths, kw = make_inputs(2, 8, 2, 40, 32, shared=True, rope=True, norm=True, dtype=torch.float16)
    k = (k * 2000).clamp(-60000, 60000)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=DecodeConfig(block_n=16, num_splits=2), **kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-2


@needs_interpreter
@pytest.mark.parametrize(("S", "block_n"), [(300, 128), (300, 32), (300, 16), (10, 128)])
def test_held_rope_rows(S, block_n):
    """The held RoPE rows of a tile, built by angle addition from 16 + block_n/16 table rows
    (read whole for a 16-key tile; also for a table shorter than the tile), give the reference."""
    q, k, _, lengths, kw = make_inputs(3, 8, 2, S, 32, shared=True, rope=True, norm=False)
    cfg = DecodeConfig(block_n=block_n, num_splits=2)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=cfg, **kw)
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope_qkn"])
def test_rope_in_half_precision(norm):
    """Rotating the key role in float16 (the cache's dtype) stays at float16 accuracy."""
    q, k, _, lengths, kw = make_inputs(2, 8, 2, 40, 32, shared=True, rope=True, norm=norm, dtype=torch.float16)
    cfg = DecodeConfig(block_n=16, num_splits=2)
    out = decode_attention(q, k, k, lengths, scale=32**-0.5, config=cfg, **kw)
    assert out.dtype == torch.float16
    assert rel_err(out, reference64(q, k, k, lengths, shared=True, **kw)) < 1e-3


@needs_cuda
def test_cuda_residency_is_read_from_the_compiled_kernel(monkeypatch):
    """The wave split policy reads registers / shared memory of the compiled kernel."""
    from qkvlab.kernels import kv_decode

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, _, lengths, kw = make_inputs(1, 32, 32, 4096, 128, shared=True, rope=True, norm=False, dtype=torch.bfloat16)
    q, k, lengths = q.cuda(), k.cuda(), lengths.cuda()
    kw = {n: t.cuda() for n, t in kw.items()}
    kv_decode._RESIDENT.clear()
    decode_attention(q, k, k, lengths, scale=128**-0.5, shared_kv=True, **kw)
    (value,) = kv_decode._RESIDENT.values()
    assert value is not None and 1 <= value <= 32


@needs_cuda
def test_cuda_programmatic_dependent_combine_in_a_graph(monkeypatch):
    """The combine kernel launched as a programmatic dependent (PDL, sm_90+) waits for every split:
    two decode calls captured in one CUDA graph, replayed on fresh inputs, match the reference each time."""
    from qkvlab.kernels import kv_decode

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert kv_decode._pdl_supported(torch.cuda.current_device())  # the PDL path is the one tested
    shapes = [(1, 32, 32, 4096, [4093]), (2, 32, 8, 3000, [3000, 1777])]
    bufs = []
    for B, Hq, Hkv, S, lens in shapes:
        lens = torch.tensor(lens, dtype=torch.int32)
        q, k, _, lengths, kw = make_inputs(
            B, Hq, Hkv, S, 128, shared=True, rope=True, norm=False, dtype=torch.bfloat16, lengths=lens
        )
        bufs.append(([t.cuda() for t in (q, k, lengths)], {n: t.cuda() for n, t in kw.items()}))
    outs = [torch.empty_like(b[0][0]) for b in bufs]

    def step():
        for ((q, k, lengths), kw), out in zip(bufs, outs, strict=True):
            decode_attention(q, k, k, lengths, scale=128**-0.5, shared_kv=True, out=out, **kw)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        for (q, k, _lengths), _ in bufs:
            q.normal_()
            k.normal_()
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for ((q, k, lengths), kw), out in zip(bufs, outs, strict=True):
            ref = reference64(q.cpu(), k.cpu(), None, lengths.cpu(), shared=True, **{n: t.cpu() for n, t in kw.items()})
            assert rel_err(out.cpu(), ref) < 1.5e-2, trial


def test_residency_arithmetic_matches_what_nsight_compute_reported():
    """``resident_programs`` (the launch heuristic's and compile_decode.py's) against the H100's
    own limits for two compiled split kernels (ncu_decode_h100_32k_q_gqa8_d64*.txt): 168 registers
    and 37,376 bytes of shared memory hold 3 programs an SM, 122 and 18,944 hold 4; registers bind
    in both (the driver then sizes the shared-memory carveout to what those programs need)."""
    from qkvlab.kernels.kv_decode import resident_programs

    assert resident_programs(168, 37376, 4) == 3
    assert resident_programs(122, 18944, 4) == 4
    assert resident_programs(64, 1024, 1) == 32  # the hardware's 32 blocks an SM
    assert resident_programs(255, 0, 8) == 1
