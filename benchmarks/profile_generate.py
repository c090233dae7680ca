"""Where one decode step of the ~1B generation benchmark spends its GPU time.

Builds the model of ``gpu_generate.py`` (random bf16 weights), fills a cache to ``--context``,
and profiles ``--steps`` replays of the CUDA-graphed static step, eager-compiled or not
(``--compile``). Prints, per step: the wall time (CUDA events), the summed kernel time, and
kernel time by kind (matrix products, the decode kernels, Inductor's fused kernels, other
elementwise kernels), then the profiler's table. Busy time below the wall time is the gap
between kernels inside the graph.

With the device-to-device copy bandwidth measured once, it also gives the bandwidth each kind
achieves on the bytes it must read: the matrix products on the weights (all but the input
embedding table), the decode kernel on the cache (B x S x bytes per token). A kind well below the
copy bandwidth is where the step loses its roofline fraction. ``--fuse`` profiles the fused
projections (``StaticDecoder(fuse=True)``); ``--prefill P`` also profiles one uncompiled prefill of
a ``P``-token prompt per variant (kernel time by kind and by name), as ``generate`` runs it.
Each qkvlab step also gets its lead-in (``lead_in``): the waited-for step beside its graph's
replay alone, and the host's time per call of the step and of each launch it makes, which
together say how much of a waited-for step is launch work with the GPU idle.
``--hf`` also profiles HF Llama's step on the same weights for the variants it has (QKV, GQA-8),
set up as ``gpu_generate_vs_hf.py`` times it, so its attention (SDPA) and matrix products get
the same split.

Run on the GPU machine from the repository root::

    PYTHONPATH=src:benchmarks python3 benchmarks/profile_generate.py --variants QKV,Q-K=V --compile --fuse \
        --hf --prefill 4096

The text goes to stdout and ``profile_generate_<mode>.txt``, the numbers to
``profile_generate_<mode>.json``, in ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchutil import env_info
from gpu_decode import copy_bandwidth, timer
from gpu_generate import ONE_B, SMOKE, build, fill_cache, release
from gpu_generate_vs_hf import HF_LLAMA, HFDecoder, hf_llama, weight_bytes
from qkvlab.attention.projections import fuse_projections
from qkvlab.models.decoding import StaticDecoder

KINDS = (  # first match wins: the attention kernels' names hold "cutlass" too
    ("decode kernel", ("_decode_split_kernel", "_decode_combine_kernel")),
    ("inductor fused", ("triton_",)),
    # SDPA's kernels, as HF's step runs them (flash, memory-efficient, cuDNN or the math path)
    ("attention", ("fmha", "flash", "attention", "cudnn", "aten::scaled_dot_product")),
    # the aten names are the CPU operators of --smoke
    ("matrix products", ("nvjet", "gemm", "gemv", "cutlass", "splitk", "splitK", "aten::linear", "aten::mm")),
)


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other kernels"


def median_us(fn, device, reps: int) -> float:
    """Median microseconds of ``fn()``: CUDA events on a GPU, a clock on the CPU (``--smoke``)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def host_us(fn, device, reps: int) -> float:
    """Mean microseconds the host spends in ``fn()``, calls run back to back and waited for only
    at the end: the launch work itself, where the GPU is busy with the calls before."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    spent = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return spent / reps * 1e6


def lead_in(dec: StaticDecoder, step, device, reps: int = 50) -> tuple[str, dict]:
    """Where a waited-for step's time goes before and around its graph: the median step and the
    median replay of its graph alone (inputs already in place), both waited for, and the host's
    microseconds per call of the step and of each launch the step makes (the token copy, the
    position fill, the replay). The waited step minus the waited replay is what the launches
    before the replay cost a step that nothing overlaps."""
    step()  # records the graph, where there is one
    waited_step = median_us(step, device, reps)
    token = dec.token.clone()  # a copy from the tensor itself would be skipped
    host = dict(
        step=host_us(step, device, reps),
        token_copy=host_us(lambda: dec.token.copy_(token), device, reps),
        position_fill=host_us(lambda: dec.pos.fill_(dec.cache.length), device, reps),
    )
    record = dict(waited_step_us=waited_step, waited_replay_us=None, host_us=host)
    line = f"  lead-in: waited step {waited_step:.0f} us"
    if dec.graph is not None:
        host["replay"] = host_us(dec.graph.replay, device, reps)
        record["waited_replay_us"] = median_us(dec.graph.replay, device, reps)
        line += f", waited replay alone {record['waited_replay_us']:.0f} us"
    line += "; host us a call: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in host.items())
    return line, record


def profiled(fn, device, reps: int):
    """A profile of ``reps`` calls: GPU kernels on CUDA, operators on the CPU (``--smoke``)."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof


def kernel_times(prof, reps: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per-repetition kernel time (us) by kind, kernel count by kind, and time by kernel name."""
    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    events = prof.events()
    cuda = any(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    for e in events:
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time
        elif not cuda and e.cpu_parent is None:  # --smoke: top-level operators stand in for kernels
            us = e.cpu_time_total
        else:
            continue
        by_kind[kind_of(e.name)] += us / reps
        count[kind_of(e.name)] += 1 / reps
        by_name[e.name] += us / reps
    return dict(by_kind), dict(count), dict(by_name)


def step_report(
    label: str, step, device, args, bw_gbps: float, weights: int, cache: int, record: dict
) -> tuple[str, dict]:
    """Time and profile one repeated decode ``step``; split its kernel time by kind, with the
    bandwidth the matrix products achieve on the ``weights`` bytes and the attention (qkvlab's
    decode kernel, or SDPA) on the ``cache`` bytes."""
    must_read = {"matrix products": weights, "decode kernel": cache, "attention": cache}
    for _ in range(3):
        step()
    wall = median_us(step, device, 20)
    prof = profiled(step, device, args.steps)
    by_kind, count, _ = kernel_times(prof, args.steps)
    busy = sum(by_kind.values())
    roofline_us = (weights + cache) / (bw_gbps * 1e3)
    lines = [
        f"{label}: step {wall:.0f} us wall, {busy:.0f} us in kernels, {sum(count.values()):.0f} kernels; "
        f"roofline {roofline_us:.0f} us ({100 * roofline_us / wall:.0f}% of the step)",
    ]
    kinds = {}
    for kind in sorted(by_kind, key=by_kind.get, reverse=True):
        row = dict(us=by_kind[kind], kernels=count[kind])
        line = f"  {kind:<16} {by_kind[kind]:8.0f} us  {count[kind]:5.0f} kernels"
        if kind in must_read and by_kind[kind] > 0:
            row["bytes"] = must_read[kind]
            row["gbps"] = must_read[kind] / by_kind[kind] / 1e3
            share = 100 * row["gbps"] / bw_gbps
            line += f"  {row['gbps']:6.0f} GB/s on {must_read[kind] / 1e9:.2f} GB ({share:.0f}% of copy)"
        kinds[kind] = row
        lines.append(line)
    lines.append(f"  {'gaps':<16} {wall - busy:8.0f} us  (wall minus kernel time)")
    if busy > wall:
        lines.append(
            "  (kernels overlap: a programmatic dependent is timed from its launch, waits included; "
            "--no-pdl times them apart)"
        )
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    record.update(what="decode step", step_us=wall, kernel_us=busy, roofline_us=roofline_us, kinds=kinds)
    return "\n".join(lines), record


def profile_case(variant: str, B: int, S: int, args, device, bw_gbps: float) -> tuple[str, dict]:
    model = build(variant, args.shape, S + 64, device, torch.bfloat16)
    cache = model.new_cache(B, S + 32)
    fill_cache(cache, S, torch.Generator(device=device).manual_seed(2))
    token = torch.zeros(B, dtype=torch.long, device=device)
    dec = StaticDecoder(
        model,
        cache,
        cuda_graph="auto",
        warmup=3,
        compile=args.compile,
        fuse=args.fuse,
        gemv=False if args.gemv == "none" else args.gemv,
    )

    def step():
        cache.reset()
        cache.advance(S)  # the same position every time: the profile is of one step, repeated
        dec.step(token)

    # What a step must read: the weights (the embedding table one row a step) and the filled cache.
    weights = weight_bytes(model, model.wte.weight, model.lm_head.weight)
    cache_bytes = B * S * cache.bytes_per_token
    mode = (
        ("compiled + graph" if args.compile else "graph")
        + (", fused" if args.fuse else "")
        + ("" if args.gemv == "none" else f", gemv {args.gemv}")
    )
    record = dict(system="qkvlab", variant=variant, B=B, context=S, mode=mode)
    text, record = step_report(
        f"{variant} B={B} S={S} ({mode})", step, device, args, bw_gbps, weights, cache_bytes, record
    )
    line, record["lead_in"] = lead_in(dec, step, device)
    out = f"{text}\n{line}", record
    dec = cache = model = None
    release(device)
    return out


def profile_hf_case(variant: str, B: int, S: int, args, device, bw_gbps: float) -> tuple[str, dict]:
    """HF Llama's step with the same weights, as ``gpu_generate_vs_hf.py`` times it (sdpa,
    ``StaticCache``, ``forward`` compiled with ``reduce-overhead``; uncompiled under ``--smoke``)."""
    model = build(variant, args.shape, S + 64, device, torch.bfloat16)
    hf = hf_llama(model)
    wbytes = weight_bytes(hf, hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
    model = None
    mode = "reduce-overhead" if device.type == "cuda" else None
    dec = HFDecoder(hf, B, S + 32, mode)
    dec.fill(S, torch.Generator(device=device).manual_seed(2))
    token = torch.zeros(B, dtype=torch.long, device=device)

    def step():
        dec.seek(S)
        dec.step(token)

    record = dict(system="hf-llama", variant=variant, B=B, context=S, mode=mode or "eager")
    label = f"HF Llama {variant} B={B} S={S} ({mode or 'eager'})"
    out = step_report(label, step, device, args, bw_gbps, wbytes, B * S * dec.bytes_per_token(), record)
    dec = hf = None
    if mode:
        torch._dynamo.reset()
    release(device)
    return out


def profile_prefill(variant: str, P: int, args, device) -> tuple[str, dict]:
    """One uncompiled prefill of a ``P``-token prompt (as ``generate`` runs it): kernel time by kind and name."""
    model = build(variant, args.shape, P + 64, device, torch.bfloat16)
    if args.fuse:
        fuse_projections(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, P), device=device)
    cache = model.new_cache(1, P)

    def run():
        cache.reset()
        model.prefill(prompt, cache)

    with torch.no_grad():
        for _ in range(2):
            run()
        wall = median_us(run, device, 5)
        prof = profiled(run, device, 1)
    by_kind, count, by_name = kernel_times(prof, 1)
    lines = [
        f"prefill {variant} P={P}{' (fused)' if args.fuse else ''}: {wall:.0f} us wall "
        f"({P / wall * 1e6:,.0f} tokens/s), {sum(by_kind.values()):.0f} us in kernels"
    ]
    lines += [
        f"  {k:<16} {v:8.0f} us  {count[k]:5.0f} kernels" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
    ]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[: args.rows]
    lines += [f"    {v:8.0f} us  {k[:110]}" for k, v in top]
    record = dict(
        what="prefill", variant=variant, prompt=P, fused=args.fuse, wall_us=wall, kinds=by_kind, top=dict(top)
    )
    model = cache = None
    release(device)
    return "\n".join(lines), record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="QKV,Q-K=V")
    ap.add_argument("--points", default="1x32768", help="comma list of BATCHxCONTEXT")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fuse", action="store_true", help="fused projections, as StaticDecoder(fuse=True)")
    ap.add_argument("--gemv", choices=("none", "kernel", "inductor"), default="none", help="as StaticDecoder(gemv=...)")
    ap.add_argument("--hf", action="store_true", help="also profile HF Llama's step (QKV, GQA-8) on the same weights")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: a check of the script")
    ap.add_argument("--out", default=None, help="folder for the text and JSON (default $OUT)")
    ap.add_argument("--prefill", default="", help="comma list of prompt lengths to profile a prefill of")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument(
        "--no-pdl",
        action="store_true",
        help="launch qkvlab's kernels plainly (QKVLAB_PDL=0), so that kernel times do not overlap",
    )
    args = ap.parse_args()
    if args.no_pdl:
        os.environ["QKVLAB_PDL"] = "0"
    if args.smoke:  # a CPU check of the script: tiny model, no claims
        args.shape, args.points, args.prefill, args.steps = SMOKE, "1x40", "24", 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke for a CPU check of the script)")
    else:
        args.shape, device = ONE_B, torch.device("cuda")
    bw = copy_bandwidth(device, timer(device, rep_ms=200))
    print(f"copy bandwidth {bw:,.0f} GB/s", flush=True)
    texts, records = [], []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        for p in args.points.split(","):
            B, S = (int(v) for v in p.split("x"))
            text, record = profile_case(variant, B, S, args, device, bw)
            print(text, flush=True)
            texts.append(text)
            records.append(record)
            if args.hf and variant in HF_LLAMA:
                text, record = profile_hf_case(variant, B, S, args, device, bw)
                print(text, flush=True)
                texts.append(text)
                records.append(record)
        for P in (int(v) for v in args.prefill.split(",") if v):
            text, record = profile_prefill(variant, P, args, device)
            print(text, flush=True)
            texts.append(text)
            records.append(record)
    out = args.out or os.environ.get("OUT")
    if out:
        tag = ("compiled" if args.compile else "graph") + ("_fused" if args.fuse else "")
        Path(out, f"profile_generate_{tag}.txt").write_text("\n\n".join(texts) + "\n")
        doc = dict(env=env_info(device), copy_gbps=bw, args=vars(args), records=records)
        Path(out, f"profile_generate_{tag}.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
