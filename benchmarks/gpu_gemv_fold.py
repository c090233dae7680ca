"""Does a batch-1 product read its weights closer to the copy rate with fewer registers a program?

A decode step at batch 1 is mostly matrix-vector products, bound by reading the weights. The GEMV
kernel (``qkvlab.kernels.gemv``) loads a weight tile into registers and multiplies it at once, so
each program has one tile in flight when it waits, and Triton does not pipeline these loads
(compiled for sm_90 its tile loop is the same with one stage as with three). The bytes an SM keeps
in flight are then its resident programs times one tile, and residency is set by registers: the
float32 accumulator has the tile's shape, twice the tile's bytes. At the step's launch shapes
that is about 32 KB an SM whatever the shape (2 rows a program: 62 registers, 8 programs of 4 KB;
8 rows: 187 registers, 2 programs of 16 KB; Triton 3.9 for sm_90). By Little's law a memory needs
bandwidth x latency bytes in flight to stay busy, and an H200 needs more than an H100: one reading
of why an H200 step runs at a lower fraction of its copy rate.

Here the same loop (the first tile read before the dependent-launch wait, float32 products, the
residual add in the epilogue for the output and down projections, as the step has it) folds each
tile's products into an accumulator ``fold`` times narrower before adding: the ``fold``
neighbouring columns summed are ones a thread loaded together, so the fold is a sum in registers
(no shuffles, no shared memory; the reduction order changes, not the arithmetic). Compiled for
sm_90 by Triton 3.9 with 1,024-column tiles, ``fold=8`` needs 48 registers at 2 rows a program
(10 programs an SM, against the kernel's 8) and 124 at 8 rows (4, against 2): more bytes in
flight an SM, if residency is what holds them back. For each weight shape of the 1.28B llama
model of ``gpu_gemv.py``, side by side:

- ``gemv``: qkvlab's kernel with its own launch shape, as the step calls it;
- ``fold F``: the folded loop over a sweep of rows per program, tile width and warps; ``fold 1``
  is the kernel's own loop in this script's code, the control.

Every launch shape is checked against a float32 product before it is timed; a shape the compiler
cannot build is reported, not timed. Timing as ``gpu_gemv.py``: CUDA-graph replay of ``--reps``
calls over rotating copies of the weight (about 200 MB, so no call reads from L2), each a
programmatic dependent of the one before where the GPU has it.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemv_fold.py --out $OUT/gpu_gemv_fold.json
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemv_fold.py --smoke   # CPU interpreter, the checks only
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

try:  # Triton is the dev extra's: without it only the error message below runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

# read by the kernel as globals (Triton's interpreter sees no closure); set by benchutil.jit_now
_sum = _gdc_wait = _gdc_launch_dependents = None


@dataclass(frozen=True)
class Shape:
    """Launch shape of the folded product: rows per program, tile width, warps, fold."""

    block_n: int
    block_k: int
    warps: int
    fold: int


def build_kernel():
    """The folded product kernel, decorated now (so that the smoke run's interpreter setting holds)."""
    from benchutil import jit_now

    return jit_now(_fold_gemv_kernel)


def _fold_gemv_kernel(
    X,
    W,
    Res,
    Y,
    N,
    K,
    stride_wn,
    HAS_RES: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FOLD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_rows = tl.minimum(rows, N - 1)  # a short last block reads row N-1 again; its stores are masked
    cols0 = tl.arange(0, BLOCK_K)
    # no kernel writes the weights: the first tile is read before the wait
    w_first = tl.load(W + safe_rows[:, None] * stride_wn + cols0[None, :], mask=cols0[None, :] < K, other=0.0)
    if PDL:
        _gdc_wait()
        _gdc_launch_dependents()
    acc = tl.full([BLOCK_N, BLOCK_K // FOLD], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        later = cols[None, :] >= BLOCK_K  # the first tile is w_first: no second read of it
        ptrs = W + safe_rows[:, None] * stride_wn + cols[None, :]
        w = tl.where(later, tl.load(ptrs, mask=later & (cols[None, :] < K), other=0.0), w_first)
        x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
        p = w.to(tl.float32) * x[None, :]
        if FOLD > 1:  # neighbouring columns, loaded by one thread: summed in its registers
            p = tl.reduce(tl.reshape(p, [BLOCK_N, BLOCK_K // FOLD, FOLD]), 2, _sum)
        acc += p
    y = tl.reduce(acc, 1, _sum)
    if HAS_RES:
        y += tl.load(Res + safe_rows).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rows < N)


def fold_gemv(kernel, x, w, shape: Shape, pdl: bool, residual=None) -> torch.Tensor:
    """``x @ w.T (+ residual)`` for one row ``x`` by the folded kernel."""
    n, k = w.shape
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    kernel[(triton.cdiv(n, shape.block_n),)](
        x.reshape(-1), w, residual if residual is not None else y, y, n, k, w.stride(0),
        HAS_RES=residual is not None, PDL=pdl, BLOCK_N=shape.block_n, BLOCK_K=shape.block_k, FOLD=shape.fold,
        num_warps=shape.warps, num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y


def sweep(rows=(1, 2, 4, 8), widths=(512, 1024, 2048), warps=(4, 8), folds=(1, 8)) -> list[Shape]:
    """The launch shapes timed: tiles of at most four times the kernel's 2-row, 1,024-column one."""
    return [Shape(*s) for s in itertools.product(rows, widths, warps, folds) if s[0] * s[1] <= 8192]


SMOKE_SWEEP = [Shape(bn, bk, 4, fold) for bn, bk, fold in itertools.product((2, 8), (64, 128), (1, 8))]
SMOKE_SHAPES = [("smoke, K tiled", 40, 256, False), ("smoke, ragged rows and K, residual", 37, 200, True)]


def check(kernel, shape: Shape, x, w, residual, pdl: bool) -> float:
    """Largest difference of the folded product from a float32 one (output rounded to bf16)."""
    ref = F.linear(x.float(), w.float()).reshape(-1)
    if residual is not None:
        ref = ref + residual.float()
    return (fold_gemv(kernel, x, w, shape, pdl, residual=residual).float() - ref).abs().max().item()


def smoke(kernel) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for name, n, k, with_res in SMOKE_SHAPES:
        g = torch.Generator().manual_seed(n * k)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
        x = torch.randn(1, k, generator=g).to(torch.bfloat16)
        res = torch.randn(n, generator=g).to(torch.bfloat16) if with_res else None
        errs = {str(asdict(s)): check(kernel, s, x, w, res, pdl=False) for s in SMOKE_SWEEP}
        worst = max(errs.values())
        ok &= worst < 0.05  # bf16 outputs of size about 1 (3 with the residual): a few ulps
        print(f"{name:40s} max abs error over {len(errs)} launch shapes {worst:.1e}")
        rows.append(dict(name=name, out_features=n, in_features=k, residual=with_res, max_abs_err=errs))
    return rows, ok


def bench(kernel, name: str, n: int, k: int, with_res: bool, reps: int, bw: float, shapes: list[Shape]) -> dict:
    from gpu_gemv import _time, rotating_weights
    from qkvlab.kernels.gemv import _auto_config, gemv
    from qkvlab.kernels.kv_decode import use_pdl

    pdl = use_pdl(torch.device("cuda"))
    w, pick = rotating_weights(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_res else None
    us = {"gemv": _time(lambda: gemv(x, pick(), residual=res), reps)}
    errs, failed = {}, {}
    for shape in shapes:
        key = f"fold {shape.fold} {shape.block_n}x{shape.block_k} w{shape.warps}"
        try:
            errs[key] = check(kernel, shape, x, w, res, pdl)
            if errs[key] < 0.05:  # a wrong product is not a candidate
                us[key] = _time(lambda shape=shape: fold_gemv(kernel, x, pick(), shape, pdl, residual=res), reps)
        except Exception as e:  # out of resources for this shape: not a candidate
            failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    bad = {s: e for s, e in errs.items() if e >= 0.05}
    best = min((s for s in us if s != "gemv"), key=us.get, default=None)
    mb = n * k * 2 / 1e6
    frac = {s: mb * 1e6 / (t * 1e-6) / 1e9 / bw for s, t in us.items()}
    line = f"{name:28s} {mb:6.1f} MB  gemv {us['gemv']:7.2f} us ({frac['gemv']:.2f})"
    if best:
        line += f"  best {us[best]:7.2f} us ({frac[best]:.2f}, {us['gemv'] / us[best]:.3f}x) [{best}]"
    print(line + (f"  {len(failed)} shapes not built" if failed else "") + (f"  {len(bad)} WRONG" if bad else ""))
    return dict(
        name=name, out_features=n, in_features=k, residual=with_res, mb=mb, us=us, fraction_of_copy=frac,
        max_abs_err=errs, wrong=bad, not_built=failed, best=best, gemv_auto_config=str(_auto_config(n, k)),
    )  # fmt: skip


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers, e.g. 2,8")
    return values


def main(argv=None) -> int:
    from benchutil import env_info, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes: the checks only")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", default="", help="comma list of words: only the weights whose name holds one")
    for flag, default in (("rows", "1,2,4,8"), ("widths", "512,1024,2048"), ("warps", "4,8"), ("folds", "1,8")):
        ap.add_argument(f"--{flag}", type=_ints, default=default, help=f"the sweep's {flag} (default {default})")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = sweep(args.rows, args.widths, args.warps, args.folds)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is decorated below
        kernel = build_kernel()
        rows, ok = smoke(kernel)
        doc = dict(benchmark="gpu_gemv_fold", smoke=True, environment=env_info(torch.device("cpu")), rows=rows)
        write_json(doc, "gpu_gemv_fold.json", args.out)
        return 0 if ok else 1
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    from gpu_decode import copy_bandwidth, timer
    from gpu_gemv import SHAPES

    kernel = build_kernel()
    words = [w for w in args.shapes.split(",") if w]
    bw = copy_bandwidth(torch.device("cuda"), timer(torch.device("cuda"), rep_ms=200))
    doc = dict(benchmark="gpu_gemv_fold", environment=env_info(torch.device("cuda")), copy_gb_s=bw, rows=[])
    print(f"copy bandwidth {bw:,.0f} GB/s on {torch.cuda.get_device_name()}; (fraction of it) after each time")
    for name, n, k in SHAPES:
        if words and not any(w in name for w in words):
            continue
        with_res = name in ("o", "down")  # the step adds the residual in these products' epilogues
        doc["rows"].append(bench(kernel, name, n, k, with_res, args.reps, bw, shapes))
        write_json(doc, "gpu_gemv_fold.json", args.out)  # after every row: a stopped run keeps them
    return 1 if any(r["wrong"] for r in doc["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
