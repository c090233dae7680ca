"""Matrix-vector products at batch 1, the weight-reading half of a decode step: cuBLAS
(``F.linear``, what the compiled step calls) against an inductor-generated reduction
(``(x * W).sum(-1)`` compiled with coordinate-descent tuning) and qkvlab's one-row kernel
(``qkvlab.kernels.gemv``: its own launch shape, and the best of a sweep of them), for each
weight shape of the 1.28B llama model of ``gpu_generate.py``. Prints GB/s read and the fraction of
the measured copy bandwidth, and writes JSON with hardware and versions.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemv.py --out $OUT/gpu_gemv.json
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemv.py --smoke   # the checks on a CPU (interpreter)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchutil import env_info, write_json
from gpu_decode import copy_bandwidth, timer
from qkvlab.attention.matvec import reduction_linear
from qkvlab.kernels.gemv import GemvConfig, _auto_config, gemv, gemv_reference

# (name, out features, in features) of the 1.28B llama shape (d_model 2048, d_ff 8192, 32 heads)
SHAPES = [
    ("qkv fused", 6144, 2048),
    ("q + kv fused (Q-K=V)", 4096, 2048),
    ("q + k + v, 8 kv heads", 3072, 2048),
    ("o", 2048, 2048),
    ("gate + up fused", 16384, 2048),
    ("down", 2048, 8192),
    ("lm head", 50304, 2048),
]


def _time(fn, reps: int, samples: int = 7) -> float:
    """Median microseconds of one call, timed by CUDA graph replay of `reps` calls (no host gaps),
    over `samples` replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def rotating_weights(n: int, k: int):
    """A bf16 ``(n, k)`` weight and a function returning it or one of its copies in turn: about
    200 MB in all, so that consecutive calls in a captured graph do not read from L2."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    ws = [w, *(w.clone() for _ in range(max(1, (200 << 20) // w.numel() // 2) - 1))]
    turn = iter(range(10**9))
    return w, lambda: ws[next(turn) % len(ws)]


def sweep_shapes(call, k: int) -> tuple[int, int, int, int]:
    """The launch shape ``(block_n, block_k, num_warps, num_stages)`` under which ``call(config)``
    is fastest, of a grid whose reduction tiles reach the whole row up to 4,096 columns (a long
    row read in few wide tiles keeps more bytes in flight per program)."""
    sweep = {}
    for bn in (2, 4, 8, 16):
        for bk in (b for b in (256, 512, 1024, 2048, 4096) if b <= max(256, k)):
            for nw in (4, 8):
                for ns in (1, 3):
                    cfg = GemvConfig(bn, bk, nw, ns)
                    try:
                        sweep[(bn, bk, nw, ns)] = _time(lambda cfg=cfg: call(cfg), 10)
                    except Exception as e:  # out of resources for this shape: not a candidate
                        print(f"  {cfg}: {type(e).__name__}")
    return min(sweep, key=sweep.get)


def bench_shape(name: str, n: int, k: int, reps: int, bw: float, red) -> dict:
    w, pick = rotating_weights(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float())

    y_red = red(x, w)
    y_tri = gemv(x, w)
    errs = {
        "cublas": (F.linear(x, w).float() - ref).abs().max().item(),
        "inductor": (y_red.float() - ref).abs().max().item(),
        "triton": (y_tri.float() - ref).abs().max().item(),
    }
    us = {
        "cublas": _time(lambda: F.linear(x, pick()), reps),
        "inductor": _time(lambda: red(x, pick()), reps),
        "triton": _time(lambda: gemv(x, pick()), reps),
    }
    # the kernel's own choice against a sweep of launch shapes: is the heuristic near the best?
    best = sweep_shapes(lambda cfg: gemv(x, pick(), config=cfg), k)
    us["triton best of sweep"] = _time(lambda: gemv(x, pick(), config=GemvConfig(*best)), reps)
    mb = n * k * 2 / 1e6
    frac = {s: mb * 1e6 / (t * 1e-6) / 1e9 / bw for s, t in us.items()}
    print(
        f"{name:24s} {mb:6.1f} {us['cublas']:10.2f} {us['inductor']:12.2f} {us['triton']:10.2f}  "
        + " / ".join(f"{frac[s]:.2f}" for s in ("cublas", "inductor", "triton"))
        + f"   sweep best {best}: {us['triton best of sweep']:.2f} us; auto {_auto_config(n, k)}"
    )
    return dict(
        name=name,
        out_features=n,
        in_features=k,
        mb=mb,
        us=us,
        fraction_of_copy=frac,
        max_abs_err=errs,
        auto_config=str(_auto_config(n, k)),
        best_config=dict(zip(("block_n", "block_k", "num_warps", "num_stages"), best, strict=True)),
    )


# the products a llama layer's norm comes before (projections, gate + up), whose output a residual
# add follows (output, down), and SwiGLU's product before the down projection: what fusing each
# into the product saves, beside the product's kernel alone
FUSED_CASES = [
    ("norm -> q + kv fused (Q-K=V)", 4096, 2048, "norm"),
    ("norm -> gate + up fused", 16384, 2048, "norm"),
    ("o -> + residual", 2048, 2048, "residual"),
    ("down -> + residual", 2048, 8192, "residual"),
    ("silu(gate) * up -> down -> + residual", 2048, 8192, "glu"),
]


def bench_fused(name: str, n: int, k: int, what: str, reps: int, sweep: bool = False) -> dict:
    """A norm before the product (F.rms_norm, then the kernel), a residual add after it, or SwiGLU's
    silu(gate) * up before the down projection and the residual after it, as kernels apart and as
    one (the kernel's prologue / epilogue); microseconds a call, and the check. ``sweep``: also
    the best launch shape of the fused kernel."""
    w, pick = rotating_weights(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    r = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)

    if what == "norm":
        apart = lambda: gemv(F.rms_norm(x, (k,), nw, 1e-5), pick())  # noqa: E731
        fused = lambda cfg=None: gemv(x, pick(), norm_weight=nw, eps=1e-5, config=cfg)  # noqa: E731
        ref = gemv_reference(x, w, None, nw, 1e-5)
        got = gemv(x, w, norm_weight=nw, eps=1e-5)
    elif what == "glu":
        gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
        gate, up = gate_up.chunk(2, dim=-1)
        apart = lambda: gemv(F.silu(gate) * up, pick()) + r  # noqa: E731
        fused = lambda cfg=None: gemv(gate_up, pick(), glu=True, residual=r, config=cfg)  # noqa: E731
        ref = gemv_reference(gate_up, w, None, None, 1e-5, r, glu=True)
        got = gemv(gate_up, w, glu=True, residual=r)
    else:
        apart = lambda: gemv(x, pick()) + r  # noqa: E731
        fused = lambda cfg=None: gemv(x, pick(), residual=r, config=cfg)  # noqa: E731
        ref = gemv_reference(x, w, None, None, 1e-5, r)
        got = gemv(x, w, residual=r)
    us = {
        "apart": _time(apart, reps),
        "fused": _time(fused, reps),
        "product alone": _time(lambda: gemv(x, pick()), reps),
    }
    err = (got.float() - ref.float()).abs().max().item()
    best = None
    if sweep:  # the launch shapes again, for the kernel as the decode step calls it (fused)
        best = sweep_shapes(fused, k)
        us["fused, best of sweep"] = _time(lambda: fused(GemvConfig(*best)), reps)
    print(
        f"{name:32s} apart {us['apart']:7.2f} us  fused {us['fused']:7.2f} us  "
        f"product alone {us['product alone']:7.2f} us  err {err:.1e}"
        + (f"   fused sweep best {best}: {us['fused, best of sweep']:.2f} us" if best else "")
    )
    row = dict(name=name, out_features=n, in_features=k, fused=what, us=us, max_abs_err=err)
    if best:
        row["best_config"] = dict(zip(("block_n", "block_k", "num_warps", "num_stages"), best, strict=True))
    return row


SMOKE_SHAPES = [("smoke, K tiled", 40, 256), ("smoke, ragged K", 37, 200)]


def smoke_shape(name: str, n: int, k: int) -> dict:
    """The checks alone, on the CPU under Triton's interpreter: the kernel with its own launch shape
    and every shape of the sweep against a float32 product (no timing)."""
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    errs = {
        "cublas": (F.linear(x, w).float() - ref).abs().max().item(),
        "triton": (gemv(x, w).float() - ref).abs().max().item(),
    }
    for cfg in (GemvConfig(bn, bk, 4, 1) for bn in (2, 16) for bk in (64, 256)):
        errs[f"triton {cfg.block_n}x{cfg.block_k}"] = (gemv(x, w, config=cfg).float() - ref).abs().max().item()
    nw, r = torch.rand(k, generator=g).to(torch.bfloat16) + 0.5, torch.randn(1, n, generator=g).to(torch.bfloat16)
    fused = gemv(x, w, norm_weight=nw, eps=1e-5, residual=r).float()
    errs["triton, norm + residual fused"] = (fused - gemv_reference(x, w, None, nw, 1e-5, r).float()).abs().max().item()
    gate_up = torch.randn(1, 2 * k, generator=g).to(torch.bfloat16)
    glu = (gemv(gate_up, w, glu=True).float() - gemv_reference(gate_up, w, glu=True).float()).abs().max().item()
    errs["triton, swiglu input made inside"] = glu
    print(f"{name:24s} max abs error " + ", ".join(f"{s} {e:.1e}" for s, e in errs.items()))
    return dict(name=name, out_features=n, in_features=k, max_abs_err=errs, auto_config=str(_auto_config(n, k)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes: the checks, no timing"
    )
    ap.add_argument(
        "--shapes", default="", help="comma list of words: only the weights and fused cases whose name holds one"
    )
    ap.add_argument(
        "--sweep-fused", action="store_true", help="also sweep each fused case's launch shapes (as the step runs it)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    words = [w for w in args.shapes.split(",") if w]
    picked = lambda name: not words or any(w in name for w in words)  # noqa: E731
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first decorated: the CPU runs it
        rows = [smoke_shape(*shape) for shape in SMOKE_SHAPES]
        result = dict(benchmark="gpu_gemv", smoke=True, environment=env_info(torch.device("cpu")), rows=rows)
        write_json(result, "gpu_gemv.json", args.out)
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    import torch._inductor.config as ic

    ic.coordinate_descent_tuning = True
    bw = copy_bandwidth(torch.device("cuda"), timer(torch.device("cuda"), rep_ms=200))  # as the other benchmarks
    # written after every row (atomically): a call stopped at its time limit keeps what it finished
    result = dict(
        benchmark="gpu_gemv", environment=env_info(torch.device("cuda")), copy_gb_s=bw, rows=[], fused_rows=[]
    )
    print(f"copy bandwidth {bw:,.0f} GB/s on {torch.cuda.get_device_name()}")
    print(f"{'weight':24s} {'MB':>6s} {'cuBLAS us':>10s} {'inductor us':>12s} {'triton us':>10s}  fraction of copy bw")
    red = torch.compile(reduction_linear, dynamic=False)  # what StaticDecoder(gemv="inductor") traces
    for name, n, k in SHAPES:
        if picked(name):
            result["rows"].append(bench_shape(name, n, k, args.reps, bw, red))
            write_json(result, "gpu_gemv.json", args.out)
    print("\nnorm before / residual add after the product, as two kernels and as one:")
    for name, n, k, what in FUSED_CASES:
        if picked(name):
            result["fused_rows"].append(bench_fused(name, n, k, what, args.reps, sweep=args.sweep_fused))
            write_json(result, "gpu_gemv.json", args.out)


if __name__ == "__main__":
    main()
