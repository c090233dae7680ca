"""Model families on the shared blocks, recipes and presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SHARINGS
from qkvlab import GPT, EncoderConfig, GPTConfig, SequenceEncoder, SetConfig, SetEncoder, ViT, ViTConfig, get_preset
from qkvlab.attention import Attention, RMSNorm
from qkvlab.costs import build_on_meta, count_params
from qkvlab.models import PRESETS

SMALL = dict(n_layers=2, d_model=32, n_heads=4, head_dim=8)
VARIANTS = [*SHARINGS, "q_kv+gqa2", "q_k_v+mqa", "(Q=K-V)+", "(Q=K=V)+"]


def _train_step(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_encoder_labels_every_token(variant):
    model = SequenceEncoder(EncoderConfig(vocab_size=10, n_labels=10, max_seq_len=16, variant=variant, **SMALL))
    x = torch.randint(0, 10, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 10)
    _train_step(model, nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_vit_classifies_images(variant):
    model = ViT(ViTConfig(image_size=16, patch_size=4, channels=3, n_classes=7, variant=variant, **SMALL))
    assert model.config.max_seq_len >= 17  # 16 patches + class token
    logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 7)
    _train_step(model, logits.logsumexp(-1).mean())


@pytest.mark.parametrize("variant", [*SHARINGS, "q_kv+mqa"])
def test_set_encoder_is_permutation_equivariant(variant):
    model = SetEncoder(SetConfig(in_features=12, variant=variant, **SMALL)).double().eval()
    assert model.config.variant.pos == "none"
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    perm = torch.randperm(10)
    scores = model(x)
    assert scores.shape == (2, 10)
    torch.testing.assert_close(model(x[:, perm]), scores[:, perm], rtol=1e-12, atol=1e-12)


def test_set_encoder_with_the_2d_fix_is_an_explicit_opt_in_and_sees_order():
    """allow_pos2d builds the paper's "+" rows for sets; the scores then depend on the element order."""
    model = SetEncoder(SetConfig(in_features=12, variant="(Q=K=V)+", allow_pos2d=True, **SMALL)).double().eval()
    assert model.config.variant.pos2d and model.config.variant.pos == "none"
    with torch.no_grad():  # a non-zero row / column mix, so the positional term is not a constant
        for layer in model.modules():
            if hasattr(layer, "m_row"):
                layer.weight.normal_()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    perm = torch.arange(9, -1, -1)
    assert not torch.allclose(model(x[:, perm]), model(x)[:, perm], atol=1e-6)


def test_encoder_is_bidirectional_and_gpt_is_causal():
    enc = SequenceEncoder(EncoderConfig(vocab_size=10, max_seq_len=16, **SMALL)).eval()
    gpt = GPT(GPTConfig(vocab_size=10, max_seq_len=16, **SMALL)).eval()
    x = torch.randint(0, 10, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 10  # change only the last token
    assert not torch.allclose(enc(x)[0, 0], enc(y)[0, 0])  # the first position sees the future
    torch.testing.assert_close(gpt(x)[0, :-1], gpt(y)[0, :-1])  # no position sees the future


def test_pos2d_parameters_learn():
    model = SequenceEncoder(EncoderConfig(vocab_size=10, max_seq_len=16, variant="(Q=K=V)+", **SMALL))
    attn = model.backbone.blocks[0].attn
    assert attn.pos2d is not None and attn.pos2d.weight.numel() == 10  # m = 10 channels + 1 bias
    model(torch.randint(0, 10, (2, 9))).sum().backward()
    assert attn.pos2d.weight.grad.abs().sum() > 0 and attn.pos2d.bias.grad is not None


def test_recipes_build_what_they_say():
    gpt2 = GPT(GPTConfig(recipe="gpt2", vocab_size=50, **SMALL))
    llama = GPT(GPTConfig(recipe="llama", vocab_size=50, **SMALL))
    assert isinstance(gpt2.backbone.blocks[0].norm1, nn.LayerNorm)
    assert gpt2.backbone.wpe is not None and gpt2.lm_head.weight is gpt2.wte.weight
    assert gpt2.backbone.blocks[0].mlp.gate is None and gpt2.backbone.blocks[0].attn.o_proj.bias is not None
    assert isinstance(llama.backbone.blocks[0].norm1, RMSNorm) and llama.backbone.wpe is None
    assert llama.backbone.blocks[0].mlp.gate is not None
    assert llama.lm_head.weight is not llama.wte.weight
    assert all(not name.endswith(".bias") for name, _ in llama.named_parameters())
    assert llama.config.variant.pos == "rope" and gpt2.config.variant.pos == "learned"
    # One rotary table is shared by all layers.
    rotaries = {id(b.attn.rotary) for b in llama.backbone.blocks}
    assert len(rotaries) == 1


def test_variant_positional_scheme_overrides_recipe():
    assert GPTConfig(recipe="gpt2", variant="q_kv+rope", **SMALL).variant.pos == "rope"
    assert GPTConfig(recipe="llama", variant="q_kv+learned", **SMALL).variant.pos == "learned"


def test_projection_groups_name_the_weights():
    model = GPT(GPTConfig(vocab_size=50, variant="Q-GQA-2", **SMALL))
    names = {n for n, _ in model.named_parameters() if ".attn.qkv." in n}
    assert names == {
        f"backbone.blocks.{i}.attn.qkv.proj.{g}.{w}" for i in range(2) for g in ("q", "kv") for w in ("weight", "bias")
    }
    kv = model.backbone.blocks[0].attn.qkv.proj["kv"]
    assert kv.weight.shape == (2 * 8, 32)  # 2 KV heads x head_dim 8


@pytest.mark.parametrize(
    "name, layers, d, heads, ff, params",
    [("paper-300m", 20, 1024, 16, 4096, 305_534_976), ("paper-1.2b", 22, 2048, 32, 8192, 1_215_102_976)],
)
def test_paper_presets_have_the_papers_shapes(name, layers, d, heads, ff, params):
    cfg = get_preset(name)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff) == (layers, d, heads, 64, ff)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.recipe, cfg.tie_embeddings) == (50304, 2048, "gpt2", True)
    assert count_params(build_on_meta(cfg))["total"] == params


def test_size_ladder_spans_0p3m_to_350m_for_both_recipes():
    for recipe in ("gpt2", "llama"):
        names = [n for n in PRESETS if n.startswith(f"{recipe}-")]
        sizes = []
        for name in names:
            cfg = get_preset(name)
            p = count_params(build_on_meta(cfg))
            non_emb = p["total"] - p["embedding"] - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
            sizes.append(non_emb)
            nominal = float(name.split("-")[1].rstrip("m")) * 1e6
            assert 0.75 * nominal <= non_emb <= 1.3 * nominal, (name, non_emb)
            assert cfg.n_heads % 4 == 0 and cfg.n_heads > 4  # GQA-4 is real grouping on every rung
        assert sizes == sorted(sizes)
        top = get_preset(f"{recipe}-300m")
        total = count_params(build_on_meta(top))["total"]
        assert 330e6 <= total <= 420e6


def test_every_attention_layer_is_the_one_module():
    for model in (
        GPT(GPTConfig(vocab_size=50, **SMALL)),
        ViT(ViTConfig(image_size=8, patch_size=4, **SMALL)),
        SetEncoder(SetConfig(in_features=4, **SMALL)),
        SequenceEncoder(EncoderConfig(**SMALL)),
    ):
        attns = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(attns) == 2


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "autocast-mixed"],
)
def test_rms_norm_matches_its_formula(x_dtype, w_dtype):
    """RMSNorm (torch's fused rms_norm when dtypes match) equals x * rsqrt(mean(x^2) + eps) * w in fp32."""
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(w_dtype)
    x = (3 * torch.randn(2, 5, 48)).to(x_dtype).requires_grad_()
    out = norm(x)
    xf, wf = x.float(), norm.weight.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * wf).to(x_dtype)
    assert out.dtype == x_dtype
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    gx, gw = torch.autograd.grad(out.float().square().sum(), [x, norm.weight])
    rx, rw = torch.autograd.grad(ref.float().square().sum(), [x, norm.weight])
    torch.testing.assert_close(gx.float(), rx.float(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=tol, atol=tol * 10)
