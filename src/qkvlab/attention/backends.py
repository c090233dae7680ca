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

Decode backends are a second registry, for the one-token step over a whole KV cache
(:class:`DecodeStep`). Each says with ``supports(step)`` whether it can run a step (device,
dtype, head width, cache layout); :func:`select_decode_backend` picks one, or None, and the
attention module then takes the PyTorch path (the attention backend over the cache).
Registered here: ``triton`` (:mod:`qkvlab.kernels.kv_decode`, which reads a shared K=V cache
once and derives its key role in registers). Add one with :func:`register_decode_backend`.
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
    except (KeyError, TypeError):  # TypeError: a list or mapping where a name goes
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
        # execution plan per shape on the host, which costs more than the step itself, so it is
        # left out for these calls; flash and memory-efficient take any length at no set-up cost.
        with sdpa_kernel(_GROWING_KV_BACKENDS):
            return AttentionOutput(F.scaled_dot_product_attention(q, k, v, **kwargs))
    return AttentionOutput(F.scaled_dot_product_attention(q, k, v, **kwargs))


# --------------------------------------------------------------------------- decode backends
@dataclass(frozen=True)
class StepWrite:
    """The static step's cache write, for a decode backend to do in its own launch.

    ``k_new`` ``(B, Hkv, 1, D)``: the raw ``s`` of a shared cache, else the new key: unrotated
    if ``rope_new``, which has the backend rotate it at its position. ``v_new``: the new value
    (None when shared). ``positions``: the slot of each row, 0-d or ``(B,)``, on the device; the
    step's lengths are ``positions + 1``. ``rope_q``: the step's query is unrotated too.
    ``rope_table``: ``(cos, sin)``, the model's RoPE tables, for those rotations.
    """

    k_new: torch.Tensor
    v_new: torch.Tensor | None
    positions: torch.Tensor
    rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
    rope_q: bool = False
    rope_new: bool = False


@dataclass(frozen=True)
class DecodeStep:
    """One new token per row attending over a whole KV cache: what a decode backend computes.

    ``q`` ``(B, Hq, 1, D)``: the new tokens' queries, already rotated / normed.
    ``k_cache``, ``v_cache`` ``(B, Hkv, S, D)``: the layer's cache, one tensor object when K=V
    is shared; it then holds the raw ``s``, and the key role ``rope(norm(s))`` is derived on
    read from ``rope_cos`` / ``rope_sin`` ``(R, D/2)`` and ``k_norm_weight`` ``(D,)`` (None
    when off). ``lengths`` ``(B,)`` int32 on the device: row ``b`` attends to cache slots
    ``0 .. lengths[b] - 1``. ``length``: the one length of every row when the host knows it
    (an eager step), else None (a step captured in a CUDA graph reads it on the device).
    The result is ``(B, Hq, 1, D)``; see :mod:`qkvlab.kernels.kv_decode` for the exact semantics.
    ``write``: the new token's entry is not in the cache yet; only a backend registered with
    ``writes=True`` runs such a step, writing it first (``lengths`` is then None).
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    lengths: torch.Tensor | None
    scale: float
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    eps: float = 1e-6
    length: int | None = None
    write: StepWrite | None = None

    @property
    def shared_kv(self) -> bool:
        return self.k_cache is self.v_cache

    @property
    def key_role(self) -> dict[str, torch.Tensor | None]:
        return dict(rope_cos=self.rope_cos, rope_sin=self.rope_sin, k_norm_weight=self.k_norm_weight)


class DecodeBackend(Protocol):
    auto_devices: tuple[str, ...]

    def supports(self, step: DecodeStep) -> bool: ...

    def __call__(self, step: DecodeStep) -> torch.Tensor: ...


_DECODE_BACKENDS: dict[str, DecodeBackend] = {}
#: The decode choice that never runs a decode backend: always the PyTorch path.
TORCH_DECODE = "torch"


def register_decode_backend(name: str, *, supports, auto_devices: tuple[str, ...] = ("cuda",), writes: bool = False):
    """Decorator: register ``fn(step) -> (B, Hq, 1, D)`` as decode backend ``name``.

    ``supports(step) -> bool`` says whether ``fn`` runs ``step``; ``auto_devices``: the device
    types on which ``"auto"`` tries it (named explicitly, it is tried on any device);
    ``writes``: it also runs steps with a :class:`StepWrite`.
    """
    if name in ("auto", TORCH_DECODE):
        raise ValueError(f"{name!r} is a reserved decode choice, not a backend name")

    def deco(fn):
        fn.supports = supports
        fn.auto_devices = tuple(auto_devices)
        fn.writes = writes
        _DECODE_BACKENDS[name] = fn
        return fn

    return deco


def decode_choices() -> list[str]:
    return ["auto", TORCH_DECODE, *sorted(_DECODE_BACKENDS)]


def check_decode_choice(choice: str) -> str:
    if choice not in decode_choices():
        raise ConfigError(f"Unknown decode backend {choice!r}; choose one of {', '.join(decode_choices())}.")
    return choice


def select_decode_backend(choice: str, step: DecodeStep) -> DecodeBackend | None:
    """The decode backend that runs ``step``, or None for the PyTorch path.

    ``choice``: ``"auto"`` tries, in registration order, the backends whose ``auto_devices``
    hold the step's device type; a backend's name tries that one on any device (Triton's
    interpreter on a CPU, say); ``"torch"`` never runs one. A backend runs only where its
    ``supports(step)`` is True: anything else falls back, never fails.
    """
    check_decode_choice(choice)
    if choice == TORCH_DECODE:
        return None
    if choice == "auto":
        candidates = [b for b in _DECODE_BACKENDS.values() if step.q.device.type in b.auto_devices]
    else:
        candidates = [_DECODE_BACKENDS[choice]]
    if step.write is not None:
        candidates = [b for b in candidates if getattr(b, "writes", False)]
    return next((b for b in candidates if b.supports(step)), None)


def _triton_supports(step: DecodeStep) -> bool:
    # A separate K/V cache whose length the host knows is read as fast by SDPA over its filled
    # prefix (flash decoding), with less launch overhead. The kernel earns its place where it
    # reads a shared K=V cache once instead of materialising the key role, and where the length
    # lives on the device, where SDPA would have to read the whole allocated cache.
    if not step.shared_kv and step.length is not None:
        return False
    from qkvlab.kernels import kv_decode

    w = step.write
    if w is not None:  # the new entries and RoPE tables must be readable by the kernel too
        return (
            kv_decode.decode_step_unsupported_reason(
                step.q,
                w.k_new,
                w.v_new,
                step.k_cache,
                step.v_cache,
                rope_table=w.rope_table if (w.rope_q or w.rope_new) else None,
                **step.key_role,
            )
            is None
        )
    return kv_decode.decode_unsupported_reason(step.q, step.k_cache, step.v_cache, **step.key_role) is None


@register_decode_backend("triton", supports=_triton_supports, writes=True)
def triton_decode(step: DecodeStep) -> torch.Tensor:
    """The split-K Triton kernel; inside ``torch.compile`` the opaque operator that wraps it."""
    from qkvlab import kernels

    if step.write is not None:
        return _triton_decode_write(step)
    if torch.compiler.is_compiling():
        return torch.ops.qkvlab.decode_attention(
            step.q,
            step.k_cache,
            step.v_cache,
            step.lengths,
            step.scale,
            step.rope_cos,
            step.rope_sin,
            step.k_norm_weight,
            step.eps,
            step.shared_kv,
        )
    return kernels.decode_attention(
        step.q,
        step.k_cache,
        step.v_cache,
        step.lengths,
        scale=step.scale,
        eps=step.eps,
        shared_kv=step.shared_kv,
        max_length=step.length,
        **step.key_role,
    )


def _triton_decode_write(step: DecodeStep) -> torch.Tensor:
    """The step with its cache write and rotations in the same launch."""
    from qkvlab.kernels import kv_decode

    w = step.write
    shared = step.shared_kv
    table = w.rope_table if w.rope_table is not None else (None, None)
    if torch.compiler.is_compiling():
        return torch.ops.qkvlab.decode_attention_step(
            step.q,
            w.k_new,
            None if shared else w.v_new,
            step.k_cache,
            None if shared else step.v_cache,
            w.positions,
            step.scale,
            *table,
            w.rope_q,
            w.rope_new,
            step.rope_cos,
            step.rope_sin,
            step.k_norm_weight,
            step.eps,
        )
    return kv_decode.decode_attention_step(
        step.q,
        w.k_new,
        None if shared else w.v_new,
        step.k_cache,
        None if shared else step.v_cache,
        w.positions,
        scale=step.scale,
        rope_table=w.rope_table,
        rope_q=w.rope_q,
        rope_new=w.rope_new,
        eps=step.eps,
        **step.key_role,
    )
