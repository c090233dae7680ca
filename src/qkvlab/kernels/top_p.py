"""Top-p (nucleus) filtering without a sort, for steps that sample on the GPU.

Top-p keeps the smallest set of most likely tokens whose probability reaches ``p``. Written as
PyTorch it is a sort of the vocabulary, a cumulative sum and a scatter back to vocabulary order;
at batch 1 on a GPU the sort of one 50k-token row alone is six radix passes of several
microseconds each, more than the rest of the pick together. The set is also a threshold: a
token stays exactly when its score is at or above ``T``, the largest score ``t`` whose mass at
or above it, ``H(t) = sum(exp(x_j - max) for x_j >= t)``, reaches ``p`` times the row's total.
``H`` only falls as ``t`` rises, so ``T`` can be searched for in the scores' order instead of
sorted for. Each float32 score has a 32-bit integer key in the same order; every one of four
launches evaluates ``H`` at 256 evenly spaced keys of the interval still open and narrows it to
one 256th, so after the fourth one key is left, and a fifth launch masks the row with it. Each
launch splits every row over a few dozen programs, which write their partial sums for the next
launch to add in a fixed order: the result does not depend on scheduling.

Ties are kept or dropped together: a token stays if the tokens *more likely than it* hold less
than ``p`` together, which is :func:`top_p_reference`'s rule too. A row holding NaN or an
infinite maximum (no distribution to cut) comes back as it went in.

:func:`top_p_filter` is the plain function (PyTorch's sort where the kernel does not run);
``torch.ops.qkvlab.top_p_cut`` is the opaque operator a compiled step calls.
"""

from __future__ import annotations

import functools

import torch

from qkvlab.kernels.kv_decode import _interpreter_problem, _interpreting

try:  # Triton is optional: the sort in PyTorch is always there.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

ROUNDS = 4  # 256 ** 4 = 2 ** 32 keys: four narrowings leave one
POINTS = 256  # keys at which each narrowing evaluates H
BLOCK = 32  # scores a program handles at once ([BLOCK, POINTS] comparisons)
MAX_PROGRAMS = 64  # per row: more split the work finer but every one adds up all partial sums

# As in the other kernels: no jit function of Triton's standard library (tl.sum, tl.max,
# tl.zeros), which were decorated for one mode when Triton was imported; the kernel is decorated
# late (_kernel), so a test can choose the interpreter after import.
if HAS_TRITON:
    _sum_fn = tl.standard._sum_combine
    _max_fn = tl.standard._elementwise_max


def _top_p_kernel(
    X,
    M,
    Z,
    Out,
    Part,
    State,
    V,
    stride_x,
    top_p,
    ROUND: tl.constexpr,
    P: tl.constexpr,
    P_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NROUNDS: tl.constexpr,
):
    row = tl.program_id(0)
    prog = tl.program_id(1)
    m = tl.load(M + row)
    z = tl.load(Z + row)
    target = top_p * z
    ids = tl.arange(0, S)
    state = State + row * (NROUNDS + 1) * 2
    if ROUND == 0:
        lo = tl.full([], -2147483648, tl.int64)  # the lowest key: H there is the whole mass
        mb = tl.where(m == 0.0, 0, m.to(tl.int32, bitcast=True))
        hi = tl.where(mb >= 0, mb, mb ^ 0x7FFFFFFF).to(tl.int64)  # the maximum's key: H above it is 0
    else:
        # the interval the last launch searched and H at its points, the programs' sums added
        lo = tl.load(state + (ROUND - 1) * 2)
        hi = tl.load(state + (ROUND - 1) * 2 + 1)
        step = (hi - lo) // S + 1
        part = Part + ((row * 2 + (ROUND - 1) % 2) * P) * S
        progs = tl.arange(0, P_POW2)  # all at once: one wait for memory, not one per program
        parts = tl.load(part + progs[:, None] * S + ids[None, :], mask=(progs < P)[:, None], other=0.0)
        h = tl.reduce(parts, 0, _sum_fn)
        points = lo + ids.to(tl.int64) * step
        # the largest point where H still reaches the target; the first always counts, as it
        # does exactly (H at the interval's low end is at least the target)
        ok = (h >= target) & (points <= hi)
        best = tl.reduce(tl.where(ok, ids, 0), 0, _max_fn).to(tl.int64)
        lo = lo + best * step
        hi = tl.minimum(lo + step - 1, hi)
    if ROUND < NROUNDS:
        if prog == 0:
            tl.store(state + ROUND * 2, lo)
            tl.store(state + ROUND * 2 + 1, hi)
        step = (hi - lo) // S + 1
        points = lo + ids.to(tl.int64) * step
        acc = tl.full([BLOCK_C, S], 0.0, tl.float32)  # one reduction at the end, not per block
        # unrolled, so that every block's load is in flight at once: one program a row's chunk
        # on its SM has no other programs to hide a wait for memory behind
        for c in tl.static_range(0, CHUNK, BLOCK_C):
            offs = prog * CHUNK + c + tl.arange(0, BLOCK_C)
            x = tl.load(X + row * stride_x + offs, mask=offs < V, other=float("-inf"))
            xb = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))  # -0.0 and 0.0: one key
            key = tl.where(xb >= 0, xb, xb ^ 0x7FFFFFFF).to(tl.int64)
            e = tl.exp(x - m)
            acc += tl.where(key[:, None] >= points[None, :], e[:, None], 0.0)
        tl.store(Part + ((row * 2 + ROUND % 2) * P + prog) * S + ids, tl.reduce(acc, 0, _sum_fn))
    else:
        # lo == hi: the key of the smallest kept score
        for c in tl.static_range(0, CHUNK, BLOCK_C):
            offs = prog * CHUNK + c + tl.arange(0, BLOCK_C)
            inside = offs < V
            x = tl.load(X + row * stride_x + offs, mask=inside, other=float("-inf"))
            xb = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
            key = tl.where(xb >= 0, xb, xb ^ 0x7FFFFFFF).to(tl.int64)
            cut = tl.where(key >= lo, x, float("-inf"))
            tl.store(Out + row * V + offs, tl.where(z == z, cut, x), mask=inside)


@functools.cache
def _kernel(interpret: bool):
    del interpret  # keys the cache: triton.jit reads TRITON_INTERPRET when it decorates
    return triton.jit(_top_p_kernel)


def top_p_unsupported_reason(logits: torch.Tensor) -> str | None:
    """Why the kernel does not take ``logits`` (then :func:`top_p_filter` sorts in PyTorch), or None."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if logits.device.type != "cuda" and not _interpreting():
        return f"logits on {logits.device.type} (the kernel needs CUDA, or TRITON_INTERPRET=1 on a CPU)"
    if logits.dim() != 2 or logits.shape[-1] == 0:
        return f"logits of shape {tuple(logits.shape)} (the kernel takes (rows, vocabulary))"
    if logits.device.type != "cuda" and not torch.compiler.is_compiling():
        return _interpreter_problem()
    return None


def _launch_shape(V: int) -> tuple[int, int]:
    """(programs a row, scores a program): at most MAX_PROGRAMS, each a whole number of blocks."""
    programs = min(MAX_PROGRAMS, triton.cdiv(V, BLOCK))
    chunk = triton.cdiv(triton.cdiv(V, programs), BLOCK) * BLOCK
    return triton.cdiv(V, chunk), chunk


def top_p_cut(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """The kernel: ``x`` float32 ``(B, V)`` with the tokens outside each row's top-p set at -inf."""
    x = x.contiguous()
    B, V = x.shape
    m = x.amax(-1)
    z = torch.exp(x - m[:, None]).sum(-1)
    programs, chunk = _launch_shape(V)
    out = torch.empty_like(x)
    part = torch.empty(B, 2, programs, POINTS, device=x.device, dtype=torch.float32)
    state = torch.empty(B, ROUNDS + 1, 2, device=x.device, dtype=torch.int64)
    kernel = _kernel(_interpreting())
    for rnd in range(ROUNDS + 1):
        kernel[(B, programs)](
            x,
            m,
            z,
            out,
            part,
            state,
            V,
            x.stride(0),
            float(top_p),
            ROUND=rnd,
            P=programs,
            P_POW2=triton.next_power_of_2(programs),
            CHUNK=chunk,
            S=POINTS,
            BLOCK_C=BLOCK,
            NROUNDS=ROUNDS,
            num_warps=8,
        )
    return out


@torch.library.custom_op("qkvlab::top_p_cut", mutates_args=())
def top_p_cut_op(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`top_p_cut` as ``torch.ops.qkvlab.top_p_cut``: opaque to ``torch.compile``, which
    would otherwise trace its five launches' host code."""
    return top_p_cut(x, top_p)


@top_p_cut_op.register_fake
def _top_p_cut_fake(x, top_p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def top_p_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """What the kernel computes, in PyTorch: sort, cumulative sum, and the mask scattered back.

    A token stays if the tokens more likely than it hold less than ``top_p`` together: tied
    scores share the mass strictly above them, so ties stay or go together.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens sorted ahead
    # the first of each run of equal scores (ascending search in the negated order) gives the
    # run's mass strictly above it
    flipped = -sorted_logits.float().contiguous()
    first = torch.searchsorted(flipped, flipped, side="left").clamp_(max=logits.shape[-1] - 1)
    drop_sorted = before.gather(-1, first) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``; the rest
    ``-inf``. The kernel where it runs (float32 out), else :func:`top_p_reference`."""
    if top_p >= 1.0:
        return logits
    if top_p_unsupported_reason(logits) is None:
        return top_p_cut_op(logits.float(), float(top_p))
    return top_p_reference(logits, top_p)


__all__ = ["HAS_TRITON", "top_p_cut", "top_p_cut_op", "top_p_filter", "top_p_reference", "top_p_unsupported_reason"]
