"""GPU benchmark: does training attention get faster when key and value are one tensor?

For shared K=V the attention module passes the same tensor as SDPA's key and value;
autograd then sums the two gradients into it. This script times forward + backward of
causal SDPA with (a) separate key and value tensors and (b) one tensor for both, for each
SDPA backend that runs (flash, cuDNN, efficient) and the default selection, at D = 64 and
128 and S = 1k to 8k, bf16. Before timing it checks that the shared gradient equals the
sum of the separate key and value gradients of the same values.

Run on a GPU from the repository root::

    PYTHONPATH=src python3 benchmarks/gpu_train_attention.py [--out benchmarks/results/gpu_train_attention.json]

It prints a table (median times, ratio shared / separate) and writes JSON with the GPU name,
driver, torch and triton versions. The decision it informs: a fused Triton forward + backward
for shared K=V is worth writing only if it would beat the best SDPA path by at least 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> None:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad)


def timed(fn, backend) -> float:
    import triton.testing

    def run():
        if backend is None:
            fn()
        else:
            with sdpa_kernel(backend):
                fn()

    return triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") * 1e3  # us


def check_gradients(B: int, H: int, S: int, D: int) -> float:
    """Relative difference between the shared gradient and dk + dv of separate tensors."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    s = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    grad = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    step(q, s, s, grad)
    k = s.detach().clone().requires_grad_()
    v = s.detach().clone().requires_grad_()
    q2 = q.detach().clone().requires_grad_()
    step(q2, k, v, grad)
    ref = (k.grad.float() + v.grad.float()).flatten()
    return float((s.grad.float().flatten() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_train_attention.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton

    rows = []
    print(f"gradient check (shared vs dk+dv): rel err {check_gradients(2, 4, 512, 64):.2e}")
    for D in (64, 128):
        for S in (1024, 2048, 4096, 8192):
            B, H = args.batch, args.heads
            g = torch.Generator(device="cuda").manual_seed(S + D)
            q, k, v, s, grad = (
                torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(5)
            )
            q, k, v, s = (t.requires_grad_() for t in (q, k, v, s))
            flops = 4 * B * H * S * S * D * 0.5 * 3.5  # causal fwd (2 matmuls) + bwd (5), x0.5 causal
            for name, backend in BACKENDS.items():
                try:
                    t_sep = timed(lambda: step(q, k, v, grad), backend)  # noqa: B023
                    t_shr = timed(lambda: step(q, s, s, grad), backend)  # noqa: B023
                except RuntimeError as e:
                    rows.append({"D": D, "S": S, "backend": name, "error": str(e).splitlines()[0][:120]})
                    continue
                rows.append(
                    {
                        "D": D,
                        "S": S,
                        "B": B,
                        "H": H,
                        "backend": name,
                        "separate_us": t_sep,
                        "shared_us": t_shr,
                        "shared_over_separate": t_shr / t_sep,
                        "separate_tflops": flops / t_sep / 1e6,
                    }
                )
    print(f"{'D':>4} {'S':>5} {'backend':>9} {'separate us':>12} {'shared us':>10} {'shared/sep':>10} {'TFLOP/s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['D']:>4} {r['S']:>5} {r['backend']:>9}  unavailable: {r['error']}")
            continue
        print(
            f"{r['D']:>4} {r['S']:>5} {r['backend']:>9} {r['separate_us']:>12.1f} {r['shared_us']:>10.1f} "
            f"{r['shared_over_separate']:>10.3f} {r['separate_tflops']:>8.1f}"
        )
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "benchmark": "gpu_train_attention",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": torch.cuda.get_device_name(),
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "causal": True,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
