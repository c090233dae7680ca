"""Positional encodings used inside attention: RoPE, per-head RMSNorm, the paper's 2D fix.

Learned absolute positions live in the model's embedding (they are added to the
input, so they keep Q=K symmetric); this file holds what acts on the attention roles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32/float64 stay as they are."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            # PyTorch's rms_norm: one fused kernel where it has one (a decode step has 2 norms a
            # layer), the same result as the formula below (it computes half inputs in fp32).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Mixed dtypes (autocast: half activations, fp32 weight) do not reach the fused kernel.
        dt = _compute_dtype(x)
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dt)).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al., 2021), "rotate half" layout.

    Pair ``(x[d], x[d + D/2])`` of a token at position ``p`` is rotated by angle
    ``p * theta**(-2d/D)``. Half-width cos/sin tables are built once for ``max_seq_len``
    positions and kept as non-persistent buffers, so one instance can be shared by every
    layer. ``forward(x, offset)`` rotates ``x`` of shape ``(B, H, T, D)`` as if its tokens sat
    at positions ``offset .. offset + T - 1``; ``offset`` is an int, a 0-d integer tensor on
    ``x``'s device (static decoding under CUDA graphs), or a ``(B,)`` integer tensor, one
    start position per row (a ragged batch, each row counted from its own first token).

    Without autograd (decoding) the rotation writes into one output buffer with fused
    multiply-adds; this matters for a shared K=V cache, whose key role is re-derived from
    the pre-RoPE cache at every step on the non-fused path.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S, D/2)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        T = x.shape[-2]
        dt = _compute_dtype(x)
        if isinstance(offset, torch.Tensor) and offset.dim() == 1:
            # One start per row: tables gathered to (B, 1, T, D/2), broadcast over the heads.
            idx = (offset[:, None] + torch.arange(T, device=x.device)).reshape(-1)
            c = self.cos.index_select(0, idx).view(-1, 1, T, self.cos.shape[1]).to(dt)
            s = self.sin.index_select(0, idx).view(-1, 1, T, self.sin.shape[1]).to(dt)
        elif isinstance(offset, torch.Tensor):
            # A position held on the device (a 0-d integer tensor): no host sync and no
            # shape that depends on its value, so a CUDA graph can capture the step.
            idx = offset.reshape(()) + torch.arange(T, device=x.device)
            c = self.cos.index_select(0, idx).to(dt)
            s = self.sin.index_select(0, idx).to(dt)
        else:
            c = self.cos[offset : offset + T].to(dt)
            s = self.sin[offset : offset + T].to(dt)
        x1, x2 = x.to(dt).chunk(2, dim=-1)
        if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            # Autograd, or a compiled graph (which fuses this into one kernel; out= into views
            # of one buffer does not trace).
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
        out = torch.empty(x.shape, dtype=dt, device=x.device)
        o1, o2 = out.chunk(2, dim=-1)
        torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
        torch.mul(x2, c, out=o2).addcmul_(x1, s)
        return out.to(x.dtype)


def sinusoid_features(n: int, dim: int) -> torch.Tensor:
    """Standard 1D sinusoidal features (Vaswani et al., 2017), shape ``(n, dim)``."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange((dim + 1) // 2, dtype=torch.float64)[None, :]
    angle = pos / (10000.0 ** (2 * i / max(dim, 1)))
    feats = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(n, -1)[:, :dim]
    return feats.float()


class Pos2DFix(nn.Module):
    """The paper's 2D positional fix "(X)+", computed without the n x n x m tensor.

    The paper adds a fixed tensor ``P[i, j, :m] = [row(i) ; col(j)]`` (row features of the
    query position, column features of the key position, sinusoidal; ``m // 2`` and
    ``m - m // 2`` channels) to the scaled score map broadcast over ``m`` channels, then
    mixes the channels back with a learned 1x1 convolution (``m`` weights ``w`` and a
    bias ``b``), before mask and softmax. Because the mix is linear this equals::

        S' = S * sum(w) + P @ w + b,    (P @ w)[i, j] = row(i) . w_row + col(j) . w_col

    so the additive term is an outer sum of two length-n vectors. One instance per layer,
    shared across heads.

    ``w`` starts at ``1/m`` (so ``sum(w) = 1`` and the scores start unscaled) and ``b`` at 0;
    a default conv init would give ``sum(w)`` a random sign and could flip attention.
    """

    def __init__(self, max_seq_len: int, channels: int = 10):
        super().__init__()
        if channels < 2:
            raise ValueError(f"the 2D fix needs at least 2 channels, got {channels}")
        self.m_row = channels // 2
        self.m_col = channels - self.m_row
        self.weight = nn.Parameter(torch.full((channels,), 1.0 / channels))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("row", sinusoid_features(max_seq_len, self.m_row), persistent=False)
        self.register_buffer("col", sinusoid_features(max_seq_len, self.m_col), persistent=False)

    def score_scale(self) -> torch.Tensor:
        """``sum(w)``: the factor on the raw score map."""
        return self.weight.sum()

    def additive(self, q_offset: int, T: int, S: int) -> torch.Tensor:
        """``P @ w + b`` for queries at ``q_offset .. q_offset+T-1`` and keys ``0 .. S-1``: ``(T, S)``."""
        w_row, w_col = self.weight[: self.m_row], self.weight[self.m_row :]
        r = self.row[q_offset : q_offset + T] @ w_row  # (T,)
        c = self.col[:S] @ w_col  # (S,)
        return r[:, None] + c[None, :] + self.bias

    def materialized(self, n: int) -> torch.Tensor:
        """The full ``P`` tensor ``(n, n, m)``; for tests and figures only."""
        row = self.row[:n][:, None, :].expand(n, n, self.m_row)
        col = self.col[:n][None, :, :].expand(n, n, self.m_col)
        return torch.cat([row, col], dim=-1)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
