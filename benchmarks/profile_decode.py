"""Run one decode-kernel launch configuration a few times, for a profiler.

Nsight Compute reads the hardware counters of the split kernel; on the GPU machine::

    ncu --clock-control none --kernel-name regex:_decode_split --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python3 benchmarks/profile_decode.py --B 1 --S 131072 --Hkv 32 --config '{"block_n": 64}'

``--host`` instead times the host side of eager calls (no CUDA graph) and prints a cProfile of
them (``results/profile_decode_eager_host.txt`` is one such run): what an eager step pays
before the GPU starts, e.g. Triton's launcher, called twice (split and combine kernels).

Inputs are those of ``gpu_decode.py`` (bf16, Hq=32, D=128 unless ``--head-dim``, a shared K=V
cache, RoPE on the key role unless ``--which kv``); the result is checked against the float32 reference first.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import torch

import gpu_decode
from gpu_decode import Point, rel_err
from qkvlab.kernels import DecodeConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--Hkv", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=gpu_decode.D, help="head width D")
    ap.add_argument("--which", default="rope_kv", choices=["rope_kv", "rope_qkn_kv", "sep_kv", "kv"])
    ap.add_argument("--config", default="{}", help="DecodeConfig fields as JSON")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--host", action="store_true", help="time and cProfile the host side of eager calls")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = DecodeConfig(**json.loads(args.config))
    gpu_decode.D = args.head_dim  # Point reads the module's head width
    pt = Point(args.B, args.S, args.Hkv, torch.device("cuda"))
    fn = pt.ours(args.which, pt.full, config=cfg, out=pt.out)
    fn()
    err = rel_err(pt.out, pt.reference(args.which, pt.full))
    if args.host:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        host_us = (time.perf_counter() - t0) / 500 * 1e6
        torch.cuda.synchronize()
        print(f"host time per eager call (launches are asynchronous; 500 calls): {host_us:.1f} us")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        print(text.getvalue())
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"B={args.B} S={args.S} Hkv={args.Hkv} {args.which} {cfg}: rel_err {err:.2e}")
    return 0 if err < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
