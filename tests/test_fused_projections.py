"""Inference fusion of the projections (``qkvlab.attention.projections.FusedLinears``).

Fusing concatenates each attention layer's projection groups (and the SwiGLU MLP's gate and up)
into one matrix product. Fused and unfused must give the same outputs, the same generated
tokens and the same state dict; training must never run on the snapshot.

Tolerances: each output column of the fused product is the same dot product as in the separate
product, so the results are equal in exact arithmetic; a BLAS may still block or vectorise the
wider matrix differently and round differently in the last bits (on the CPUs we checked it
gives bit-identical results, on a GPU it need not). So the tests ask for agreement to a few ulps
of the dtype: 1e-12 in float64 and 1e-6 in float32 (relative and absolute), far below what a
wrong split or a stale weight gives (order 1e-1), and greedy tokens exactly.
"""

from __future__ import annotations

import io
import shutil
import sys

import pytest
import torch

from qkvlab import GPT, GPTConfig
from qkvlab.attention import Attention
from qkvlab.attention.projections import (
    FusedLinears,
    ProjectionStrategy,
    fuse_projections,
    fusion_epoch,
    unfuse_projections,
)
from qkvlab.checkpoint import load_into, read_metadata, read_tensors, save_model
from qkvlab.errors import ConfigError
from qkvlab.models.blocks import MLP
from qkvlab.models.decoding import StaticDecoder

V = 41
#: Every variant family: QKV, Q-K=V, Q=K-V, Q=K=V, GQA, Q-GQA, MQA.
VARIANTS = ["q_k_v", "q_kv", "qk_v", "qkv", "q_k_v+gqa2", "q_kv+gqa2", "q_k_v+mqa"]
RECIPES = ["gpt2", "llama"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}

needs_cc = pytest.mark.skipif(
    sys.platform == "win32" or not any(map(shutil.which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)


def small_gpt(variant: str, recipe: str, dtype=torch.float64, **kw) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=48)
    model = GPT(GPTConfig(recipe=recipe, variant=variant, **{**shape, **kw})).to(dtype).eval()
    with torch.no_grad():  # non-zero biases (the gpt2 recipe initialises them to zero)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = TOL[a.dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def fusable(model) -> list[FusedLinears]:
    return [m for m in model.modules() if isinstance(m, FusedLinears)]


def expected_fused(model: GPT) -> int:
    """Modules that have something to fuse: attention with 2+ groups, SwiGLU MLPs."""
    n_groups = len(model.config.variant.groups)
    per_layer = (n_groups > 1) + (model.config.mlp == "swiglu")
    return per_layer * model.config.n_layers


def decode_logits(model: GPT, prompt: torch.Tensor, tokens: torch.Tensor, *, static: bool, **kw) -> torch.Tensor:
    """Prefill logits, then teacher-forced decode steps (dynamic, or a StaticDecoder): (B, 1 + steps, V)."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + tokens.shape[1] + 3)
    out = [model.prefill(prompt, cache)]
    dec = StaticDecoder(model, cache, cuda_graph=False, **kw) if static else None
    for t in range(tokens.shape[1]):
        out.append(dec.step(tokens[:, t]) if dec is not None else model.decode_one(tokens[:, t], cache))
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_outputs_equal_unfused(variant, recipe, dtype):
    """Full forward, prefill + cached decode, and the static step: fused == unfused."""
    model = small_gpt(variant, recipe, dtype)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, 9), generator=g)
    prompt, tokens = idx[:, :6], idx[:, 6:]
    with torch.no_grad():
        full = model(idx)
    dyn = decode_logits(model, prompt, tokens, static=False)

    assert fuse_projections(model) == expected_fused(model)
    with torch.no_grad():
        close(model(idx), full)
    close(decode_logits(model, prompt, tokens, static=False), dyn)
    close(decode_logits(model, prompt, tokens, static=True), dyn)


@pytest.mark.parametrize("variant", [*VARIANTS, "k_v", "q_kv+rope+qknorm"])
def test_fused_roles_keep_their_sharing(variant):
    """One product split per group: shared roles are still one tensor object, the identity the input."""
    model = small_gpt(variant, "llama")
    attn = model.backbone.blocks[0].attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = attn.qkv(x)
        assert attn.qkv.fuse() == (len(attn.variant.groups) > 1)
        got = attn.qkv(x)
    for a, b in zip(got, ref, strict=True):
        close(a, b)
    for i in range(3):
        for j in range(3):
            assert (got[i] is got[j]) == (ref[i] is ref[j])
    if attn.variant.identity_roles:
        assert got[0] is x


def test_single_group_is_left_alone():
    """Q=K=V has one projection already: nothing to fuse there (the SwiGLU MLP still fuses)."""
    model = small_gpt("qkv", "llama")
    assert fuse_projections(model) == model.config.n_layers
    assert not any(b.attn.qkv.fused for b in model.backbone.blocks)
    assert all(b.mlp.fused for b in model.backbone.blocks)
    gelu = small_gpt("q_kv", "gpt2")
    fuse_projections(gelu)
    assert not any(b.mlp.fused for b in gelu.backbone.blocks)  # GELU MLP: one input projection


def test_linear_attention_fuses_too():
    model = small_gpt("q_kv+learned+linear", "gpt2", linear_decay=0.9)
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    fuse_projections(model)
    ref = model.generate(prompt, 6, cuda_graph=False)  # fused; compare with a clean model
    other = small_gpt("q_kv+learned+linear", "gpt2", linear_decay=0.9)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedLinears, "fuse", lambda self: False)
        unfused = other.generate(prompt, 6, cuda_graph=False)
    assert torch.equal(ref, unfused)
    assert any(m.fused for m in fusable(model))


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_same_tokens_fused_or_not(variant, recipe):
    """A fused model generates the tokens of the unfused model (greedy, sampled with a seeded
    generator, and a ragged batch)."""
    rows = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (2, 5), generator=g)

    def run(model):
        greedy = model.generate(prompt, 8)
        sampled = model.generate(prompt, 8, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(4))
        ragged = model.generate(rows, 6, return_dict=True).tokens
        return greedy, sampled, ragged

    ref = small_gpt(variant, recipe, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedLinears, "fuse", lambda self: False)
        want = run(ref)
    assert not any(m.fused for m in fusable(ref))

    model = small_gpt(variant, recipe, torch.float32)
    fuse_projections(model)
    got = run(model)
    assert sum(m.fused for m in fusable(model)) == expected_fused(model)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_generate_does_not_fuse_unless_asked():
    """Fusing keeps a second copy of the matrices: generate() and the decoder leave it to the user."""
    model = small_gpt("q_kv", "llama")
    model.generate(torch.tensor([[1, 2, 3]]), 3)
    assert not any(m.fused for m in fusable(model))
    cache = model.new_cache(1, 8)
    model.prefill(torch.tensor([[1, 2]]), cache)
    assert StaticDecoder(model, cache, cuda_graph=False).fused == 0


@pytest.mark.parametrize("variant", ["q_kv", "q_k_v+gqa2"])
def test_generate_fuses_when_asked_and_gives_the_same_tokens(variant):
    """generate(fuse=True) / stream(fuse="auto") fuse the model (prefill and steps) and give the
    unfused model's tokens; fuse=True on a training model, or another value, is refused."""
    prompt, rows = torch.tensor([[1, 2, 3, 4]]), [[5, 6, 7], [8, 9]]
    ref = small_gpt(variant, "llama")
    want = ref.generate(prompt, 6), ref.generate(rows, 5, return_dict=True).tokens
    assert not any(m.fused for m in fusable(ref))
    model = small_gpt(variant, "llama")
    got = model.generate(prompt, 6, fuse=True)
    assert sum(m.fused for m in fusable(model)) == expected_fused(model)
    assert torch.equal(got, want[0])
    again = small_gpt(variant, "llama")
    stream = again.stream(rows, 5, fuse="auto")
    assert [s.tokens for s in stream] and stream.result.tokens == want[1]
    assert sum(m.fused for m in fusable(again)) == expected_fused(again)
    training = small_gpt(variant, "llama").train()
    with pytest.raises(ConfigError, match=r"model is in training mode; call model\.eval"):
        training.generate(prompt, 2, fuse=True)
    training.generate(prompt, 2, fuse="auto")  # auto: only in eval mode
    assert not any(m.fused for m in fusable(training))
    with pytest.raises(ConfigError, match="fuse must be True, False or 'auto', got 'yes'"):
        model.generate(prompt, 2, fuse="yes")


def test_generate_leaves_a_training_model_unfused():
    model = small_gpt("q_kv", "llama").train()
    model.generate(torch.tensor([[1, 2, 3]]), 3)
    assert not any(m.fused for m in fusable(model))


# ----------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("recipe", RECIPES)
def test_state_dict_and_checkpoint_unchanged(recipe, tmp_path):
    model = small_gpt("q_k_v+gqa2", recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buf_before = io.BytesIO()
    torch.save(model.state_dict(), buf_before)
    save_model(model, tmp_path / "a.safetensors")

    assert fuse_projections(model) == expected_fused(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), k
    assert not any("_fused" in k for k in after)
    buf_after = io.BytesIO()
    torch.save(model.state_dict(), buf_after)
    assert buf_after.getvalue() == buf_before.getvalue()
    save_model(model, tmp_path / "b.safetensors")  # (safetensors orders its metadata per write: compare contents)
    assert read_metadata(tmp_path / "a.safetensors") == read_metadata(tmp_path / "b.safetensors")
    a, b = read_tensors(tmp_path / "a.safetensors"), read_tensors(tmp_path / "b.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    # Loading into a fused model: the snapshot is dropped, the loaded weights are used.
    other = small_gpt("q_k_v+gqa2", recipe)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    save_model(other, tmp_path / "c.safetensors")
    load_into(model, tmp_path / "c.safetensors")
    assert not any(m.fused for m in fusable(model))
    idx = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        close(model(idx), other(idx))
        fuse_projections(model)
        close(model(idx), other(idx))


# ----------------------------------------------------------------------------- training
def test_fuse_is_refused_in_training_mode():
    model = small_gpt("q_k_v", "llama").train()
    with pytest.raises(ConfigError, match="eval"):
        fuse_projections(model)
    with pytest.raises(ConfigError, match="eval"):
        model.backbone.blocks[0].attn.qkv.fuse()
    cache = model.new_cache(1, 8)
    model.prefill(torch.tensor([[1, 2]]), cache)
    with pytest.raises(ConfigError, match="training mode"):
        StaticDecoder(model, cache, cuda_graph=False, fuse=True)
    dec = StaticDecoder(model, cache, cuda_graph=False, fuse="auto")  # only in eval mode
    assert dec.fused == 0
    with pytest.raises(ConfigError, match="fuse must be"):
        StaticDecoder(model, cache, fuse="yes")


@pytest.mark.parametrize("recipe", RECIPES)
def test_train_after_fuse_unfuses_and_trains_the_parameters(recipe):
    """model.train() drops the snapshot; a training step then matches a never-fused model's,
    and the next fuse sees the new weights."""
    idx = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(6))

    def train_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    ref = small_gpt("q_kv+gqa2", recipe).train()
    ref_loss = train_step(ref)

    model = small_gpt("q_kv+gqa2", recipe)
    fuse_projections(model)
    model.train()
    assert not any(m.fused for m in fusable(model))
    assert torch.equal(train_step(model), ref_loss)
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), n

    model.eval()
    ref.eval()
    fuse_projections(model)
    with torch.no_grad():
        close(model(idx), ref(idx))


def test_autograd_forward_unfuses_and_reaches_the_parameters():
    """Fused in eval mode, then a forward with grad enabled (fine-tuning in eval mode, saliency):
    it runs on the parameters, so every projection gets its gradient."""
    idx = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(7))
    ref = small_gpt("q_k_v", "llama")
    ref(idx).sum().backward()
    model = small_gpt("q_k_v", "llama")
    fuse_projections(model)
    model(idx).sum().backward()
    assert not any(m.fused for m in fusable(model))
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad), n


def test_in_place_weight_change_is_seen():
    """An in-place update under no_grad while fused (an EMA, a manual edit) re-copies the snapshot."""
    model = small_gpt("q_k_v", "gpt2")
    idx = torch.randint(0, V, (1, 6))
    fuse_projections(model)
    w = model.backbone.blocks[1].attn.qkv.proj["k"].weight
    b = model.backbone.blocks[0].attn.qkv.proj["v"].bias
    with torch.no_grad():
        w.mul_(1.5)
        b.add_(0.3)
        got = model(idx)
    assert all(m.fused for m in fusable(model) if m._fusion_linears())
    ref = small_gpt("q_k_v", "gpt2")
    with torch.no_grad():
        ref.backbone.blocks[1].attn.qkv.proj["k"].weight.mul_(1.5)
        ref.backbone.blocks[0].attn.qkv.proj["v"].bias.add_(0.3)
        close(got, ref(idx))


def test_replaced_parameter_is_seen_by_fuse():
    model = small_gpt("q_kv", "llama")
    fuse_projections(model)
    mlp = model.backbone.blocks[0].mlp
    assert isinstance(mlp, MLP) and mlp.fused and not mlp.fusion_stale
    mlp.up.weight = torch.nn.Parameter(mlp.up.weight.detach() * 2)
    assert mlp.fusion_stale
    fuse_projections(model)
    assert not mlp.fusion_stale
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with torch.no_grad():
        close(mlp(x), mlp.down(torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x)))


def test_dtype_change_after_fuse():
    """.to() casts the fused buffers with the parameters: still equal to the unfused model."""
    model = small_gpt("q_k_v+gqa2", "llama")
    fuse_projections(model)
    model.float()
    ref = small_gpt("q_k_v+gqa2", "llama").float()
    idx = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        close(model(idx), ref(idx))
    assert all(m._fused_weight.dtype == torch.float32 for m in fusable(model) if m.fused)


def test_unfuse_projections():
    model = small_gpt("q_kv", "llama")
    fuse_projections(model)
    unfuse_projections(model)
    assert not any(m.fused for m in fusable(model))
    assert all(m._fused_weight is None and m._fused_bias is None for m in fusable(model))


# ----------------------------------------------------------------------------- StaticDecoder
def test_static_decoder_fuses_and_refuses_after_train_eval():
    """The decoder fuses an eval-mode model; train() drops it; the next step (back in eval mode)
    fuses again and gives the same logits as the never-fused dynamic step."""
    model = small_gpt("q_kv+gqa2", "llama")
    ref = small_gpt("q_kv+gqa2", "llama")
    g = torch.Generator().manual_seed(8)
    prompt, tokens = torch.randint(0, V, (2, 4), generator=g), torch.randint(0, V, (2, 4), generator=g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedLinears, "fuse", lambda self: False)
        want = decode_logits(ref, prompt, tokens, static=False)

    cache = model.new_cache(2, 12)
    got = [model.prefill(prompt, cache)]
    dec = StaticDecoder(model, cache, cuda_graph=False, fuse=True)
    assert dec.fused == expected_fused(model)
    got.append(dec.step(tokens[:, 0]))
    epoch = fusion_epoch()
    model.train()
    assert dec.fused == 0 and fusion_epoch() != epoch
    model.eval()
    got.append(dec.step(tokens[:, 1]))
    assert dec.fused == expected_fused(model)
    no_fuse = StaticDecoder(model, cache, cuda_graph=False, fuse=False)  # leaves the fusion as it is
    got += [no_fuse.step(tokens[:, 2]), dec.step(tokens[:, 3])]
    close(torch.stack(got, 1), want)


def test_fused_attention_module_directly():
    """Attention with a fused ProjectionStrategy, outside a GPT (need_weights path included)."""
    from qkvlab.attention import VariantSpec

    torch.manual_seed(0)
    attn = Attention(32, 4, VariantSpec.parse("q_kv+gqa2+rope"), max_seq_len=16).double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        ref, ref_info = attn(x, need_weights=True)
        assert isinstance(attn.qkv, ProjectionStrategy) and attn.qkv.fuse()
        got, info = attn(x, need_weights=True)
    close(got, ref)
    close(info.weights, ref_info.weights)


@needs_cc
@pytest.mark.parametrize("variant", ["q_k_v", "q_kv+rope+qknorm", "q_k_v+gqa2"])
def test_compiled_fused_static_step_equals_unfused(variant):
    """torch.compile (fullgraph) of the fused static step: the logits of the unfused eager step."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    prompt, tokens = torch.randint(0, V, (2, 5), generator=g), torch.randint(0, V, (2, 4), generator=g)
    ref = small_gpt(variant, "llama", torch.float32)
    want = decode_logits(ref, prompt, tokens, static=True, fuse=False)
    assert not any(m.fused for m in fusable(ref))
    model = small_gpt(variant, "llama", torch.float32)
    got = decode_logits(model, prompt, tokens, static=True, compile=True, fuse=True)
    assert sum(m.fused for m in fusable(model)) == expected_fused(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # Inductor's fused kernels round differently
