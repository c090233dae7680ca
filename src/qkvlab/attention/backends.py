"""Attention backends behind one registry.

A backend computes ``softmax(scale * q k^T + bias + mask) v`` for

- ``q``: ``(B, Hq, T, D)``, queries at absolute positions ``q_offset .. q_offset + T - 1``;
- ``k``, ``v``: ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0``. When key and value are one
  shared tensor, ``k is v``: backends must not copy it, and grouped heads are never
  repeated to ``Hq``.

Keyword arguments: ``causal`` (key ``j`` is visible to query ``i`` iff
``j <= q_offset + i``), ``key_padding_mask`` (``(B, S)`` bool, True for real tokens),
``bias`` (``(T, S)`` additive float, e.g. the 2D fix), ``dropout_p``, ``scale`` and
``need_weights``. A backend returns ``AttentionOutput``; only backends that say
``supports_weights`` can fill in ``weights`` and ``logits``.

Registered here: ``reference`` (plain math, returns weights and pre-softmax logits,
the ground truth for tests and analysis) and ``sdpa`` (PyTorch's fused
``scaled_dot_product_attention``, the default). Add one with :func:`register_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qkvlab.errors import ConfigError


@dataclass
class AttentionOutput:
    out: torch.Tensor  # (B, Hq, T, D)
    weights: torch.Tensor | None = None  # (B, Hq, T, S), after softmax
    logits: torch.Tensor | None = None  # (B, Hq, T, S), scale * q k^T + bias, before mask


class Backend(Protocol):
    supports_weights: bool

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        q_offset: int = 0,
        key_padding_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        scale: float,
        need_weights: bool = False,
    ) -> AttentionOutput: ...


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, *, supports_weights: bool = False):
    """Decorator: register ``fn`` as attention backend ``name``."""

    def deco(fn):
        fn.supports_weights = supports_weights
        _BACKENDS[name] = fn
        return fn

    return deco


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown attention backend {name!r}; registered backends: {', '.join(sorted(_BACKENDS))}."
        ) from None


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def visibility_mask(
    T: int,
    S: int,
    *,
    causal: bool,
    q_offset: int,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask ``(B or 1, 1, T, S)``, True where a query may attend; None if all may.

    A query row left with no visible key (say a padded query under a causal mask) is
    opened fully so that softmax stays finite; its output is meaningless and is the
    caller's to ignore.
    """
    mask = None
    if causal and not (q_offset + T == S and T == 1):
        qpos = torch.arange(q_offset, q_offset + T, device=device)[:, None]
        kpos = torch.arange(S, device=device)[None, :]
        mask = (kpos <= qpos)[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)
        mask = pad if mask is None else mask & pad
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


@register_backend("reference", supports_weights=True)
def reference_attention(
    q, k, v, *, causal, q_offset=0, key_padding_mask=None, bias=None, dropout_p=0.0, scale, need_weights=False
) -> AttentionOutput:
    """Plain math; grouped heads are handled by a view, not by repeating K/V."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.to(compute).reshape(B, Hkv, G, T, D)
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k.to(compute)) * scale
    logits = logits.reshape(B, Hq, T, S)
    if bias is not None:
        logits = logits + bias.to(compute)
    mask = visibility_mask(T, S, causal=causal, q_offset=q_offset, key_padding_mask=key_padding_mask, device=q.device)
    masked = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
    weights = masked.softmax(dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.einsum("bhgts,bhsd->bhgtd", dropped.reshape(B, Hkv, G, T, S), v.to(compute))
    out = out.reshape(B, Hq, T, D).to(q.dtype)
    if need_weights:
        return AttentionOutput(out, weights, logits)
    return AttentionOutput(out)


#: SDPA backends for calls whose key length changes every call (cached decoding); see sdpa_attention.
_GROWING_KV_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@register_backend("sdpa")
def sdpa_attention(
    q, k, v, *, causal, q_offset=0, key_padding_mask=None, bias=None, dropout_p=0.0, scale, need_weights=False
) -> AttentionOutput:
    """``F.scaled_dot_product_attention`` with ``enable_gqa`` for grouped heads.

    A shared K=V tensor is passed as the same object for both arguments.
    """
    if need_weights:
        raise ConfigError("The 'sdpa' backend cannot return attention weights; use backend='reference'.")
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    simple_causal = causal and q_offset == 0 and T == S and key_padding_mask is None and bias is None
    if simple_causal:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa)
        return AttentionOutput(out)
    mask = visibility_mask(T, S, causal=causal, q_offset=q_offset, key_padding_mask=key_padding_mask, device=q.device)
    if bias is not None:
        add = bias.to(q.dtype)[None, None]
        attn_mask = add if mask is None else torch.where(mask, add, torch.full_like(add, float("-inf")))
    else:
        attn_mask = mask
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    if q_offset > 0 and q.is_cuda:
        # Cached decoding: the key length grows by one every call. cuDNN attention builds an
        # execution plan per shape, on the host (3.7 ms a call on an H100, torch 2.11: 60-80 ms
        # a token for a 16-layer model), so it is left out for these calls; flash and
        # memory-efficient take any length at no set-up cost.
        with sdpa_kernel(_GROWING_KV_BACKENDS):
            return AttentionOutput(F.scaled_dot_product_attention(q, k, v, **kwargs))
    return AttentionOutput(F.scaled_dot_product_attention(q, k, v, **kwargs))
