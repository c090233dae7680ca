"""The one attention module for the whole variant grid.

Data flow for one layer (shapes: B batch, T new tokens, S keys, Hq query heads,
Hkv key/value heads, D head width)::

    x (B, T, d) --ProjectionStrategy--> q_raw, k_raw, v_raw   (shared roles: same tensor)
    value  = v_raw                                            never rotated, never normed
    key    = rope(norm_k(k_raw))                              RoPE / QK-norm on the key role
    query  = rope(norm_q(q_raw))   (= key when Q and K share: the score map stays symmetric)
    cache  : K=V shared -> stores raw s once; key re-derived from it on read
             otherwise  -> stores key (rotated) and value
    scores : 2D fix "(X)+" -> q * sum(w) and the additive (T, S) map P @ w + b
    backend(q, k, v)  with k is v when K=V has no key transform; Hkv < Hq passed as is

A one-token decode step (a cache, no padding mask, no weights) writes the new token into the
cache, at an int position (eager) or at a device position (``offset`` a 0-d or ``(B,)``
tensor: the graph-safe step), then attends over the cache along one path, with the lengths
always a device tensor: a decode backend where one supports the step
(:func:`~qkvlab.attention.backends.select_decode_backend`; the Triton kernel derives a shared
cache's key role in registers), else the attention backend over the cache.

Linear attention (variant ``+linear``, :mod:`qkvlab.attention.linear`) takes the same roles
and replaces scores + backend by ``phi(q)^T S / phi(q)^T n``: the masked form without a
cache, the recurrent form with a :class:`~qkvlab.attention.cache.LayerLinearState`.
"""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.attention import linear as linear_attn
from qkvlab.attention.backends import (
    TORCH_DECODE,
    AttentionOutput,
    DecodeStep,
    StepWrite,
    check_decode_choice,
    get_backend,
    select_decode_backend,
)
from qkvlab.attention.cache import LayerKVCache, LayerLinearState
from qkvlab.attention.matvec import apply_linear
from qkvlab.attention.positional import Pos2DFix, RMSNorm, Rotary, default_scale
from qkvlab.attention.projections import ProjectionStrategy
from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError


class Attention(nn.Module):
    """Multi-head attention with projection sharing and head sharing.

    Args:
        d_model: model width.
        n_heads: query heads.
        head_dim: width per head (default ``d_model // n_heads``).
        variant: a :class:`VariantSpec` whose ``pos`` is resolved (not None).
        causal: mask future keys (decoders) or not (encoders).
        bias: biases on the projections.
        attn_dropout: dropout on attention probabilities (training only).
        max_seq_len: longest sequence (RoPE tables, 2D fix tables).
        rotary: a :class:`Rotary` to share between layers (built if None and RoPE is on).
        pos2d_channels: ``m``, channels of the 2D fix.
        backend: name in the backend registry (``"sdpa"`` or ``"reference"``); unused by
            linear attention.
        decode_backend: how one-token decode steps attend over the cache: ``"auto"`` (a
            registered decode backend where it supports the step on its device: the Triton
            kernel on CUDA), a decode backend's name (``"triton"``: also under
            ``TRITON_INTERPRET=1`` on a CPU), or ``"torch"`` (always ``backend`` over the cache).
        linear_feature: feature map of linear attention (``variant.linear``): ``"elu+1"``
            or ``"relu"``.
        linear_decay: decay ``lam`` in (0, 1] of linear attention's state; 1 = none.

    ``forward(x, offset=0, cache=None, padding_mask=None, need_weights=False)`` with ``x``
    of shape ``(B, T, d_model)`` returns ``(B, T, d_model)``, or with ``need_weights`` a
    pair ``(out, AttentionOutput)`` holding weights and pre-softmax logits per head.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        variant: VariantSpec,
        *,
        head_dim: int | None = None,
        causal: bool = True,
        bias: bool = True,
        attn_dropout: float = 0.0,
        max_seq_len: int = 2048,
        rotary: Rotary | None = None,
        rope_theta: float = 10000.0,
        pos2d_channels: int = 10,
        backend: str = "sdpa",
        decode_backend: str = "auto",
        linear_feature: str = "elu+1",
        linear_decay: float = 1.0,
    ):
        super().__init__()
        head_dim = head_dim or d_model // n_heads
        if variant.pos is None:
            raise ValueError("Attention needs a resolved positional scheme (variant.pos is None)")
        variant.validate(n_heads=n_heads, head_dim=head_dim, d_model=d_model, causal=causal)
        self.variant = variant
        self.n_heads = n_heads
        self.n_kv_heads = variant.kv_heads(n_heads)
        self.head_dim = head_dim
        self.causal = causal
        self.attn_dropout = attn_dropout
        self.scale = default_scale(head_dim)
        self.backend = backend
        get_backend(backend)
        self.decode_backend = check_decode_choice(decode_backend)

        self.qkv = ProjectionStrategy(d_model, n_heads, head_dim, variant, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

        # QK-norm: per role; a shared Q=K source shares one norm so s_ij = s_ji holds.
        self.qk_shared = variant.qk_shared
        self.kv_shared = variant.kv_shared
        if variant.qk_norm:
            self.k_norm = RMSNorm(head_dim)
            self.q_norm = None if self.qk_shared else RMSNorm(head_dim)
        else:
            self.k_norm = self.q_norm = None
        self.rotary = None
        if variant.pos == "rope":
            self.rotary = rotary if rotary is not None else Rotary(head_dim, max_seq_len, rope_theta)
        self.pos2d = Pos2DFix(max_seq_len, pos2d_channels) if variant.pos2d else None
        # Does the key role differ from the raw shared tensor?
        self.key_transformed = self.rotary is not None or self.k_norm is not None
        self.linear = variant.linear
        self.linear_feature = linear_feature
        self.feature_map = linear_attn.get_feature_map(linear_feature) if self.linear else None
        self.linear_decay = linear_attn.check_decay(linear_decay, causal=causal) if self.linear else 1.0

    # ------------------------------------------------------------------ roles
    def _heads(self, t: torch.Tensor, h: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, h, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def key_role(self, s: torch.Tensor, offset: int) -> torch.Tensor:
        """The key role from a raw projection ``(B, H, T, D)`` at positions ``offset..``."""
        if self.k_norm is not None:
            s = self.k_norm(s)
        if self.rotary is not None:
            s = self.rotary(s, offset)
        return s

    def query_role(self, s: torch.Tensor, offset: int) -> torch.Tensor:
        norm = self.k_norm if self.qk_shared else self.q_norm
        if norm is not None:
            s = norm(s)
        if self.rotary is not None:
            s = self.rotary(s, offset)
        return s

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        *,
        offset: int = 0,
        cache: LayerKVCache | LayerLinearState | None = None,
        padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        norm: nn.Module | None = None,
        residual: torch.Tensor | None = None,
    ):
        """``norm`` and ``residual`` (the block's input norm and its residual stream) are for the
        static one-token step only: the output is then ``residual + attention(norm(x))``, so a
        one-row product can take the norm and the add into its kernel (``StaticDecoder(gemv=...)``)."""
        B, T, _ = x.shape
        if (norm is not None or residual is not None) and not isinstance(offset, torch.Tensor):
            raise ConfigError("Attention takes norm= and residual= only in the static decode step (a device offset).")
        q_raw, k_raw, v_raw = self.qkv(x, norm)
        k_src = self._heads(k_raw, self.n_kv_heads)
        v_src = k_src if self.kv_shared else self._heads(v_raw, self.n_kv_heads)
        if self.linear:
            return self._linear_forward(q_raw, k_src, v_src, offset, cache, padding_mask, need_weights)
        static = isinstance(offset, torch.Tensor)  # a device position: the graph-safe decode step
        if static and (not isinstance(cache, LayerKVCache) or self.pos2d is not None):
            raise ConfigError("Static decoding needs a KV cache and a causal model without the 2D fix.")
        if static:
            fused = self._write_and_decode(q_raw, k_src, v_src, offset, cache)
            if fused is not None:
                return self._project(fused, B, residual)
        # The key role of the new tokens; a shared K=V cache re-derives it on read instead.
        needs_k_new = cache is None or not self.kv_shared or self.qk_shared
        k_new = self.key_role(k_src, offset) if needs_k_new else k_src
        if self.qk_shared:
            q = k_new  # same source, same transforms: symmetric scores
        else:
            q = self.query_role(self._heads(q_raw, self.n_heads), offset)

        if cache is not None:
            # A shared K=V cache stores the raw shared tensor once; the key role is derived on read.
            k_store, v_store = (k_src, None) if self.kv_shared else (k_new, v_src)
            if static:
                cache.write_at(offset, k_store, v_store)
            else:
                cache.write(offset, k_store, v_store)
        if static:
            lengths = (offset + 1).to(torch.int32).expand(B).contiguous()  # one per row, read by pointer
            return self._project(self._decode(q, cache, lengths), B, residual)
        if cache is not None and T == 1 and padding_mask is None and not need_weights and self.pos2d is None:
            lengths = torch.full((B,), offset + 1, dtype=torch.int32, device=x.device)
            return self._project(self._decode(q, cache, lengths, length=offset + 1), B)

        if cache is None:
            k, v = k_new, v_src
        else:
            k, v = cache.read(offset + T)
            if self.kv_shared and self.key_transformed:
                k = self.key_role(k, 0)

        bias = None
        if self.pos2d is not None:
            q = q * self.pos2d.score_scale().to(q.dtype)
            bias = self.pos2d.additive(offset, T, k.shape[2])

        backend_name = "reference" if need_weights else self.backend
        res: AttentionOutput = get_backend(backend_name)(
            q,
            k,
            v,
            causal=self.causal,
            q_offset=offset,
            key_padding_mask=padding_mask,
            bias=bias,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
            need_weights=need_weights,
        )
        y = self.o_proj(res.out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return (y, res) if need_weights else y

    def _project(self, out: torch.Tensor, B: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, Hq, 1, D)`` attention output of a decode step -> ``(B, 1, d_model)`` (+ ``residual``)."""
        return apply_linear(
            self.o_proj, out.transpose(1, 2).reshape(B, 1, self.n_heads * self.head_dim), residual=residual
        )

    def _derived_key_role(self) -> dict:
        """The :class:`DecodeStep` fields that derive a shared K=V cache's key role from the raw
        ``s`` on read (RoPE tables, QK-norm weight; None where the layer has none or the cache
        holds final keys), and the norm's eps."""
        derive = self.kv_shared and self.key_transformed
        return dict(
            rope_cos=self.rotary.cos if derive and self.rotary is not None else None,
            rope_sin=self.rotary.sin if derive and self.rotary is not None else None,
            k_norm_weight=self.k_norm.weight if derive and self.k_norm is not None else None,
            eps=self.k_norm.eps if self.k_norm is not None else 1e-6,
        )

    def _write_and_decode(
        self, q_raw: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, offset: torch.Tensor, cache: LayerKVCache
    ) -> torch.Tensor | None:
        """The static step's cache write, rotations and attention in one decode-backend launch,
        where the chosen backend writes (a step's small kernels around the attention cost it a
        launch and a gap each). Norms of the query or key roles are applied here first; RoPE is
        left to the backend. None: no backend takes the step, and it runs op by op."""
        if self.decode_backend == TORCH_DECODE:
            return None
        rope = self.rotary is not None
        query_norm = self.k_norm if self.qk_shared else self.q_norm
        q_src = k_src if self.qk_shared else self._heads(q_raw, self.n_heads)
        rope_q = rope and query_norm is None
        q = q_src if rope_q else self.query_role(q_src, offset)
        if self.kv_shared:  # the raw s is stored; the key role is derived on read
            k_new, v_new, rope_new = k_src, None, False
        else:
            rope_new = rope and self.k_norm is None
            k_new, v_new = (k_src if rope_new else self.key_role(k_src, offset)), v_src
        cache.owner._check(k_new, 1)
        step = DecodeStep(
            q,
            cache.k,
            cache.v,
            None,
            self.scale,
            **self._derived_key_role(),
            write=StepWrite(
                k_new,
                v_new,
                offset,
                rope_table=(self.rotary.cos, self.rotary.sin) if rope else None,
                rope_q=rope_q,
                rope_new=rope_new,
            ),
        )
        backend = select_decode_backend(self.decode_backend, step)
        return None if backend is None else backend(step)

    def _decode(
        self, q: torch.Tensor, cache: LayerKVCache, lengths: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """One new token per row attending over the cache it was just written into.

        ``q`` ``(B, Hq, 1, D)``; ``lengths`` ``(B,)`` int32 on the device; ``length``: the one
        length of every row when the host knows it (an eager step), else None. A decode backend
        runs the step where one supports it; otherwise the attention backend reads the filled
        prefix (``length`` known) or the whole cache with a per-row key mask. Returns
        ``(B, Hq, 1, D)``.
        """
        step = DecodeStep(q, cache.k, cache.v, lengths, self.scale, **self._derived_key_role(), length=length)
        backend = select_decode_backend(self.decode_backend, step)
        if backend is not None:
            return backend(step)
        if length is not None:
            k, v = cache.read(length)
            mask, causal, q_offset = None, self.causal, length - 1
        else:
            k, v = cache.k, cache.v
            mask = torch.arange(k.shape[2], device=q.device) < lengths[:, None]  # (B, S)
            causal, q_offset = False, 0
        if self.kv_shared and self.key_transformed:  # the key role is derived from raw s on read
            k = self.key_role(k, 0)
        return get_backend(self.backend)(
            q,
            k,
            v,
            causal=causal,
            q_offset=q_offset,
            key_padding_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
        ).out

    @property
    def decode_kernel(self) -> bool | str:
        """The earlier switch, kept for compatibility: True is ``decode_backend="triton"``,
        False is ``"torch"``, ``"auto"`` is ``"auto"``."""
        return {"triton": True, "torch": False}.get(self.decode_backend, self.decode_backend)

    @decode_kernel.setter
    def decode_kernel(self, flag: bool | str) -> None:
        choices = {True: "triton", False: "torch", "auto": "auto"}
        if not isinstance(flag, bool | str) or flag not in choices:
            raise ConfigError(f"decode_kernel must be True, False or 'auto', got {flag!r}; see decode_backend.")
        self.decode_backend = choices[flag]

    def _linear_forward(self, q_raw, k_src, v_src, offset, cache, padding_mask, need_weights):
        """Linear attention over the same roles: masked form, or the recurrent one with a state."""
        B, T = k_src.shape[0], k_src.shape[2]
        kf = self.feature_map(self.key_role(k_src, offset))  # (B, Hkv, T, D)
        # Q=K: one source, one transform, one feature map: phi(q) is phi(k).
        qf = kf if self.qk_shared else self.feature_map(self.query_role(self._heads(q_raw, self.n_heads), offset))
        res = None
        if cache is None:
            out, weights, kernel = linear_attn.parallel(
                qf,
                kf,
                v_src,
                causal=self.causal,
                decay=self.linear_decay,
                key_mask=padding_mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                need_weights=need_weights,
            )
            res = AttentionOutput(out, weights, kernel)
        else:
            if not isinstance(cache, LayerLinearState):
                raise ConfigError(
                    f"Variant {self.variant.id!r} uses linear attention, which decodes with a LinearState, "
                    f"not {type(cache).__name__}; build it with model.new_cache(batch_size)."
                )
            if need_weights:
                raise ConfigError(
                    "need_weights with linear attention needs the whole sequence in one call (the "
                    "decode state keeps no per-token weights); run the model without a cache."
                )
            mask = None if padding_mask is None else padding_mask[:, offset : offset + T]
            out = linear_attn.recurrent(qf, kf, v_src, cache, decay=self.linear_decay, key_mask=mask)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return (y, res) if need_weights else y

    def extra_repr(self) -> str:
        kind = (
            f"linear={self.linear_feature!r}, decay={self.linear_decay}" if self.linear else f"backend={self.backend!r}"
        )
        return (
            f"variant={self.variant.id!r} ({self.variant.paper_name}), heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, causal={self.causal}, {kind}"
        )


def check_padding_mask(mask: torch.Tensor | None, B: int, S: int) -> torch.Tensor | None:
    """Validate a ``(B, S)`` key padding mask (True = real token)."""
    if mask is None:
        return None
    if mask.shape != (B, S):
        raise ConfigError(
            f"padding_mask has shape {tuple(mask.shape)} but must be (batch, keys) = ({B}, {S}), True for real tokens."
        )
    return mask.to(torch.bool)
