"""Costs of a variant, computed from the built model and from allocated caches.

Parameters are counted on the model itself (built on the ``meta`` device, so even the
1.2B preset costs no memory); KV-cache bytes per token are given both analytically and
as measured from a really allocated :class:`KVCache`. Multiply-accumulates follow the
paper's counting rule (PAPER.md 2.5.2), generalised to any sharing and head count:

=============================== ===========================================
projections, per layer          L * d * (sum of the group output widths)
output projection, per layer    L * (Hq * D) * d
q k^T and A v, per layer        L^2 * (Hq * D) each (no causal halving)
2D fix, per layer               L * Hq * D (query scaled by sum w) + L * m
MLP, per layer                  2 * L * d * d_ff (GELU), 3 * L * d * d_ff (SwiGLU)
LM head (GPT)                   L * d * V
label head (sequence encoder)   L * d * n_labels
ViT                             patches: (L - 1) * C * p^2 * d; head on the class token: d * classes
set encoder                     input: L * in_features * d; scores: L * d
=============================== ===========================================

Norms, RoPE, softmax and biases are not counted, as in the paper. Linear attention
(variants ``+linear``) trains with the masked form, which has the same two ``L^2`` products
(``phi(q) phi(k)^T`` and weights times ``V``), so the same rule counts it; feature maps are
not counted. It decodes with a fixed-size :class:`~qkvlab.attention.cache.LinearState`
instead of a KV cache: its rows report 0 bytes per token (measured: the state allocated for
twice the length is no larger) and the state's bytes in ``decode_state_bytes``, held in
float32 when the activations are half precision.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from qkvlab.attention.cache import KVCache, LinearState
from qkvlab.attention.module import Attention
from qkvlab.attention.variant import VariantSpec
from qkvlab.models.config import GPTConfig, TransformerConfig


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts (each shared tensor once): total, attention, embedding, mlp, norm, other."""
    seen: set[int] = set()

    def n(params) -> int:
        total = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    attention = n(p for m in model.modules() if isinstance(m, Attention) for p in m.parameters())
    mlp = n(p for name, m in model.named_modules() if name.endswith(".mlp") for p in m.parameters())
    embedding = n(p for name, m in model.named_modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    norm = n(
        p
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm"
        for p in m.parameters()
    )
    other = n(model.parameters())
    total = attention + mlp + embedding + norm + other
    return {"total": total, "attention": attention, "embedding": embedding, "mlp": mlp, "norm": norm, "other": other}


def params_nonembedding(model: nn.Module) -> int:
    """Kaplan et al.'s N: parameters outside the token and position embeddings and an untied
    output head (the quantity scaling laws are fitted against)."""
    counts = count_params(model)
    head = getattr(model, "lm_head", None)
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    untied = head is not None and all(head.weight is not w for w in embeddings)
    return counts["total"] - counts["embedding"] - (head.weight.numel() if untied else 0)


def train_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token by PaLM's count (Chowdhery et al., 2022, appendix B):
    ``6 N_matmul + 12 L T d_attn``, where ``N_matmul`` counts every linear layer's weight (the
    output head included, also when tied to the embedding) and ``d_attn`` is the query width."""
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    d_attn = sum(m.n_heads * m.head_dim for m in attn)
    return 6 * n_matmul + 12 * seq_len * d_attn


#: Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's data sheets, by name fragment.
BF16_PEAK = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM5 (the "H100 80GB HBM3" name)
    ("H200", 989.4e12),
    ("A100", 312e12),
]


def bf16_peak(name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (``torch.cuda.get_device_name``), or None."""
    for frag, peak in BF16_PEAK:
        if frag in name:
            return peak
    return None


def macs(cfg: TransformerConfig, seq_len: int) -> dict[str, int]:
    """Multiply-accumulates of one forward pass over ``seq_len`` tokens (batch 1).

    For a ViT ``seq_len`` counts the class token too (patches + 1).
    """
    L, d, D, Hq = seq_len, cfg.d_model, cfg.head_dim, cfg.n_heads
    v: VariantSpec = cfg.variant
    n_kv = cfg.n_kv_heads
    widths = sum((Hq if "q" in g else n_kv) * D for g in v.groups)
    proj = L * d * widths
    out = L * Hq * D * d
    scores = 2 * L * L * Hq * D
    fix = (L * Hq * D + L * cfg.pos2d_channels) if v.pos2d else 0
    mlp = (2 if cfg.mlp == "gelu" else 3) * L * d * cfg.d_ff
    per_layer_attn = proj + out + scores + fix
    head = _io_macs(cfg, L)
    attention = cfg.n_layers * per_layer_attn
    total = attention + cfg.n_layers * mlp + head
    return {
        "total": total,
        "attention": attention,
        "projections": cfg.n_layers * proj,
        "scores": cfg.n_layers * scores,
        "mlp": cfg.n_layers * mlp,
        "head": head,
    }


def _io_macs(cfg: TransformerConfig, L: int) -> int:
    """MACs of the family's input and output layers (embedding lookups cost none)."""
    d = cfg.d_model
    if cfg.family == "gpt":
        return L * d * cfg.vocab_size
    if cfg.family == "encoder":
        return L * d * cfg.n_labels
    if cfg.family == "vit":
        return (L - 1) * cfg.channels * cfg.patch_size**2 * d + d * cfg.n_classes
    if cfg.family == "set":
        return L * cfg.in_features * d + L * d
    raise ValueError(f"no MAC rule for family {cfg.family!r}")


def build_on_meta(cfg: TransformerConfig) -> nn.Module:
    from qkvlab.models import build_model

    with torch.device("meta"):
        return build_model(cfg)


def variant_costs(
    base: GPTConfig,
    variants: list[str | VariantSpec],
    *,
    seq_len: int | None = None,
    context: int = 32768,
    dtype: torch.dtype = torch.bfloat16,
    measure_len: int = 16,
) -> list[dict[str, Any]]:
    """One row of costs per variant, on the shape of ``base``.

    ``cache_reduction`` is relative to QKV (MHA, same shape and positions) and is computed
    from the measured cache bytes per token. ``decode_state_bytes`` is the fixed state of a
    linear-attention variant (0 for softmax attention); ``kv_cache_bytes_at_context`` is the
    per-token bytes times ``context`` plus that state.
    """
    seq_len = seq_len or base.max_seq_len
    baseline = None
    rows = []
    qkv_cfg = base.replace(variant=VariantSpec("q_k_v", pos=base.variant.pos).to_dict())
    for spec in [qkv_cfg.variant, *variants]:
        parsed = VariantSpec.parse(spec)
        if parsed.pos is None:
            parsed = parsed.replace(pos=base.variant.pos)
        cfg = base.replace(variant=parsed.to_dict())
        model = build_on_meta(cfg)
        params = count_params(model)
        layout = model.cache_layout()
        if layout.linear:
            cache = LinearState(layout, 1, measure_len, dtype=LinearState.state_dtype(dtype))
            longer = LinearState(layout, 1, 2 * measure_len, dtype=cache.dtype)
            measured = (longer.nbytes - cache.nbytes) / measure_len
            state_bytes = cache.nbytes
        else:
            cache = KVCache(layout, batch_size=1, max_len=measure_len, dtype=dtype)
            measured = cache.measured_bytes_per_token
            state_bytes = 0
        m = macs(cfg, seq_len)
        row = {
            "variant": cfg.variant.paper_name,
            "id": cfg.variant.id,
            "params_total": params["total"],
            "params_attention": params["attention"],
            "seq_len": seq_len,
            "macs": m["total"],
            "macs_attention": m["attention"],
            "cached_tensors_per_layer": cache.layout.tensors_per_layer,
            "cache_tensors_allocated": cache.n_tensors,
            "kv_cache_bytes_per_token": cache.bytes_per_token,
            "kv_cache_bytes_per_token_measured": measured,
            "context": context,
            "decode_state_bytes": state_bytes,
            "kv_cache_bytes_at_context": int(measured * context) + state_bytes,
            "dtype": str(dtype).removeprefix("torch."),
        }
        if baseline is None:
            baseline = row
            continue
        row["cache_reduction"] = 1.0 - measured / baseline["kv_cache_bytes_per_token_measured"]
        row["params_change"] = row["params_total"] / baseline["params_total"] - 1.0
        row["macs_change"] = row["macs"] / baseline["macs"] - 1.0
        rows.append(row)
    return rows


def model_costs(cfg: TransformerConfig) -> dict[str, Any]:
    """The costs a results row reports for a resolved model config, in its row order.

    Parameters (all, attention) for every family. A causal language model (:class:`GPTConfig`)
    adds its KV-cache bytes per token in bf16 (the paper counts 2 bytes), their reduction vs
    QKV of the same shape, its non-embedding parameters and, for linear attention, the
    fixed decode state; the other families have no KV cache, so those are None.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "GQA-N on N heads is MHA", said when the model was built
        if not isinstance(cfg, GPTConfig):
            params = count_params(build_on_meta(cfg))
            return {
                "params_total": params["total"],
                "params_attention": params["attention"],
                "kv_cache_bytes_per_token": None,
                "cache_reduction": None,
                "kv_cache_dtype": None,
                "decode_state_bytes": None,
            }
        (row,) = variant_costs(cfg, [cfg.variant])
        return {
            "params_total": row["params_total"],
            "params_attention": row["params_attention"],
            "kv_cache_bytes_per_token": row["kv_cache_bytes_per_token"],
            "cache_reduction": row["cache_reduction"],
            "kv_cache_dtype": row["dtype"],
            "params_nonembedding": params_nonembedding(build_on_meta(cfg)),
            "decode_state_bytes": row["decode_state_bytes"] or None,  # linear attention's fixed state
        }
