"""The one-row matrix-vector kernel (``qkvlab.kernels.gemv``) and the switch the model's call sites
go through (``qkvlab.attention.matvec``): the kernel under Triton's interpreter against
``F.linear``, every launch shape it may pick, and a decode step with the switch on equal to one
without it. The GPU run of the same is in ``test_gpu.py``; speed is ``benchmarks/gpu_gemv.py``'s.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_interpreter
from qkvlab import GPT, GPTConfig
from qkvlab.attention import matvec
from qkvlab.errors import ConfigError
from qkvlab.kernels.gemv import (
    HAS_TRITON,
    GemvConfig,
    gemv,
    gemv_reference,
    gemv_unsupported_reason,
    resolve_config,
)
from qkvlab.models.decoding import StaticDecoder

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rounded_reference(x, w, b):
    """float32-accumulated product rounded to the inputs' dtype, as the kernel (and cuBLAS) return."""
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    return y.to(w.dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,bias", [(40, 300, True), (64, 512, False), (7, 1024, True), (1, 16, False)])
def test_kernel_equals_linear(interpret, dtype, n, k, bias):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    assert gemv_unsupported_reason(x, w, b) is None
    got = gemv(x, w, b)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    ref = rounded_reference(x, w, b)
    # the same float32 sum in another order: one unit in the last place of the output at most
    tol = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@needs_interpreter
@pytest.mark.parametrize(
    "cfg",
    [
        GemvConfig(1, 16),
        GemvConfig(4, 64),
        GemvConfig(16, 128, 2, 1),
        GemvConfig(2, 256),
        GemvConfig(4, 64, fold=1),
        GemvConfig(2, 16, fold=16),  # the whole tile summed in registers
        GemvConfig(8, 128, fold=4),
    ],
)
def test_every_launch_shape_gives_the_same_product(interpret, cfg):
    """Blocks that do not divide N (a repeated last row, masked stores) or K (masked tail)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 200, generator=g, dtype=torch.float64).float()
    x = torch.randn(200, generator=g).float()
    b = torch.randn(37, generator=g).float()
    got = gemv(x, w, b, config=cfg)
    assert torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_launch_shape_fields_left_zero_come_from_the_shape():
    assert resolve_config(None, 2048, 2048) == GemvConfig(4, 1024, 4, 3, 1)
    assert resolve_config(None, 16384, 2048).block_n == resolve_config(None, 2560, 2048).block_n == 4
    assert resolve_config(None, 64, 300).block_k == 256  # the widest power of two K fills
    assert resolve_config(None, 2048, 8192) == GemvConfig(8, 1024, 4, 1, 1)  # long rows: eight a program
    assert resolve_config(GemvConfig(block_n=2), 2048, 8192) == GemvConfig(2, 1024, 4, 1, 1)
    assert resolve_config(GemvConfig(8, 64, 2, 1), 2048, 2048) == GemvConfig(8, 64, 2, 1, 1)
    assert resolve_config(GemvConfig(8, 64, fold=8), 2048, 2048) == GemvConfig(8, 64, 4, 3, 8)


@pytest.mark.parametrize("fold", [3, 64])
def test_a_fold_that_does_not_fit_the_tile_is_refused(fold):
    with pytest.raises(ValueError, match=f"fold={fold}"):
        resolve_config(GemvConfig(2, 32, fold=fold), 64, 64)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [256, 200], ids=["even-k", "ragged-k"])
@pytest.mark.parametrize("norm,res,bias", [(True, False, False), (False, True, True), (True, True, False)])
@pytest.mark.parametrize("fold", [1, 8])
def test_norm_before_and_residual_after_in_the_kernel(interpret, dtype, k, norm, res, bias, fold):
    """RMSNorm of the input before the product and a residual added after it, in one kernel: equal
    to the definition (gemv_reference), and to the model's norm module followed by F.linear up to
    the rounding of the normalised input that the model does and the kernel does not."""
    from qkvlab.attention.positional import RMSNorm

    g = torch.Generator().manual_seed(k)
    w = (torch.randn(48, k, generator=g) / k**0.5).to(dtype)
    x = (3 * torch.randn(1, 1, k, generator=g)).to(dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype) if norm else None
    r = torch.randn(1, 1, 48, generator=g).to(dtype) if res else None
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    got = gemv(x, w, b, config=GemvConfig(4, 64, fold=fold), norm_weight=nw, eps=1e-5, residual=r)
    ref = gemv_reference(x, w, b, nw, 1e-5, r)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    scale = ref.float().abs().max().item()
    assert got.shape == (1, 1, 48) and torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * scale)
    model_way = x
    if norm:
        rms = RMSNorm(k, eps=1e-5).to(dtype)
        rms.weight.data.copy_(nw)
        model_way = rms(x)
    model_way = F.linear(model_way, w, b) + (r if res else 0)
    loose = 1e-5 if dtype == torch.float32 else 2**-5  # the model rounds twice more in bf16
    assert torch.allclose(got.float(), model_way.float(), rtol=loose, atol=loose * scale)


@needs_interpreter
@pytest.mark.parametrize("k", [256, 200], ids=["even-k", "ragged-k"])
@pytest.mark.parametrize("fold", [1, 8])
def test_swiglu_input_made_in_the_kernel(interpret, k, fold):
    """glu: the input is [gate | up] and the product reads silu(gate) * up, with a residual after."""
    g = torch.Generator().manual_seed(k + 1)
    w = torch.randn(24, k, generator=g) / k**0.5
    gate_up = torch.randn(1, 1, 2 * k, generator=g)
    r = torch.randn(1, 1, 24, generator=g)
    got = gemv(gate_up, w, config=GemvConfig(4, 64, fold=fold), residual=r, glu=True)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(got, F.linear(F.silu(gate) * up, w) + r, rtol=1e-5, atol=1e-5)
    assert torch.allclose(matvec.swiglu_linear(gate_up, w, residual=r), got, rtol=1e-5, atol=1e-5)
    assert "glu" in gemv_unsupported_reason(torch.randn(1, k), w, glu=True)


def test_norm_and_residual_fall_back_to_the_definition_where_the_kernel_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w, x = torch.randn(8, 16), torch.randn(16)
    nw, r = torch.rand(16) + 0.5, torch.randn(8)
    assert torch.equal(gemv(x, w, norm_weight=nw, residual=r), gemv_reference(x, w, None, nw, 1e-6, r))


@needs_interpreter
def test_strided_weight_rows(interpret):
    """A weight whose rows are a slice of a wider matrix (row stride > K)."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(24, 96, generator=g)
    w = wide[:, :64]
    x = torch.randn(64, generator=g)
    assert torch.allclose(gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_triton
def test_what_the_kernel_refuses_goes_to_linear(interpret):
    w = torch.randn(8, 16)
    assert "rows" in gemv_unsupported_reason(torch.randn(2, 16), w)
    assert "dtypes" in gemv_unsupported_reason(torch.randn(16, dtype=torch.float64), w)
    assert "contiguous" in gemv_unsupported_reason(torch.randn(16), torch.randn(16, 8).t())
    assert "norm weight" in gemv_unsupported_reason(torch.randn(16), w, norm_weight=torch.ones(15))
    assert "residual of 7" in gemv_unsupported_reason(torch.randn(16), w, residual=torch.ones(7))
    x = torch.randn(3, 16)  # three rows: F.linear's answer, exactly
    assert torch.equal(gemv(x, w), F.linear(x, w))


def test_switch_is_off_by_default_and_keeps_autograd():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(1, 16)
    assert not matvec.gemv_enabled()
    assert torch.equal(matvec.apply_linear(lin, x), lin(x))
    with matvec.use_gemv():
        assert matvec.gemv_enabled()
        y = matvec.apply_linear(lin, x)  # parameters need gradients: F.linear, with a graph
        assert y.grad_fn is not None
    assert not matvec.gemv_enabled()


@needs_interpreter
def test_switch_routes_one_row_products_to_the_kernel(interpret, monkeypatch):
    calls = []
    real = torch.ops.qkvlab.gemv if hasattr(torch.ops.qkvlab, "gemv") else None
    lin = torch.nn.Linear(32, 8).eval()
    x = torch.randn(1, 1, 32)
    with torch.no_grad(), matvec.use_gemv():
        real = torch.ops.qkvlab.gemv

        def spy(*a):
            calls.append(a[1].shape)
            return real(*a)

        monkeypatch.setattr(torch.ops.qkvlab, "gemv", spy)
        got = matvec.apply_linear(lin, x)
        matvec.apply_linear(lin, torch.randn(2, 32))  # two rows: F.linear
    assert calls == [torch.Size([8, 32])]
    assert torch.allclose(got, lin(x), rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_autocast_keeps_linear(interpret):
    """Under autocast a one-row product is F.linear's, in autocast's dtype: the kernel does not cast
    its inputs, and a decode step's keys must come out in the dtype the cache was allocated in."""
    lin = torch.nn.Linear(32, 8).eval()
    x = torch.randn(1, 1, 32)
    with torch.no_grad(), matvec.use_gemv("kernel"), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, lin.weight, lin.bias)
        assert matvec.apply_linear(lin, x).dtype == want.dtype == torch.bfloat16
        assert torch.equal(matvec.apply_linear(lin, x), want)
        gate_up = torch.randn(1, 1, 64)
        assert matvec.swiglu_linear(gate_up, lin.weight).dtype == torch.bfloat16


def test_static_decoder_refuses_a_bad_gemv_value():
    model = GPT(GPTConfig(recipe="llama", variant="q_kv", n_layers=1, d_model=32, n_heads=4, vocab_size=41)).eval()
    cache = model.new_cache(1, 8)
    with pytest.raises(ConfigError, match="gemv must be one of"):
        StaticDecoder(model, cache, cuda_graph=False, gemv="yes")
    with pytest.raises(ConfigError, match="needs compile=True"):
        StaticDecoder(model, cache, cuda_graph=False, gemv="inductor")


def test_auto_takes_the_kernel_on_cuda_only(monkeypatch):
    """ "auto" (the default) is the kernel on a CUDA device where Triton is installed, else off;
    the switch itself takes only a decided route."""
    from qkvlab.kernels import gemv as gemv_module

    model = GPT(GPTConfig(recipe="llama", variant="q_kv", n_layers=1, d_model=32, n_heads=4, vocab_size=41)).eval()
    assert StaticDecoder(model, model.new_cache(1, 8), cuda_graph=False)._gemv is False  # a CPU cache
    assert matvec.resolve_gemv("auto", torch.device("cuda")) == ("kernel" if gemv_module.HAS_TRITON else False)
    monkeypatch.setattr(gemv_module, "HAS_TRITON", False)
    assert matvec.resolve_gemv("auto", torch.device("cuda")) is False
    for mode in (False, "kernel", "inductor"):
        assert matvec.resolve_gemv(mode, torch.device("cuda")) == mode
    with pytest.raises(ConfigError, match="gemv must be one of"), matvec.use_gemv("auto"):
        pass


@needs_interpreter
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(
    "variant,recipe", [("q_kv", "llama"), ("q_k_v+gqa2", "llama"), ("qkv", "gpt2"), ("k_v", "llama"), ("kv", "llama")]
)
def test_decode_steps_with_the_kernel_equal_those_without(interpret, variant, recipe, fuse, monkeypatch):
    """Every one-row product of the step (projections, fused or not, output, MLP, head) through the
    kernel, with the block's RMSNorms, residual adds and SwiGLU inside it where the products are fused.
    A role that is the input itself (Q = x in k_v and kv) needs norm(x) as a tensor: there the norm
    runs first and the fused product takes its output."""
    from qkvlab.kernels import gemv as gemv_mod

    launched = []
    real = gemv_mod.gemv

    def spy(x, w, b=None, config=None, **kw):
        launched.append((kw.get("norm_weight") is not None, kw.get("residual") is not None, kw.get("glu", False)))
        return real(x, w, b, **kw)

    monkeypatch.setattr(gemv_mod, "gemv", spy)
    torch.manual_seed(0)
    cfg = GPTConfig(recipe=recipe, variant=variant, n_layers=2, d_model=32, n_heads=4, vocab_size=41, max_seq_len=32)
    model = GPT(cfg).float().eval()
    prompt = torch.randint(0, 41, (1, 5))
    tokens = torch.randint(0, 41, (1, 3))
    logits = {}
    for use in (False, True):
        cache = model.new_cache(1, 16)
        model.prefill(prompt, cache)
        dec = StaticDecoder(model, cache, cuda_graph=False, fuse=fuse, gemv=use)
        logits[use] = torch.stack([dec.step(tokens[:, t]) for t in range(tokens.shape[1])], 1)
    n_proj = 1 if fuse else len(model.backbone.blocks[0].attn.qkv.proj)  # projection products per layer
    n_mlp = 2 if fuse or recipe == "gpt2" else 3
    assert len(launched) == tokens.shape[1] * (2 * (n_proj + 1 + n_mlp) + 1)  # 2 layers, then the head
    if fuse and recipe == "llama" and not cfg.variant.identity_roles:  # norms, adds, SwiGLU inside the kernels
        layer = [(True, False, False), (False, True, False), (True, False, False), (False, True, True)]
        assert launched[:9] == layer * 2 + [(False, False, False)]  # q+kv, o, gate+up, down; then the head
    assert torch.allclose(logits[True], logits[False], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduction_route_is_the_product(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 40, generator=g).to(dtype)
    x = torch.randn(1, 1, 40, generator=g).to(dtype)
    b = torch.randn(24, generator=g).to(dtype)
    got = matvec.reduction_linear(x, w, b)
    assert got.shape == (1, 1, 24) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    ref = rounded_reference(x, w, b).float()
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_inductor_route_is_plain_linear_outside_a_trace():
    """Eagerly the multiply would materialise the whole matrix: the route applies only under compile."""
    lin = torch.nn.Linear(16, 8).eval()
    x = torch.randn(1, 16)
    with torch.no_grad(), matvec.use_gemv("inductor"):
        assert matvec.gemv_enabled() == "inductor"
        assert torch.equal(matvec.apply_linear(lin, x), lin(x))


needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler"
)


@needs_cc
def test_compiled_step_with_the_inductor_route_equals_the_eager_step(monkeypatch):
    """gemv="inductor" under compile: every one-row product traced as a reduction, same logits."""
    torch._dynamo.reset()
    traced = []
    real = matvec.reduction_linear

    def spy(x, w, bias=None):
        traced.append(tuple(w.shape))
        return real(x, w, bias)

    monkeypatch.setattr(matvec, "reduction_linear", spy)
    torch.manual_seed(0)
    cfg = GPTConfig(recipe="llama", variant="q_kv", n_layers=2, d_model=32, n_heads=4, vocab_size=41, max_seq_len=32)
    model = GPT(cfg).float().eval()
    prompt = torch.randint(0, 41, (1, 5))
    tokens = torch.randint(0, 41, (1, 3))
    logits = {}
    for mode, compile in ((False, False), ("inductor", True)):
        cache = model.new_cache(1, 16)
        model.prefill(prompt, cache)
        dec = StaticDecoder(model, cache, cuda_graph=False, fuse=True, compile=compile, gemv=mode)
        logits[mode] = torch.stack([dec.step(tokens[:, t]) for t in range(tokens.shape[1])], 1)
    # per layer the fused projections, the output, the fused gate+up and the down; then the head
    assert traced[:9] == [(64, 32), (32, 32), (256, 32), (32, 128)] * 2 + [(41, 32)]
    torch.testing.assert_close(logits["inductor"], logits[False], rtol=1e-5, atol=1e-5)


def test_generate_checks_the_gemv_value_at_the_call():
    model = GPT(GPTConfig(recipe="llama", variant="q_kv", n_layers=1, d_model=32, n_heads=4, vocab_size=41)).eval()
    prompt = torch.randint(0, 41, (1, 4))
    with pytest.raises(ConfigError, match="gemv must be one of"):
        model.generate(prompt, 2, gemv="fast")
    with pytest.raises(ConfigError, match="needs compile=True"):
        model.stream(prompt, 2, gemv="inductor")
    assert model.generate(prompt, 2, gemv=True).shape == (1, 6)  # on a CPU: F.linear, the same step
