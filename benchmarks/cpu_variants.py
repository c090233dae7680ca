"""CPU benchmark: what does each Q/K/V sharing variant cost to train and to decode, next to QKV?

For every variant of one small preset (by default the paper's eight: QKV, Q-K=V, Q=K-V,
Q=K=V, GQA-4, MQA, Q-GQA-4, Q-MQA), in one run and on the same inputs, this measures

1. a training step: forward + backward of the cross-entropy loss on random tokens
   (batch ``--batch`` x ``--seq-len``, ``model.train()``, dropout 0, no optimizer step);
2. cached decoding: prefill a ``--prompt-len`` prompt into a :class:`~qkvlab.KVCache`, then
   ``--decode-steps`` one-token steps with ``model.decode_one`` (``model.eval()``, no grad);

and records parameters (total, attention) and KV-cache bytes per token (analytic and
measured from the allocated tensors). Every metric is also given as a ratio to QKV: for
times, variant time / QKV time (below 1 is faster), taken within each round and then the
median over rounds, so that a slow round (another process, clock changes) cancels out; for
the cache, variant bytes / QKV bytes (exactly 0.5 for the K=V variants at full heads).

Fairness: one seed for every model's initialisation and one set of input tokens for all;
``--warmup`` untimed rounds first; then ``--repeats`` rounds in which every variant runs
once, in order (round-robin), so drift in clock speed or cache state hits all alike.
Reported: the median over repeats (and the best, i.e. the minimum time); the raw times go
to the JSON file. Decode steps feed fixed random tokens (the same for every variant) rather
than each model's own argmax, so each variant processes identical inputs; the cost of a
step does not depend on the token. Before any timing, each model's cached greedy decode is
checked against full recomputation (``model.generate(..., use_cache=False)``); the run
stops if they differ.

Run (from the repository root)::

    python benchmarks/cpu_variants.py            # or: make bench   (about 2-3 minutes on 2 cores)
    python benchmarks/cpu_variants.py --quick    # smoke test, a few seconds
    python benchmarks/cpu_variants.py --preset tiny --variants "QKV,Q-K=V,Q-MQA" --threads 1

Results go to ``benchmarks/results/cpu_variants.json`` (``--out``), written atomically.

Allocator: a training step of a 50k-vocabulary model allocates and frees about a gigabyte
(logits and their gradient). glibc hands such blocks back to the kernel on free, so every step
pays for hundreds of thousands of page faults, which on a small machine add a third to the
step time and make it jump between runs. On glibc the benchmark therefore keeps freed memory
in the process (``mallopt``: no mmap'd blocks, no trimming), for every variant alike;
``--system-malloc`` turns this off. The JSON records which was used.

Head sharing needs enough query heads: a preset with 4 heads would turn GQA-4 into plain MHA
(the config normalises it to QKV). Such a row is then a second measurement of the same model,
a handy noise control; the table marks it as e.g. "QKV (as GQA-4)".
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import qkvlab
from qkvlab.attention.cache import KVCache
from qkvlab.costs import count_params, macs
from qkvlab.errors import ConfigError
from qkvlab.models import GPT, PRESETS, get_preset, paper_variants

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu_variants.json"
QUICK_OUT = Path(tempfile.gettempdir()) / "qkvlab_cpu_variants_quick.json"

# Sizes: the default run takes 2-3 minutes on a 2-core CPU; --quick a few seconds.
DEFAULTS: dict[str, Any] = dict(
    preset="gpt2-3m", batch=8, seq_len=128, decode_steps=64, prompt_len=32, repeats=9, warmup=2
)
QUICK: dict[str, Any] = dict(preset="tiny", batch=2, seq_len=32, decode_steps=8, prompt_len=8, repeats=2, warmup=1)

# The correctness check: a short greedy generation, cached vs recomputed.
CHECK_ROWS, CHECK_PROMPT, CHECK_NEW = 2, 8, 16

console = Console() if sys.stdout.isatty() else Console(width=170)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help=f"model shape (default {DEFAULTS['preset']}; --quick: {QUICK['preset']})")
    p.add_argument("--variants", help="comma-separated variants (default: the paper's list for the preset)")
    p.add_argument("--batch", type=int, help=f"batch size, training and decode (default {DEFAULTS['batch']})")
    p.add_argument("--seq-len", type=int, help=f"training sequence length (default {DEFAULTS['seq_len']})")
    p.add_argument("--decode-steps", type=int, help=f"timed one-token steps (default {DEFAULTS['decode_steps']})")
    p.add_argument("--prompt-len", type=int, help=f"prefill length before decoding (default {DEFAULTS['prompt_len']})")
    p.add_argument("--repeats", type=int, help=f"timed round-robin rounds (default {DEFAULTS['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed rounds first (default {DEFAULTS['warmup']})")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and inputs (default 0)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO)}; "
                   f"--quick: {QUICK_OUT})")  # fmt: skip
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings as they are")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (explicit options still win)")
    args = p.parse_args(argv)

    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    args.out = args.out.resolve()
    if args.variants is None:
        args.variants = ",".join(paper_variants(args.preset))

    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; available: {', '.join(PRESETS)}")
    for name in ("batch", "seq_len", "decode_steps", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    max_len = PRESETS[args.preset]["max_seq_len"]
    if args.seq_len > max_len or args.prompt_len + args.decode_steps > max_len:
        p.error(
            f"preset {args.preset} holds {max_len} positions: need --seq-len <= {max_len} and "
            f"--prompt-len + --decode-steps <= {max_len}"
        )
    return args


def keep_freed_memory() -> str | None:
    """Make glibc malloc reuse freed memory instead of returning it to the kernel; None if not glibc."""
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return None
    return "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1)" if ok else None


# ------------------------------------------------------------------ one variant
@dataclass
class Subject:
    """One variant under test: its model, its decode cache and what was measured on it."""

    requested: str
    model: GPT
    cache: KVCache
    params: dict[str, int]
    cached_matches_full: bool
    train_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model.config.variant.paper_name

    @property
    def is_plain_qkv(self) -> bool:
        v = self.model.config.variant
        return v.sharing == "q_k_v" and v.n_kv_heads is None and not v.pos2d and not v.qk_norm


def build_subject(args: argparse.Namespace, requested: str, check_prompt: torch.Tensor) -> Subject:
    """Build the variant's model (same seed for all), allocate its cache, check cached decode."""
    cfg = get_preset(args.preset, variant=requested, dropout=0.0, attn_dropout=0.0, emb_dropout=0.0)
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    model.eval()
    cached = model.generate(check_prompt, CHECK_NEW, use_cache=True)
    full = model.generate(check_prompt, CHECK_NEW, use_cache=False)
    cache = model.new_cache(args.batch, args.prompt_len + args.decode_steps)
    return Subject(requested, model, cache, count_params(model), bool(torch.equal(cached, full)))


def train_step(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds for forward + backward of the next-token loss; gradients are dropped afterwards."""
    t0 = time.perf_counter()
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return elapsed


def decode_run(model: GPT, cache: KVCache, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[float, float]:
    """Seconds for the prefill and for all one-token decode steps (fed ``steps[:, i]``)."""
    cache.reset()
    with torch.no_grad():
        t0 = time.perf_counter()
        model.prefill(prompt, cache)
        t1 = time.perf_counter()
        for i in range(steps.shape[1]):
            model.decode_one(steps[:, i], cache)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


# ------------------------------------------------------------------- the timing
def run_rounds(args: argparse.Namespace, subjects: list[Subject], inputs: dict[str, torch.Tensor]) -> None:
    """Warmup, then round-robin repeats: first all training steps, then all decode runs."""
    x, y = inputs["x"], inputs["y"]
    prompt, steps = inputs["prompt"], inputs["steps"]
    for phase in ("train", "decode"):
        for s in subjects:
            s.model.train(phase == "train")
        gc.collect()
        gc.disable()  # no collector pauses inside a timed region
        try:
            for r in range(args.warmup + args.repeats):
                timed = r >= args.warmup
                label = f"repeat {r - args.warmup + 1}/{args.repeats}" if timed else f"warmup {r + 1}/{args.warmup}"
                console.print(f"  {phase:6s} {label}", highlight=False)
                for s in subjects:
                    if phase == "train":
                        t = train_step(s.model, x, y)
                        if timed:
                            s.train_s.append(t)
                    else:
                        t_prefill, t_decode = decode_run(s.model, s.cache, prompt, steps)
                        if timed:
                            s.prefill_s.append(t_prefill)
                            s.decode_s.append(t_decode)
        finally:
            gc.enable()


# --------------------------------------------------------------------- results
def ratio(value: float, base: float | None) -> float | None:
    return None if base is None else value / base


def timing(times: list[float], units: int, base: list[float] | None) -> dict[str, Any]:
    """Median and best of ``times`` (seconds for ``units`` tokens) and their ratios to ``base``.

    ``ratio_vs_qkv`` pairs the two lists round by round (both were timed in the same round)
    and takes the median of the per-round ratios; ``ratio_of_medians_vs_qkv`` is the plain one.
    """
    med, best = statistics.median(times), min(times)
    return {
        "times_s": times,
        "median_s": med,
        "min_s": best,
        "tokens_per_s_median": units / med,
        "tokens_per_s_best": units / best,
        "ratio_vs_qkv": statistics.median(t / b for t, b in zip(times, base, strict=True)) if base else None,
        "ratio_of_medians_vs_qkv": ratio(med, statistics.median(base) if base else None),
        "ratio_of_best_vs_qkv": ratio(best, min(base) if base else None),
    }


def make_rows(args: argparse.Namespace, subjects: list[Subject]) -> list[dict[str, Any]]:
    base = next((s for s in subjects if s.is_plain_qkv), None)
    base_bytes = base.cache.measured_bytes_per_token if base else None
    train_tokens, decode_tokens = args.batch * args.seq_len, args.batch * args.decode_steps
    rows = []
    for s in subjects:
        cfg, cache = s.model.config, s.cache
        cache_positions = cache.batch_size * cache.max_len
        m = macs(cfg, args.seq_len)
        decode = timing(s.decode_s, decode_tokens, base.decode_s if base else None)
        decode["step_latency_ms_median"] = 1e3 * decode["median_s"] / args.decode_steps
        decode["step_latency_ms_best"] = 1e3 * decode["min_s"] / args.decode_steps
        rows.append(
            {
                "requested": s.requested,
                "variant": s.name,
                "id": cfg.variant.id,
                "n_kv_heads": cfg.n_kv_heads,
                "kv_shared": cfg.variant.kv_shared,
                "cached_matches_full": s.cached_matches_full,
                "params_total": s.params["total"],
                "params_attention": s.params["attention"],
                "macs_per_sequence": m["total"],
                "macs_attention_per_sequence": m["attention"],
                "cache": {
                    "dtype": str(cache.dtype).removeprefix("torch."),
                    "batch": cache.batch_size,
                    "max_len": cache.max_len,
                    "tensors": cache.n_tensors,
                    "nbytes": cache.nbytes,
                    "bytes_per_token": cache.bytes_per_token,
                    "measured_bytes_per_token": cache.measured_bytes_per_token,
                    "measured_equals_analytic": cache.nbytes == cache.bytes_per_token * cache_positions,
                    "ratio_vs_qkv": ratio(cache.measured_bytes_per_token, base_bytes),
                },
                "train": timing(s.train_s, train_tokens, base.train_s if base else None),
                "prefill": timing(s.prefill_s, args.batch * args.prompt_len, base.prefill_s if base else None),
                "decode": decode,
            }
        )
    return rows


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}"


def results_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> Table:
    title = (
        f"{args.preset}: train fwd+bwd B={args.batch} T={args.seq_len}; decode B={args.batch}, "
        f"{args.decode_steps} steps after a {args.prompt_len}-token prompt; CPU fp32, "
        f"{torch.get_num_threads()} threads"
    )
    caption = (
        f"tok/s: median of {args.repeats} rounds (best: min time). vs QKV: time = median of per-round "
        "variant/QKV time (< 1 is faster); cache = measured bytes ratio."
    )
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in (
        "variant", "params", "attn params", "train tok/s", "best", "train vs QKV",
        "decode tok/s", "best", "ms/step", "decode vs QKV", "cache B/token", "cache vs QKV",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        name = r["variant"] if r["variant"] == r["requested"] else f"{r['variant']} (as {r['requested']})"
        tr, de, ca = r["train"], r["decode"], r["cache"]
        table.add_row(
            name,
            f"{r['params_total']:,}",
            f"{r['params_attention']:,}",
            f"{tr['tokens_per_s_median']:,.0f}",
            f"{tr['tokens_per_s_best']:,.0f}",
            fmt_ratio(tr["ratio_vs_qkv"]),
            f"{de['tokens_per_s_median']:,.0f}",
            f"{de['tokens_per_s_best']:,.0f}",
            f"{de['step_latency_ms_median']:.2f}",
            fmt_ratio(de["ratio_vs_qkv"]),
            f"{ca['measured_bytes_per_token']:,.0f}",
            fmt_ratio(ca["ratio_vs_qkv"]),
        )
    return table


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_steal_s() -> float | None:
    """CPU time the hypervisor gave to others so far (Linux ``/proc/stat``), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine-specific prefix in results)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def git_info() -> dict[str, Any]:
    """Commit and dirtiness of the checkout, or nulls when git is unavailable."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it owner-only; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = None if args.system_malloc else keep_freed_memory()
    requested = [v.strip() for v in args.variants.split(",") if v.strip()]

    # One set of inputs for every variant.
    vocab = PRESETS[args.preset]["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=gen)
    inputs = {
        "x": tokens[:, :-1].contiguous(),
        "y": tokens[:, 1:].contiguous(),
        "prompt": torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen),
        "steps": torch.randint(0, vocab, (args.batch, args.decode_steps), generator=gen),
    }
    check_prompt = inputs["prompt"][:CHECK_ROWS, :CHECK_PROMPT]

    console.print(
        f"[bold]cpu_variants[/]: preset {args.preset}, {len(requested)} variants, "
        f"{torch.get_num_threads()} threads, seed {args.seed}, allocator: {allocator or 'system default'}",
        highlight=False,
    )
    console.print("  building models and checking cached decode == full recompute ...", highlight=False)
    subjects = [build_subject(args, name, check_prompt) for name in requested]
    bad = [s.requested for s in subjects if not s.cached_matches_full]
    if bad:
        console.print(
            f"[bold red]error:[/] cached greedy decode differs from full recomputation for {', '.join(bad)}; "
            "the KV cache path is broken, so timings would be meaningless. Aborting.",
            highlight=False,
        )
        return 1

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    steal0, t0 = cpu_steal_s(), time.perf_counter()
    run_rounds(args, subjects, inputs)
    steal1, wall = cpu_steal_s(), time.perf_counter() - t0
    steal = None if steal0 is None or steal1 is None else steal1 - steal0

    shape = get_preset(args.preset)
    rows = make_rows(args, subjects)
    console.print(results_table(args, rows))
    if not any(s.is_plain_qkv for s in subjects):
        console.print("note: QKV is not among the variants, so no ratios are given.", highlight=False)
    aliased = [f"{r['requested']} = {r['variant']}" for r in rows if r["variant"] != r["requested"]]
    if aliased:
        console.print(
            f"note: at {shape.n_heads} query heads {'; '.join(aliased)} (same model, measured again: a noise control).",
            highlight=False,
        )

    result = {
        "benchmark": "cpu_variants",
        "question": "Training-step and cached-decode speed, parameters and KV-cache bytes of each "
        "Q/K/V sharing variant, as ratios to QKV, on CPU.",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {**vars(args), "out": display_path(args.out), "variants": requested},
        "model": {
            k: getattr(shape, k)
            for k in ("recipe", "n_layers", "d_model", "n_heads", "head_dim", "d_ff", "vocab_size", "max_seq_len")
        }
        | {"dtype": "float32", "dropout": 0.0},
        "hardware": {
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "allocator": allocator or "system default",
            "load_average_1min_at_start": load,
            "cpu_steal_s_during_timing": steal,  # > 0: a hypervisor ran other guests on our cores
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "qkvlab": qkvlab.__version__},
        "git": git_info(),
        "wall_time_s": wall,
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    console.print(f"wrote {display_path(args.out)} (timing took {wall:.0f} s)", highlight=False)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
