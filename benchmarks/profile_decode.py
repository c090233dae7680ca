"""Run one decode-kernel launch configuration a few times, for a profiler (issue 5).

Nsight Compute reads the hardware counters of the split kernel; on the GPU machine::

    ncu --clock-control none --kernel-name regex:_decode_split --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python3 benchmarks/profile_decode.py --B 1 --S 131072 --Hkv 32 --config '{"rope_math": "native"}'

Inputs are those of ``gpu_decode.py`` (bf16, Hq=32, D=128, a shared K=V cache, RoPE on the key
role unless ``--which kv``); the result is checked against the float32 reference first.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gpu_decode import Point, rel_err
from qkvlab.kernels import DecodeConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--Hkv", type=int, default=32)
    ap.add_argument("--which", default="rope_kv", choices=["rope_kv", "rope_qkn_kv", "sep_kv", "kv"])
    ap.add_argument("--config", default="{}", help="DecodeConfig fields as JSON")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = DecodeConfig(**json.loads(args.config))
    pt = Point(args.B, args.S, args.Hkv, torch.device("cuda"))
    fn = pt.ours(args.which, pt.full, config=cfg, out=pt.out)
    fn()
    err = rel_err(pt.out, pt.reference(args.which, pt.full))
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"B={args.B} S={args.S} Hkv={args.Hkv} {args.which} {cfg}: rel_err {err:.2e}")
    return 0 if err < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
