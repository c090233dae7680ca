"""Matrix-vector product for one-row decode steps: ``y = x @ w.T (+ b)`` with ``x`` of one row.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the weights
once. cuBLAS tiles the output in blocks of 64 rows, so an 8 MB projection (2048 x 2048) runs on 32
thread blocks of a 132-SM card and reads well below the copy rate. This kernel gives each program
a few output rows and the whole reduction, so every projection spreads over hundreds of programs,
and accumulates in float32 (as cuBLAS does for half inputs).

:func:`gemv` is the plain function (falls back to ``F.linear`` for what the kernel does not take);
``torch.ops.qkvlab.gemv`` is the opaque operator a compiled step calls. The model reaches it through
:mod:`qkvlab.attention.matvec`, the switch a decode step turns on.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

from qkvlab.kernels.kv_decode import _gdc_launch_dependents, _gdc_wait, _interpreter_problem, _interpreting, use_pdl

try:  # Triton is optional: F.linear is always there.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The kernel calls no jit function of Triton's standard library (tl.sum, tl.zeros), which were
# decorated for one mode when Triton was imported: the kernel is decorated late (_kernel), so a
# test can choose the interpreter after import. The same rule as the decode kernel's.
if HAS_TRITON:
    _sum_fn = tl.standard._sum_combine


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: output rows per program, reduction tile, warps, pipeline stages, and how
    many neighbouring columns each tile's products are summed over before they are accumulated
    (``fold``: the accumulator is that many times narrower than the tile, so fewer registers)."""

    block_n: int = 0  # 0 in any field: that field chosen from the shape (see _auto_config)
    block_k: int = 0
    num_warps: int = 0
    num_stages: int = 0
    fold: int = 0


def _gemv_kernel(
    X,
    W,
    Bias,
    NormW,
    Res,
    Y,
    N,
    K,
    stride_wn,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    GLU: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FOLD: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    # a short last block reads row N-1 again rather than masking every load; its stores are masked
    safe_rows = tl.minimum(rows, N - 1)
    # No kernel writes the weights: the first tile is read into registers before the wait below,
    # so its DRAM latency overlaps the previous kernel's tail; the loop reads the others.
    cols0 = tl.arange(0, BLOCK_K)
    first_ptrs = W + safe_rows[:, None] * stride_wn + cols0[None, :]
    if EVEN_K:
        w_first = tl.load(first_ptrs)
    else:
        w_first = tl.load(first_ptrs, mask=cols0[None, :] < K, other=0.0)
    if PDL:
        # Launched as a programmatic dependent of the kernel before it: this program may already
        # be resident while that one finishes, so it waits for its results before reading any
        # input, then lets the next product launch in turn. A step's chain of products (and the
        # decode combine before them) thus overlaps each launch with the previous kernel's tail.
        _gdc_wait()
        _gdc_launch_dependents()
    if HAS_NORM:  # (inv_rms exists only in this specialisation, as its only readers are under HAS_NORM)
        # every program reduces the whole input row (a few KB, from L2) rather than wait for a
        # separate norm kernel: the step saves that kernel's launch and its round trip to memory
        ssq = tl.full([BLOCK_K], 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
            ssq += xs * xs
        inv_rms = tl.rsqrt(tl.reduce(ssq, 0, _sum_fn) / K + eps)
    # One reduction at the end, not per tile. A float32 accumulator of the tile's shape takes
    # twice the tile's registers, and registers bound how many programs (so how many loads in
    # flight) an SM holds: FOLD > 1 first sums each tile's products over FOLD neighbouring
    # columns, ones a thread loaded together (a sum in its registers), into an accumulator FOLD
    # times narrower. The same sum in another order.
    acc = tl.full([BLOCK_N, BLOCK_K // FOLD], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ptrs = W + safe_rows[:, None] * stride_wn + cols[None, :]
        later = cols[None, :] >= BLOCK_K  # the first tile is w_first: no second read of it
        if EVEN_K:
            x = tl.load(X + cols).to(tl.float32)
            w = tl.where(later, tl.load(ptrs, mask=later, other=0.0), w_first)
            if HAS_NORM:
                x = x * inv_rms * tl.load(NormW + cols).to(tl.float32)
            if GLU:  # X holds [gate | up]: the input is silu(gate) * up, made here
                x = x / (1.0 + tl.exp(-x)) * tl.load(X + K + cols).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
            w = tl.where(later, tl.load(ptrs, mask=later & (cols[None, :] < K), other=0.0), w_first)
            if HAS_NORM:
                x = x * inv_rms * tl.load(NormW + cols, mask=cols < K, other=0.0).to(tl.float32)
            if GLU:
                x = x / (1.0 + tl.exp(-x)) * tl.load(X + K + cols, mask=cols < K, other=0.0).to(tl.float32)
        p = w.to(tl.float32) * x[None, :]
        if FOLD > 1:
            p = tl.reduce(tl.reshape(p, [BLOCK_N, BLOCK_K // FOLD, FOLD]), 2, _sum_fn)
        acc += p
    y = tl.reduce(acc, 1, _sum_fn)
    if HAS_BIAS:
        y += tl.load(Bias + safe_rows).to(tl.float32)
    if HAS_RES:
        y += tl.load(Res + safe_rows).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rows < N)


@functools.cache
def _kernel(interpret: bool):
    del interpret  # keys the cache: triton.jit reads TRITON_INTERPRET when it decorates
    return triton.jit(_gemv_kernel)


def _auto_config(N: int, K: int) -> GemvConfig:
    """Many small programs, each streaming four whole rows in wide tiles: a 2048-row projection
    gets about five hundred programs, and wide tiles keep many loads in flight. Four rows, not
    two, for the small products too (a layer's Q/KV and output): whole decode steps were faster
    with it on an H100, back to back, for every variant paired (``benchmarks/gpu_gemv.py`` and
    ``gpu_gemv_fold.py`` sweep the alternatives; docs/benchmarks.md has the pairs). Rows of
    8,192 columns or more (an MLP's down projection) go eight to a program, unpipelined: the
    sweep's best for the step's down projection, and a faster step. No fold: with more programs
    resident, whole steps were no faster on an H100 or an H200."""
    block_k = 1024
    while block_k > 16 and block_k > K:
        block_k //= 2
    if K >= 8192:
        return GemvConfig(block_n=8, block_k=block_k, num_warps=4, num_stages=1, fold=1)
    return GemvConfig(block_n=4, block_k=block_k, num_warps=4, num_stages=3, fold=1)


def resolve_config(config: GemvConfig | None, N: int, K: int) -> GemvConfig:
    """``config`` with each field left 0 (or all, for None) chosen from the shape."""
    given = config or GemvConfig()
    cfg = GemvConfig(*(g or a for g, a in zip(astuple(given), astuple(_auto_config(N, K)), strict=True)))
    if cfg.fold & (cfg.fold - 1) or cfg.fold > cfg.block_k:
        raise ValueError(f"fold={cfg.fold}: it must be a power of two no wider than block_k={cfg.block_k}")
    return cfg


def gemv_unsupported_reason(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    glu: bool = False,
) -> str | None:
    """Why the kernel does not take these inputs (then :func:`gemv` computes them with PyTorch), or None."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if w.device.type != "cuda" and not _interpreting():
        return f"weights on {w.device.type} (the kernel needs CUDA, or TRITON_INTERPRET=1 on a CPU)"
    width = 2 * w.shape[1] if glu and w.dim() == 2 else w.shape[-1]  # [gate | up] for glu
    if w.dim() != 2 or x.shape[-1] != width:
        return f"shapes {tuple(x.shape)} x {tuple(w.shape)}" + (" (glu: the input is [gate | up])" if glu else "")
    if x.numel() != width:
        return f"{x.numel() // max(width, 1)} rows (the kernel takes one)"
    if glu and norm_weight is not None:
        return "a norm and glu together"
    extras = [t for t in (bias, norm_weight, residual) if t is not None]
    if w.dtype not in _DTYPES or x.dtype != w.dtype or any(t.dtype != w.dtype for t in extras):
        return f"dtypes {x.dtype} / {w.dtype}"
    if w.stride(1) != 1:
        return "weight rows not contiguous"
    if norm_weight is not None and tuple(norm_weight.shape) != (w.shape[1],):
        return f"norm weight of shape {tuple(norm_weight.shape)} for {w.shape[1]} inputs"
    if residual is not None and residual.numel() != w.shape[0]:
        return f"residual of {residual.numel()} values for {w.shape[0]} outputs"
    if w.device.type != "cuda" and not torch.compiler.is_compiling():  # can this Triton's interpreter run it?
        return _interpreter_problem()
    return None


def gemv_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    glu: bool = False,
) -> torch.Tensor:
    """What :func:`gemv` computes, in PyTorch: ``residual + linear(rms_norm(x) * norm_weight, w, bias)``,
    the norm (if given) over the last dimension and everything but the output rounding in float32;
    with ``glu``, ``x`` is ``[gate | up]`` and the product's input is ``silu(gate) * up``.

    The model's own norm rounds its output to the activations' dtype before the product; the
    kernel keeps it in float32, so in half precision the two differ by that rounding.
    """
    xf = x.float()
    if glu:
        gate, up = xf.chunk(2, dim=-1)
        xf = F.silu(gate) * up
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = F.linear(xf, w.float(), None if bias is None else bias.float())
    if residual is not None:
        y = y + residual.float().reshape(y.shape)
    return y.to(w.dtype)


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    glu: bool = False,
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for an ``x`` holding one row (any leading shape of size 1).

    ``norm_weight`` first normalises ``x`` (RMSNorm with that weight and ``eps``) and ``residual``
    (one value per output) is added to the result: the norm before a projection and the residual
    add after one, in the same kernel (:func:`gemv_reference` is the definition). With ``glu``,
    ``x`` is SwiGLU's ``[gate | up]`` and the kernel makes ``silu(gate) * up`` as it reads them.

    Where the launch is a programmatic dependent (``use_pdl``), the kernel reads the first tile
    of ``w`` before it waits for the kernel launched just before it: weights are a model's
    constants, so that kernel must not be the one that writes them (``QKVLAB_PDL=0`` launches
    plainly).
    """
    if gemv_unsupported_reason(x, w, bias, norm_weight, residual, glu) is not None:
        if norm_weight is None and residual is None and not glu:
            return F.linear(x, w, bias)
        return gemv_reference(x, w, bias, norm_weight, eps, residual, glu)
    N, K = w.shape
    cfg = resolve_config(config, N, K)
    xv = x.reshape(-1).contiguous()
    y = torch.empty(N, device=w.device, dtype=w.dtype)
    interpreting = _interpreting()
    pdl = use_pdl(w.device)
    kernel = _kernel(interpreting)
    kernel[(triton.cdiv(N, cfg.block_n),)](
        xv,
        w,
        bias if bias is not None else w,  # the pointers of absent inputs are never read
        norm_weight.contiguous() if norm_weight is not None else w,
        residual.reshape(N).contiguous() if residual is not None else w,
        y,
        N,
        K,
        w.stride(0),
        float(eps),
        HAS_BIAS=bias is not None,
        HAS_NORM=norm_weight is not None,
        HAS_RES=residual is not None,
        GLU=glu,
        EVEN_K=K % cfg.block_k == 0,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        FOLD=cfg.fold,
        PDL=pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("qkvlab::gemv", mutates_args=())
def gemv_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    glu: bool = False,
) -> torch.Tensor:
    """:func:`gemv` as ``torch.ops.qkvlab.gemv``: opaque to ``torch.compile`` (its launch shape
    is host code), so a compiled step fuses the code around it and calls the kernel as is."""
    return gemv(x, w, bias, norm_weight=norm_weight, eps=eps, residual=residual, glu=glu)


@gemv_op.register_fake
def _gemv_fake(x, w, bias, norm_weight=None, eps=1e-6, residual=None, glu=False):
    return x.new_empty(*x.shape[:-1], w.shape[0])


__all__ = ["HAS_TRITON", "GemvConfig", "gemv", "gemv_op", "gemv_reference", "gemv_unsupported_reason", "resolve_config"]
