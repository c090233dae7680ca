"""Is a persistent kernel with a grid barrier a faster way to run a layer's products at batch 1?

At B=1 every kernel of a decode step reads what the kernel before it wrote, and each boundary
costs a ramp (programs start, first loads wait on DRAM) and a tail. A persistent kernel keeps
its programs resident across the boundary and replaces it with a barrier in memory. This script
measures that on the llama MLP of ``gpu_generate_vs_hf.py`` (d_model 2048, d_ff 8192, bf16), as
qkvlab's step runs it: RMSNorm, the fused gate + up product, SwiGLU, the down product and the
residual add.

- ``two gemv kernels``: what the step launches now, ``gemv(x, W_gu, norm_weight=...)`` then
  ``gemv(gate_up, W_down, glu=True, residual=x)`` (each a programmatic dependent of the last);
- ``persistent``: one kernel of ``programs`` resident programs that computes every gate + up row
  block, waits at a grid barrier (an arrival counter and a generation word in global memory,
  acquire / release atomics), then every down row block. With ``prefetch`` each program reads its
  first down tile before the barrier, so that read overlaps the wait.

Both run as a chain of 16 layers with their own weights (1.6 GB, none of it in L2), captured in
one CUDA graph and replayed; microseconds a layer, the fraction of the measured copy bandwidth,
and the largest difference from the two kernels' output (the persistent kernel's tiles of 1,024
columns reduce in the same order, so those agree exactly). A launch shape is timed only where
all its programs fit on the card at once (from the compiled kernel's registers, warps and shared
memory): otherwise programs at the barrier would wait for ones that never start.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_persistent_mlp.py --out $OUT/gpu_persistent_mlp.json
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_persistent_mlp.py --smoke   # CPU interpreter, the check only

The smoke run checks the arithmetic with one program (Triton's interpreter runs programs one
after another, so a barrier between two of them would wait forever); the barrier itself runs only
on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

import torch

try:  # Triton is the dev extra's: without it only the error message below runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

D_MODEL, D_FF = 2048, 8192
# read by the kernel as globals (Triton's interpreter sees no closure); set by benchutil.jit_now
_sum = _gdc_wait = _gdc_launch_dependents = None


@dataclass(frozen=True)
class Shape:
    """Launch shape: programs per SM, row blocks and reduction tiles of each product, warps, stages."""

    per_sm: int
    bn1: int
    bk1: int
    bn2: int
    bk2: int
    warps: int
    stages: int
    prefetch: bool


def build_kernel():
    """The persistent MLP kernel, decorated now (so that the smoke run's interpreter setting holds)."""
    from benchutil import jit_now

    return jit_now(_mlp_kernel)


def _mlp_kernel(
    X,
    NormW,
    Wgu,
    Wd,
    GU,
    Y,
    Bar,
    D,
    F,
    eps,
    NPROG: tl.constexpr,
    BN1: tl.constexpr,
    BK1: tl.constexpr,
    BN2: tl.constexpr,
    BK2: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    if PDL:
        _gdc_wait()
        _gdc_launch_dependents()
    # gate + up: GU = W_gu @ (rms_norm(x) * norm_weight), 2F rows of D columns
    ssq = tl.full([BK1], 0.0, tl.float32)
    for k0 in range(0, D, BK1):
        xs = tl.load(X + k0 + tl.arange(0, BK1)).to(tl.float32)
        ssq += xs * xs
    inv_rms = tl.rsqrt(tl.reduce(ssq, 0, _sum) / D + eps)
    for t in range(pid, (2 * F) // BN1, NPROG):
        rows = t * BN1 + tl.arange(0, BN1)
        acc = tl.full([BN1, BK1], 0.0, tl.float32)
        for k0 in range(0, D, BK1):
            cols = k0 + tl.arange(0, BK1)
            x = tl.load(X + cols).to(tl.float32) * inv_rms * tl.load(NormW + cols).to(tl.float32)
            acc += tl.load(Wgu + rows[:, None] * D + cols[None, :]).to(tl.float32) * x[None, :]
        tl.store(GU + rows, tl.reduce(acc, 1, _sum).to(GU.dtype.element_ty))
    cols0 = tl.arange(0, BK2)
    if PREFETCH:  # the first down tile does not depend on GU: read it before the barrier
        rows0 = pid * BN2 + tl.arange(0, BN2)
        w_first = tl.load(Wd + rows0[:, None] * F + cols0[None, :], mask=rows0[:, None] < D, other=0.0)
    # grid barrier: the last program to arrive resets the counter and moves the generation on
    tl.debug_barrier()  # every thread's GU stores are issued before the program arrives
    gen = tl.atomic_add(Bar + 1, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(Bar, 1, sem="acq_rel", scope="gpu")
    if arrived == NPROG - 1:
        tl.atomic_xchg(Bar, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(Bar + 1, 1, sem="release", scope="gpu")
    else:
        cur = tl.atomic_add(Bar + 1, 0, sem="acquire", scope="gpu")
        while cur == gen:
            cur = tl.atomic_add(Bar + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    # down: Y = W_down @ (silu(gate) * up) + x, D rows of F columns
    for t in range(pid, D // BN2, NPROG):
        rows = t * BN2 + tl.arange(0, BN2)
        acc = tl.full([BN2, BK2], 0.0, tl.float32)
        k_start = 0
        if PREFETCH:  # noqa: SIM102 - a compile-time branch around a run-time one
            if t == pid:
                g = tl.load(GU + cols0).to(tl.float32)
                x = g / (1.0 + tl.exp(-g)) * tl.load(GU + F + cols0).to(tl.float32)
                acc += w_first.to(tl.float32) * x[None, :]
                k_start = BK2
        for k0 in range(k_start, F, BK2):
            cols = k0 + tl.arange(0, BK2)
            g = tl.load(GU + cols).to(tl.float32)
            x = g / (1.0 + tl.exp(-g)) * tl.load(GU + F + cols).to(tl.float32)
            acc += tl.load(Wd + rows[:, None] * F + cols[None, :]).to(tl.float32) * x[None, :]
        y = tl.reduce(acc, 1, _sum) + tl.load(X + rows).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty))


def mlp_persistent(kernel, x, norm_weight, w_gu, w_down, bar, nprog: int, shape: Shape, pdl: bool, eps=1e-5):
    """One layer's MLP (with the residual) by the persistent kernel on ``nprog`` programs."""
    d, f = x.numel(), w_down.shape[1]
    gate_up = torch.empty(2 * f, device=x.device, dtype=x.dtype)
    y = torch.empty(d, device=x.device, dtype=x.dtype)
    return kernel[(nprog,)](
        x, norm_weight, w_gu, w_down, gate_up, y, bar, d, f, eps,
        NPROG=nprog, BN1=shape.bn1, BK1=shape.bk1, BN2=shape.bn2, BK2=shape.bk2, PDL=pdl, PREFETCH=shape.prefetch,
        num_warps=shape.warps, num_stages=shape.stages, **({"launch_pdl": True} if pdl else {}),
    ), y  # fmt: skip


def mlp_two_kernels(x, norm_weight, w_gu, w_down, eps=1e-5):
    """The MLP as qkvlab's batch-1 step computes it: two GEMV kernels, the norm and SwiGLU fused in."""
    from qkvlab.kernels.gemv import gemv

    return gemv(gemv(x, w_gu, norm_weight=norm_weight, eps=eps), w_down, glu=True, residual=x)


def resident_programs(compiled, warps: int) -> int:
    """How many programs of this compiled kernel one SM holds at once (registers, threads, shared memory)."""
    props = torch.cuda.get_device_properties(0)
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    shared = compiled.metadata.shared
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 228 << 10) // shared if shared else 32
    return min(by_regs, by_threads, by_smem, 32)


SHAPES = [
    Shape(per_sm, bn1, bk, bn2, bk, warps, stages, prefetch)
    for per_sm in (1, 2, 4)
    for bn1, bn2, warps, stages in ((4, 2, 4, 3), (8, 8, 8, 1), (4, 4, 4, 1))
    for bk in (1024,)
    for prefetch in (True, False)
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, one program: the check only")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is decorated below
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    kernel = build_kernel()
    device = torch.device("cpu" if args.smoke else "cuda")
    d, f = (64, 128) if args.smoke else (D_MODEL, D_FF)
    g = torch.Generator().manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(torch.bfloat16).to(device)

    n_layers = 1 if args.smoke else args.layers
    layers = [(randn(d) * 0.1 + 1, randn(2 * f, d, scale=d**-0.5), randn(d, f, scale=f**-0.5)) for _ in range(n_layers)]
    x0 = randn(d)
    bar = torch.zeros(2, device=device, dtype=torch.int32)  # arrivals, generation: reset by the barrier itself
    if args.smoke:
        ref = mlp_two_kernels(x0, *layers[0])
        _, got = mlp_persistent(kernel, x0, *layers[0], bar, 1, Shape(1, 4, 32, 2, 64, 4, 1, True), pdl=False)
        err = (ref.float() - got.float()).abs().max().item()
        print(f"one program against the two kernels: max abs difference {err:.1e}; barrier words {bar.tolist()}")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(benchmark="gpu_persistent_mlp", smoke=True, max_abs_err=err, barrier=bar.tolist()), fh)
        return 0 if err == 0 and bar.tolist() == [0, 1] else 1

    from benchutil import env_info
    from gpu_decode import copy_bandwidth, timer
    from gpu_gemv import _time
    from qkvlab.kernels.kv_decode import use_pdl

    pdl = use_pdl(device)
    bw = copy_bandwidth(device, timer(device, rep_ms=200))
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    mb = 3 * d * f * 2 / 1e6
    print(
        f"{torch.cuda.get_device_name()}: copy bandwidth {bw:,.0f} GB/s, {n_sm} SMs, "
        f"{mb:.1f} MB a layer, {n_layers} layers"
    )

    def time_chain(layer_fn, reps=3):
        """Microseconds a layer (the median of nine replays of ``reps`` chains) and the chain's output."""

        def chain():
            x = x0
            for weights in layers:
                x = layer_fn(x, weights)
            return x

        return _time(chain, reps, samples=9) / n_layers, chain()

    frac = lambda us: mb * 1e6 / (us * 1e-6) / 1e9 / bw  # noqa: E731
    ref_us, ref_out = time_chain(lambda x, w: mlp_two_kernels(x, *w))
    rows = [dict(name="two gemv kernels", us=ref_us, fraction_of_copy=frac(ref_us))]
    print(f"{'two gemv kernels':58s} {ref_us:8.2f} us a layer  {frac(ref_us):.3f} of copy")
    for shape in SHAPES:
        compiled, _ = mlp_persistent(kernel, x0, *layers[0], bar, n_sm, shape, pdl)  # compiles; all fit at 1 per SM
        fits = resident_programs(compiled, shape.warps)
        name = (
            f"persistent {shape.per_sm}/SM {shape.bn1}x{shape.bk1}, {shape.bn2}x{shape.bk2}, "
            f"{shape.warps}w {shape.stages}s" + (" prefetch" if shape.prefetch else "")
        )
        if shape.per_sm > fits:
            print(f"{name:58s} skipped: {fits} program(s) of it fit on an SM")
            continue
        nprog = shape.per_sm * n_sm
        us, out = time_chain(
            lambda x, w, nprog=nprog, shape=shape: mlp_persistent(kernel, x, *w, bar, nprog, shape, pdl)[1]
        )
        err = (out.float() - ref_out.float()).abs().max().item()
        print(f"{name:58s} {us:8.2f} us a layer  {frac(us):.3f} of copy  {ref_us / us:.3f}x  diff {err:.1e}")
        rows.append(
            dict(
                name=name,
                shape=asdict(shape),
                programs=nprog,
                us=us,
                fraction_of_copy=frac(us),
                speedup=ref_us / us,
                max_abs_diff=err,
            )
        )
    best = min(rows, key=lambda r: r["us"])
    print(f"fastest: {best['name']} ({best['us']:.2f} us a layer)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                dict(
                    benchmark="gpu_persistent_mlp",
                    environment=env_info(device),
                    copy_gb_s=bw,
                    mb_per_layer=mb,
                    rows=rows,
                ),
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
