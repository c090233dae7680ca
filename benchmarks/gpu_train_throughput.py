"""GPU benchmark: training tokens/s and MFU, QKV vs Q-K=V, and the paper's reference code side by side.

Goals: training tokens/s of Q-K=V at least 1.03x QKV's at ~124M, and MFU at least 40% at
~350M. One training step is forward + backward + gradient clipping + a fused AdamW step
on one batch of random token ids, bf16 autocast with fp32 weights (as ``qkvlab train`` runs on
a GPU). Each case is warmed up (the first steps compile), then timed step by step with CUDA
events; the table gives the median step time, tokens/s, peak memory and MFU.

MFU = model FLOPs per token x tokens/s / the GPU's dense bf16 peak, with PaLM's count
(Chowdhery et al., 2022, app. B): ``6 N + 12 L T d_attn`` per token, where N is the number of
parameters that multiply activations (all but the embedding lookups; a tied token
embedding counted once, as the LM head), L layers, T the sequence length and d_attn the query
width. The attention term is not halved for the causal mask (PaLM's convention).

Cases (``--cases``; default all):

- ``ladder``: qkvlab ``gpt2-85m`` (124.5M parameters with the GPT-2 vocabulary) and
  ``gpt2-300m`` (354.9M), QKV and Q-K=V, T=1024, ``torch.compile``d two ways
  (``--ladder-modes``): the model alone (``model``), and model + loss as one graph (``loss``,
  what ``compile: true`` in a training config does: the logits' fp32 upcast fuses into the loss);
- ``rung``: the scaling ladder's largest rungs as the ladder trains them (``--rung-presets``,
  default ``gpt2-85m`` and ``llama-30m``): its 8,192-token BPE vocabulary, 32 x 512 tokens a
  step, model + loss compiled, QKV and Q-K=V, each run alone on the GPU (the ladder's slices
  share the GPU among six runs, so their rows' MFU is each run's share);
- ``paper``: the paper's 300M shape (``paper-300m``, dropout 0.1) in qkvlab, eager and
  compiled, beside the paper's own model classes ``GPT`` (QKV) and ``GPT_QKV_KEqualsV`` (Q-K=V)
  from its ``transformer_KQV_300_M.py`` / ``transformer_KV_1_300_M.py`` (main @ ffedd92, MIT),
  run as shipped: without the ``flash-attn`` package they fall back to their unfused attention
  (matmul, mask, softmax, matmul), which is what a user without flash-attn gets; and again
  with ``flash_attn_func`` replaced by SDPA (same layout and causal flag), which is fairer.
  Their module-level imports of ``transformers`` / ``datasets`` (used only by their data code)
  are stubbed when absent. The files are read from ``--ref-dir`` (not part of this project).

Run on the GPU machine from the repository root::

    PYTHONPATH=src python3 benchmarks/gpu_train_throughput.py --ref-dir .data/paper_ref \\
        --out benchmarks/results/gpu_train_throughput.json
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchutil import bf16_peak, env_info, write_json
from qkvlab.models import build_model, get_preset
from qkvlab.train.batches import lm_loss


# ----------------------------------------------------------------------------- models
def matmul_params(model: nn.Module, *, tied_head: bool) -> int:
    """PaLM's N: all parameters but the embedding lookups; a tied token embedding counts once, as the LM head."""
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    token = max(embeddings, key=lambda w: w.shape[0])  # the vocabulary table
    lookups = sum(w.numel() for w in embeddings if not (tied_head and w is token))
    return total_params(model) - lookups


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_reference(ref_dir: Path, filename: str, *, sdpa: bool) -> types.ModuleType:
    """Import one of the paper's training scripts as a module (its model classes are what we use)."""
    path = ref_dir / filename
    if not path.is_file():
        raise SystemExit(f"reference file {path} not found; give --ref-dir, or --cases ladder to skip it")
    for name, attrs in (("transformers", ("AutoTokenizer",)), ("datasets", ("load_from_disk",))):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            for a in attrs:
                setattr(stub, a, None)
            sys.modules[name] = stub
    modname = f"paper_ref_{path.stem}_{'sdpa' if sdpa else 'shipped'}"
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if sdpa:

        def sdpa_as_flash(q, k, v, dropout_p=0.0, causal=False, **_):
            # flash-attn layout (B, T, H, D) -> SDPA (B, H, T, D) and back
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal
            )
            return out.transpose(1, 2)

        mod.flash_attn_func = sdpa_as_flash
        mod.FLASH_AVAILABLE = True
    return mod


# ----------------------------------------------------------------------------- timing
def time_training(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    *,
    warmup: int,
    steps: int,
) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "warmup_s": warm_s,
        "loss": float(loss),
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
    }


def run_case(
    label: str, model: nn.Module, loss_fn, *, B, T, n_layers, d_attn, vocab, tied_head: bool, args, peak
) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = torch.randint(0, vocab, (B, T + 1), device="cuda", generator=g)
    n_mm = matmul_params(model, tied_head=tied_head)
    res = time_training(model, loss_fn, batch, warmup=args.warmup, steps=args.steps)
    tokens = B * T
    flops_per_token = 6 * n_mm + 12 * n_layers * T * d_attn
    res.update(
        case=label,
        B=B,
        T=T,
        params=total_params(model),
        matmul_params=n_mm,
        tokens_per_s=tokens / res["step_s"],
        flops_per_token=flops_per_token,
    )
    res["mfu"] = flops_per_token * res["tokens_per_s"] / peak if peak else None
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
    print(
        f"{label:<44} {res['params'] / 1e6:8.1f}M {B:>3}x{T:<5} {1e3 * res['step_s']:9.1f} ms "
        f"{res['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6}  peak {res['peak_mem_GiB']:5.1f} GiB  "
        f"loss {res['loss']:.3f}  (warmup {res['warmup_s']:.0f} s)",
        flush=True,
    )
    return res


def qkvlab_case(
    preset: str,
    variant: str,
    *,
    compiled: bool,
    B: int,
    T: int,
    args,
    peak,
    whole_loss: bool = False,
    vocab_size: int | None = None,
) -> dict:
    torch.manual_seed(0)
    cfg = get_preset(preset, variant=variant, **({"vocab_size": vocab_size} if vocab_size else {}))
    model = build_model(cfg).cuda().train()
    fwd = torch.compile(model) if compiled and not whole_loss else model

    def loss_fn(batch):
        return lm_loss(fwd(batch[:, :-1]), batch[:, 1:])

    if whole_loss:  # model + fp32 cross-entropy in one graph: the logits' upcast fuses into the loss
        loss_fn = torch.compile(loss_fn)
    how = "compiled with loss" if whole_loss else "compiled" if compiled else "eager"
    label = f"qkvlab {preset} {variant} {how}" + (f", vocab {cfg.vocab_size}" if vocab_size else "")
    res = run_case(
        label,
        model,
        loss_fn,
        B=B,
        T=T,
        n_layers=cfg.n_layers,
        d_attn=cfg.n_heads * cfg.head_dim,
        vocab=cfg.vocab_size,
        tied_head=cfg.tie_embeddings,
        args=args,
        peak=peak,
    )
    res.update(
        source="qkvlab", preset=preset, variant=variant, compiled=compiled, whole_loss=whole_loss, vocab=cfg.vocab_size
    )
    return res


def reference_case(filename: str, cls: str, variant: str, *, sdpa: bool, B: int, T: int, args, peak) -> dict:
    torch.manual_seed(0)
    mod = load_reference(Path(args.ref_dir), filename, sdpa=sdpa)
    cfg = mod.ModelConfig()
    model = getattr(mod, cls)(cfg).cuda().train()
    attn = next(m for m in model.modules() if hasattr(m, "use_flash"))

    def loss_fn(batch):
        # their forward shifts internally: logits[:, :-1] against labels[:, 1:]
        _, loss = model(batch[:, :-1], labels=batch[:, :-1])
        return loss

    how = "SDPA substituted" if sdpa else "as shipped, unfused"
    label = f"paper {cls} ({variant}) {how}"
    res = run_case(
        label,
        model,
        loss_fn,
        B=B,
        T=T,
        n_layers=cfg.n_layer,
        d_attn=cfg.n_embd,
        vocab=cfg.vocab_size,
        tied_head=cfg.tie_word_embeddings,
        args=args,
        peak=peak,
    )
    res.update(source="paper", file=filename, cls=cls, variant=variant, sdpa=sdpa, uses_flash_path=bool(attn.use_flash))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="ladder,paper", help="comma list of: ladder, rung, paper")
    ap.add_argument("--ref-dir", default=".data/paper_ref", help="folder with the paper's transformer_*_300_M.py")
    ap.add_argument("--ladder-presets", default="gpt2-85m,gpt2-300m")
    ap.add_argument(
        "--ladder-modes", default="model,loss", help="torch.compile the model alone, and/or model + loss in one graph"
    )
    ap.add_argument("--rung-presets", default="gpt2-85m,llama-30m")
    ap.add_argument("--rung-vocab", type=int, default=8192, help="the ladder's BPE vocabulary")
    ap.add_argument("--rung-batch", default="32x512", help="BxT of a ladder step")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    env = env_info(torch.device("cuda"))
    peak = bf16_peak(env["gpu"])
    tflops = peak and peak / 1e12
    print(f"{env['gpu']} (driver {env.get('driver')}), torch {env['torch']}, dense bf16 peak {tflops} TFLOP/s")
    cases = set(args.cases.split(","))
    rows: list[dict] = []

    def add(row: dict) -> None:  # saved after every case: a run stopped at its limit keeps its rows
        rows.append(row)
        write_json(
            {"benchmark": "gpu_train_throughput", "env": env, "partial": True, "rows": rows},
            "gpu_train_throughput.json",
            args.out,
        )

    if "ladder" in cases:
        for preset in args.ladder_presets.split(","):
            for mode in args.ladder_modes.split(","):
                for variant in ("QKV", "Q-K=V"):
                    whole = mode == "loss"
                    add(
                        qkvlab_case(
                            preset, variant, compiled=True, B=16, T=1024, args=args, peak=peak, whole_loss=whole
                        )
                    )
    if "rung" in cases:
        B, T = (int(x) for x in args.rung_batch.split("x"))
        for preset in args.rung_presets.split(","):
            for variant in ("QKV", "Q-K=V"):
                add(
                    qkvlab_case(
                        preset,
                        variant,
                        compiled=True,
                        B=B,
                        T=T,
                        args=args,
                        peak=peak,
                        whole_loss=True,
                        vocab_size=args.rung_vocab,
                    )
                )
    if "paper" in cases:
        B, T = 8, 1024
        for variant in ("QKV", "Q-K=V"):
            add(qkvlab_case("paper-300m", variant, compiled=False, B=B, T=T, args=args, peak=peak))
            add(qkvlab_case("paper-300m", variant, compiled=True, B=B, T=T, args=args, peak=peak))
        for filename, cls, variant in (
            ("transformer_KQV_300_M.py", "GPT", "QKV"),
            ("transformer_KV_1_300_M.py", "GPT_QKV_KEqualsV", "Q-K=V"),
        ):
            for sdpa in (False, True):
                add(reference_case(filename, cls, variant, sdpa=sdpa, B=B, T=T, args=args, peak=peak))

    def find(**kw):
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)

    print("\nratios (tokens/s)")
    summary = {}
    shapes = dict.fromkeys((r["preset"], r["vocab"], r["B"], r["T"]) for r in rows if r.get("source") == "qkvlab")
    for preset, vocab, B, T in shapes:
        rung = vocab == args.rung_vocab and f"{B}x{T}" == args.rung_batch  # the ladder's own shape
        name = f"{preset} (ladder rung, vocab {vocab}, {B}x{T})" if rung else preset
        for compiled, whole in ((True, True), (True, False), (False, False)):
            kw = dict(preset=preset, vocab=vocab, B=B, T=T, compiled=compiled, whole_loss=whole)
            a, b = find(variant="QKV", **kw), find(variant="Q-K=V", **kw)
            if a and b:
                how = "compiled with loss" if whole else "compiled" if compiled else "eager"
                summary[f"{name} {how}: Q-K=V / QKV"] = b["tokens_per_s"] / a["tokens_per_s"]
    for variant in ("QKV", "Q-K=V"):
        ours_e = find(preset="paper-300m", variant=variant, compiled=False)
        ours_c = find(preset="paper-300m", variant=variant, compiled=True, whole_loss=False)
        for sdpa in (False, True):
            ref = find(source="paper", variant=variant, sdpa=sdpa)
            if ref and ours_e:
                how = "sdpa" if sdpa else "shipped"
                for mode, ours in (("eager", ours_e), ("compiled", ours_c)):
                    key = f"paper-300m {variant}: qkvlab {mode} / paper {how}"
                    summary[key] = ours["tokens_per_s"] / ref["tokens_per_s"]
    for k, v in summary.items():
        print(f"  {k:<55} {v:6.3f}x")
    t1 = summary.get("gpt2-85m compiled with loss: Q-K=V / QKV", summary.get("gpt2-85m compiled: Q-K=V / QKV"))
    mfu350 = {r["case"]: r["mfu"] for r in rows if r.get("preset") == "gpt2-300m" and r.get("mfu") is not None}
    rung_mfu = {
        r["case"]: r["mfu"]
        for r in rows
        if r.get("vocab") == args.rung_vocab and f"{r['B']}x{r['T']}" == args.rung_batch and r.get("mfu") is not None
    }
    goals = {
        "Q-K=V / QKV training tokens/s at 124M": {"target": 1.03, "value": t1},
        "MFU at 350M": {"target": 0.40, "values": mfu350},
        "MFU of the ladder's largest rungs, alone on the GPU": {"target": 0.35, "values": rung_mfu},
    }
    if rung_mfu:
        print(f"ladder rungs alone, MFU: { {k: round(v, 3) for k, v in rung_mfu.items()} } (goal 35%)")
    print(f"\ntraining goals: Q-K=V / QKV at 124M = {t1} (goal 1.03x); MFU at 350M = {mfu350} (goal 40%)")
    doc = {
        "benchmark": "gpu_train_throughput",
        "env": env,
        "bf16_peak_flops": peak,
        "mfu_method": "PaLM: (6 N_matmul + 12 L T d_attn) per token x tokens/s / dense bf16 peak",
        "step": "fwd + bwd + clip 1.0 + fused AdamW, bf16 autocast, fp32 weights, random token ids",
        "rows": rows,
        "ratios": summary,
        "goals": goals,
    }
    for path in write_json(doc, "gpu_train_throughput.json", args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
