"""Where one decode step of the ~1B generation benchmark spends its GPU time.

Builds the model of ``gpu_generate.py`` (random bf16 weights), fills a cache to ``--context``,
and profiles ``--steps`` replays of the CUDA-graphed static step, eager-compiled or not
(``--compile``). Prints, per step: the wall time (CUDA events), the summed kernel time, and
kernel time by kind (matrix products, the decode kernels, Inductor's fused kernels, other
elementwise kernels), then the profiler's table. Busy time below the wall time is the gap
between kernels inside the graph.

Run on the GPU machine from the repository root::

    PYTHONPATH=src:benchmarks python3 benchmarks/profile_generate.py --variants QKV,Q-K=V --compile
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_generate import ONE_B, build, fill_cache, release
from qkvlab.models.decoding import StaticDecoder

KINDS = (
    ("decode kernel", ("_decode_split_kernel", "_decode_combine_kernel")),
    ("matrix products", ("nvjet", "gemm", "gemv", "cutlass", "splitk", "splitK")),
    ("inductor fused", ("triton_",)),
)


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other kernels"


def profile_case(variant: str, B: int, S: int, args, device) -> str:
    model = build(variant, ONE_B, S + 64, device, torch.bfloat16)
    cache = model.new_cache(B, S + 32)
    fill_cache(cache, S, torch.Generator(device=device).manual_seed(2))
    token = torch.zeros(B, dtype=torch.long, device=device)
    dec = StaticDecoder(model, cache, cuda_graph=True, warmup=3, compile=args.compile)

    def step():
        cache.reset()
        cache.advance(S)  # the same position every time: the profile is of one step, repeated
        dec.step(token)

    for _ in range(3):
        step()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    wall = statistics.median(times)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(e.name)] += e.device_time / args.steps
            count[kind_of(e.name)] += 1
    busy = sum(by_kind.values())
    mode = "compiled + graph" if args.compile else "graph"
    lines = [
        f"{variant} B={B} S={S} ({mode}): step {wall:.0f} us wall, {busy:.0f} us in kernels, "
        f"{sum(count.values()) / args.steps:.0f} kernels",
    ]
    for kind in sorted(by_kind, key=by_kind.get, reverse=True):
        lines.append(f"  {kind:<16} {by_kind[kind]:8.0f} us  {count[kind] / args.steps:5.0f} kernels")
    lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    dec = cache = model = None
    release(device)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="QKV,Q-K=V")
    ap.add_argument("--points", default="1x32768", help="comma list of BATCHxCONTEXT")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    texts = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        for p in args.points.split(","):
            B, S = (int(v) for v in p.split("x"))
            text = profile_case(variant, B, S, args, device)
            print(text, flush=True)
            texts.append(text)
    out = os.environ.get("OUT")
    if out:
        tag = "compiled" if args.compile else "graph"
        Path(out, f"profile_generate_{tag}.txt").write_text("\n\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
