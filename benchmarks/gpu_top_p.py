"""Top-p filtering alone: qkvlab's sort-free kernel (``qkvlab.kernels.top_p``) against the sort
in PyTorch (:func:`top_p_reference`, what HF's ``TopPLogitsWarper`` also does: sort, cumulative
sum, scatter), eager and compiled, per vocabulary width and batch. Each is timed as CUDA-graph
replays of back-to-back calls (no host gaps), after a check that it keeps the sort's set. Prints
a table and writes JSON with hardware and versions.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_top_p.py --out $OUT/gpu_top_p.json
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_top_p.py --smoke   # the checks on a CPU (interpreter)
"""

from __future__ import annotations

import argparse
import os

import torch

from benchutil import env_info, write_json


def _time(fn, reps: int, samples: int = 7) -> float:
    """Median microseconds of one call over ``samples`` replays of a graph of ``reps`` calls."""
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
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def check(cut, reference, x: torch.Tensor, p: float) -> int:
    """Tokens kept by one and not the other (0, or a boundary token within rounding of p)."""
    a, b = cut(x, p) > float("-inf"), reference(x, p) > float("-inf")
    return int((a != b).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="32000,50304,151936", help="comma list of vocabulary widths")
    ap.add_argument("--batch", default="1,16", help="comma list of batch sizes")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--scale", type=float, default=2.0, help="logits are standard normal times this")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes: the checks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first decorated
    from qkvlab.kernels.top_p import top_p_cut, top_p_reference

    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    vocabs = [300, 1000] if args.smoke else [int(v) for v in args.vocab.split(",")]
    batches = [1, 3] if args.smoke else [int(b) for b in args.batch.split(",")]
    sort_compiled = None if args.smoke else torch.compile(top_p_reference, dynamic=False)
    doc = dict(benchmark="gpu_top_p", environment=env_info(device), args=vars(args), rows=[])
    print(f"{'vocab':>7s} {'B':>3s}  {'sort us':>8s} {'sort compiled':>14s} {'kernel us':>10s}  speedup  differ")
    for V in vocabs:
        for B in batches:
            x = torch.randn(B, V, device=device, generator=torch.Generator(device).manual_seed(V + B)) * args.scale
            row = dict(vocab=V, batch=B, top_p=args.top_p)
            row["differ_vs_sort"] = check(top_p_cut, top_p_reference, x, args.top_p)
            if not args.smoke:
                row["sort_us"] = _time(lambda x=x: top_p_reference(x, args.top_p), args.reps)
                row["sort_compiled_us"] = _time(lambda x=x: sort_compiled(x, args.top_p), args.reps)
                row["kernel_us"] = _time(lambda x=x: top_p_cut(x, args.top_p), args.reps)
                row["speedup_vs_best_sort"] = min(row["sort_us"], row["sort_compiled_us"]) / row["kernel_us"]
                print(
                    f"{V:7d} {B:3d}  {row['sort_us']:8.1f} {row['sort_compiled_us']:14.1f} {row['kernel_us']:10.1f}"
                    f"  {row['speedup_vs_best_sort']:6.2f}x  {row['differ_vs_sort']}"
                )
            else:
                print(f"{V:7d} {B:3d}  (smoke: no timing)  differ {row['differ_vs_sort']}")
            doc["rows"].append(row)
            write_json(doc, "gpu_top_p.json", args.out)


if __name__ == "__main__":
    main()
