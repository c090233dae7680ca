"""Where a generated token's time goes beyond its step: ``model.stream`` and ``generate`` profiled.

A whole ``generate`` runs more than the decode steps: between two steps it samples the next
token, copies it out (streaming) and into the next step's input. This script times, on the
1.28B llama shape of ``gpu_generate.py`` (random bf16 weights, compiled, fused, GEMV kernel),
each of these calls per token, as the difference of a long and a short call (so that the
prefill and the graph's capture cancel):

- ``stream+text``: ``model.stream`` with a tokenizer, every token read and decoded on the host;
- ``stream``: ``model.stream`` without one;
- ``generate``: ``model.generate``;
- ``steps``: the greedy static step alone (``StaticDecoder(greedy=True)``, each step fed its own
  pick, back to back, no loop around it): the floor a whole call's token stands on.

``--calls`` picks some of them. ``--temperature``, ``--top-k`` and ``--top-p`` make the streams
and ``generate`` sample (``steps`` stays greedy), which prices the sampling between steps.

Then it profiles one call (``--profile-call``, a streamed one with text by default) and splits
the GPU's timeline at each step's first kernel (``--step-start``): per token, the period from
one step to the next, the time some kernel runs (``busy``), what runs after the step's last
matrix product (sampling, copies) and the idle gaps between kernels, by the pair of kernels
around them; and the host's CUDA calls per token.

    PYTHONPATH=src:benchmarks python3 benchmarks/profile_stream.py --out $OUT
    PYTHONPATH=src:benchmarks python3 benchmarks/profile_stream.py --smoke   # CPU, tiny model: the plumbing
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchutil import env_info
from gpu_generate import ONE_B, SMOKE, build
from qkvlab.models.decoding import StaticDecoder

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cuda_runtime", "cuda_driver")
CALLS = ("stream+text", "stream", "generate", "steps")


class TextSink:
    """A tokenizer whose text is one character a token: the host's decoding, cheaply."""

    def decode(self, ids) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def split_trace(events: list[dict], step_start: str, n_tokens: int, skip: int = 5) -> dict:
    """The per-token split of a profiled call's GPU timeline (Chrome trace events): steps begin
    at kernels whose name starts with ``step_start``; the first and last ``skip`` steps are left
    out (the call's start and end). Durations in microseconds."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    starts = [i for i, e in enumerate(gpu) if e["name"].startswith(step_start)]
    out: dict = {"gpu_events": len(gpu), "step_starts": len(starts)}
    pairs = list(zip(starts[skip:-skip], starts[skip + 1 : len(starts) - skip + 1], strict=False))
    host: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST_CATS:
            host.setdefault(e["name"], []).append(e["dur"])
    out["host_calls_per_token"] = {
        k: dict(median_us=statistics.median(v), per_token=len(v) / n_tokens, us_per_token=sum(v) / n_tokens)
        for k, v in sorted(host.items(), key=lambda kv: -sum(kv[1]))
    }
    if not pairs:
        return out
    periods, busies, after, gaps = [], [], {}, {}
    for a, b in pairs:
        window = gpu[a:b]
        periods.append(gpu[b]["ts"] - gpu[a]["ts"])
        end, busy = window[0]["ts"], 0.0
        for e in window:  # kernels may overlap (dependent launches): count covered time once
            busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
            end = max(end, e["ts"] + e["dur"])
        busies.append(busy)
        for prev, nxt in zip(window, [*window[1:], gpu[b]], strict=True):
            gap = nxt["ts"] - (prev["ts"] + prev["dur"])
            if gap > 1.0:
                key = f"{prev['name'][:50]} -> {nxt['name'][:50]}"
                gaps[key] = gaps.get(key, 0.0) + gap
        products = [i for i, e in enumerate(window) if "gemv" in e["name"] or "gemm" in e["name"]]
        for e in window[products[-1] + 1 :] if products else []:
            after.setdefault(e["name"][:60], []).append(e["dur"])
    n = len(pairs)
    out.update(
        tokens=n,
        period_us=statistics.median(periods),
        busy_us=statistics.median(busies),
        after_last_product={k: dict(median_us=statistics.median(v), per_token=len(v) / n) for k, v in after.items()},
        gaps_us_per_token=dict(sorted(((k, v / n) for k, v in gaps.items()), key=lambda kv: -kv[1])),
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="Q-GQA-8")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--long", type=int, default=208, help="new tokens of the long call")
    ap.add_argument("--short", type=int, default=8, help="new tokens of the short call")
    ap.add_argument("--profile-tokens", type=int, default=40, help="new tokens of the profiled call")
    ap.add_argument("--step-start", default="triton_poi_fused_embedding", help="name prefix of a step's first kernel")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, no graphs: the script's plumbing")
    ap.add_argument("--calls", default="stream+text,stream,generate,steps", help="comma list of the calls to time")
    ap.add_argument("--profile-call", default="stream+text", help="the call to profile (one of --calls' names)")
    ap.add_argument("--temperature", type=float, default=0.0, help="stream's and generate's (0: greedy)")
    ap.add_argument("--top-k", type=int, default=None, help="stream's and generate's top_k")
    ap.add_argument("--top-p", type=float, default=None, help="stream's and generate's top_p")
    ap.add_argument("--out", default=None, help="folder for profile_stream.json")
    args = ap.parse_args(argv)
    names = [c for c in args.calls.split(",") if c]
    bad = [c for c in [*names, args.profile_call] if c not in CALLS]
    if bad:
        ap.error(f"{bad[0]!r} is not a call; the calls are {', '.join(CALLS)}")
    if args.smoke:
        device, shape, args.context, args.long, args.short, args.profile_tokens = "cpu", SMOKE, 12, 10, 2, 12
        kw = dict(cuda_graph=False)
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke for a CPU check of the script)")
    else:
        device, shape = "cuda", ONE_B
        kw = dict(compile="default", fuse=True, gemv="kernel")
    # the calls sample as asked (steps stays greedy: the floor a token stands on)
    kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    device = torch.device(device)
    room = args.context + max(args.long, args.profile_tokens)
    model = build(args.variant, shape, room, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, shape["vocab_size"], (1, args.context), device=device, generator=g)
    cache = model.new_cache(1, room)

    def stream(n: int, text: bool):
        steps = model.stream(prompt, n, cache=cache, tokenizer=TextSink() if text else None, **kw)
        for _ in steps:
            pass
        return steps.result

    decoder = None

    def steps(n: int):
        """The prefill, then ``n`` greedy static steps back to back (one decoder for all calls)."""
        nonlocal decoder
        cache.reset()
        logits = model.prefill(prompt, cache)
        if decoder is None:
            options = ("cuda_graph", "compile", "fuse", "gemv")
            decoder = StaticDecoder(model, cache, greedy=True, **{k: v for k, v in kw.items() if k in options})
        decoder.step(logits.argmax(-1), copy=False)
        for _ in range(n - 1):
            decoder.step(decoder.next_token, copy=False)

    every = {
        "stream+text": lambda n: stream(n, True),
        "stream": lambda n: stream(n, False),
        "generate": lambda n: model.generate(prompt, n, cache=cache, **kw),
        "steps": steps,
    }
    calls = {c: every[c] for c in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for call in calls.values():  # compiles and captures once each
        call(args.short)
    rates = {}
    for name, call in calls.items():
        took = {}
        for n in (args.short, args.long):
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                call(n)
                sync()
                times.append(time.perf_counter() - t0)
            took[n] = statistics.median(times)
        us = (took[args.long] - took[args.short]) / (args.long - args.short) * 1e6
        # (on a loaded CPU the long call can come out no slower than the short one: no rate then)
        rate = 1e6 / us if us > 0 else float("nan")
        rates[name] = dict(us_per_token=us, tokens_per_s=rate)
        print(f"{name:12s} {us:8.1f} us a token ({rate:,.1f} tok/s)", flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    every[args.profile_call](args.short)  # compiled and captured before the profile, if not timed above
    sync()
    with profile(activities=activities) as prof:
        every[args.profile_call](args.profile_tokens)
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    split = split_trace(events, args.step_start, args.profile_tokens)
    if "period_us" in split:
        print(f"per token on the GPU: period {split['period_us']:.1f} us, busy {split['busy_us']:.1f} us")
        print("after the step's last product, per token:")
        for k, v in split["after_last_product"].items():
            print(f"  {k:60s} {v['median_us']:7.2f} us x{v['per_token']:.1f}")
        print("gaps over 1 us between kernels, per token:")
        for k, v in list(split["gaps_us_per_token"].items())[:10]:
            print(f"  {v:7.2f} us  {k}")
    else:
        print(f"{split['gpu_events']} GPU events, {split['step_starts']} step starts: no per-token split")
    print("host CUDA calls, per token:")
    for k, v in list(split["host_calls_per_token"].items())[:10]:
        print(f"  {k:40s} median {v['median_us']:8.2f} us x{v['per_token']:.1f}  {v['us_per_token']:8.1f} us a token")
    if args.out:
        doc = dict(benchmark="profile_stream", environment=env_info(device), args=vars(args), rates=rates, split=split)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_stream.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
