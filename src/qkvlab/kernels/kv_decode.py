"""Decode attention (one query token per row) over a KV cache, with a shared K=V cache.

Semantics (the same for the reference and the kernel)::

    q        (B, Hq, D)        one query token per row, already rotated / normed by the caller
    k_cache  (B, Hkv, S, D)    Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv)
    v_cache  (B, Hkv, S, D)    the same tensor object as k_cache for a shared K=V cache
    lengths  (B,)              valid cache length per row; keys j >= lengths[b] are masked

    key_j   = rope_j(norm(k_cache[..., j, :]))     norm: x * rsqrt(mean(x^2) + eps) * w (if given)
                                                    rope_j: "rotate half" at position j (if given)
    value_j = v_cache[..., j, :]                    (the raw ``s`` when K=V is shared)
    out     = softmax(scale * q . key^T) @ value    (B, Hq, D), in q's dtype

A shared K=V cache holds the raw projection ``s`` before RoPE and QK-norm, so the key role is
re-derived on every read and the value is ``s`` itself: the kernel reads each cache tile once
and builds the key role in registers. With separate caches ``k_cache`` normally holds final
keys (pass no rope / norm).

:func:`decode_attention_reference` is the ground truth (plain PyTorch, float32 / float64
math). :func:`decode_attention` is a Triton split-K ("flash-decoding") kernel with the same
signature; it falls back to the reference, with one warning, for anything it does not support
(:func:`decode_unsupported_reason`), so it never returns a wrong answer. The attention module
reaches it through the ``"triton"`` decode backend of :mod:`qkvlab.attention.backends`.

:func:`decode_attention_step` is the same kernel doing a static decode step's work around the
attention in its launch: it writes the new token's entry at each row's position (rotating a
separate key there), rotates the query, and attends over ``positions + 1``
(:func:`decode_attention_step_reference` defines it).

Example::

    out = decode_attention(q, cache.k, cache.v, lengths, scale=D**-0.5,
                           rope_cos=rotary.cos, rope_sin=rotary.sin, shared_kv=True)
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass

import torch

from qkvlab.errors import ConfigError

try:  # Triton is optional: the reference path works without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

_LOG2E = 1.4426950408889634
_gdc_launch_dependents = _gdc_wait = None  # set below where Triton has them
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cdiv(a: int, b: int) -> int:  # host-side; Triton's own helpers are jit functions (slow to call)
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# --------------------------------------------------------------------------- reference
def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    lengths: torch.Tensor | int,
    *,
    scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    shared_kv: bool = False,
) -> torch.Tensor:
    """Decode attention in plain PyTorch; the ground truth for :func:`decode_attention`.

    Args:
        q: ``(B, Hq, D)`` (or ``(B, Hq, 1, D)``) queries, already rotated / normed.
        k_cache: ``(B, Hkv, S, D)``; raw ``s`` for a shared cache, else keys.
        v_cache: ``(B, Hkv, S, D)`` values; the same object as ``k_cache`` (or None) if shared.
        lengths: ``(B,)`` integer valid lengths (1 <= length <= S), or one int for all rows.
        scale: softmax scale on ``q . k``.
        rope_cos, rope_sin: ``(R, D/2)`` half-width tables (``Rotary.cos`` / ``.sin``), R >= S.
        k_norm_weight: ``(D,)`` RMSNorm weight of the key role (QK-norm), or None.
        eps: RMSNorm epsilon.
        shared_kv: the cache is one shared K=V tensor (``v_cache`` is ``k_cache`` or None).

    Returns ``(B, Hq, D)`` (``(B, Hq, 1, D)`` for a 4-D ``q``) in ``q``'s dtype. Math runs in
    float64 for float64 inputs, else float32.
    """
    q3, v_cache, lengths, four_d = _check_args(
        q, k_cache, v_cache, lengths, rope_cos, rope_sin, k_norm_weight, shared_kv
    )
    B, Hq, D = q3.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    compute = torch.float64 if q3.dtype == torch.float64 else torch.float32
    s = k_cache.to(compute)
    key = s
    if k_norm_weight is not None:
        key = key * torch.rsqrt(key.pow(2).mean(-1, keepdim=True) + eps) * k_norm_weight.to(compute)
    if rope_cos is not None:
        c = rope_cos[:S].to(device=key.device, dtype=compute)
        sn = rope_sin[:S].to(device=key.device, dtype=compute)
        k1, k2 = key.chunk(2, dim=-1)
        key = torch.cat([k1 * c - k2 * sn, k2 * c + k1 * sn], dim=-1)
    value = s if v_cache is k_cache else v_cache.to(compute)
    qg = q3.to(compute).reshape(B, Hkv, G, D)
    logits = torch.einsum("bhgd,bhsd->bhgs", qg, key) * scale
    visible = torch.arange(S, device=q3.device)[None, :] < lengths.to(q3.device)[:, None]  # (B, S)
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    weights = logits.softmax(dim=-1)
    out = torch.einsum("bhgs,bhsd->bhgd", weights, value).reshape(B, Hq, D).to(q3.dtype)
    return out.unsqueeze(2) if four_d else out


def _check_args(q, k_cache, v_cache, lengths, rope_cos, rope_sin, k_norm_weight, shared_kv):
    """Validate shapes (ValueError on inconsistent arguments); returns (q3, v_cache, lengths, four_d)."""
    four_d = q.dim() == 4
    if four_d:
        if q.shape[2] != 1:
            raise ValueError(f"decode attention takes one query token per row; q has shape {tuple(q.shape)}")
        q = q[:, :, 0]
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"expected q (B, Hq, D) and k_cache (B, Hkv, S, D); got {tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if shared_kv and v_cache is not None and v_cache is not k_cache:
        raise ValueError("shared_kv=True needs v_cache to be k_cache (or None)")
    if v_cache is None:
        if not shared_kv:
            raise ValueError("v_cache is None but shared_kv is False")
        v_cache = k_cache
    B, Hq, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match q {tuple(q.shape)}"
        )
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if isinstance(lengths, int):
        lengths = torch.full((B,), lengths, dtype=torch.int32, device=q.device)
    if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be an integer tensor of shape ({B},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("pass both rope_cos and rope_sin, or neither")
    if rope_cos is not None:
        if D % 2 or rope_cos.dim() != 2 or rope_cos.shape != rope_sin.shape or rope_cos.shape[1] != D // 2:
            raise ValueError(f"RoPE tables must be (R, D/2) = (R, {D // 2}); got {tuple(rope_cos.shape)}")
        if rope_cos.shape[0] < S:
            raise ValueError(f"RoPE tables have {rope_cos.shape[0]} positions but the cache has {S}")
    if k_norm_weight is not None and k_norm_weight.shape != (D,):
        raise ValueError(f"k_norm_weight must have shape ({D},), got {tuple(k_norm_weight.shape)}")
    # The kernel reads lengths[row] by pointer: an expanded (stride-0) tensor would be misread.
    return q, v_cache, lengths.contiguous(), four_d


# --------------------------------------------------------------------------- support
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _aligned(t: torch.Tensor) -> bool:
    """Last dim contiguous and every row start 16-byte aligned (vector loads).

    While ``torch.compile`` traces, tensors have no address: only the strides are checked, and
    :func:`decode_attention` checks the address again when the compiled graph runs.
    """
    if t.stride(-1) != 1 or (not torch.compiler.is_compiling() and t.data_ptr() % 16):
        return False
    esize = t.element_size()
    return all((st * esize) % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1)


def decode_unsupported_reason(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None = None,
    *,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
) -> str | None:
    """Why :func:`decode_attention` would fall back to the reference here, or None if it runs.

    Takes validated shapes (``q`` 3-D or 4-D); looks at Triton, device, dtypes, head width,
    strides and alignment.
    """
    if not HAS_TRITON:
        return "Triton is not installed"
    v_cache = k_cache if v_cache is None else v_cache
    q3 = q[:, :, 0] if q.dim() == 4 else q
    tensors = [q3, k_cache, v_cache]
    extras = [t for t in (rope_cos, rope_sin, k_norm_weight) if t is not None]
    devices = {t.device for t in tensors + extras}
    if len(devices) != 1:
        return f"tensors are on different devices: {sorted(map(str, devices))}"
    device = q3.device
    if device.type != "cuda" and not _interpreting():
        return f"tensors are on {device.type}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if q3.dtype not in _KERNEL_DTYPES:
        return f"dtype {q3.dtype} is not one of float16 / bfloat16 / float32"
    if k_cache.dtype != q3.dtype or v_cache.dtype != q3.dtype:
        return f"mixed dtypes: q {q3.dtype}, k {k_cache.dtype}, v {v_cache.dtype}"
    D = q3.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        return f"head dim {D} is not a power of two in [16, 256]"
    if q3.shape[1] // k_cache.shape[1] > 64:
        return f"query group of {q3.shape[1] // k_cache.shape[1]} heads per KV head is over 64"
    for name, t in (("q", q3), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not _aligned(t):
            return f"{name} is not contiguous in its last dim with 16-byte aligned rows (strides {t.stride()})"
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t is not None and (t.stride(-1) != 1 or not t.dtype.is_floating_point):
            return f"{name} must be a floating table contiguous in its last dim"
    if k_norm_weight is not None and (k_norm_weight.stride(0) != 1 or not k_norm_weight.dtype.is_floating_point):
        return "k_norm_weight must be a contiguous floating vector"
    if device.type != "cuda" and not torch.compiler.is_compiling():  # can this Triton's interpreter run it?
        return _interpreter_problem()  # (under torch.compile the operator checks when it runs)
    return None


# --------------------------------------------------------------------------- kernels
# The kernel bodies are plain functions, jit-compiled on first use (see _kernels): Triton decides
# between the compiler and the interpreter when a function is decorated, so deciding late lets a
# test set TRITON_INTERPRET=1 after Triton was imported. For the same reason the kernels call no
# jit *function* of Triton's standard library (tl.sum, tl.max, tl.zeros were decorated when Triton
# was imported, maybe for the other mode): reductions call tl.reduce with the standard library's
# combine functions, which both the compiler and the interpreter (its numpy fast path) accept.
if HAS_TRITON:
    _sum_fn = tl.standard._sum_combine
    _max_fn = tl.standard._elementwise_max
    try:  # programmatic dependent launch (Hopper+); Triton >= 3.4 has these and ``launch_pdl``
        from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
        from triton.language.extra.cuda import gdc_wait as _gdc_wait
    except ImportError:  # pragma: no cover - older Triton: they stay None, the kernels launch plainly
        pass


def _decode_split_kernel(
    Q,
    K,
    V,
    Lens,
    Cos,
    Sin,
    W,
    Opart,
    LSEpart,
    Out,
    Knew,
    Vnew,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_cs,
    stride_l,
    stride_nkb,
    stride_nkh,
    stride_nvb,
    stride_nvh,
    n_kv_heads,
    n_q_heads,
    seq_len,
    split_len,
    num_splits,
    cos_rows,
    qk_scale,
    eps,
    G: tl.constexpr,
    GP: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    SHARED: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ROPE_TY: tl.constexpr,
    NORM_DOT: tl.constexpr,
    PDL: tl.constexpr,
    TABLE_LO: tl.constexpr,
    LENS_POS: tl.constexpr,
    WRITE_NEW: tl.constexpr,
    ROPE_Q: tl.constexpr,
    ROPE_NEW: tl.constexpr,
):
    """One program = one (batch row, KV head, split of the sequence).

    The program holds all ``G`` query heads of its KV head as the rows of a ``(GP, D)`` block
    (``GP``: G padded to a power of two, to 16 for ``tl.dot``) and walks its split in tiles of
    ``BLOCK_N`` keys, each tile loaded once as its two half-width blocks ``x1 = s[:, :D/2]``,
    ``x2 = s[:, D/2:]`` (the two halves of the RoPE pairs). The key role is built in registers:
    RMSNorm's ``rsqrt`` factor scales the score column instead of every element, and RoPE uses
    ``q . R(n0 + n) k = (R(n0)^T q) . (R(n) k)``: the query block is rotated back by the tile's
    base angle (one table row per tile) and each key by the angles of ``n < BLOCK_N``, held in
    registers for the whole loop, so no key costs DRAM traffic beyond the cache. The held angles
    are built by angle addition from ``TABLE_LO + BLOCK_N / TABLE_LO`` table rows (fewer L2 reads
    at every program's start); ``ROPE_TY`` is the rotation's dtype (the cache's 16-bit dtype
    where the dot rounds the rotated key to it anyway: half the registers).

    The tile loop is a ``tl.range`` whose ``NUM_STAGES`` tiles' loads the software pipeliner
    keeps in flight. Scores ``(GP, BLOCK_N)`` come from ``tl.dot`` (tensor cores, rows padded)
    or, for heads narrower than 32, from broadcast products and ``tl.sum``; ``DOT_F32`` runs the
    dots in float32. Online softmax in base 2. With a single split the output is written
    directly; else the split's normalised partial output and its log2-sum-exp go to ``Opart`` /
    ``LSEpart`` for the combine kernel, which (``PDL``) is launched as a programmatic dependent
    while the last splits finish: each program signals it once its results are stored.

    The static decode step's work around the attention, in the same launch: ``LENS_POS``:
    ``Lens`` holds each row's new position (``stride_l`` 0 for one shared by all rows) and the
    length is one more; ``ROPE_Q``: ``Q`` is the unrotated query, rotated here at that position;
    ``WRITE_NEW``: the program whose split holds the new position first stores the new token's
    entry (``Knew``, and ``Vnew`` for separate caches; ``ROPE_NEW``: the key rotated here) into
    the cache, then reads it back with the rest of its split. No other program reads that slot.
    """
    offs_d = tl.arange(0, HALF)
    offs_n = tl.arange(0, BLOCK_N)
    # Before the wait, only what no kernel of a step writes: the key role's held RoPE angles and
    # its norm weight, built while the kernel before this one (the projection) still finishes.
    if HAS_NORM:
        w1 = tl.load(W + offs_d).to(tl.float32)
        w2 = tl.load(W + HALF + offs_d).to(tl.float32)
    if HAS_ROPE:
        if TABLE_LO < BLOCK_N:  # n = i * LO + j by angle addition from LO + BLOCK_N / LO rows
            offs_lo = tl.arange(0, TABLE_LO)
            offs_hi = tl.arange(0, BLOCK_N // TABLE_LO) * TABLE_LO
            lo_rows = offs_lo[:, None] * stride_cs + offs_d[None, :]
            hi_rows = offs_hi[:, None] * stride_cs + offs_d[None, :]
            c_lo = tl.load(Cos + lo_rows, mask=(offs_lo < cos_rows)[:, None], other=1.0).to(tl.float32)
            s_lo = tl.load(Sin + lo_rows, mask=(offs_lo < cos_rows)[:, None], other=0.0).to(tl.float32)
            c_hi = tl.load(Cos + hi_rows, mask=(offs_hi < cos_rows)[:, None], other=1.0).to(tl.float32)
            s_hi = tl.load(Sin + hi_rows, mask=(offs_hi < cos_rows)[:, None], other=0.0).to(tl.float32)
            c3 = c_hi[:, None, :] * c_lo[None, :, :] - s_hi[:, None, :] * s_lo[None, :, :]
            s3 = s_hi[:, None, :] * c_lo[None, :, :] + c_hi[:, None, :] * s_lo[None, :, :]
            cos_n = tl.reshape(c3, (BLOCK_N, HALF)).to(ROPE_TY)
            sin_n = tl.reshape(s3, (BLOCK_N, HALF)).to(ROPE_TY)
        else:  # a tile of at most TABLE_LO keys reads its rows
            small_rows = offs_n[:, None] * stride_cs + offs_d[None, :]
            small = (offs_n < cos_rows)[:, None]
            cos_n = tl.load(Cos + small_rows, mask=small, other=1.0).to(ROPE_TY)
            sin_n = tl.load(Sin + small_rows, mask=small, other=0.0).to(ROPE_TY)
    if PDL:  # launched as a programmatic dependent too: the kernel before it may still be running
        _gdc_wait()
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)  # 64-bit row / head offsets: caches can pass 2^31 elements
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    stored = tl.load(Lens + b * stride_l).to(tl.int32)
    if LENS_POS:
        stored = stored + 1  # a position: the new token attends to itself and what comes before
    length = tl.minimum(stored, seq_len)  # never read past the cache
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    if split == num_splits - 1:
        end = length  # the last split takes any remainder: coverage never depends on the hint

    offs_g = tl.arange(0, GP)
    g_mask = offs_g < G
    heads = kvh * G + offs_g

    last = length - 1  # the new token's position
    if WRITE_NEW:
        if split == tl.minimum(last // split_len, num_splits - 1):
            n_ptr = Knew + b * stride_nkb + kvh * stride_nkh + offs_d
            n1 = tl.load(n_ptr)
            n2 = tl.load(n_ptr + HALF)
            if ROPE_NEW:  # in float32, rounded once: as the model's rotation computes it
                cn = tl.load(Cos + last * stride_cs + offs_d).to(tl.float32)
                sn = tl.load(Sin + last * stride_cs + offs_d).to(tl.float32)
                f1 = n1.to(tl.float32)
                f2 = n2.to(tl.float32)
                n1 = f1 * cn - f2 * sn
                n2 = f2 * cn + f1 * sn
            k_slot = K + b * stride_kb + kvh * stride_kh + last * stride_ks + offs_d
            tl.store(k_slot, n1.to(K.dtype.element_ty))
            tl.store(k_slot + HALF, n2.to(K.dtype.element_ty))
            if not SHARED:
                nv_ptr = Vnew + b * stride_nvb + kvh * stride_nvh + offs_d
                v_slot = V + b * stride_vb + kvh * stride_vh + last * stride_vs + offs_d
                tl.store(v_slot, tl.load(nv_ptr).to(V.dtype.element_ty))
                tl.store(v_slot + HALF, tl.load(nv_ptr + HALF).to(V.dtype.element_ty))
        tl.debug_barrier()  # the slot's stores are visible to the whole program before its loads

    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q1 = tl.load(q_rows, mask=g_mask[:, None], other=0.0)
    q2 = tl.load(q_rows + HALF, mask=g_mask[:, None], other=0.0)
    if ROPE_Q:
        cq = tl.load(Cos + last * stride_cs + offs_d).to(tl.float32)[None, :]
        sq = tl.load(Sin + last * stride_cs + offs_d).to(tl.float32)[None, :]
        fq1 = q1.to(tl.float32)
        fq2 = q2.to(tl.float32)
        q1 = (fq1 * cq - fq2 * sq).to(q1.dtype)
        q2 = (fq2 * cq + fq1 * sq).to(q2.dtype)
    if (not USE_DOT) or DOT_F32:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
    if HAS_ROPE:
        q1f = q1.to(tl.float32)  # the query is re-rotated per tile from a float32 copy
        q2f = q2.to(tl.float32)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.full([GP], 0.0, tl.float32)
    acc1 = tl.full([GP, HALF], 0.0, tl.float32)
    acc2 = tl.full([GP, HALF], 0.0, tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        pos = n0 + offs_n
        n_mask = pos < end
        kp = k_base + pos[:, None] * stride_ks + offs_d[None, :]
        x1 = tl.load(kp, mask=n_mask[:, None], other=0.0)
        x2 = tl.load(kp + HALF, mask=n_mask[:, None], other=0.0)
        if not SHARED:
            vp = v_base + pos[:, None] * stride_vs + offs_d[None, :]
            v1 = tl.load(vp, mask=n_mask[:, None], other=0.0)
            v2 = tl.load(vp + HALF, mask=n_mask[:, None], other=0.0)

        k1 = x1.to(ROPE_TY)
        k2 = x2.to(ROPE_TY)
        if HAS_NORM and NORM_DOT:
            # Sums of squares on the tensor cores, already in the scores' (GP, BLOCK_N) layout:
            # ones(GP, D) @ (x * x)^T, each square rounded to bf16 (float32's range: no overflow),
            # summed in float32; in float32 throughout where the dots are (the interpreter).
            if DOT_F32:
                s1 = x1.to(tl.float32)
                s2 = x2.to(tl.float32)
            else:
                s1 = x1
                s2 = x2
            ones = tl.full([GP, HALF], 1.0, s1.dtype)
            ssq_t = tl.dot(ones, tl.trans(s1 * s1), input_precision=DOT_PRECISION)
            ssq_t = tl.dot(ones, tl.trans(s2 * s2), ssq_t, input_precision=DOT_PRECISION)
            rnorm_t = tl.rsqrt(ssq_t / (2 * HALF) + eps)
            k1 = k1 * w1.to(ROPE_TY)[None, :]
            k2 = k2 * w2.to(ROPE_TY)[None, :]
        elif HAS_NORM:
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            ssq = tl.reduce(f1 * f1, 1, _sum_fn) + tl.reduce(f2 * f2, 1, _sum_fn)
            rnorm = tl.rsqrt(ssq / (2 * HALF) + eps)
            k1 = k1 * w1.to(ROPE_TY)[None, :]
            k2 = k2 * w2.to(ROPE_TY)[None, :]
        qd1 = q1
        qd2 = q2
        if HAS_ROPE:
            cb = tl.load(Cos + n0 * stride_cs + offs_d).to(tl.float32)[None, :]
            sb = tl.load(Sin + n0 * stride_cs + offs_d).to(tl.float32)[None, :]
            qd1 = (q1f * cb + q2f * sb).to(q1.dtype)
            qd2 = (q2f * cb - q1f * sb).to(q2.dtype)
            r1 = k1 * cos_n - k2 * sin_n
            k2 = k2 * cos_n + k1 * sin_n
            k1 = r1
        if USE_DOT:
            qk = tl.dot(qd1, tl.trans(k1.to(q1.dtype)), input_precision=DOT_PRECISION)
            qk = tl.dot(qd2, tl.trans(k2.to(q2.dtype)), qk, input_precision=DOT_PRECISION)
        else:
            qk = tl.reduce(qd1[:, None, :] * k1[None, :, :], 2, _sum_fn) + tl.reduce(
                qd2[:, None, :] * k2[None, :, :], 2, _sum_fn
            )
        if HAS_NORM and NORM_DOT:
            qk = qk * (rnorm_t * qk_scale)
        elif HAS_NORM:
            qk = qk * (rnorm * qk_scale)[None, :]
        else:
            qk = qk * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_fn))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_fn)
        m_i = m_new

        if SHARED:
            v1 = x1
            v2 = x2
        if USE_DOT:
            if DOT_F32:
                v1 = v1.to(tl.float32)
                v2 = v2.to(tl.float32)
            pv = p.to(v1.dtype)
            acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
            acc2 = tl.dot(pv, v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
        else:
            acc1 = acc1 * alpha[:, None] + tl.reduce(p[:, :, None] * v1.to(tl.float32)[None, :, :], 1, _sum_fn)
            acc2 = acc2 * alpha[:, None] + tl.reduce(p[:, :, None] * v2.to(tl.float32)[None, :, :], 1, _sum_fn)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o1 = acc1 / l_safe[:, None]
    o2 = acc2 / l_safe[:, None]
    if ONE_SPLIT:
        o_rows = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_rows, o1.to(Out.dtype.element_ty), mask=g_mask[:, None])
        tl.store(o_rows + HALF, o2.to(Out.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = b * n_q_heads + heads  # (GP,) rows of the (B * Hq, num_splits, D) partials
        p_rows = Opart + (row[:, None] * num_splits + split) * (2 * HALF) + offs_d[None, :]
        tl.store(p_rows, o1, mask=g_mask[:, None])
        tl.store(p_rows + HALF, o2, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(LSEpart + row * num_splits + split, lse, mask=g_mask)
        if PDL:  # this program's results are stored: the combine kernel may start launching
            _gdc_launch_dependents()


def _decode_combine_kernel(
    Opart,
    LSEpart,
    Out,
    stride_ob,
    stride_oh,
    n_q_heads,
    num_splits,
    SPLITS_P2: tl.constexpr,
    D: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program = one (batch row, query head): merge the ``num_splits`` partial outputs.

    The ``(SPLITS_P2, D)`` block of partials and their log2-sum-exps are read at once; weights
    ``2^(lse_i - max)`` (zero for empty splits) normalise the weighted sum. ``PDL``: launched
    as a programmatic dependent of the split kernel, so it first waits for its results.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // n_q_heads
    h = row % n_q_heads
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < num_splits
    if PDL:
        _gdc_wait()  # every split has finished and its stores are visible
        _gdc_launch_dependents()  # the output projection (a dependent too, on one row) may launch
    lse = tl.load(LSEpart + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.reduce(lse, 0, _max_fn)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.reduce(w, 0, _sum_fn)
    o = tl.load(Opart + (row * num_splits + offs_s[:, None]) * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.reduce(w[:, None] * o, 0, _sum_fn) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


@functools.cache
def _kernels(interpret: bool):
    """The (split, combine) kernels, decorated for the compiler or the interpreter.

    ``triton.jit`` reads ``TRITON_INTERPRET`` itself; ``interpret`` (its current value) keys
    the cache so that both modes can live in one process.
    """
    del interpret
    return triton.jit(_decode_split_kernel), triton.jit(_decode_combine_kernel)


def _range_probe_kernel(Lens, Out):
    n = tl.load(Lens)  # a loaded scalar as a loop bound, as the split kernel's tile loop has
    count = n * 0
    for _ in tl.range(0, n, 2):
        count += 1
    tl.store(Out, count)


@functools.cache
def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None (checked once, on CPU).

    Some Triton interpreters (3.6 with numpy 2) turn a loop bound they loaded into an int with
    ``int(array)``, which numpy 2 refuses for a one-element array, so every ``tl.range`` over a
    loaded length raises. A one-program probe finds out.
    """
    old = os.environ.get("TRITON_INTERPRET")
    try:
        lens = torch.tensor([5], dtype=torch.int32)
        out = torch.zeros(1, dtype=torch.int32)
        os.environ["TRITON_INTERPRET"] = "1"  # read when the probe is decorated: always the interpreter
        probe = triton.jit(_range_probe_kernel)
        probe[(1,)](lens, out)
        if int(out[0]) == 3:
            return None
        return f"Triton {triton.__version__}'s interpreter counted {int(out[0])} loop steps instead of 3"
    except Exception as e:  # any failure: the interpreter cannot be trusted here
        try:
            import numpy

            np_version = f"numpy {numpy.__version__}"
        except ImportError:
            np_version = "no numpy (the interpreter needs it)"
        return (
            f"Triton {triton.__version__}'s interpreter fails a one-program probe (a loop over a loaded "
            f"bound) with {np_version}: {type(e).__name__}: {str(e)[:80]}; Triton 3.9's interpreter runs the kernel"
        )
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


# --------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class DecodeConfig:
    """Launch overrides for :func:`decode_attention`; None keeps the heuristic choice.

    The heuristics choose from the shapes and the GPU; override them to tune for a GPU they do
    not fit, or to pin the split count (tests, or the same partial sums at every length). A call
    without a config takes :func:`default_config` (``QKVLAB_DECODE_CONFIG``, for a whole model).

    Args:
        block_n: keys per tile, a power of two >= 16. Default 128 for a shared cache whose key
            role is rotated and ``D <= 128`` (more independent work per tile hides the
            rotation), else 64; heads narrower than 32 (no tensor cores) use smaller tiles.
        num_splits: sequence splits per (row, KV head). Default: as many as fill whole waves of
            the programs that fit on the GPU at once.
        num_warps: warps per program (default 4).
        num_stages: tiles whose loads the software pipeliner keeps in flight (default 3).
    """

    block_n: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name, pow2, low in (("block_n", True, 16), ("num_splits", False, 1), ("num_warps", True, 1)):
            value = getattr(self, name)
            if value is not None and (value < low or (pow2 and value & (value - 1))):
                kind = f"a power of two >= {low}" if pow2 else f"an integer >= {low}"
                raise ValueError(f"DecodeConfig.{name} must be {kind} or None, got {value!r}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be an integer >= 1 or None, got {self.num_stages!r}")


def default_config() -> DecodeConfig:
    """The launch overrides that apply where a call passes no ``config``: none, unless the
    environment sets ``QKVLAB_DECODE_CONFIG`` to a JSON object of :class:`DecodeConfig` fields,
    e.g. ``'{"block_n": 64, "num_stages": 6}'``. A whole model's decode steps (compiled and
    graphed ones too, whose launches happen when the graph is captured) then take it: the way to
    tune the kernel for a GPU its heuristics do not fit without changing code, or to compare two
    launches in the same tree (``benchmarks/ab_pairs.py --after-env``). A bad value raises
    :class:`~qkvlab.errors.ConfigError` naming it."""
    return _config_from_env(os.environ.get("QKVLAB_DECODE_CONFIG", "").strip())


@functools.lru_cache(maxsize=16)
def _config_from_env(text: str) -> DecodeConfig:
    if not text:
        return DecodeConfig()
    fields = list(DecodeConfig.__dataclass_fields__)
    fix = f"set it to a JSON object of {', '.join(fields)} (e.g. '{{\"num_stages\": 4}}'), or unset it"
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"QKVLAB_DECODE_CONFIG={text!r} is not JSON: {fix}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"QKVLAB_DECODE_CONFIG={text!r} is not a JSON object of launch fields: {fix}")
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"QKVLAB_DECODE_CONFIG={text!r} names {unknown[0]!r}, not a launch field: {fix}")
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value.values()):
        raise ConfigError(f"QKVLAB_DECODE_CONFIG={text!r}: every field takes an integer or null: {fix}")
    try:
        return DecodeConfig(**value)
    except ValueError as e:
        msg = str(e).replace("DecodeConfig.", "").replace(" or None,", " or null,")
        raise ConfigError(f"QKVLAB_DECODE_CONFIG={text!r}: {msg}") from None


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32} if HAS_TRITON else {}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _pdl_supported(index: int) -> bool:
    """Programmatic dependent launch works here: Triton has the launch option, the GPU is sm_90+."""
    if not HAS_TRITON or _gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
            return False
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether qkvlab's kernels launch as programmatic dependents on ``device``: where Triton and
    the GPU support it (sm_90+), unless the environment sets ``QKVLAB_PDL=0`` (to measure what
    the overlap is worth, or to profile kernels that do not overlap)."""
    if device.type != "cuda" or _interpreting():
        return False
    if os.environ.get("QKVLAB_PDL", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return _pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def _plan(G: int, D: int, cfg: DecodeConfig, *, rotated_shared: bool) -> tuple[int, int, int, int, bool]:
    """Tile choices ``(GP, block_n, num_warps, num_stages, use_dot)``.

    Tensor cores score any group (rows padded to 16): the broadcast products of the tl.sum path
    need so many registers that they spill, so that path is only for heads narrower than 32.
    ``rotated_shared``: a shared K=V cache whose key role is rotated in the kernel (RoPE).
    """
    half = D // 2
    use_dot = half >= 16
    gp = max(_next_pow2(G), 16) if use_dot else _next_pow2(G)
    if cfg.block_n is not None:
        block_n = cfg.block_n
    elif use_dot:  # longer tiles give the rotation more independent work per iteration
        block_n = 128 if rotated_shared and half <= 64 else 64
    else:  # keep the (GP, BLOCK_N, D/2) broadcast product near 8k elements
        block_n = max(16, min(128, 8192 // (gp * half)))
    return gp, block_n, cfg.num_warps or 4, cfg.num_stages or 3, use_dot


@functools.lru_cache(maxsize=4096)
def _split_waves(pairs: int, n_tiles: int, slots: int, overhead_tiles: int = 2) -> int:
    """Splits per (row, KV head) that minimise ``waves * (tiles per split + overhead)``.

    ``slots``: programs resident on the whole GPU at once. A program count just over a multiple
    of ``slots`` leaves a nearly empty last wave that costs a whole wave's time; this model picks
    the split count whose programs fill their waves (ties: fewer splits). ``overhead_tiles``: a
    split's fixed cost (pipeline fill, its combine row), in tiles.
    """
    best_cost, best = None, 1
    for s in range(1, min(n_tiles, max(1, 4 * slots // pairs)) + 1):
        cost = -(-pairs * s // slots) * (-(-n_tiles // s) + overhead_tiles)
        if best_cost is None or cost < best_cost:
            best_cost, best = cost, s
    return best


def _num_splits(B: int, Hkv: int, n_tiles: int, device, cfg: DecodeConfig, resident_per_sm: int | None) -> int:
    """Sequence splits per (row, KV head): whole waves where the kernel's residency is known,
    else about 4 programs per multiprocessor with at least a few tiles per split (each split pays
    a pipeline fill and a combine row)."""
    if cfg.num_splits is not None:
        return max(1, min(cfg.num_splits, n_tiles))
    n_sm = _sm_count(device.index or 0) if device.type == "cuda" else 8
    if resident_per_sm is not None:
        return _split_waves(B * Hkv, n_tiles, resident_per_sm * n_sm)
    splits = _cdiv(4 * n_sm, B * Hkv)
    min_tiles = min(16, max(2, n_tiles // 8))
    return max(1, min(splits, n_tiles // min_tiles))


_RESIDENT: dict = {}


def resident_programs(
    n_regs: int, shared: int, warps: int, *, regs_sm: int = 65536, smem_sm: int = 228 * 1024, threads_sm: int = 2048
) -> int:
    """Programs of a compiled kernel that fit on one multiprocessor at once, limited by registers
    (allocated per warp in 256-register units), shared memory (the driver reserves 1 KiB a block)
    and threads; the defaults are an H100's / H200's (sm_90)."""
    regs = -(-max(n_regs, 1) // 8) * 8 * 32 * warps
    return max(1, min(regs_sm // regs, smem_sm // (shared + 1024), threads_sm // (32 * warps), 32))


def _resident_per_sm(compile_kernel, launch_key) -> int | None:
    """Programs of a kernel that fit on one multiprocessor at once (registers, shared memory,
    threads), or None where that is unknown. ``compile_kernel()`` compiles it without a launch
    (Triton's ``warmup``); the answer is cached under ``launch_key``."""
    value = None
    try:
        kernel = compile_kernel()
        kernel._init_handles()
        warps = kernel.metadata.num_warps
        props = torch.cuda.get_device_properties(launch_key[0])
        value = resident_programs(
            kernel.n_regs,
            kernel.metadata.shared,
            warps,
            regs_sm=getattr(props, "regs_per_multiprocessor", 65536),
            smem_sm=getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
            threads_sm=getattr(props, "max_threads_per_multi_processor", 2048),
        )
    except Exception:  # Triton internals differ between versions: the plain heuristic then
        value = None
    _RESIDENT[launch_key] = value
    return value


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    lengths: torch.Tensor | int,
    *,
    scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    shared_kv: bool = False,
    max_length: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-K Triton decode attention; same arguments and result as :func:`decode_attention_reference`.

    Extra keyword arguments: ``max_length`` is a hint (an upper bound of ``lengths``, e.g. the
    cache's filled length) used only to balance the splits; without it the cache's allocated
    length ``S`` is used. Correctness never depends on it. ``config`` overrides the launch
    heuristics (:class:`DecodeConfig`). ``out``: a contiguous ``(B, Hq, D)`` tensor of q's dtype
    to write into (a static buffer for CUDA graphs); it is returned.

    A shared K=V cache (``k_cache is v_cache``, or ``shared_kv=True``) is read once per tile;
    separate caches read both tensors. Unsupported inputs (see :func:`decode_unsupported_reason`)
    fall back to the reference with one ``warnings.warn``. ``lengths`` must lie in ``[1, S]``
    (not checked, to avoid a device sync); a row of length 0 gets zeros.

    Where the launch is a programmatic dependent (:func:`use_pdl`), the kernel reads the RoPE
    tables and ``k_norm_weight`` before it waits for the kernel launched just before it: they
    are a model's constant buffers, so that kernel must not be the one that writes them
    (``QKVLAB_PDL=0`` launches plainly).
    """
    q3, v_cache, lengths, four_d = _check_args(
        q, k_cache, v_cache, lengths, rope_cos, rope_sin, k_norm_weight, shared_kv
    )
    key_role = dict(rope_cos=rope_cos, rope_sin=rope_sin, k_norm_weight=k_norm_weight)
    reason = decode_unsupported_reason(q3, k_cache, v_cache, **key_role)
    if reason is not None:
        warnings.warn(
            f"qkvlab decode_attention: falling back to the PyTorch reference ({reason}).", RuntimeWarning, stacklevel=2
        )
        res = decode_attention_reference(
            q, k_cache, v_cache, lengths, scale=scale, eps=eps, shared_kv=shared_kv, **key_role
        )
        if out is None:
            return res
        return out.copy_(res.reshape(out.shape))
    res = _launch(
        q3, k_cache, v_cache, lengths, scale=scale, eps=eps, max_length=max_length, config=config, out=out, **key_role
    )
    if out is not None:
        return out
    return res.unsqueeze(2) if four_d else res


def split_kernel_constants(
    dtype: torch.dtype,
    G: int,
    D: int,
    cfg: DecodeConfig,
    *,
    shared: bool,
    has_rope: bool,
    has_norm: bool,
    interpreting: bool = False,
    pdl: bool = False,
    positions: bool = False,
    write_new: bool = False,
    rope_q: bool = False,
    rope_new: bool = False,
) -> dict:
    """The split kernel's compile-time constants and launch options (``num_warps``,
    ``num_stages``) for a cache of ``dtype`` with ``G`` query heads per KV head of width ``D``:
    what a launch specialises on (``benchmarks/compile_decode.py`` compiles the same offline)."""
    gp, block_n, num_warps, num_stages, use_dot = _plan(G, D, cfg, rotated_shared=shared and has_rope)
    # The interpreter's tl.dot mishandles bfloat16 operands: it then multiplies in float32.
    dot_f32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting)
    return dict(
        G=G,
        GP=gp,
        HALF=D // 2,
        BLOCK_N=block_n,
        SHARED=shared,
        HAS_ROPE=has_rope,
        HAS_NORM=has_norm,
        USE_DOT=use_dot,
        DOT_PRECISION="ieee" if dot_f32 else "tf32",
        DOT_F32=dot_f32,
        NUM_STAGES=num_stages,
        # Rotate in the cache's 16-bit dtype: the dot rounds the rotated key to it anyway. The
        # interpreter has no 16-bit bfloat arithmetic: it rotates in float32 there (as its dots).
        ROPE_TY=tl.float32 if dot_f32 else _TL_DTYPES[dtype],
        # QK-norm's sums of squares by tl.dot: bfloat16 caches only (float16 squares overflow
        # past 256; float32 caches keep the float32 sums)
        NORM_DOT=use_dot and dtype == torch.bfloat16,
        PDL=pdl,
        TABLE_LO=min(16, block_n),
        LENS_POS=positions,
        WRITE_NEW=write_new,
        ROPE_Q=rope_q,
        ROPE_NEW=rope_new,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _launch(
    q3: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    max_length: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    positions: bool = False,
    new: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    table: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_q: bool = False,
    rope_new: bool = False,
) -> torch.Tensor:
    """Launch the kernels on checked, supported inputs; returns ``(B, Hq, D)``.

    ``positions``: ``lengths`` holds positions (stride 0 for one shared by all rows); ``new``:
    the ``(B, Hkv, D)`` entries to write there first; ``table``: the RoPE tables that
    ``rope_q`` / ``rope_new`` rotate the query / the new key with (``rope_cos`` / ``rope_sin``
    are the key role's, derived on read from a shared cache).
    """
    cfg = config or default_config()
    B, Hq, D = q3.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    S_hint = min(S, max_length) if max_length else S
    shared = v_cache is k_cache or (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride())
    has_rope = rope_cos is not None
    if table is None and has_rope:
        table = (rope_cos, rope_sin)
    interpreting = _interpreting()
    split_kernel, combine_kernel = _kernels(interpreting)

    lengths = lengths.to(q3.device)
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q3.dtype, device=q3.device)
    elif out.dtype != q3.dtype or out.numel() != B * Hq * D or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q3.dtype} tensor of {B * Hq * D} elements")
    out = out.view(B, Hq, D)
    pdl = use_pdl(q3.device)
    cos, sin = table if table is not None else (out, out)
    k_new, v_new = new if new is not None else (out, None)
    v_new = k_new if v_new is None else v_new
    weight = k_norm_weight if k_norm_weight is not None else out
    consts = split_kernel_constants(
        q3.dtype,
        G,
        D,
        cfg,
        shared=shared,
        has_rope=has_rope,
        has_norm=k_norm_weight is not None,
        interpreting=interpreting,
        pdl=pdl,
        positions=positions,
        write_new=new is not None,
        rope_q=rope_q,
        rope_new=rope_new,
    )
    block_n = consts["BLOCK_N"]
    n_tiles = max(1, _cdiv(S_hint, block_n))

    def args(o_part, lse_part, split_len, splits):
        return (
            q3,
            k_cache,
            v_cache,
            lengths,
            cos,
            sin,
            weight,
            o_part,
            lse_part,
            out,
            k_new,
            v_new,
            *q3.stride()[:2],
            *k_cache.stride()[:3],
            *v_cache.stride()[:3],
            *out.stride()[:2],
            cos.stride(0) if table is not None else 0,
            lengths.stride(0),
            *k_new.stride()[:2],
            *v_new.stride()[:2],
            Hkv,
            Hq,
            S,
            split_len,
            splits,
            cos.shape[0] if table is not None else 0,
            float(scale) * _LOG2E,
            float(eps),
        )

    resident = None
    if cfg.num_splits is None and not interpreting:
        # Residency of the multi-split kernel, compiled (not launched) on first use; cached.
        key = (q3.device.index or 0, q3.dtype, tuple(consts.items()))
        if key not in _RESIDENT:  # value None: unknown, the plain heuristic

            def compile_split_kernel():
                part = torch.empty(2, dtype=torch.float32, device=q3.device)
                return split_kernel.warmup(
                    *args(part, part, block_n, 2),
                    grid=(1,),
                    ONE_SPLIT=False,
                    **consts,
                    **({"launch_pdl": True} if pdl else {}),
                )

            _resident_per_sm(compile_split_kernel, key)
        resident = _RESIDENT[key]
    splits = _num_splits(B, Hkv, n_tiles, q3.device, cfg, resident)
    split_len = _cdiv(n_tiles, splits) * block_n
    splits = _cdiv(n_tiles * block_n, split_len)  # drop splits that would start past S_hint
    if splits > 1:
        o_part = torch.empty((B * Hq, splits, D), dtype=torch.float32, device=q3.device)
        lse_part = torch.empty((B * Hq, splits), dtype=torch.float32, device=q3.device)
    else:
        o_part = lse_part = out  # unused
    split_kernel[(B * Hkv, splits)](
        *args(o_part, lse_part, split_len, splits),
        ONE_SPLIT=splits == 1,
        **consts,
        **({"launch_pdl": True} if pdl else {}),
    )
    if splits > 1:
        combine_kernel[(B * Hq,)](
            o_part,
            lse_part,
            out,
            out.stride(0),
            out.stride(1),
            Hq,
            splits,
            SPLITS_P2=_next_pow2(splits),
            D=D,
            PDL=pdl,
            num_warps=4 if D >= 128 else 2,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out


@torch.library.custom_op("qkvlab::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    shared_kv: bool,
) -> torch.Tensor:
    """:func:`decode_attention` as the PyTorch operator ``torch.ops.qkvlab.decode_attention``.

    ``torch.compile`` keeps an operator opaque: it fuses the code around the call (projections,
    RoPE of the query, the cache write) and calls the kernel as is, whose launch heuristics are
    host code that a graph cannot trace. Lengths are a device tensor (no ``max_length`` hint)
    and the default :class:`DecodeConfig` applies.
    """
    return decode_attention(
        q,
        k_cache,
        v_cache,
        lengths,
        scale=scale,
        rope_cos=rope_cos,
        rope_sin=rope_sin,
        k_norm_weight=k_norm_weight,
        eps=eps,
        shared_kv=shared_kv,
    )


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, lengths, scale, rope_cos, rope_sin, k_norm_weight, eps, shared_kv):
    return q.new_empty(q.shape)  # (B, Hq, D) or (B, Hq, 1, D), contiguous, as the kernel returns


# --------------------------------------------------------------------------- the whole step
def _step_args(q, k_new, v_new, k_cache, v_cache, positions, rope_table, rope_q, rope_new):
    """Validate a step's extra arguments; returns (k_new3, v_new3 or None, positions (B,) int64)."""
    B = q.shape[0]
    k3 = k_new[:, :, 0] if k_new.dim() == 4 else k_new
    shape = (B, k_cache.shape[1], k_cache.shape[3])
    if tuple(k3.shape) != shape:
        raise ValueError(f"k_new must be {shape} (or with a length-1 third dim), got {tuple(k_new.shape)}")
    v3 = None
    if v_cache is not None and v_cache is not k_cache:
        if v_new is None:
            raise ValueError("separate K and V caches need v_new")
        v3 = v_new[:, :, 0] if v_new.dim() == 4 else v_new
        if tuple(v3.shape) != shape:
            raise ValueError(f"v_new must be {shape} (or with a length-1 third dim), got {tuple(v_new.shape)}")
    elif v_new is not None:
        raise ValueError("a shared K=V cache takes k_new only (v_new must be None)")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.numel() not in (1, B):
        got = f"{positions.dtype} {tuple(positions.shape)}"
        raise ValueError(f"positions must be integers, one or {B} of them; got {got}")
    if (rope_q or rope_new) and rope_table is None:
        raise ValueError("rope_q / rope_new need the RoPE tables (rope_table)")
    if rope_table is not None:
        S, half = k_cache.shape[2], k_cache.shape[3] // 2
        c, sn = rope_table
        if c.dim() != 2 or c.shape != sn.shape or c.shape[1] != half or c.shape[0] < S:
            raise ValueError(f"rope_table must be two (R, {half}) tables with R >= {S}, got {tuple(c.shape)}")
    return k3, v3, positions.reshape(-1).expand(B)


def decode_step_unsupported_reason(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None = None,
    *,
    rope_table: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
) -> str | None:
    """Why :func:`decode_attention_step` would run its reference here, or None if the kernel runs:
    :func:`decode_unsupported_reason`'s reasons, and new entries or RoPE tables it cannot read.
    ``rope_table``: the tables the step rotates the query or new key with (None where it rotates
    neither); the kernel reads one pair of tables, so they must be the key role's, if it has any."""
    reason = decode_unsupported_reason(
        q, k_cache, v_cache, rope_cos=rope_cos, rope_sin=rope_sin, k_norm_weight=k_norm_weight
    )
    if reason is not None:
        return reason
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is None:
            continue
        t3 = t[:, :, 0] if t.dim() == 4 else t
        if t3.dtype != k_cache.dtype or t3.device != k_cache.device or not _aligned(t3):
            return f"{name} is not a {k_cache.dtype} tensor on {k_cache.device} with 16-byte aligned rows"
    if rope_table is not None and any(
        t.stride(-1) != 1 or t.device != k_cache.device or not t.dtype.is_floating_point for t in rope_table
    ):
        return "the RoPE tables are not floating tables contiguous in their last dim on the cache's device"
    if (
        rope_table is not None
        and rope_cos is not None
        and not (_same_tensor(rope_table[0], rope_cos) and _same_tensor(rope_table[1], rope_sin))
    ):
        return "the query's RoPE tables are not the key role's (the kernel reads one pair)"
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same memory viewed the same way (while torch.compile traces, the same tensor object)."""
    if a is b:
        return True
    if torch.compiler.is_compiling():
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _rotate(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``(B, H, D)`` at one position per row, in float32, rounded once to x's dtype."""
    c = table[0].index_select(0, pos).float()[:, None, :]
    sn = table[1].index_select(0, pos).float()[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1).to(x.dtype)


def decode_attention_step_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    positions: torch.Tensor,
    *,
    scale: float,
    rope_table: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_q: bool = False,
    rope_new: bool = False,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """What :func:`decode_attention_step` computes, in PyTorch: write the new entry, then attend.

    Row ``b`` stores ``k_new[b]`` (rotated at ``positions[b]`` if ``rope_new``) and, for
    separate caches, ``v_new[b]`` at slot ``positions[b]`` of its caches (mutated in place),
    then its query (rotated there if ``rope_q``) attends to slots ``0 .. positions[b]`` as
    :func:`decode_attention_reference` defines it.
    """
    shared = v_cache is None or v_cache is k_cache
    cache_v = None if shared else v_cache
    k3, v3, pos = _step_args(q, k_new, v_new, k_cache, cache_v, positions, rope_table, rope_q, rope_new)
    four_d = q.dim() == 4
    q3 = q[:, :, 0] if four_d else q
    pos = pos.to(device=k_cache.device, dtype=torch.long)
    if rope_q:
        q3 = _rotate(q3, rope_table, pos)
    if rope_new:
        k3 = _rotate(k3, rope_table, pos)
    rows = torch.arange(q3.shape[0], device=k_cache.device)
    k_cache[rows, :, pos] = k3.to(k_cache.dtype)
    if not shared:
        v_cache[rows, :, pos] = v3.to(v_cache.dtype)
    out = decode_attention_reference(
        q3,
        k_cache,
        None if shared else v_cache,
        pos + 1,
        scale=scale,
        rope_cos=rope_cos,
        rope_sin=rope_sin,
        k_norm_weight=k_norm_weight,
        eps=eps,
        shared_kv=shared,
    )
    return out.unsqueeze(2) if four_d else out


def decode_attention_step(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    positions: torch.Tensor,
    *,
    scale: float,
    rope_table: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_q: bool = False,
    rope_new: bool = False,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """One whole decode step of a layer in one launch: write the new token's cache entry at
    ``positions``, rotate what RoPE still has to rotate, attend (see
    :func:`decode_attention_step_reference` for the definition).

    A static decode step otherwise spends a small kernel on each of these (the query's
    rotation, the key's rotation and write, the value's write, the lengths), each costing a
    launch and a gap of the same order as its work. ``q`` ``(B, Hq, D)`` or ``(B, Hq, 1, D)``;
    ``k_new`` / ``v_new`` ``(B, Hkv, D)`` or ``(B, Hkv, 1, D)`` (``v_new`` None for a shared
    cache, whose ``k_new`` is the raw ``s``); ``positions``: one integer per row, or one for
    all rows, on the device (a CUDA graph replays it); each must be below the cache length (not
    checked: no device sync). ``rope_table``: ``(cos, sin)`` ``(R, D/2)``; ``rope_cos`` /
    ``rope_sin`` / ``k_norm_weight`` derive a shared cache's key role on read, as in
    :func:`decode_attention` (and read as early, so the same rule holds for them); ``config``
    as there. Inputs the kernel does not take
    (:func:`decode_step_unsupported_reason`) run the reference, with one warning.
    """
    shared = v_cache is None or v_cache is k_cache
    cache_v = k_cache if shared else v_cache
    k3, v3, pos = _step_args(q, k_new, v_new, k_cache, cache_v, positions, rope_table, rope_q, rope_new)
    q3, _, _, four_d = _check_args(
        q, k_cache, None if shared else v_cache, pos, rope_cos, rope_sin, k_norm_weight, shared
    )
    key_role = dict(rope_cos=rope_cos, rope_sin=rope_sin, k_norm_weight=k_norm_weight)
    table = rope_table if (rope_q or rope_new) else None
    reason = decode_step_unsupported_reason(q3, k3, v3, k_cache, cache_v, rope_table=table, **key_role)
    if reason is not None:
        warnings.warn(
            f"qkvlab decode_attention_step: falling back to the PyTorch reference ({reason}).",
            RuntimeWarning,
            stacklevel=2,
        )
        return decode_attention_step_reference(
            q, k_new, v_new, k_cache, v_cache, positions, scale=scale, rope_table=rope_table,
            rope_q=rope_q, rope_new=rope_new, eps=eps, **key_role,
        )  # fmt: skip
    res = _launch(
        q3,
        k_cache,
        cache_v,
        pos.to(k_cache.device),
        scale=scale,
        eps=eps,
        positions=True,
        new=(k3, v3),
        table=table,
        rope_q=rope_q,
        rope_new=rope_new,
        config=config,
        **key_role,
    )
    return res.unsqueeze(2) if four_d else res


@torch.library.custom_op("qkvlab::decode_attention_step", mutates_args=("k_cache", "v_cache"))
def decode_attention_step_op(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    positions: torch.Tensor,
    scale: float,
    rope_table_cos: torch.Tensor | None,
    rope_table_sin: torch.Tensor | None,
    rope_q: bool,
    rope_new: bool,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """:func:`decode_attention_step` as ``torch.ops.qkvlab.decode_attention_step``, which
    mutates the caches (``v_cache`` None for a shared one); a compiled step calls it as is."""
    table = None if rope_table_cos is None else (rope_table_cos, rope_table_sin)
    return decode_attention_step(
        q, k_new, v_new, k_cache, v_cache, positions, scale=scale, rope_table=table, rope_q=rope_q,
        rope_new=rope_new, rope_cos=rope_cos, rope_sin=rope_sin, k_norm_weight=k_norm_weight, eps=eps,
    )  # fmt: skip


@decode_attention_step_op.register_fake
def _decode_attention_step_fake(q, k_new, v_new, k_cache, v_cache, positions, *args):
    return q.new_empty(q.shape)


__all__ = [
    "HAS_TRITON",
    "DecodeConfig",
    "decode_attention",
    "decode_attention_op",
    "decode_attention_reference",
    "decode_attention_step",
    "decode_attention_step_op",
    "decode_attention_step_reference",
    "decode_step_unsupported_reason",
    "decode_unsupported_reason",
    "default_config",
    "use_pdl",
]
