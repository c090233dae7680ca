"""GPU benchmark: one-token decode over a shared K=V cache with RoPE on the key role.

At Hq=32, D=128, bf16, for each point (B rows, S cached tokens, Hkv KV heads: 32 = MHA, 8 = GQA-8)
this script, in one run:

1. measures the copy bandwidth (device-to-device copy of 1 GiB, bytes read + written);
2. checks every method first, on random data: relative error ``||out - ref|| / ||ref||`` against
   the float32 reference :func:`qkvlab.kernels.decode_attention_reference` (per-row lengths,
   incl. length 1 and lengths that are not a multiple of the tile, for B > 1); our kernel writes
   into a NaN-poisoned buffer. The run stops if a check fails;
3. times each method (median of many calls, the L2 flushed before every call so the cache is
   read cold), in several rounds, method after method. ``--flush zero`` (default) is
   ``triton.testing.do_bench``, which flushes by writing zeros over 256 MB: the L2 is then full
   of dirty lines that the timed call's first reads must write back to DRAM (a fixed cost that
   every method pays). ``--flush read`` reads a 256 MB buffer instead: as cold
   for the cache, but clean, as after the weight reads that precede attention in a decode step.
   ``--flush none`` (a check) leaves the L2 warm;
4. prints a table and writes JSON (GPU, driver, torch, triton) to ``$OUT/gpu_decode.json`` when
   ``$OUT`` is set and to ``--out`` when given.

Methods (``unique bytes`` = bytes of cache the method must read once):

- ``ours_rope_kv``: our Triton kernel on a K=V cache of raw ``s``, key role ``rope(s)`` in registers,
  value ``s``: the target. Reads ``B*Hkv*S*D*2`` bytes.
- ``ours_rope_qkn_kv``: the same with QK-norm (``rope(rmsnorm(s))``) on the key role.
- ``ours_sep_kv``: our kernel on separate K (final keys) and V: like for like with SDPA MHA.
- ``ours_kv``: our kernel on the shared cache without RoPE (the aliased floor's problem): what
  the key-role arithmetic costs is ``ours_rope_kv`` minus this.
- ``sdpa_<backend>``: ``F.scaled_dot_product_attention`` on separate K and V (the MHA baseline;
  ``enable_gqa`` for Hkv < Hq) for each backend that runs (cudnn, flash; memory-efficient is
  left out: slower than both at these shapes, it would never be the best); ``best_mha`` is the fastest, named.
- ``alias_<backend>``: SDPA given the SAME tensor as key and value and no RoPE: the K=V floor
  (it cannot express RoPE on the key role only).
- ``stream_read``: not attention: ``torch.sum`` over the K=V cache, the same unique bytes read once
  under the same timing. No decode method can be much faster; ``alias_cudnn / stream_read`` at the
  GQA-8 point bounds the speedup over ``alias_cudnn`` that any kernel reading the cache can reach.

Goals (:func:`goals`, checked on a full run and written under ``goals`` in the JSON), for
``ours_rope_kv``: at the bandwidth-bound points, at least 1.85x faster than ``best_mha``, its
unique bytes / time at least 85% of copy bandwidth, and within 5% of ``alias_cudnn``; at the
GQA-8 point (B=1 S=32k) at least 1.3x faster than ``alias_cudnn``; at every point never slower
than ``best_mha``.

Run on the GPU machine from the repository root::

    PYTHONPATH=src python3 benchmarks/gpu_decode.py                  # full run, a few minutes
    PYTHONPATH=src python3 benchmarks/gpu_decode.py --sweep          # also tune launch configs
    PYTHONPATH=src python3 benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode.json
    PYTHONPATH=src python3 benchmarks/gpu_decode.py --flush read --out benchmarks/results/gpu_decode_flush_read.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_decode.py --smoke   # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchutil import env_info, write_json
from qkvlab.attention.positional import Rotary
from qkvlab.kernels import DecodeConfig, decode_attention, decode_attention_reference

HQ, D = 32, 128
MAIN_POINTS = [(1, 32768, 32), (1, 131072, 32), (16, 8192, 32), (64, 4096, 32)]  # bandwidth-bound
GQA_POINT = (1, 32768, 8)  # GQA-8
SMALL_POINTS = [(1, 512, 32), (1, 2048, 32), (1, 4096, 32), (8, 1024, 32), (32, 512, 32)]
SMOKE_POINTS = [(1, 96, 4), (3, 80, 2)]
TOL = 2e-2  # bf16 operands: a correct kernel stays well inside this, a wrong one lands far outside


# ----------------------------------------------------------------------------- setup
EAGER_FALLBACKS: list[str] = []


def capture_graph(fn):
    """``fn`` captured in a CUDA graph (after one eager call, which also compiles); returns replay."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g.replay


def _median_event_us(run, flush, rep_ms: int) -> float:
    """Median microseconds of ``run()`` between two events, ``flush()`` before each (as do_bench)."""
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        run()
    end.record()
    torch.cuda.synchronize()
    n = max(5, min(10000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


FLUSHES = {
    "zero": "triton.testing.do_bench: the L2 is flushed by writing zeros over 256 MB, which leaves it "
    "full of dirty lines that the timed call's reads must write back",
    "read": "events around each call, after a flush that READS a 256 MB buffer (a torch.sum): the L2 "
    "is as cold for the cache but holds clean lines, as after a decode step's weight reads",
    "none": "events around each call, no flush: a cache that fits the L2 is read warm (a check that "
    "the flushes matter; not a decode step's condition)",
}


def timer(device: torch.device, rep_ms: int, graphs: bool = True, flush: str = "zero"):
    """Median time in microseconds of ``fn()`` with a cold L2 on CUDA (see ``FLUSHES``), a clock on CPU.

    On CUDA each method is captured in a CUDA graph and the replay is timed, so host launch
    overhead (Python checks, Triton's launcher: more than the kernel itself at small sizes)
    stays out of the number, for every method alike; ``fn.eager`` or ``graphs=False`` times
    the plain call. A method that cannot be captured is timed eagerly and listed.
    """
    if device.type == "cuda":
        import triton.testing

        if flush not in FLUSHES:
            raise ValueError(f"flush must be one of {sorted(FLUSHES)}, got {flush!r}")
        flush_fn = None  # zero: do_bench's own flush
        if flush == "read":
            flush_buf = torch.ones(2**26, dtype=torch.float32, device=device)  # 256 MB: several times the L2
            flush_sum = torch.empty((), dtype=torch.float32, device=device)

            def flush_fn():
                torch.sum(flush_buf, dim=0, out=flush_sum)
        elif flush == "none":

            def flush_fn():
                pass

        def cuda_time(fn, name=""):
            run = fn
            if graphs and not getattr(fn, "eager", False):
                try:
                    run = capture_graph(fn)
                except Exception as e:  # not capturable: time the eager call, and say so
                    EAGER_FALLBACKS.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
                    torch.cuda.synchronize()
            if flush_fn is not None:
                return _median_event_us(run, flush_fn, rep_ms)
            return triton.testing.do_bench(run, warmup=25, rep=rep_ms, return_mode="median") * 1e3

        return cuda_time

    def cpu_time(fn, name=""):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    return cpu_time


def copy_bandwidth(device: torch.device, bench) -> float:
    """GB/s of a device-to-device copy of 1 GiB (64 MiB on CPU), counting read + write."""
    n = (2**30 if device.type == "cuda" else 2**26) // 2
    x = torch.randn(n, device=device).to(torch.bfloat16)
    y = torch.empty_like(x)
    copy = lambda: y.copy_(x)  # noqa: E731 - one big kernel: timed as a plain call
    copy.eager = True
    us = bench(copy, "copy")
    return 2 * n * 2 / us / 1e3


# ----------------------------------------------------------------------------- one point
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


class Point:
    """Random inputs for one (B, S, Hkv) point, in bf16 on ``device``."""

    def __init__(self, B, S, Hkv, device, dtype=torch.bfloat16, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.B, self.S, self.Hkv = B, S, Hkv
        self.scale = D**-0.5
        self.q4 = torch.randn(B, HQ, 1, D, device=device, generator=g).to(dtype)
        self.q = self.q4[:, :, 0]
        self.s = torch.randn(B, Hkv, S, D, device=device, generator=g).to(dtype)  # shared cache (raw s)
        self.k = torch.randn(B, Hkv, S, D, device=device, generator=g).to(dtype)  # MHA: final keys
        self.v = torch.randn(B, Hkv, S, D, device=device, generator=g).to(dtype)
        rot = Rotary(D, S).to(device)
        self.cos, self.sin = rot.cos, rot.sin
        self.norm_w = (torch.rand(D, device=device, generator=g) + 0.5).to(dtype)
        self.full = torch.full((B,), S, dtype=torch.int32, device=device)
        if B == 1:
            mixed = [S - 3]
        else:
            mixed = torch.randint(1, S + 1, (B,), device=device, generator=g).tolist()
            mixed[0], mixed[1] = 1, S
        self.mixed = torch.tensor(mixed, dtype=torch.int32, device=device)
        self.out = torch.empty(B, HQ, D, device=device, dtype=dtype)

    @property
    def elems(self) -> int:
        return self.B * self.Hkv * self.S * D

    def ours(self, which: str, lengths, config=None, out=None):
        rope = dict(rope_cos=self.cos, rope_sin=self.sin)
        common = dict(scale=self.scale, max_length=self.S, config=config, out=out)
        if which == "rope_kv":
            return lambda: decode_attention(self.q, self.s, self.s, lengths, shared_kv=True, **rope, **common)
        if which == "rope_qkn_kv":
            nw = self.norm_w
            return lambda: decode_attention(
                self.q, self.s, self.s, lengths, shared_kv=True, k_norm_weight=nw, **rope, **common
            )
        if which == "sep_kv":
            return lambda: decode_attention(self.q, self.k, self.v, lengths, **common)
        if which == "kv":  # shared K=V without RoPE: our kernel on the aliased floor's problem
            return lambda: decode_attention(self.q, self.s, self.s, lengths, shared_kv=True, **common)
        raise ValueError(which)

    def reference(self, which: str, lengths):
        rope = dict(rope_cos=self.cos, rope_sin=self.sin)
        if which == "rope_kv":
            return decode_attention_reference(self.q, self.s, None, lengths, scale=self.scale, shared_kv=True, **rope)
        if which == "rope_qkn_kv":
            return decode_attention_reference(
                self.q, self.s, None, lengths, scale=self.scale, shared_kv=True, k_norm_weight=self.norm_w, **rope
            )
        if which == "sep_kv":
            return decode_attention_reference(self.q, self.k, self.v, lengths, scale=self.scale)
        if which in ("alias", "kv"):
            return decode_attention_reference(self.q, self.s, None, lengths, scale=self.scale, shared_kv=True)
        raise ValueError(which)

    def sdpa(self, backend, alias: bool):
        from torch.nn.attention import sdpa_kernel

        k, v = (self.s, self.s) if alias else (self.k, self.v)
        gqa = self.Hkv != HQ

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(self.q4, k, v, scale=self.scale, enable_gqa=gqa)

        return fn


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
    }


def run_point(B, S, Hkv, device, bench, rounds: int, log) -> dict:
    """Check, then time, every method at one point; returns the JSON record."""
    pt = Point(B, S, Hkv, device)
    elem = pt.s.element_size()
    kv_bytes = pt.elems * elem
    small = (pt.q.numel() * 2) * elem  # q read + out written
    rec = {"B": B, "S": S, "Hq": HQ, "Hkv": Hkv, "D": D, "dtype": "bfloat16", "methods": {}}
    methods = {}
    # --- correctness first (per-row lengths); ours writes into a NaN-poisoned buffer
    for which in ("rope_kv", "rope_qkn_kv", "sep_kv", "kv"):
        ref = pt.reference(which, pt.mixed)
        pt.out.fill_(float("nan"))
        pt.ours(which, pt.mixed, out=pt.out)()
        err = rel_err(pt.out, ref)
        shared = which != "sep_kv"
        name = f"ours_{which}"
        rec["methods"][name] = {"rel_err": err, "bytes": kv_bytes * (1 if shared else 2) + small}
        methods[name] = pt.ours(which, pt.full)
        del ref
    eager = pt.ours("rope_kv", pt.full)
    eager.eager = True  # the same call without a CUDA graph: host overhead included
    methods["ours_rope_kv_eager"] = eager
    rec["methods"]["ours_rope_kv_eager"] = dict(rec["methods"]["ours_rope_kv"])
    if device.type == "cuda":
        ref_sep = pt.reference("sep_kv", pt.full)
        ref_alias = pt.reference("alias", pt.full)
        for be_name, be in sdpa_backends().items():
            for alias in (False, True):
                name = f"{'alias' if alias else 'sdpa'}_{be_name}"
                fn = pt.sdpa(be, alias)
                try:
                    got = fn()[:, :, 0]
                    torch.cuda.synchronize()
                except RuntimeError as e:  # backend does not support this case
                    rec["methods"][name] = {"error": str(e).splitlines()[0][:160]}
                    continue
                err = rel_err(got, ref_alias if alias else ref_sep)
                rec["methods"][name] = {"rel_err": err, "bytes": kv_bytes * (1 if alias else 2) + small}
                methods[name] = fn
        del ref_sep, ref_alias
        # Not attention: the unique bytes of the K=V cache read once by a plain reduction, under the
        # same timing. No decode method can be much faster; it bounds the GQA-8 speedup over the alias.
        total = torch.empty((), dtype=torch.float32, device=device)
        dims = tuple(range(pt.s.dim()))
        methods["stream_read"] = functools.partial(torch.sum, pt.s, dim=dims, dtype=torch.float32, out=total)
        rec["methods"]["stream_read"] = {"bytes": kv_bytes}
    bad = {n: m["rel_err"] for n, m in rec["methods"].items() if "rel_err" in m and not m["rel_err"] < TOL}
    if bad:
        log(f"CORRECTNESS FAILURE at B={B} S={S} Hkv={Hkv}: {bad}")
        rec["failed"] = bad
    # --- timing: rounds of every method in turn
    times = {n: [] for n in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(bench(fn, name))
    for name, ts in times.items():
        m = rec["methods"][name]
        m["us_rounds"] = [round(t, 2) for t in ts]
        m["us"] = statistics.median(ts)
        m["GBps"] = m["bytes"] / m["us"] / 1e3
    mha = {n: m["us"] for n, m in rec["methods"].items() if n.startswith("sdpa_") and "us" in m}
    alias = {n: m["us"] for n, m in rec["methods"].items() if n.startswith("alias_") and "us" in m}
    if mha:
        rec["best_mha"] = min(mha, key=mha.get)
    if alias:
        rec["best_alias"] = min(alias, key=alias.get)
    del pt, methods
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# ----------------------------------------------------------------------------- sweep
def _decode_configs(text: str) -> list[DecodeConfig]:
    """``--sweep-configs``: a JSON list of DecodeConfig fields; a bad one is a usage error."""
    try:
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError("not a list of objects")
        return [DecodeConfig(**i) for i in items]
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def sweep_configs(which: str = "rope_kv", grid: str = "launch") -> list[DecodeConfig]:
    """Launch configs to compare against the defaults: tile length, warps and pipelining depth
    (``grid="tiles"``: longer tiles, e.g. at ``--head-dim 64``, where a 128-key tile is 16 KB;
    ``grid="stages"``: deep pipelines, so that a short program has most of its split's tiles in
    flight at once, with shorter tiles where the shared memory would otherwise cap residency)."""
    C = DecodeConfig
    if grid == "stages":
        return [
            C(),
            C(num_stages=4),
            C(num_stages=5),
            C(block_n=64, num_stages=6),
            C(block_n=64, num_stages=8),
            C(block_n=64, num_stages=12),
            C(block_n=32, num_stages=8),
            C(block_n=32, num_stages=16),
            C(block_n=64, num_stages=6, num_warps=2),
            C(block_n=32, num_stages=12, num_warps=2),
        ]
    if grid == "tiles":
        return [
            C(),
            C(block_n=256),
            C(block_n=256, num_stages=2),
            C(block_n=256, num_warps=8),
            C(block_n=64),
            C(num_stages=4),
        ]
    return [
        C(),
        C(block_n=64),
        C(block_n=64, num_stages=4),
        C(block_n=128, num_stages=2),
        C(num_warps=8),
    ]


SPLIT_GRID = {1: (4, 8, 12, 16, 17, 24, 32, 48), 16: (1, 2, 3, 4), 64: (1, 2)}
GQA_SPLIT_GRID = (8, 16, 24, 32, 48, 64, 128)


def _sweep_row(pt, which, cfg, ref, bench) -> dict:
    row = {"B": pt.B, "S": pt.S, "Hkv": pt.Hkv, "which": which}
    row["config"] = {
        k: v for k, v in vars(cfg).items() if v is not None and v != DecodeConfig.__dataclass_fields__[k].default
    }
    try:
        pt.out.fill_(float("nan"))
        pt.ours(which, pt.mixed, config=cfg, out=pt.out)()
        row["rel_err"] = rel_err(pt.out, ref)
        row["us"] = bench(pt.ours(which, pt.full, config=cfg), "sweep")
        row["GBps"] = pt.elems * 2 / row["us"] / 1e3
    except Exception as e:  # a config that does not compile is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def run_sweep(
    device, bench, log, smoke=False, split_configs: int = 3, points=None, which="rope_kv", grid="launch", configs=None
) -> list[dict]:
    """Time launch configurations of ours_rope_kv at the goal points (each checked first), then
    the split count for the ``split_configs`` fastest configs (on summed time over the points)."""
    rows = []
    if points is None:
        points = [(1, 96, 32), (2, 64, 32), (1, 96, 8)] if smoke else [*MAIN_POINTS, GQA_POINT]
    cfgs = [DecodeConfig(), *configs] if configs else sweep_configs(which, grid)
    made = {}
    for B, S, Hkv in points:
        pt = made[(B, S, Hkv)] = Point(B, S, Hkv, device, seed=1)
        ref = pt.reference(which, pt.mixed)
        for i, cfg in enumerate(cfgs):
            row = _sweep_row(pt, which, cfg, ref, bench)
            row["config_index"] = i
            rows.append(row)
            log(
                f"  sweep B={B} S={S} Hkv={Hkv} #{i} {row['config']}: {row.get('us', float('nan')):.1f} us "
                f"err={row.get('rel_err', float('nan')):.1e} {row.get('error', '')}"
            )
        ref_kv = pt.reference("kv", pt.mixed)
        row = _sweep_row(pt, "kv", DecodeConfig(), ref_kv, bench)  # our kernel without RoPE: its floor
        rows.append(row)
        log(f"  sweep B={B} S={S} Hkv={Hkv} kv: {row.get('us', float('nan')):.1f} us")
        del ref, ref_kv
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = {}
    for r in rows:
        if r["which"] == which:
            total.setdefault(r["config_index"], []).append(r.get("us", float("inf")))
    # a smoke checks the split phase's plumbing on the interpreter, where each timing takes seconds
    ranked = sorted(total, key=lambda i: sum(total[i]))[: 1 if smoke else split_configs]
    log(f"  fastest configs (summed): {[(i, round(sum(total[i]), 1)) for i in ranked]}")
    for B, S, Hkv in points:
        pt = made[(B, S, Hkv)]
        ref = pt.reference(which, pt.mixed)
        grid = GQA_SPLIT_GRID if Hkv != HQ else SPLIT_GRID.get(B, (1, 2, 4))
        grid = grid[:2] if smoke else grid
        for i in ranked:
            for splits in grid:
                cfg = DecodeConfig(**{**vars(cfgs[i]), "num_splits": splits})
                row = _sweep_row(pt, which, cfg, ref, bench)
                row["config_index"] = i
                rows.append(row)
                log(f"  splits B={B} S={S} Hkv={Hkv} #{i} splits={splits}: {row.get('us', float('nan')):.1f} us")
        del ref
    made.clear()
    return rows


# ----------------------------------------------------------------------------- report
def compiled_report() -> list[dict]:
    """Registers, spills and shared memory of every compiled split-kernel variant (from Triton's cache)."""
    from qkvlab.kernels import kv_decode

    rows = []
    try:
        fn = kv_decode._kernels(False)[0]
        for entry in fn.device_caches.values():
            for key, ck in entry[0].items():
                md = ck.metadata
                consts = getattr(getattr(ck, "src", None), "constants", None)
                rows.append(
                    {
                        "n_regs": getattr(ck, "n_regs", None),
                        "n_spills": getattr(ck, "n_spills", None),
                        "num_warps": getattr(md, "num_warps", None),
                        "num_stages": getattr(md, "num_stages", None),
                        "shared": getattr(md, "shared", None),
                        "constexprs": str(consts)[:400] if consts is not None else str(key)[-400:],
                    }
                )
    except Exception as e:  # introspection of Triton internals is best effort
        rows.append({"error": f"{type(e).__name__}: {e}"})
    return rows


def goals(points: list[dict], copy_gbps: float) -> dict:
    """Each goal of ``ours_rope_kv``, by a descriptive name: its target, the value at each point it
    covers, and whether every value meets the target."""
    main = [p for p in points if (p["B"], p["S"], p["Hkv"]) in MAIN_POINTS]
    res = {}

    def ours(p):
        return p["methods"]["ours_rope_kv"]["us"]

    def best_mha(p):
        return p["methods"][p["best_mha"]]["us"] if "best_mha" in p else math.nan

    def at_least(values: list[float], target: float) -> dict:
        return {"target": target, "values": values, "met": bool(values) and min(values) >= target}

    def at_most(values: list[float], target: float) -> dict:
        return {"target": target, "values": values, "met": bool(values) and max(values) <= target}

    def alias(p):
        return p["methods"].get("alias_cudnn", {}).get("us")

    res["K=V decode vs best MHA, bandwidth-bound points"] = at_least([best_mha(p) / ours(p) for p in main], 1.85)
    res["K=V decode bandwidth / copy bandwidth, bandwidth-bound points"] = at_least(
        [p["methods"]["ours_rope_kv"]["GBps"] / copy_gbps for p in main], 0.85
    )
    res["K=V decode time / cuDNN K=V alias, bandwidth-bound points"] = at_most(
        [ours(p) / alias(p) for p in main if alias(p)], 1.05
    )
    g = [p for p in points if (p["B"], p["S"], p["Hkv"]) == GQA_POINT]
    res["GQA-8 K=V decode vs cuDNN K=V alias"] = at_least([alias(p) / ours(p) for p in g if alias(p)], 1.3)
    bound = [alias(p) / p["methods"]["stream_read"]["us"] for p in g if alias(p) and "stream_read" in p["methods"]]
    res["GQA-8 bound: cuDNN K=V alias / stream_read"] = {
        **at_least(bound, 1.3),
        "note": "not a goal: the GQA-8 speedup over the alias of a kernel as fast as a plain read of the cache",
    }
    res["K=V decode vs best MHA, every point"] = at_least([best_mha(p) / ours(p) for p in points], 1.0)
    return res


def table(points: list[dict], copy_gbps: float, flush: str = "zero") -> str:
    cols = [
        "ours_rope_kv",
        "ours_rope_kv_eager",
        "ours_rope_qkn_kv",
        "ours_sep_kv",
        "best_mha",
        "alias_cudnn",
        "stream_read",
    ]
    short = {"ours_rope_kv_eager": "ours_rope (eager)", "ours_rope_qkn_kv": "ours_rope_qkn_kv"}
    head = (
        f"{'B':>3} {'S':>7} {'Hkv':>3} | " + " ".join(f"{short.get(c, c):>17}" for c in cols) + " | "
        f"{'GB/s ours':>9} {'%copy':>5} {'xMHA':>5} {'/alias':>6} {'err ours':>8}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        m = p["methods"]
        cells = []
        for c in cols:
            name = p.get("best_mha") if c == "best_mha" else c
            t = m.get(name, {}).get("us") if name else None
            label = f"{t:.1f}" if t is not None else "n/a"
            if c == "best_mha" and name:
                label += f" {name.split('_', 1)[1][:5]}"
            cells.append(f"{label:>17}")
        ours = m["ours_rope_kv"]
        mha = m.get(p.get("best_mha", ""), {}).get("us", math.nan)
        alias = m.get("alias_cudnn", {}).get("us", math.nan)
        lines.append(
            f"{p['B']:>3} {p['S']:>7} {p['Hkv']:>3} | " + " ".join(cells) + " | "
            f"{ours['GBps']:>9.0f} {100 * ours['GBps'] / copy_gbps:>5.1f} {mha / ours['us']:>5.2f} "
            f"{ours['us'] / alias:>6.3f} {ours['rel_err']:>8.1e}"
        )
    lines.append(f"times in us (median, L2 flush: {flush}); copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    lines.append(
        "xMHA = best MHA SDPA time / ours_rope_kv time; /alias = ours_rope_kv / SDPA cuDNN K=V alias (no RoPE)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    global D
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write the JSON here (e.g. benchmarks/results/gpu_decode.json)")
    ap.add_argument("--sweep", action="store_true", help="first time a grid of launch configs")
    ap.add_argument("--no-main", action="store_true", help="skip the main table (with --sweep)")
    ap.add_argument("--split-configs", type=int, default=3, help="configs whose split count --sweep also varies")
    ap.add_argument("--sweep-which", default="rope_kv", choices=["rope_kv", "rope_qkn_kv"], help="method --sweep times")
    grids = ["launch", "tiles", "stages"]
    ap.add_argument("--sweep-grid", default="launch", choices=grids, help="configs --sweep times")
    ap.add_argument("--head-dim", type=int, default=D, help="head width D (the goals are stated at 128)")
    ap.add_argument(
        "--sweep-configs",
        type=_decode_configs,
        default=None,
        help="launch configs for --sweep to time against the default instead of a grid: a JSON list of "
        'DecodeConfig fields, e.g. \'[{"block_n": 64, "num_warps": 8}]\'',
    )
    ap.add_argument("--sweep-points", default="", help="comma list of BxSxHkv for --sweep, e.g. 1x512x32,8x1024x32")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per method (median reported)")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    ap.add_argument("--points", choices=["all", "main", "small"], default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--no-graphs", action="store_true", help="time plain calls, not CUDA-graph replays")
    ap.add_argument(
        "--flush",
        choices=sorted(FLUSHES),
        default="zero",
        help="how the L2 is made cold before each timed call: zero (do_bench's, leaves dirty lines) or read",
    )
    args = ap.parse_args(argv)
    D = args.head_dim

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) for a CPU check of this script")
        return 2
    bench = timer(device, args.rep_ms, graphs=not args.no_graphs, flush=args.flush)

    def log(msg):
        print(msg, flush=True)

    t_start = time.time()
    info = env_info(device)
    log(f"device: {info}")
    copy_gbps = copy_bandwidth(device, bench)
    log(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    data = {"benchmark": "gpu_decode", "env": info, "copy_GBps": copy_gbps, "points": [], "argv": sys.argv[1:]}
    data["flush"] = args.flush
    data["head_dim"] = D
    data["timing"] = f"median of many calls, L2 flushed before each: {FLUSHES[args.flush]}; timed: " + (
        "plain calls" if args.no_graphs else "CUDA-graph replays, one graph per method (ours_rope_kv_eager: plain call)"
    )
    if args.sweep:
        pts = [p.split("x") for p in args.sweep_points.split(",") if p]
        if any(len(p) != 3 or not all(v.isdigit() for v in p) for p in pts):
            ap.error(f"--sweep-points takes BxSxHkv triples of integers, e.g. 1x512x32; got {args.sweep_points!r}")
        pts = [tuple(int(v) for v in p) for p in pts] or None
        data["sweep"] = run_sweep(
            device,
            bench,
            log,
            smoke=args.smoke,
            split_configs=args.split_configs,
            points=pts,
            which=args.sweep_which,
            grid=args.sweep_grid,
            configs=args.sweep_configs,
        )
        write_json(data, "gpu_decode.json", args.out)  # kept even if the main table is stopped later
    if not args.no_main:
        if args.smoke:
            pts = SMOKE_POINTS
        else:
            pts = {"main": [*MAIN_POINTS, GQA_POINT], "small": SMALL_POINTS}.get(
                args.points, [*MAIN_POINTS, GQA_POINT, *SMALL_POINTS]
            )
        for B, S, Hkv in pts:
            rec = run_point(B, S, Hkv, device, bench, args.rounds, log)
            data["points"].append(rec)
            errs = {n: f"{m['rel_err']:.1e}" for n, m in rec["methods"].items() if "rel_err" in m}
            ts = {n: round(m["us"], 1) for n, m in rec["methods"].items() if "us" in m}
            log(f"B={B} S={S} Hkv={Hkv}: err {errs}\n    us {ts}")
        if data["points"] and not args.smoke:
            data["goals"] = goals(data["points"], copy_gbps)
    if device.type == "cuda":
        data["compiled"] = compiled_report()
        regs = sorted({(r.get("n_regs"), r.get("num_warps"), r.get("shared")) for r in data["compiled"]}, key=str)
        log(f"compiled split-kernel variants (registers, warps, shared bytes): {regs}")
    data["eager_fallbacks"] = EAGER_FALLBACKS
    for line in EAGER_FALLBACKS:
        log(f"timed without a graph: {line}")
    data["wall_s"] = round(time.time() - t_start, 1)
    write_json(data, "gpu_decode.json", args.out)
    if data["points"]:
        log("\n" + table(data["points"], copy_gbps, args.flush))
    for name, g in data.get("goals", {}).items():
        vals = ", ".join(f"{v:.3f}" for v in g["values"])
        log(f"{name}: {'MET' if g['met'] else 'missed'} (target {g['target']}; {vals})")
    failed = [p for p in data["points"] if "failed" in p]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
