"""Blocks shared by every model family: norms, MLPs, the pre-norm block and the backbone."""

from __future__ import annotations

import math

import torch
from torch import nn

from qkvlab.attention.backends import AttentionOutput
from qkvlab.attention.cache import CacheLayout, KVCache, LinearState
from qkvlab.attention.matvec import apply_linear, gemv_enabled, swiglu_linear
from qkvlab.attention.module import Attention, check_padding_mask
from qkvlab.attention.positional import RMSNorm, Rotary
from qkvlab.attention.projections import FusedLinears
from qkvlab.errors import ConfigError
from qkvlab.models.config import TransformerConfig


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class MLP(FusedLinears, nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer, 2020; LLaMA).

    For inference, :meth:`fuse` runs SwiGLU's gate and up projections as one matrix product
    (see :class:`~qkvlab.attention.projections.FusedLinears`; the GELU MLP has one input
    projection and nothing to fuse).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU() if cfg.mlp == "gelu" else nn.SiLU()
        self._init_fusion()

    def _fusion_linears(self) -> list[nn.Linear]:
        return [] if self.gate is None else [self.gate, self.up]

    def forward(
        self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``residual + mlp(norm(x))`` (each where given: the block's norm and residual stream, which a
        one-row step may compute inside the products' kernels, see :mod:`qkvlab.attention.matvec`)."""
        if (
            self.gate is not None
            and gemv_enabled() == "kernel"
            and type(self.act) is nn.SiLU
            and type(self.down) is nn.Linear
            and self._fused_weight is not None
        ):
            # the one-row kernel makes silu(gate) * up as the down projection reads [gate | up]
            product = self._fused_product(x, norm)
            if product is not None:
                return swiglu_linear(product, self.down.weight, self.down.bias, residual=residual)
        fused = self._fused_outputs(x, norm) if self.gate is not None else None
        if fused is None:
            x = norm(x) if norm is not None else x
            if self.gate is None:
                return apply_linear(self.down, self.act(apply_linear(self.up, x)), residual=residual)
            fused = (apply_linear(self.gate, x), apply_linear(self.up, x))
        gate, up = fused
        return apply_linear(self.down, self.act(gate) * up, residual=residual)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: TransformerConfig, rotary: Rotary | None = None):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            cfg.variant,
            head_dim=cfg.head_dim,
            causal=cfg.causal,
            bias=cfg.bias,
            attn_dropout=cfg.attn_dropout,
            max_seq_len=cfg.max_seq_len,
            rotary=rotary,
            rope_theta=cfg.rope_theta,
            pos2d_channels=cfg.pos2d_channels,
            backend=cfg.backend,
            linear_feature=cfg.linear_feature,
            linear_decay=cfg.linear_decay,
        )
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, *, offset=0, cache=None, padding_mask=None, need_weights=False):
        if isinstance(offset, torch.Tensor) and gemv_enabled() and not self.training and not self.attn.linear:
            # The static one-token step with one-row products on: the norms and residual adds go
            # to the products (the kernel route computes them in the products' own kernels).
            x = self.attn(x, offset=offset, cache=cache, norm=self.norm1, residual=x)
            return self.mlp(x, norm=self.norm2, residual=x)
        a = self.attn(self.norm1(x), offset=offset, cache=cache, padding_mask=padding_mask, need_weights=need_weights)
        a, info = a if need_weights else (a, None)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return (x, info) if need_weights else x


class Backbone(nn.Module):
    """Embeddings in, hidden states out: learned positions (if any), blocks, final norm.

    ``forward(x, offset=0, cache=None, padding_mask=None, need_weights=False)`` takes token
    embeddings ``x`` of shape ``(B, T, d_model)`` at positions ``offset .. offset+T-1``.
    With a :class:`KVCache` (or the :class:`LinearState` of a linear-attention model) the
    offset is the cache's length and the cache advances by T. ``position`` (a 0-d tensor on
    the device, or one per row) runs the static one-token step instead, see
    :meth:`_static_step`. A ragged cache (``cache.row_lengths`` set by a ragged prefill)
    continues each row at its own position: one token per row, through the static step for a
    KV cache.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        pos = cfg.variant.pos
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if pos == "learned" else None
        rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if pos == "rope" else None
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)

    def cache_layout(self) -> CacheLayout:
        v = self.cfg.variant
        return CacheLayout(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim, v.kv_shared, linear=v.linear)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: KVCache | LinearState | None = None,
        padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        position: torch.Tensor | None = None,
    ):
        B, T, _ = x.shape
        if position is not None:
            return self._static_step(x, cache, position, padding_mask, need_weights)
        offset = 0
        rows = getattr(cache, "row_lengths", None)
        if rows is not None and isinstance(cache, KVCache):
            if T != 1:
                raise ConfigError(
                    f"A ragged KV cache (rows of different lengths) continues one token per row at a time; got {T}. "
                    "Decode one token per step, or cache.reset() and prefill the whole batch again."
                )
            cache.check_room(1)
            x = self._static_step(x, cache, rows, padding_mask, need_weights)
            cache.advance(1)
            return x
        if cache is not None:
            cache.check_compatible(self.cache_layout(), B, x.device)
            cache.check_room(T)
            offset = cache.length
        if offset + T > self.cfg.max_seq_len:
            raise ConfigError(
                f"Sequence of {offset + T} positions ({offset} cached + {T} new) exceeds the model's "
                f"max_seq_len={self.cfg.max_seq_len}; truncate the input or build the model with a "
                "larger max_seq_len."
            )
        padding_mask = check_padding_mask(padding_mask, B, offset + T)
        if self.wpe is not None:
            if rows is not None:  # a ragged linear-attention state: each row at its own position
                x = x + self.wpe(rows[:, None] + torch.arange(T, device=x.device))
            else:
                x = x + self.wpe(torch.arange(offset, offset + T, device=x.device))
        x = self.drop(x)
        infos: list[AttentionOutput] = []
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            x = block(x, offset=offset, cache=layer_cache, padding_mask=padding_mask, need_weights=need_weights)
            if need_weights:
                x, info = x
                infos.append(info)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return (x, infos) if need_weights else x

    def _static_step(self, x, cache, position, padding_mask, need_weights):
        """One token at the device position ``position``: no host sync.

        ``position`` is a 0-d integer tensor (every row there) or ``(B,)`` (row ``b`` at
        ``position[b]``, counted from its own first token). The caller
        (:class:`~qkvlab.models.decoding.StaticDecoder`) checks room in the cache and advances
        it; everything here has static shapes, so a CUDA graph can capture it.
        """
        B, T, _ = x.shape
        if cache is None or T != 1 or padding_mask is not None or need_weights:
            raise ConfigError(
                "A device position (static decoding) takes one token per row, a cache, no padding mask "
                f"and no weights; got T={T}, cache={'yes' if cache is not None else 'no'}, "
                f"padding_mask={'yes' if padding_mask is not None else 'no'}, need_weights={need_weights}."
            )
        if position.shape not in ((), (B,)) or position.dtype.is_floating_point or position.dtype == torch.bool:
            raise ConfigError(
                f"position must be a 0-d integer tensor or one per row ({B},), got {position.dtype} "
                f"{tuple(position.shape)}."
            )
        cache.check_compatible(self.cache_layout(), B, x.device)
        if self.wpe is not None:
            x = x + self.wpe(position.reshape(-1, 1))  # (1 or B, 1, d_model)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, offset=position, cache=cache.layers[i])
        return self.norm(x)


def init_weights(model: nn.Module, cfg: TransformerConfig) -> None:
    """N(0, ``init_std``) weight matrices and zero biases; with ``init="scaled"`` (GPT-2's rule)
    the residual-stream output projections get ``init_std / sqrt(2L)`` instead."""
    scaled = cfg.init == "scaled"
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = cfg.init_std
            if scaled and (name.endswith("o_proj.weight") or name.endswith("mlp.down.weight")):
                std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith(".bias") and "pos2d" not in name:
            nn.init.zeros_(p)
