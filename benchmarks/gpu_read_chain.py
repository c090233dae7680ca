"""How near the bandwidth roofline can a decode step of separate kernels come on this card?

The step of ``gpu_weight_prefetch.py``'s stack (16 layers of the 1.28B llama shape at B=1, each
the fused Q/KV product with its norm, the decode kernel over a shared RoPE K=V cache and its
combine, the output product with the residual, gate and up with their norm, down with SwiGLU
and the residual; every layer its own weights and cache) is timed beside chains of kernels that
do nothing but read the same bytes. Each chain is one CUDA graph, replayed:

- ``kernels``: qkvlab's kernels, as the step launches them;
- ``gemv+read``: qkvlab's products, but each cache read by the read kernel instead of the decode
  kernel (the output product takes a fixed attention output): what the attention costs the step
  beyond its bytes;
- ``read+decode``: the decode kernel over each cache, each product's weight read by the read
  kernel (the decode kernel takes a fixed query): what the products cost beyond their bytes;
- ``reads``: one read kernel for each product's weight and for each cache, the same bytes in the
  same order (five a layer), each launched as qkvlab's kernels are: a programmatic dependent
  (where the GPU has it) that waits for the kernel before it, then lets the next one launch;
- ``reads-early``: the same, each program reading its first tile before that wait, as the GEMV
  reads the first tile of its weights;
- ``reads+1``: ``reads`` with a one-tile read after each cache's, where the step launches the
  decode combine: one more kernel boundary a layer and nearly no bytes;
- ``layer-reads``: one read kernel a layer over as many bytes as the layer reads: what a step of
  one kernel a layer could reach at best;
- ``one-read``: one read kernel over as many bytes as the whole step reads.

A read kernel's programs each sum ``--tiles`` tiles of ``--tile`` contiguous elements into one
float32 (so nothing is optimised away; each read is checked against ``torch.sum`` first). The
gap between ``reads`` and ``one-read`` is what kernel boundaries cost a step of pure reads, and
``kernels`` against ``reads`` what qkvlab's kernels cost beyond reading; if ``reads`` itself is
below a roofline target, no set of kernels of this shape can meet it without fusing across them.
Prints a table and writes JSON with hardware and versions.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_read_chain.py --kv-heads 8 --out $OUT/gpu_read_chain.json
    PYTHONPATH=src:benchmarks TRITON_INTERPRET=1 python3 benchmarks/gpu_read_chain.py --smoke   # CPU: the checks
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchutil import env_info, jit_now
from gpu_decode import copy_bandwidth, timer
from gpu_weight_prefetch import FULL, SMOKE, Stack, bench_device, check_stack, finish, time_rows
from qkvlab.kernels.gemv import gemv
from qkvlab.kernels.kv_decode import decode_attention, use_pdl

try:  # Triton is the dev extra's: without it only jit_now's error message runs
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

MODES = ("kernels", "gemv+read", "read+decode", "reads", "reads-early", "reads+1", "layer-reads", "one-read")


# read by the kernel as globals (Triton's interpreter sees no closure); set by benchutil.jit_now
_sum = _gdc_wait = _gdc_launch_dependents = None


def _read_sum(P, Out, n, TILE: tl.constexpr, TILES: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr):
    """One program sums TILES consecutive tiles of TILE elements of P (masked at n) into Out[pid]."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (TILE * TILES)
    offs = tl.arange(0, TILE)
    acc = tl.full([TILE], 0.0, tl.float32)
    if EARLY:  # the first tile before the wait: nothing in the chain writes what it reads
        acc += tl.load(P + base + offs, mask=base + offs < n, other=0.0).to(tl.float32)
    if PDL:
        _gdc_wait()
        _gdc_launch_dependents()
    for t in range(1 if EARLY else 0, TILES):
        idx = base + t * TILE + offs
        acc += tl.load(P + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.reduce(acc, 0, _sum))


class Reader:
    """Launches the read kernel over flat buffers; each buffer gets its own output of per-program sums."""

    def __init__(self, device, tile: int, tiles: int):
        self.device, self.tile, self.tiles = device, tile, tiles
        self.pdl = use_pdl(device)
        self.kernel = jit_now(_read_sum)
        self.outs: dict[tuple[int, int], torch.Tensor] = {}

    def programs(self, n: int, tiles: int) -> int:
        return -(-n // (self.tile * tiles))

    def __call__(self, buf: torch.Tensor, *, early: bool = False, tiles: int | None = None) -> torch.Tensor:
        flat = buf.reshape(-1)
        tiles = tiles or self.tiles
        grid = self.programs(flat.numel(), tiles)
        key = (flat.data_ptr(), tiles)
        if key not in self.outs:  # allocated before any capture: the graph reuses it
            self.outs[key] = torch.empty(grid, dtype=torch.float32, device=self.device)
        out = self.outs[key]
        self.kernel[(grid,)](
            flat,
            out,
            flat.numel(),
            TILE=self.tile,
            TILES=tiles,
            EARLY=early,
            PDL=self.pdl,
            num_warps=4,
            **({"launch_pdl": True} if self.pdl else {}),
        )
        return out


class Chains:
    """The stack's step and the read chains over the same bytes."""

    def __init__(self, stack: Stack, reader: Reader):
        self.stack, self.read = stack, reader
        dev = stack.device
        per_layer = stack.weight_bytes_per_layer + stack.cache_bytes_per_layer
        # buffers of the same sizes for the chains that read a layer, or the step, in one kernel
        self.layer_bufs = [torch.ones(per_layer // 2, dtype=torch.bfloat16, device=dev) for _ in stack.layers]
        self.step_buf = torch.ones(len(stack.layers) * per_layer // 2, dtype=torch.bfloat16, device=dev)
        self.tiny = torch.ones(reader.tile, dtype=torch.bfloat16, device=dev)
        dh, hq = stack.cfg["head_dim"], stack.hq
        self.q_fixed = torch.randn(1, hq, dh, device=dev).to(torch.bfloat16)
        self.a_fixed = self.attend(self.q_fixed, stack.layers[0]).reshape(1, hq * dh).clone()
        # for the check only: a last program that reads past the end (masked)
        self.odd = torch.randn(reader.tile * reader.tiles + reader.tile // 2 + 3, device=dev).to(torch.bfloat16)

    def attend(self, q: torch.Tensor, L: dict) -> torch.Tensor:
        st = self.stack
        return decode_attention(
            q, L["cache"], L["cache"], st.lengths, scale=st.cfg["head_dim"] ** -0.5, shared_kv=True,
            rope_cos=st.cos, rope_sin=st.sin, max_length=st.cfg["context"],
        )  # fmt: skip

    def kernels_per_step(self, mode: str) -> int:
        n = len(self.stack.layers)
        return {"reads": 5 * n, "reads-early": 5 * n, "reads+1": 6 * n, "layer-reads": n, "one-read": 1}.get(mode, 0)

    def run(self, mode: str):
        if mode == "kernels":
            return self.stack.step("none")
        st = self.stack
        if mode == "gemv+read":
            x = st.x0
            for L in st.layers:
                gemv(x, L["qkv"], norm_weight=st.norm)
                self.read(L["cache"])
                h = gemv(self.a_fixed, L["o"], residual=x)
                x = gemv(gemv(h, L["gu"], norm_weight=st.norm), L["down"], glu=True, residual=h)
            return x
        if mode == "read+decode":
            for L in st.layers:
                self.read(L["qkv"])
                out = self.attend(self.q_fixed, L)
                for name in ("o", "gu", "down"):
                    self.read(L[name])
            return out
        if mode == "one-read":
            return self.read(self.step_buf)
        if mode == "layer-reads":
            for buf in self.layer_bufs:
                out = self.read(buf)
            return out
        early = mode == "reads-early"
        for L in self.stack.layers:
            for name in ("qkv", "cache", "o", "gu", "down"):
                out = self.read(L[name], early=early)
                if name == "cache" and mode == "reads+1":
                    self.read(self.tiny, tiles=1)
        return out

    def check(self) -> dict:
        """Each kind of buffer the chains read, summed by the read kernel against torch.sum."""
        bufs = {"qkv": self.stack.layers[0]["qkv"], "cache": self.stack.layers[0]["cache"]}
        bufs |= {"layer": self.layer_bufs[0], "tiny": self.tiny, "odd length": self.odd}
        errs = {}
        for name, buf in bufs.items():
            for early in (False, True):
                got = self.read(buf, early=early).double().sum()
                want = buf.double().sum()
                errs[f"{name}{', early' if early else ''}"] = (abs(got - want) / max(abs(want), 1.0)).item()
        return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tile", type=int, default=1024, help="elements a read program loads at a time (power of two)")
    ap.add_argument("--tiles", type=int, default=4, help="tiles a read program sums")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the modes (median of medians)")
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): the checks only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    if args.tile < 16 or args.tile & (args.tile - 1) or args.tiles < 1:
        ap.error(f"--tile {args.tile} / --tiles {args.tiles}: the tile must be a power of two >= 16, tiles >= 1")
    device = bench_device(args.smoke)
    if device is None:
        return 2
    cfg = SMOKE if args.smoke else FULL
    tile = min(args.tile, 64) if args.smoke else args.tile
    stack = Stack(cfg, min(args.kv_heads, cfg["n_heads"]), device)
    chains = Chains(stack, Reader(device, tile, args.tiles))
    info = env_info(device)
    print(f"device: {info}", flush=True)
    errs = chains.check()
    print("read kernel against torch.sum, relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    if not max(errs.values()) < 1e-3:  # float32 sums of bf16 values; also false for NaN
        print("the read kernel does not sum what it reads; stopping")
        return 1
    rel = check_stack(stack, chains.run("kernels"), "kernels")
    if rel is None:
        return 1
    for m in modes:
        chains.run(m)  # compiles every launch before the timing
    bench = timer(device, args.rep_ms, graphs=True, flush="none")
    copy = copy_bandwidth(device, bench) if device.type == "cuda" else float("nan")
    rows = [dict(mode=m, kernels_per_step=chains.kernels_per_step(m), us=[]) for m in modes]
    time_rows(rows, chains.run, bench, args.rounds, device)
    n = cfg["layers"]
    bytes_step = n * (stack.weight_bytes_per_layer + stack.cache_bytes_per_layer)
    print(
        f"{n} layers, {stack.kv_heads} KV heads of {cfg['head_dim']}, context {cfg['context']}: "
        f"{bytes_step / 1e9:.3f} GB a step; copy bandwidth {copy:.0f} GB/s; read programs of "
        f"{args.tiles} x {tile} elements"
    )
    print(f"{'mode':>12} {'kernels':>8} {'us/step':>9} {'roofline':>9}")
    for r in rows:
        if r["us_median"] is None:
            print(f"{r['mode']:>12} {'(checked)':>9}")
            continue
        r["roofline_fraction"] = bytes_step / (copy * 1e3) / r["us_median"]
        k = r["kernels_per_step"] or ""
        print(f"{r['mode']:>12} {k:>8} {r['us_median']:9.1f} {r['roofline_fraction']:8.1%}")
    doc = dict(
        benchmark="gpu_read_chain",
        env=info,
        argv=sys.argv[1:] if argv is None else list(argv),
        shape=dict(cfg, kv_heads=stack.kv_heads),
        read_program=dict(tile=tile, tiles=args.tiles, num_warps=4, programmatic_dependent_launch=chains.read.pdl),
        copy_GBps=copy,
        read_check_rel_err=errs,
        rel_err_vs_reference=rel,
        bytes_per_step=bytes_step,
        timing="CUDA-graph replay of each chain, no flush (every buffer read once a step, the step's "
        "bytes several times the L2); median of rep_ms of replays, median over rounds",
        rows=rows,
    )
    finish(doc, "gpu_read_chain.json", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
