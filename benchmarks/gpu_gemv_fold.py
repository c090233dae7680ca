"""Does a batch-1 product read its weights faster with a narrower accumulator, as the step calls it?

A decode step at batch 1 is mostly matrix-vector products, bound by reading the weights. The GEMV
kernel (``qkvlab.kernels.gemv``) multiplies a weight tile into a float32 accumulator of the tile's
shape, twice the tile's registers, and registers bound how many programs (so how many loads in
flight) an SM holds. Its ``fold`` launch-shape field first sums each tile's products over ``fold``
neighbouring columns that a thread loaded together, into an accumulator ``fold`` times narrower:
compiled for sm_90 (Triton 3.9), ``fold=8`` takes the 4-row tile with the norm in the loop from
122 registers to 56, and the down projection's 8-row tile with SwiGLU's input from 225 to 126.

For each product of the 1.28B llama model of ``gpu_gemv.py``, in the variant the decode step
launches (the norm in the loop before the Q/KV and gate + up projections, the residual after the
output projection, SwiGLU's input and the residual in the down projection, the LM head plain),
side by side:

- ``auto``: the kernel's own launch shape, as the step calls it (``fold=1``);
- ``auto, fold F``: the same shape with each other fold of the sweep;
- ``fold F RxC wW``: a sweep of rows per program, tile width, warps and fold.

Every launch shape is checked against ``gemv_reference`` (float32) before it is timed; a shape the
compiler cannot build is reported, not timed. Timing as ``gpu_gemv.py``: CUDA-graph replay of
``--reps`` calls over rotating copies of the weight (about 200 MB, so no call reads from L2), each
a programmatic dependent of the one before where the GPU has it. A product timed back to back with
itself is not the step, where it follows other kernels: a gain here is a candidate for
``ab_pairs.py``'s whole steps, which decide (docs/benchmarks.md has both for ``fold=8``).

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemv_fold.py --out $OUT/gpu_gemv_fold.json
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemv_fold.py --smoke   # CPU interpreter, the checks only
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import dataclass

import torch

from qkvlab.kernels.gemv import GemvConfig, _auto_config, gemv, gemv_reference


@dataclass(frozen=True)
class Shape:
    """Launch shape of the sweep: rows per program, tile width, warps, fold."""

    block_n: int
    block_k: int
    warps: int
    fold: int

    def config(self) -> GemvConfig:
        return GemvConfig(self.block_n, self.block_k, self.warps, 1, self.fold)


# (name, out features, in features, the step's variant of the product)
STEP_PRODUCTS = [
    ("norm -> qkv fused", 6144, 2048, "norm"),
    ("norm -> q + kv fused (Q-K=V)", 4096, 2048, "norm"),
    ("norm -> q + kv, 8 kv heads (Q-GQA-8)", 2560, 2048, "norm"),
    ("norm -> q + k + v, 8 kv heads", 3072, 2048, "norm"),
    ("o -> + residual", 2048, 2048, "residual"),
    ("norm -> gate + up fused", 16384, 2048, "norm"),
    ("silu(gate) * up -> down -> + residual", 2048, 8192, "glu"),
    ("lm head", 50304, 2048, "plain"),
]
SMOKE_PRODUCTS = [
    ("smoke, norm", 40, 256, "norm"),
    ("smoke, ragged rows and K, residual", 37, 200, "residual"),
    ("smoke, glu and residual", 24, 128, "glu"),
    ("smoke, plain", 33, 64, "plain"),
]
SMOKE_SWEEP = [Shape(bn, bk, 4, fold) for bn, bk, fold in itertools.product((2, 8), (64, 128), (1, 8))]
TOL = 0.05  # bf16 outputs of size about 1 (3 with the residual): a few ulps


def sweep(rows=(1, 2, 4, 8), widths=(512, 1024, 2048), warps=(4, 8), folds=(1, 8)) -> list[Shape]:
    """The launch shapes timed: tiles of at most 8,192 weights (rows x columns), folds no wider
    than the tile."""
    return [Shape(*s) for s in itertools.product(rows, widths, warps, folds) if s[0] * s[1] <= 8192 and s[3] <= s[1]]


def random_weight(n: int, k: int, device, generator=None) -> torch.Tensor:
    return (torch.randn(n, k, device=device, generator=generator) / k**0.5).to(torch.bfloat16)


def product_inputs(w: torch.Tensor, what: str, generator=None) -> dict:
    """The step's inputs to the product ``what`` on weight ``w``: the keyword arguments of ``gemv``."""
    (n, k), kw = w.shape, dict(device=w.device, generator=generator)
    x = torch.randn(1, 2 * k if what == "glu" else k, **kw).to(torch.bfloat16)
    extra = {}
    if what == "norm":
        extra = dict(norm_weight=(torch.rand(k, **kw) + 0.5).to(torch.bfloat16), eps=1e-5)
    elif what in ("residual", "glu"):
        extra = dict(residual=torch.randn(n, **kw).to(torch.bfloat16), glu=what == "glu")
    return dict(x=x, w=w, **extra)


def call(inputs: dict, w: torch.Tensor, config: GemvConfig | None) -> torch.Tensor:
    """The product as the step calls it, on weight ``w`` (the inputs' own or a copy)."""
    return gemv(**{**inputs, "w": w}, config=config)


def check(inputs: dict, config: GemvConfig | None) -> float:
    """Largest difference of the kernel's product from the float32 definition."""
    ref = gemv_reference(**inputs).float()
    return (call(inputs, inputs["w"], config).float() - ref).abs().max().item()


def candidates(n: int, k: int, shapes: list[Shape]) -> dict[str, GemvConfig | None]:
    """``auto``, the auto shape with each other fold of the sweep, then the sweep's shapes."""
    auto = _auto_config(n, k)
    out: dict[str, GemvConfig | None] = {"auto": None}
    for fold in sorted({s.fold for s in shapes} - {auto.fold}):
        if fold <= auto.block_k:
            out[f"auto, fold {fold}"] = GemvConfig(auto.block_n, auto.block_k, auto.num_warps, auto.num_stages, fold)
    for s in shapes:
        out[f"fold {s.fold} {s.block_n}x{s.block_k} w{s.warps}"] = s.config()
    return out


def smoke(shapes: list[Shape]) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for name, n, k, what in SMOKE_PRODUCTS:
        g = torch.Generator().manual_seed(n * k)
        inputs = product_inputs(random_weight(n, k, "cpu", g), what, g)
        errs = {key: check(inputs, cfg) for key, cfg in candidates(n, k, shapes).items()}
        worst = max(errs.values())
        ok &= worst < TOL
        print(f"{name:40s} max abs error over {len(errs)} launch shapes {worst:.1e}")
        rows.append(dict(name=name, out_features=n, in_features=k, step_variant=what, max_abs_err=errs))
    return rows, ok


def bench(name: str, n: int, k: int, what: str, reps: int, bw: float, shapes: list[Shape]) -> dict:
    from gpu_gemv import _time, rotating_weights

    w, pick = rotating_weights(n, k)
    inputs = product_inputs(w, what)
    us, errs, failed = {}, {}, {}
    for key, cfg in candidates(n, k, shapes).items():
        try:
            errs[key] = check(inputs, cfg)
            if errs[key] < TOL:  # a wrong product is not a candidate
                us[key] = _time(lambda cfg=cfg: call(inputs, pick(), cfg), reps)
        except Exception as e:  # out of resources for this shape: not a candidate
            failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    bad = {s: e for s, e in errs.items() if e >= TOL}
    mb = n * k * 2 / 1e6
    frac = {s: mb * 1e6 / (t * 1e-6) / 1e9 / bw for s, t in us.items()}
    best = min(us, key=us.get, default=None)
    line = f"{name:40s} {mb:6.1f} MB"
    if "auto" in us:
        line += f"  auto {us['auto']:7.2f} us ({frac['auto']:.2f})"
        folded = [s for s in us if s.startswith("auto, fold")]
        line += "".join(f"  {s[6:]} {us[s]:7.2f}" for s in folded)
        if best:
            line += f"  best {us[best]:7.2f} us ({frac[best]:.2f}, {us['auto'] / us[best]:.3f}x) [{best}]"
    print(line + (f"  {len(failed)} shapes not built" if failed else "") + (f"  {len(bad)} WRONG" if bad else ""))
    return dict(
        name=name, out_features=n, in_features=k, step_variant=what, mb=mb, us=us, fraction_of_copy=frac,
        max_abs_err=errs, wrong=bad, not_built=failed, best=best, auto_config=str(_auto_config(n, k)),
    )  # fmt: skip


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers, e.g. 2,8")
    return values


def _folds(text: str) -> tuple[int, ...]:
    values = _ints(text)
    if any(v & (v - 1) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a fold is a power of two, e.g. 1,4,8")
    return values


def main(argv=None) -> int:
    from benchutil import env_info, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes: the checks only")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", default="", help="comma list of words: only the products whose name holds one")
    for flag, default in (("rows", "1,2,4,8"), ("widths", "512,1024,2048"), ("warps", "4,8")):
        ap.add_argument(f"--{flag}", type=_ints, default=default, help=f"the sweep's {flag} (default {default})")
    ap.add_argument("--folds", type=_folds, default="1,8", help="the sweep's folds, powers of two (default 1,8)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # the kernel runs under Triton's interpreter on the CPU
        rows, ok = smoke(SMOKE_SWEEP)
        doc = dict(benchmark="gpu_gemv_fold", smoke=True, environment=env_info(torch.device("cpu")), rows=rows)
        write_json(doc, "gpu_gemv_fold.json", args.out)
        return 0 if ok else 1
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    from gpu_decode import copy_bandwidth, timer

    shapes = sweep(args.rows, args.widths, args.warps, args.folds)
    words = [w for w in args.shapes.split(",") if w]
    bw = copy_bandwidth(torch.device("cuda"), timer(torch.device("cuda"), rep_ms=200))
    doc = dict(benchmark="gpu_gemv_fold", environment=env_info(torch.device("cuda")), copy_gb_s=bw, rows=[])
    print(f"copy bandwidth {bw:,.0f} GB/s on {torch.cuda.get_device_name()}; (fraction of it) after each time")
    for name, n, k, what in STEP_PRODUCTS:
        if words and not any(w in name for w in words):
            continue
        doc["rows"].append(bench(name, n, k, what, args.reps, bw, shapes))
        write_json(doc, "gpu_gemv_fold.json", args.out)  # after every row: a stopped run keeps them
    return 1 if any(r["wrong"] for r in doc["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
