"""GPU benchmark: KV-cached generation of a ~1B llama-recipe model, QKV vs Q-K=V vs GQA-8 vs Q-GQA-8.

Goals: batch-1 decode speed (Q-K=V tokens/s over QKV's: >= 1.45x at 32k context and >= 1.1x
at 4k) and cache-budget capacity (cached tokens that fit a fixed memory budget: >= 1.95x QKV's).

Model: 16 layers, d_model 2048, 32 heads of 64 (Llama-3.2-1B's attention shape), SwiGLU
d_ff 8192, RoPE, RMSNorm, GPT-2 vocabulary (50,304): 1.28B parameters for QKV (untied embedding
and head). Random weights in bf16 (speed does not depend on the values). For each variant, batch (1, 16) and
context (4k, 32k), the cache is filled with random entries up to the context (no prefill is
timed; a 32k prefill at batch 16 would need the full logits), then decode steps are timed
with CUDA events (median of ``--steps`` steps, after warm-up):

- ``eager``: ``model.decode_one`` (the dynamic path: SDPA, or the Triton kernel for K=V
  with RoPE), one Python-launched kernel sequence per token;
- ``graph``: :class:`qkvlab.models.decoding.StaticDecoder`, the static step (device position,
  whole-cache read with per-row lengths) replayed as a CUDA graph;
- ``compiled`` (with ``--compile``): the same static step through ``torch.compile`` (Inductor
  fuses the small kernels; the decode kernel stays one opaque operator), then replayed as a
  CUDA graph. The first step's wall time, compile included, is recorded as ``compile_s``.

Before timing, the graph step is checked against the eager step on the same cache (logits,
relative error in bf16). For the cache budget each variant allocates the largest cache that
fits ``--budget-gib`` (measured from the real allocation) and reports cached tokens and the
ratio to QKV. With ``--budget-decode`` each variant is also timed at the largest batch whose
cache of ``--budget-context`` tokens (plus the steps' headroom) fits that budget: the serving
question "how many tokens/s does a fixed amount of cache memory give", where a smaller cache
buys rows.

Run on the GPU machine from the repository root::

    PYTHONPATH=src python3 benchmarks/gpu_generate.py --out benchmarks/results/gpu_generate.json
    PYTHONPATH=src python3 benchmarks/gpu_generate.py --compile --budget-decode --points none   # tokens/s in 16 GiB
    PYTHONPATH=src python3 benchmarks/gpu_generate.py --smoke      # CPU, tiny model, eager only

A smoke run writes its JSON only when given ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from benchutil import env_info, write_json
from qkvlab.attention.cache import KVCache
from qkvlab.models import GPT, GPTConfig
from qkvlab.models.decoding import StaticDecoder

VARIANTS = ["QKV", "Q-K=V", "GQA-8", "Q-GQA-8"]
ONE_B = dict(recipe="llama", n_layers=16, d_model=2048, n_heads=32, d_ff=8192, vocab_size=50304)
SMOKE = dict(recipe="llama", n_layers=2, d_model=64, n_heads=8, d_ff=128, vocab_size=97)


def build(variant: str, shape: dict, max_len: int, device, dtype) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(variant=variant, max_seq_len=max_len, **shape))
    return model.to(dtype).eval()


def fill_normal(t: torch.Tensor, gen: torch.Generator) -> None:
    """Unit normal entries into ``t``, drawn in its logical order, so that two caches filled from
    the same generator hold the same values whatever their memory layouts (``normal_`` on a
    strided view promises no order)."""
    for b in range(t.shape[0]):  # a row at a time: a 32k cache of 16 rows leaves no room for a whole copy
        t[b].copy_(torch.randn(t.shape[1:], generator=gen, device=t.device, dtype=t.dtype))


def fill_cache(cache: KVCache, length: int, gen: torch.Generator) -> None:
    """Random entries in the first ``length`` positions (unit-scale, like normed activations)."""
    for layer in cache.layers:
        for t in {id(layer.k): layer.k, id(layer.v): layer.v}.values():
            fill_normal(t[:, :, :length], gen)
    cache.reset()
    cache.advance(length)


def time_steps(step, token, steps: int, device) -> float:
    """Median seconds of one decode step."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(token)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step(token)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps_in_a_row(step, token, steps: int, device) -> float:
    """Mean seconds of one decode step over ``steps`` steps run back to back, with one wait at the
    end. :func:`time_steps` waits for every step, so each of its times also holds the host's work
    of launching that step (its input copies and the graph's launch) while the GPU idles; a
    generation loop that does not wait for each token (``qkvlab``'s ``generate`` waits every few
    steps, where it has stop conditions) overlaps that work with the step before."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            step(token)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step(token)
    return (time.perf_counter() - t0) / steps


def cache_len(S: int, args) -> int:
    """Positions a decode case allocates: the context, then room for every step it times."""
    return S + args.warmup + 2 * args.steps + 8


def decode_case(model, variant, B, S, args, device) -> dict:
    steps = args.steps
    max_len = cache_len(S, args)
    gen = torch.Generator(device=device).manual_seed(1)
    row = dict(variant=variant, B=B, context=S)
    try:
        cache = model.new_cache(B, max_len)
    except torch.OutOfMemoryError:
        row["error"] = "OOM allocating the cache"
        release(device)  # the layers allocated before the failure
        return row
    row["cache_GiB"] = cache.nbytes / 2**30
    token = torch.randint(0, model.config.vocab_size, (B,), device=device, generator=gen)

    # eager (dynamic path)
    fill_cache(cache, S, gen)
    for _ in range(args.warmup):
        model.decode_one(token, cache)
    fill_cache(cache, S, gen)
    row["eager_step_s"] = time_steps(lambda t: model.decode_one(t, cache), token, steps, device)

    # static step: check against eager at the same position, then time (graph on CUDA)
    fill_cache(cache, S, gen)
    ref = model.decode_one(token, cache).float()
    cache.reset()
    cache.advance(S)
    dec = StaticDecoder(model, cache, cuda_graph="auto" if not args.no_graph else False, warmup=args.warmup)
    got = dec.step(token).float()
    row["graph_rel_err"] = float((got - ref).norm() / ref.norm())
    row["graph_used"] = dec.graph is not None
    row["static_step_s"] = time_steps(dec.step, token, steps, device)
    modes = ["eager", "static"]
    if args.compile:
        dec = None
        release(device)
        cache.reset()
        cache.advance(S)
        graph = "auto" if not args.no_graph else False
        dec = StaticDecoder(model, cache, cuda_graph=graph, warmup=args.warmup, compile=args.compile_mode)
        t0 = time.perf_counter()
        got = dec.step(token).float()
        row["compile_s"] = time.perf_counter() - t0
        row["compile_mode"] = args.compile_mode
        row["compiled_rel_err"] = float((got - ref).norm() / ref.norm())
        row["compiled_step_s"] = time_steps(dec.step, token, steps, device)
        modes.append("compiled")
    for mode in modes:
        row[f"{mode}_tokens_per_s"] = B / row[f"{mode}_step_s"]
    dec = cache = None  # drop the references before collecting
    release(device)
    return row


def release(device) -> None:
    """Free what the last case held (graph pools and caches sit in reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_eager(model, variant: str, B: int, S: int, device, out_dir: str | None) -> str:
    """torch.profiler table of a few eager decode steps (where the eager step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(B, S + 16)
    fill_cache(cache, S, torch.Generator(device=device).manual_seed(2))
    token = torch.zeros(B, dtype=torch.long, device=device)
    for _ in range(3):
        model.decode_one(token, cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            model.decode_one(token, cache)
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cpu_time_total", row_limit=18)
    text += "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    # The static step without a graph: its GPU kernels are what a graph replay runs.
    cache.reset()
    cache.advance(S)
    dec = StaticDecoder(model, cache, cuda_graph=False, warmup=1)
    dec.step(token)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            dec.step(token)
        torch.cuda.synchronize()
    text += "\n\nstatic step (4 steps, no graph), by GPU time\n"
    text += prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    dec = None
    if out_dir:
        Path(out_dir, f"profile_eager_{variant.replace('=', '').replace('-', '_')}.txt").write_text(text)
    del cache
    release(device)
    return text


def budget_case(model, budget_bytes: int, device) -> dict:
    """Largest batch x context cache that fits ``budget_bytes`` (context = model max), measured."""
    probe = model.new_cache(1, 1)
    per_token = probe.bytes_per_token
    tokens = budget_bytes // per_token
    length = min(tokens, model.config.max_seq_len)
    batch = max(1, tokens // length)
    cache = KVCache.for_model(model, batch, length)
    out = dict(bytes_per_token=per_token, measured_bytes_per_token=cache.measured_bytes_per_token)
    out.update(batch=batch, length=length, cached_tokens=batch * length, nbytes=cache.nbytes)
    del cache
    return out


def budget_batch(per_token: int, budget_bytes: int, S: int, args) -> int:
    """Rows of ``S`` context (plus the timed steps' headroom) whose cache fits ``budget_bytes``."""
    return budget_bytes // (per_token * cache_len(S, args))


def partial(env: dict, rows: list, budget: dict, args) -> None:
    """What the run has measured so far, written after each case (a long run that is cut keeps it)."""
    doc = {"benchmark": "gpu_generate", "env": env, "partial": True, "rows": rows, "budget": budget}
    write_json(doc, "gpu_generate.json", args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, eager only (a check of the script)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-graph", action="store_true", help="time the static step without CUDA graphs")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd static step")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of --compile")
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument(
        "--budget-decode",
        action="store_true",
        help="also time each variant at the largest batch whose --budget-context cache fits --budget-gib",
    )
    ap.add_argument("--budget-context", type=int, default=32768, help="context of the --budget-decode point")
    ap.add_argument("--profile", default="", help="comma list of variants whose eager decode steps are profiled first")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--points",
        default="",
        help="comma list of BATCHxCONTEXT, e.g. 1x4096,1x32768 (default: all four; 'none' with --budget-decode)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    shape = SMOKE if args.smoke else ONE_B
    points = [(1, 64), (2, 96)] if args.smoke else [(1, 4096), (1, 32768), (16, 4096), (16, 32768)]
    if args.points and not args.smoke:
        points = [] if args.points == "none" else [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    if not points and not args.budget_decode:
        raise SystemExit("--points none times nothing without --budget-decode")
    if args.smoke:
        args.steps, args.warmup, args.budget_gib, args.budget_context = 3, 1, 1 / 1024, 48
    dtype = torch.float32 if args.smoke else torch.bfloat16
    env = env_info(device)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env.get('triton')}")
    max_ctx = max([s for _, s in points] + ([args.budget_context] if args.budget_decode else []))
    rows, budget = [], {}
    for variant in args.variants.split(","):
        if args.compile:
            torch._dynamo.reset()  # each variant compiles afresh (one cache entry per shape set)
        model = build(variant, shape, max_ctx + 2 * args.steps + args.warmup + 16, device, dtype)
        if variant in args.profile.split(",") and device.type == "cuda":
            print(profile_eager(model, variant, 1, 4096, device, os.environ.get("OUT")), flush=True)
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        for B, S in points:
            row = decode_case(model, variant, B, S, args, device)
            row["params"] = n_params
            rows.append(row)
            if not args.smoke:
                partial(env, rows, budget, args)
            if "error" in row:
                print(f"{variant:<8} B={B:<3} S={S:<6} {row['error']}", flush=True)
                continue
            static = "static (graph)" if row["graph_used"] else "static"
            print(
                f"{variant:<8} B={B:<3} S={S:<6} cache {row['cache_GiB']:6.2f} GiB  "
                f"eager {row['eager_tokens_per_s']:9.1f} tok/s  {static} {row['static_tokens_per_s']:9.1f} tok/s  "
                f"check rel.err {row['graph_rel_err']:.1e}",
                flush=True,
            )
            if args.compile:
                print(
                    f"{'':<8} compiled {row['compiled_tokens_per_s']:9.1f} tok/s ({row['compile_s']:.0f} s to compile "
                    f"and run the first step)  check rel.err {row['compiled_rel_err']:.1e}",
                    flush=True,
                )
        budget[variant] = budget_case(model, int(args.budget_gib * 2**30), device)
        if args.budget_decode:
            B = budget_batch(
                budget[variant]["bytes_per_token"], int(args.budget_gib * 2**30), args.budget_context, args
            )
            if B < 1:
                raise SystemExit(
                    f"--budget-gib {args.budget_gib:g} holds no {variant} row of {args.budget_context} tokens: "
                    "raise --budget-gib or lower --budget-context"
                )
            row = decode_case(model, variant, B, args.budget_context, args, device)
            budget[variant]["decode"] = row
            if "error" in row:
                print(f"{variant:<8} budget B={B} S={args.budget_context} {row['error']}", flush=True)
            else:
                extra = f"  compiled {row['compiled_tokens_per_s']:9.1f} tok/s" if args.compile else ""
                print(
                    f"{variant:<8} budget B={B:<3} S={args.budget_context:<6} cache {row['cache_GiB']:6.2f} GiB  "
                    f"static {row['static_tokens_per_s']:9.1f} tok/s{extra}  check rel.err {row['graph_rel_err']:.1e}",
                    flush=True,
                )
            if not args.smoke:
                partial(env, rows, budget, args)
        del model
        release(device)
    # bf16 logits of a 16-layer model computed two correct ways (the graph step's kernels against
    # the eager step's SDPA) differ by a few percent; Inductor's fused kernels round differently
    # again, so the compiled step gets a looser bound.
    tol, tol_compiled = (1e-4, 1e-4) if args.smoke else (3e-2, 5e-2)
    checked = rows + [b["decode"] for b in budget.values() if "decode" in b]
    bad = [r for r in checked if r.get("graph_rel_err", 0) > tol or r.get("compiled_rel_err", 0) > tol_compiled]
    ratios = {}
    for B, S in points:
        by = {r["variant"]: r for r in rows if r["B"] == B and r["context"] == S and "error" not in r}
        if "QKV" in by:
            for v in VARIANTS[1:]:
                if v in by:
                    for mode in ("eager", "static", "compiled"):
                        if f"{mode}_tokens_per_s" not in by[v] or f"{mode}_tokens_per_s" not in by["QKV"]:
                            continue
                        key = f"B={B} S={S} {mode}: {v} / QKV"
                        ratios[key] = by[v][f"{mode}_tokens_per_s"] / by["QKV"][f"{mode}_tokens_per_s"]
    print("\ndecode tokens/s ratios vs QKV")
    for k, v in ratios.items():
        print(f"  {k:<40} {v:6.3f}x")
    print(f"\ncache-budget capacity: cached tokens in {args.budget_gib:g} GiB")
    for v, b in budget.items():
        vs = f"  {b['cached_tokens'] / budget['QKV']['cached_tokens']:5.2f}x QKV" if "QKV" in budget else ""
        print(f"  {v:<8} {b['cached_tokens']:>12,} tokens ({b['batch']} x {b['length']}){vs}")
    base = budget.get("QKV", {}).get("decode", {})
    if args.budget_decode and base and "error" not in base:
        print(f"\ndecode tokens/s at the largest batch of {args.budget_context}-token rows in {args.budget_gib:g} GiB")
        for v, b in budget.items():
            row = b.get("decode", {})
            if "error" in row:
                continue
            for mode in ("eager", "static", "compiled"):
                key = f"{mode}_tokens_per_s"
                if key in row and key in base:
                    ratios[f"budget {args.budget_gib:g} GiB S={args.budget_context} {mode}: {v} / QKV"] = (
                        row[key] / base[key]
                    )
                    print(
                        f"  {v:<8} B={row['B']:<3} {mode:<8} {row[key]:10.1f} tok/s  {row[key] / base[key]:5.2f}x QKV"
                    )
    doc = dict(
        benchmark="gpu_generate",
        env=env,
        model=shape,
        dtype=str(dtype),
        rows=rows,
        ratios=ratios,
        budget_GiB=args.budget_gib,
        budget_context=args.budget_context if args.budget_decode else None,
        budget=budget,
    )
    if not args.smoke or args.out:
        for path in write_json(doc, "gpu_generate.json", args.out):
            print(f"wrote {path}")
    if bad:
        raise SystemExit(f"static step differs from eager beyond {tol} (compiled: {tol_compiled}): {bad}")


if __name__ == "__main__":
    main()
