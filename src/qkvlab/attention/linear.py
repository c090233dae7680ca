"""Kernelised linear attention, in a parallel form (training) and a recurrent form (decoding).

Softmax attention weighs value ``s`` by ``exp(q . k_s)``; linear attention (Katharopoulos
et al., 2020) by ``phi(q) . phi(k_s)`` for a positive feature map ``phi``. For a causal
layer with optional decay ``lam`` (default 1) the output at position ``t`` is::

    out_t = phi(q_t)^T S_t / max(phi(q_t)^T n_t, eps)
    S_t   = lam * S_{t-1} + phi(k_t) v_t^T          (F x Dv per KV head)
    n_t   =       n_{t-1} + phi(k_t)                (F per KV head)

Under full collapse Q = K = V = z this is exactly the recurrence of DESIGN.md and PAPER.md
3.4 (paper App. A): ``S_t = lam S_{t-1} + phi(z_t) z_t^T``, ``n_t = n_{t-1} + phi(z_t)``,
``y_t = phi(z_t)^T S_t / phi(z_t)^T n_t``.

Choices, stated once:

- **The normaliser is not decayed**, as DESIGN.md writes it. With ``lam = 1`` (the default)
  the output is a convex combination of the visible values. With ``lam < 1`` the numerator
  forgets old tokens while the denominator keeps their mass, so old context fades out
  (the output shrinks) instead of being re-weighted. Both forms below implement exactly
  this. Decay needs a causal layer (it is defined by the order of tokens).
- **No 1/sqrt(D) scale**: ``phi`` is applied to the query and key roles as they are.
- **eps** (:data:`EPS`, 1e-6): the denominator is clamped from below, ``max(den, eps)``,
  so a query whose features all vanish (possible with ``relu``) reads zero instead of NaN.
  With ``elu+1`` features are strictly positive and the clamp never binds in practice.
- Half-precision inputs are computed in float32 (the decode state is then float32 too).
- Padded keys (``key_mask`` False) contribute nothing to numerator or normaliser.

Feature maps (:data:`FEATURE_MAPS`): ``"elu+1"`` (default; ``elu(x) + 1 > 0``) and
``"relu"`` (``max(x, 0) >= 0``).

Grouped heads: ``q`` has ``Hq`` heads and ``k``, ``v`` have ``Hkv``; query head ``h`` reads
KV head ``h // (Hq // Hkv)`` (as SDPA's ``enable_gqa``), by a view, never by repeating K/V.
The decode state is per KV head, so queries of one group read the same state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qkvlab.errors import ConfigError

if TYPE_CHECKING:
    from qkvlab.attention.cache import LayerLinearState

#: Lower bound on the normaliser ``phi(q)^T n`` (see the module docstring).
EPS = 1e-6


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"elu+1": _elu1, "relu": F.relu}


def get_feature_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature map called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    try:
        return FEATURE_MAPS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown linear-attention feature map {name!r}; use one of {', '.join(FEATURE_MAPS)} "
            "(e.g. linear_feature='elu+1')."
        ) from None


def check_decay(decay: float, *, causal: bool) -> float:
    """Validate the decay ``lam``: a number in (0, 1], and 1 unless the layer is causal."""
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 < decay <= 1.0:
        raise ConfigError(f"linear_decay must be a number in (0, 1] (1 = no decay), got {decay!r}.")
    if decay != 1.0 and not causal:
        raise ConfigError(
            f"linear_decay={decay} needs a causal model: decay is defined by token order. "
            "Use linear_decay=1 for encoders, ViTs and set encoders."
        )
    return float(decay)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _decay_powers(n: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay ** n`` for a non-negative integer tensor ``n`` (exp of n log decay; underflows to 0)."""
    return torch.exp(n * math.log(decay))


def parallel(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    decay: float = 1.0,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    eps: float = EPS,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Masked (quadratic) form over a whole sequence, for training and full recompute.

    Args:
        qf: query features ``phi(q)``, ``(B, Hq, T, F)``, at positions ``S-T .. S-1``.
        kf: key features ``phi(k)``, ``(B, Hkv, S, F)``.
        v: values ``(B, Hkv, S, Dv)``.
        causal: query ``t`` sees keys ``s <= t``; else all keys.
        decay: ``lam``; key ``s`` enters query ``t``'s numerator with weight ``lam**(t-s)``.
        key_mask: ``(B, S)`` bool, True for real keys.
        dropout_p: dropout on the normalised weights (training).

    Returns ``(out (B, Hq, T, Dv), weights, kernel)``; with ``need_weights`` ``weights`` are
    the effective attention weights ``(B, Hq, T, S)`` (rows sum to 1 when ``lam = 1``) and
    ``kernel`` the raw scores ``phi(q_t) . phi(k_s)`` before mask, decay and normalisation.
    """
    B, Hq, T, Fd = qf.shape
    Hkv, S = kf.shape[1], kf.shape[2]
    G = Hq // Hkv
    dt = _compute_dtype(qf)
    kernel = torch.einsum("bhgtf,bhsf->bhgts", qf.to(dt).reshape(B, Hkv, G, T, Fd), kf.to(dt))
    visible = None
    dist = None
    if causal:
        qpos = torch.arange(S - T, S, device=qf.device)[:, None]
        dist = qpos - torch.arange(S, device=qf.device)[None, :]  # (T, S): t - s
        visible = dist >= 0
    if key_mask is not None:
        pad = key_mask.to(torch.bool)[:, None, None, None, :]  # (B, 1, 1, 1, S)
        visible = pad if visible is None else visible & pad
    scores = kernel if visible is None else kernel.masked_fill(~visible, 0.0)
    den = scores.sum(-1, keepdim=True).clamp_min(eps)  # the normaliser is never decayed
    if decay != 1.0:
        scores = scores * _decay_powers(dist.clamp_min(0).to(dt), decay)
    weights = scores / den
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.einsum("bhgts,bhsd->bhgtd", dropped, v.to(dt)).reshape(B, Hq, T, -1).to(v.dtype)
    if not need_weights:
        return out, None, None
    return out, weights.reshape(B, Hq, T, S), kernel.reshape(B, Hq, T, S)


def recurrent(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    state: LayerLinearState,
    *,
    decay: float = 1.0,
    key_mask: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Continue ``state`` by ``T`` new tokens and read them out; updates the state in place.

    Args:
        qf: ``(B, Hq, T, F)``; kf: ``(B, Hkv, T, F)``; v: ``(B, Hkv, T, Dv)``: the new tokens.
        state: one layer's ``S`` ``(B, Hkv, F, Dv)`` and ``n`` ``(B, Hkv, F)``.
        key_mask: ``(B, T)`` bool for the new tokens, True for real ones.

    One token (decoding) is the recurrence itself: update ``S`` and ``n``, then read
    ``phi(q)^T S / phi(q)^T n``. Several tokens (a prompt) are one chunk: the previous
    state's contribution plus the masked form inside the chunk, then one state update.
    Returns ``(B, Hq, T, Dv)`` in ``v``'s dtype.
    """
    B, Hq, T, Fd = qf.shape
    Hkv = kf.shape[1]
    G = Hq // Hkv
    S, n = state.S, state.n
    dt = S.dtype
    q = qf.to(dt).reshape(B, Hkv, G, T, Fd)
    k, val = kf.to(dt), v.to(dt)
    if key_mask is not None:
        k = k * key_mask.to(dt)[:, None, :, None]  # a padded key adds nothing to S or n
    if T == 1:
        if decay != 1.0:
            S.mul_(decay)
        S.add_(k[:, :, 0, :, None] * val[:, :, 0, None, :])  # S_t = lam S_{t-1} + phi(k_t) v_t^T
        n.add_(k[:, :, 0])  # n_t = n_{t-1} + phi(k_t)
        num = torch.einsum("bhgf,bhfd->bhgd", q[:, :, :, 0], S)
        den = torch.einsum("bhgf,bhf->bhg", q[:, :, :, 0], n).clamp_min(eps)
        out = (num / den[..., None]).unsqueeze(3)  # (B, Hkv, G, 1, Dv)
        return out.reshape(B, Hq, 1, -1).to(v.dtype)
    # A chunk of T tokens after the state: previous contribution + masked form inside.
    kernel = torch.einsum("bhgtf,bhsf->bhgts", q, k)
    dist = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]
    kernel = kernel.masked_fill(dist < 0, 0.0)
    den = (torch.einsum("bhgtf,bhf->bhgt", q, n) + kernel.sum(-1)).clamp_min(eps)
    prev = torch.einsum("bhgtf,bhfd->bhgtd", q, S)
    if decay != 1.0:
        steps = torch.arange(T, device=q.device, dtype=dt)
        prev = prev * _decay_powers(steps + 1, decay)[:, None]  # S_prev seen from t: lam^(t+1)
        kernel = kernel * _decay_powers(dist.clamp_min(0).to(dt), decay)
        k_in = k * _decay_powers(T - 1 - steps, decay)[:, None]  # lam^(T-1-s) into the new state
        S.mul_(decay**T)
    else:
        k_in = k
    num = prev + torch.einsum("bhgts,bhsd->bhgtd", kernel, val)
    S.add_(torch.einsum("bhsf,bhsd->bhfd", k_in, val))
    n.add_(k.sum(2))
    return (num / den[..., None]).reshape(B, Hq, T, -1).to(v.dtype)
