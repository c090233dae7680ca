"""Does asking L2 for the next products' weights while the attention runs shorten a decode step?

At B=1 with few KV heads the decode kernel reads its cache at about half the DRAM bandwidth
(one wave of short programs), while every matrix product after it is bandwidth-bound. This
script measures whether the idle half can be spent early: while the attention of a layer runs,
a small kernel prefetches (``prefetch.global.L2``) the first bytes of the weights that the
products after it read (the output projection, then the MLP's gate and up), so that those
products find part of their weights in L2.

The step is a stack of layers of the 1.28B llama shape of ``gpu_generate_vs_hf.py`` built from
qkvlab's kernels alone (no model, no compile): per layer the fused Q/KV product, the decode
kernel over a shared RoPE K=V cache (Q-GQA-8: 8 KV heads of 64, or ``--kv-heads``), the output
product with the residual, the fused gate and up product, and the down product with SwiGLU and
the residual. Each mode is one CUDA graph of the whole stack, replayed; every layer has its own
weights and cache, so nothing is in L2 but what the step itself left there. Modes:

- ``none``: the step as is;
- ``fork``: the same with the attention forked onto a second stream and joined (what the
  prefetch modes add besides the prefetch itself);
- ``side:<MB>``: the prefetch kernel for the first <MB> of [output | gate and up] weights on the
  second stream, concurrent with the attention;
- ``before:<MB>``: the prefetch kernel on the main stream just before the attention (its
  instructions return at once; the L2 fills while the attention runs).

Every mode's output is checked against ``none``'s (the prefetch does not change a value).
Prints a table and writes JSON with hardware and versions.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_weight_prefetch.py --out $OUT/gpu_weight_prefetch.json
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_weight_prefetch.py --smoke   # CPU, the checks only
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from benchutil import env_info, write_json
from gpu_decode import EAGER_FALLBACKS, copy_bandwidth, timer
from qkvlab.attention.positional import Rotary
from qkvlab.kernels.gemv import gemv
from qkvlab.kernels.kv_decode import decode_attention, decode_attention_reference

FULL = dict(layers=16, d_model=2048, n_heads=32, d_ff=8192, head_dim=64, context=32768)
SMOKE = dict(layers=2, d_model=64, n_heads=4, d_ff=128, head_dim=16, context=64)


def _prefetch_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_l2(P, n_lines, LINES: tl.constexpr, LINE_ELEMS: tl.constexpr):
        """Each program asks L2 for LINES consecutive 128-byte lines of P (no value is read)."""
        offs = tl.program_id(0) * LINES + tl.arange(0, LINES)
        ptrs = P + tl.minimum(offs, n_lines - 1).to(tl.int64) * LINE_ELEMS
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )

    return prefetch_l2


def bench_device(smoke: bool) -> torch.device | None:
    """The GPU, or the CPU for ``--smoke``; None (after saying why) where there is no GPU to time."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type == "cpu" and not smoke:
        print("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) for a CPU check of this script")
        return None
    return device


def finish(doc: dict, name: str, out: str | None) -> None:
    """Records the methods timed without a graph (they could not be captured), then writes ``doc``."""
    if EAGER_FALLBACKS:
        print("timed eagerly (not capturable): " + "; ".join(EAGER_FALLBACKS))
    doc["eager_fallbacks"] = list(EAGER_FALLBACKS)
    write_json(doc, name, out)


def check_stack(stack: Stack, got: torch.Tensor, label: str) -> float | None:
    """``got``'s relative error against the stack's float32 reference, or None (said) where it is not that."""
    want = stack.reference()
    rel = ((got.float() - want).norm() / want.norm()).item()
    print(f"{label} against the float32 reference: relative error {rel:.2e}")
    if not rel < 0.05:  # bf16 activations and weights through every layer; also false for NaN
        print("the stack does not compute its reference; stopping")
        return None
    return rel


def time_rows(rows: list[dict], run, bench, rounds: int, device: torch.device) -> None:
    """Each row's ``mode`` run by ``run(mode)`` and timed, rows in turn, ``rounds`` times (on a GPU);
    the median of its times in ``us_median`` (None where nothing was timed)."""
    if device.type == "cuda":
        for _ in range(rounds):
            for r in rows:
                r["us"].append(bench(lambda m=r["mode"]: run(m), r["mode"]))
    for r in rows:
        r["us_median"] = statistics.median(r["us"]) if r["us"] else None


class Stack:
    """Per-layer weights (output, gate/up in one flat buffer, so one prefetch covers both) and caches."""

    def __init__(self, cfg: dict, kv_heads: int, device, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        d, ff, dh, S = cfg["d_model"], cfg["d_ff"], cfg["head_dim"], cfg["context"]
        self.cfg, self.kv_heads, self.device = cfg, kv_heads, device
        self.hq = cfg["n_heads"]

        def w(n, k):
            return (torch.randn(n, k, device=device, generator=g) / k**0.5).to(torch.bfloat16)

        self.layers = []
        for _ in range(cfg["layers"]):
            flat = torch.cat([w(d, d).flatten(), w(2 * ff, d).flatten()])  # [output | gate and up]
            self.layers.append(
                dict(
                    qkv=w(d + kv_heads * dh, d),
                    flat=flat,
                    o=flat[: d * d].view(d, d),
                    gu=flat[d * d :].view(2 * ff, d),
                    down=w(d, ff),
                    cache=torch.randn(1, kv_heads, S, dh, device=device, generator=g).to(torch.bfloat16),
                )
            )
        rot = Rotary(dh, S).to(device)
        self.cos, self.sin = rot.cos, rot.sin
        self.norm = torch.ones(d, device=device, dtype=torch.bfloat16)  # the pre-norms, fused as in the model
        self.lengths = torch.full((1,), S, dtype=torch.int32, device=device)
        self.x0 = torch.randn(1, d, device=device, generator=g).to(torch.bfloat16)
        self.out = torch.empty(1, d, device=device, dtype=torch.bfloat16)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.kernel = _prefetch_kernel() if device.type == "cuda" else None

    @property
    def weight_bytes_per_layer(self) -> int:
        L = self.layers[0]
        return sum(L[k].numel() * 2 for k in ("qkv", "o", "gu", "down"))

    @property
    def cache_bytes_per_layer(self) -> int:
        return self.layers[0]["cache"].numel() * 2

    def prefetch(self, flat: torch.Tensor, mb: float):
        n_lines = min(int(mb * 2**20) // 128, flat.numel() * 2 // 128)
        if n_lines == 0 or self.kernel is None:
            return
        lines = 64
        self.kernel[(-(-n_lines // lines),)](flat, n_lines, LINES=lines, LINE_ELEMS=64, num_warps=2)

    def reference(self) -> torch.Tensor:
        """The same stack in float32 PyTorch (the attention by its reference): what ``step`` must give."""
        dh, hq = self.cfg["head_dim"], self.hq

        def norm(t):  # the kernels' fused pre-norm: unit weights, their eps
            return F.rms_norm(t, (t.shape[-1],), eps=1e-6)

        x = self.x0.float()
        for L in self.layers:
            q = F.linear(norm(x), L["qkv"].float())[:, : hq * dh].view(1, hq, dh)
            a = decode_attention_reference(
                q.to(torch.bfloat16), L["cache"], None, self.lengths, scale=dh**-0.5, shared_kv=True,
                rope_cos=self.cos, rope_sin=self.sin,
            ).float()  # fmt: skip
            h = F.linear(a.reshape(1, hq * dh), L["o"].float()) + x
            gate, up = F.linear(norm(h), L["gu"].float()).chunk(2, dim=-1)
            x = F.linear(F.silu(gate) * up, L["down"].float()) + h
        return x

    def step(self, mode: str):
        """The stack once; ``mode`` as in the module docstring. Returns the last hidden state.

        The products before the attention and the MLP normalise their input (RMSNorm with unit
        weights, in the kernel) as the model's do: without it the random stack overflows."""
        kind, _, mb = mode.partition(":")
        mb = float(mb or 0)
        dh, hq = self.cfg["head_dim"], self.hq
        x = self.x0
        main = torch.cuda.current_stream(self.device) if self.side is not None else None
        for L in self.layers:
            qkv = gemv(x, L["qkv"], norm_weight=self.norm)
            q = qkv[:, : hq * dh].view(1, hq, dh)

            def attend(q=q, L=L):
                return decode_attention(
                    q, L["cache"], L["cache"], self.lengths, scale=dh**-0.5, shared_kv=True,
                    rope_cos=self.cos, rope_sin=self.sin, max_length=self.cfg["context"],
                )  # fmt: skip

            if kind in ("fork", "side") and main is not None:
                self.side.wait_stream(main)
                with torch.cuda.stream(self.side):
                    if kind == "side":
                        self.prefetch(L["flat"], mb)
                a = attend()
                main.wait_stream(self.side)
            else:
                if kind == "before":
                    self.prefetch(L["flat"], mb)
                a = attend()
            h = gemv(a.reshape(1, hq * dh), L["o"], residual=x)
            gu = gemv(h, L["gu"], norm_weight=self.norm)
            x = gemv(gu, L["down"], glu=True, residual=h)
        self.out.copy_(x)
        return self.out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="none,fork,side:8,side:16,side:24,before:8,before:16,before:24")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the modes (median of medians)")
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): the checks only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        kind, _, mb = m.partition(":")
        if kind not in ("none", "fork", "side", "before") or (kind in ("side", "before")) != bool(mb):
            ap.error(f"--modes: {m!r} is not none, fork, side:<MB> or before:<MB>")
    if "none" not in modes:
        modes.insert(0, "none")
    device = bench_device(args.smoke)
    if device is None:
        return 2
    cfg = SMOKE if args.smoke else FULL
    if args.smoke:
        modes = ["none", "fork"]  # the prefetch is an sm_90 instruction: nothing to check on a CPU
    stack = Stack(cfg, min(args.kv_heads, cfg["n_heads"]), device)
    info = env_info(device)
    print(f"device: {info}", flush=True)
    bench = timer(device, args.rep_ms, graphs=True, flush="none")
    copy = copy_bandwidth(device, bench) if device.type == "cuda" else float("nan")
    ref = stack.step("none").clone()
    rel = check_stack(stack, ref, "mode none")
    if rel is None:
        return 1
    rows = []
    for m in modes:
        got = stack.step(m)
        err = (got.float() - ref.float()).abs().max().item()
        if err != 0.0:
            print(f"mode {m}: output differs from mode none by {err:.3g}; stopping")
            return 1
        rows.append(dict(mode=m, max_abs_diff=err, us=[]))
    time_rows(rows, stack.step, bench, args.rounds, device)
    L = cfg["layers"]
    bytes_step = L * (stack.weight_bytes_per_layer + stack.cache_bytes_per_layer)
    base = None
    print(f"{L} layers, {stack.kv_heads} KV heads of {cfg['head_dim']}, context {cfg['context']}: "
          f"{bytes_step / 1e9:.3f} GB a step; copy bandwidth {copy:.0f} GB/s")  # fmt: skip
    print(f"{'mode':>12} {'us/step':>9} {'vs none':>8} {'roofline':>9}")
    for r in rows:
        if r["us_median"] is None:
            print(f"{r['mode']:>12} {'(checked)':>9}")
            continue
        base = base or r["us_median"]
        r["speedup_vs_none"] = base / r["us_median"]
        r["roofline_fraction"] = bytes_step / (copy * 1e3) / r["us_median"]
        print(f"{r['mode']:>12} {r['us_median']:9.1f} {r['speedup_vs_none']:7.3f}x {r['roofline_fraction']:8.1%}")
    doc = dict(
        benchmark="gpu_weight_prefetch",
        env=info,
        argv=sys.argv[1:],
        shape=dict(cfg, kv_heads=stack.kv_heads),
        copy_GBps=copy,
        rel_err_vs_reference=rel,
        bytes_per_step=bytes_step,
        timing="CUDA-graph replay of the whole stack, no flush (each layer's own weights and cache "
        "are cold); median of rep_ms of replays, median over rounds",
        rows=rows,
    )
    finish(doc, "gpu_weight_prefetch.json", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
