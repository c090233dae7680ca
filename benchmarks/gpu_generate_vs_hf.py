"""GPU benchmark: qkvlab generation beside Hugging Face transformers, in one process, same model shape.

The model is the ~1B llama-recipe shape of ``gpu_generate.py`` (16 layers, d_model 2048, 32 heads
of 64, SwiGLU 8192, RoPE, GPT-2 vocabulary; random bf16 weights). For each variant (QKV, Q-K=V,
GQA-8, Q-GQA-8) and point (batch B x cached context S, default {1, 16} x {4k, 32k}) it times one
decode step at a filled cache, for

- ``qkvlab``: :class:`qkvlab.models.decoding.StaticDecoder` with ``compile=True`` (Inductor, then one
  CUDA graph per step);
- ``hf-llama`` (QKV and GQA-8 only): ``LlamaForCausalLM`` holding the SAME weights (copied from the
  qkvlab model), ``attn_implementation="sdpa"``, a ``StaticCache``, and ``forward`` compiled with
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` as transformers documents for fast
  decoding;
- ``hf-gemma4-kv`` (Q-K=V and Q-GQA-8 only): Gemma 4 text with ``attention_k_eq_v=True`` on every
  layer (the K=V implementation transformers ships; it still caches keys and values as two
  tensors), same widths, random weights, run the same way. Skipped, with the reason, where the
  installed transformers has no Gemma 4 or no ``attention_k_eq_v``.

Checks come first, on the cache each point is timed on: the qkvlab compiled step against its own
eager step; the HF Llama step against the qkvlab eager step on the same cache contents (same
weights, so the same logits up to bf16 rounding); the Gemma step against Gemma's own uncompiled
step, on a float32 copy at the first point (in bf16 a random Gemma 4 is too sensitive to rounding
for the check to mean anything: ``gemma_float32_check``), the bf16 difference reported beside it;
and, once per model, full-forward logits and 16 greedy tokens of a short prompt, qkvlab
against HF Llama. A check beyond tolerance stops the run (exit status 1) after the JSON is written.

Reported per row: tokens/s (B / step time), the ratio to ``hf-llama`` QKV at the same point, and
the fraction of the bandwidth roofline: (bytes a step must read: every weight but the input
embedding table, plus the whole cache once) / (device-to-device copy bandwidth, measured once,
read + write) / step time. The step time is the median of steps each waited for, as the targets
take it; beside it, ``*_in_a_row``: the mean over as many steps run back to back with one wait at
the end, where the host's work of launching a step overlaps the step before (as in a generation
loop that does not wait for each token). Prefill tokens/s of one prompt (``--prefill``, default
4k and 32k; uncompiled on both sides, as ``generate`` runs a prefill) per variant and system, measured after
the decode points with every model in memory and the repetitions taken in turn across them.
``--generate BxS,...``: greedy tokens/s of each system's whole ``generate`` call at a prompt of S
random tokens (its loop, sampling and stop checks included, as a user calls it: qkvlab's
``model.generate`` with the decode rows' options, HF's ``generate`` over a ``StaticCache``, which it
compiles itself), timed as the difference of a short and a long call so that the prefill and the
call's setup cancel (``generate_phase``); with ``--generate-stream`` every token also goes to the
host as it comes, decoded to text, as a caller printing a stream gets it.
Every HF call runs without autograd, as ``generate`` runs it and as qkvlab's steps run. JSON (hardware,
versions, rows) goes to ``$OUT/gpu_generate_vs_hf.json`` and ``--out``, rewritten after each row.

Run on the GPU machine from the repository root. Compiling, per model and point on both sides,
takes most of the time, so a run of two variants and two points at a time keeps each call
short; every row is written as it finishes, so a cut run keeps its rows.
``--baseline-from`` takes the HF Llama QKV rows of an earlier call for the ratios of a call
without them::

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_generate_vs_hf.py --variants QKV,Q-K=V \
        --points 1x4096,1x32768                                        # + prefill of 4k and 32k
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_generate_vs_hf.py --variants GQA-8,Q-GQA-8 \
        --points 1x4096,1x32768 --prefill none --baseline-from benchmarks/results/gpu_generate_vs_hf_b1.json
    # the same two with --points 16x4096,16x32768
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_generate_vs_hf.py --smoke    # CPU, tiny, no timing claims

A QKV cache of B=16 x 32k is 64 GiB: on an 80 GB card that point holds one system's cache at a
time (each is freed before the next is built) and may still run out of memory (the row then says so).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import torch

from benchutil import GpuWatch, env_info, write_json
from gpu_decode import copy_bandwidth, rel_err, timer
from gpu_generate import ONE_B, VARIANTS, build, fill_cache, fill_normal, release, time_steps, time_steps_in_a_row
from qkvlab.attention.projections import fuse_projections, unfuse_projections
from qkvlab.models.decoding import StaticDecoder

NAME = "gpu_generate_vs_hf.json"
#: A tiny shape where GQA-8 groups two query heads per KV head (16 heads).
SMOKE = dict(recipe="llama", n_layers=2, d_model=128, n_heads=16, d_ff=256, vocab_size=97)
HF_LLAMA = {"QKV", "GQA-8"}  # same weights in LlamaForCausalLM
HF_GEMMA = {"Q-K=V", "Q-GQA-8"}  # Gemma 4 text, attention_k_eq_v
# bf16 logits of a 16-layer model computed two correct ways differ by a few percent (as between
# the eager, graph and compiled steps of gpu_generate.py).
TOL_BF16, TOL_FP32 = 6e-2, 1e-4
# the Gemma rows' float32 check: far above its rounding (1e-4 and below), far below a wrong step's
# error (a step that misplaces the cache or a position is off by order 1)
GEMMA_TOL = 1e-2


def free(device) -> None:
    """Free what a case held on the GPU (a full collection is slow with transformers loaded: GPU only)."""
    if device.type == "cuda":
        release(device)


# ----------------------------------------------------------------------------- HF models
def _cache_kwarg(hf) -> str:
    """The name under which this transformers takes the cache (``past_key_values``, later ``cache``)."""
    params = inspect.signature(type(hf.model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def from_config(cls, config, dtype: torch.dtype):
    """A ``cls`` model in ``dtype`` built as ``from_pretrained(..., dtype=dtype)`` builds it
    (``AutoModelForCausalLM.from_config`` with ``dtype``, checked to give ``cls``).

    Not ``cls(config).to(dtype)``: that also casts the rotary inverse frequencies, which
    transformers keeps in fp32, and with them rounded to bf16 the angles at position 4k are off
    by radians (the step's logits 0.32 from the fp32 ones, against 0.03 for the same step with
    fp32 frequencies).
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if type(hf) is not cls:
        raise RuntimeError(f"transformers built {type(hf).__name__} for this config, not {cls.__name__}")
    return hf


def hf_llama(model):
    """``LlamaForCausalLM`` with ``model``'s weights (a qkvlab llama-recipe GPT with separate q, k, v)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hc = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    hc._attn_implementation = "sdpa"
    param = next(model.parameters())
    with torch.device(param.device):
        hf = from_config(LlamaForCausalLM, hc, param.dtype)
    sd = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.backbone.norm.weight}
    sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.backbone.blocks):
        p, proj = f"model.layers.{i}.", b.attn.qkv.proj
        sd[p + "input_layernorm.weight"] = b.norm1.weight
        sd[p + "post_attention_layernorm.weight"] = b.norm2.weight
        for role in "qkv":
            sd[p + f"self_attn.{role}_proj.weight"] = proj[role].weight
        sd[p + "self_attn.o_proj.weight"] = b.attn.o_proj.weight
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            sd[p + f"mlp.{theirs}.weight"] = getattr(b.mlp, ours).weight
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def hf_gemma_kv(model):
    """Gemma 4 text with ``attention_k_eq_v=True`` on every layer, ``model``'s widths; or (None, why not)."""
    import transformers

    try:
        from transformers.models.gemma4 import Gemma4ForCausalLM, Gemma4TextConfig
    except ImportError as e:
        return None, f"transformers {transformers.__version__} has no Gemma 4 ({e})"
    c = model.config
    try:
        gc = Gemma4TextConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.d_model,
            intermediate_size=c.d_ff,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            global_head_dim=c.head_dim,
            num_global_key_value_heads=c.n_kv_heads,
            layer_types=["full_attention"] * c.n_layers,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,  # no per-layer embedding tables: the same weights as the others
            tie_word_embeddings=False,
            max_position_embeddings=c.max_seq_len,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta}},
        )
    except (TypeError, ValueError) as e:
        return None, f"transformers {transformers.__version__}: Gemma4TextConfig refused the shape ({e})"
    gc._attn_implementation = "sdpa"
    param = next(model.parameters())
    torch.manual_seed(0)
    with torch.device(param.device):
        hf = from_config(Gemma4ForCausalLM, gc, param.dtype)
    attn = hf.model.layers[0].self_attn
    if getattr(attn, "v_proj", None) is not None:
        return None, f"transformers {transformers.__version__}: attention_k_eq_v did not remove v_proj"
    return hf.eval(), None


def weight_bytes(module, embedding: torch.Tensor, head: torch.Tensor) -> int:
    """Bytes of every distinct parameter but the input ``embedding`` table (a step reads one row of it),
    unless it is also the output ``head`` (tied: read whole)."""
    params = {id(p): p for p in module.parameters()}
    if embedding is not head:
        params.pop(id(embedding), None)
    return sum(p.numel() * p.element_size() for p in params.values())


class HFDecoder:
    """One-token steps of an HF causal LM over a ``StaticCache`` filled to ``S`` positions."""

    def __init__(self, hf, B: int, max_len: int, compile_mode: str | None):
        from transformers import StaticCache

        self.hf = hf
        self.kw = _cache_kwarg(hf)
        self.cache = StaticCache(config=hf.config, max_cache_len=max_len)
        device = next(hf.parameters()).device
        # The layers allocate on their first write: one token per row does it.
        with torch.no_grad():
            hf(
                torch.zeros(B, 1, dtype=torch.long, device=device),
                **{self.kw: self.cache},
                use_cache=True,
                logits_to_keep=1,
            )
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.fwd = torch.compile(hf.forward, mode=compile_mode, fullgraph=True) if compile_mode else hf.forward
        self.compiled = compile_mode is not None

    @property
    def layers(self):
        return self.cache.layers

    def fill(self, S: int, gen: torch.Generator) -> None:
        """Random entries in the first ``S`` positions, drawn as ``gpu_generate.fill_cache`` draws them
        (layer by layer, keys then values): a qkvlab cache of separate K/V of the same size filled
        from the same generator holds the same values. Position S is next."""
        for layer in self.cache.layers:
            fill_normal(layer.keys[:, :, :S], gen)
            fill_normal(layer.values[:, :, :S], gen)
        self.seek(S)

    def seek(self, S: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(S)
        self.pos.fill_(S)

    @torch.no_grad()  # as HF's generate() and its static-cache recipe run it (qkvlab's steps too)
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        out = self.fwd(input_ids=token.view(-1, 1), position_ids=self.pos, **{self.kw: self.cache}, use_cache=True)
        self.pos += 1
        return out.logits[:, -1]

    def bytes_per_token(self) -> int:
        return sum((layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()) * layer.keys.element_size()
                   for layer in self.cache.layers)  # fmt: skip


# ----------------------------------------------------------------------------- one point
@torch.no_grad()
def hf_greedy(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens from ``hf`` with its own cache (a DynamicCache)."""
    kw = _cache_kwarg(hf)
    out = hf(idx, use_cache=True)
    cache = getattr(out, kw, None) or getattr(out, "past_key_values", None)
    toks = [out.logits[:, -1].argmax(-1)]
    for t in range(n - 1):
        pos = torch.full((idx.shape[0], 1), idx.shape[1] + t, device=idx.device)
        out = hf(toks[-1][:, None], position_ids=pos, **{kw: cache}, use_cache=True)
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, 1)


@torch.no_grad()
def model_checks(model, hf, device, tol: float) -> dict:
    """Full-forward logits and 16 greedy tokens of a short prompt: qkvlab against HF Llama (same weights)."""
    g = torch.Generator(device=device).manual_seed(5)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), device=device, generator=g)
    ours, theirs = model(idx).float(), hf(idx).logits.float()
    n = 16
    a = model.generate(idx, n, cuda_graph=False)[:, 16:]
    b = hf_greedy(hf, idx, n)
    agree = (a == b).cumprod(1).sum(1).float().mean().item() / n  # tokens equal up to the first difference
    out = dict(forward_rel_err=rel_err(ours, theirs), greedy_agreement=agree)
    out["ok"] = out["forward_rel_err"] <= tol and (agree == 1.0 or tol > TOL_FP32)
    return out


def time_row(row: dict, step, token, args, device) -> None:
    """Both timings of a row's step (waited for one by one, and back to back), with what the card
    ran at meanwhile."""
    with GpuWatch(device) as watch:
        row["step_s"] = time_steps(step, token, args.steps, device)
        row["step_s_in_a_row"] = time_steps_in_a_row(step, token, args.steps, device)
    row["gpu_state"] = watch.summary()


def point_len(S: int, args) -> int:
    """Positions each system's cache allocates at context S (the same for all: see ``HFDecoder.fill``)."""
    return S + args.warmup + 3 * args.steps + 8  # the checks, the warmup, both timings, slack


def point_inputs(model, B: int, S: int, args, device, seed: int):
    """The token every step of the point decodes, and a qkvlab cache filled to S from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    token = torch.randint(0, model.config.vocab_size, (B,), device=device, generator=gen)
    cache = model.new_cache(B, point_len(S, args))
    fill_cache(cache, S, torch.Generator(device=device).manual_seed(seed + 1))
    return token, cache


def qkvlab_point(model, B, S, args, device, seed: int, gemv: str = "none") -> tuple[dict, torch.Tensor | None]:
    """qkvlab's compiled step at ``(B, S)``: check against the eager step, time. Returns (row, eager logits)."""
    row = dict(system="qkvlab", B=B, context=S, fused=args.fuse, gemv=gemv)
    try:
        token, cache = point_inputs(model, B, S, args, device, seed)
    except torch.OutOfMemoryError:
        free(device)
        return {**row, "error": "OOM allocating the cache"}, None
    unfuse_projections(model)  # the reference is the plain model's; the decoder fuses again if asked
    ref = model.decode_one(token, cache).float()
    cache.reset()
    cache.advance(S)
    dec = StaticDecoder(
        model,
        cache,
        cuda_graph="auto",
        warmup=args.warmup,
        compile=args.compile_mode or False,
        fuse=args.fuse,
        gemv=False if gemv == "none" else gemv,
    )
    t0 = time.perf_counter()
    got = dec.step(token).float()
    row["first_step_s"] = time.perf_counter() - t0  # compile included
    row["check_rel_err"] = rel_err(got, ref)
    time_row(row, dec.step, token, args, device)
    row["cache_bytes_per_token"] = cache.bytes_per_token
    row["weight_bytes"] = weight_bytes(model, model.wte.weight, model.lm_head.weight)
    dec = cache = None
    free(device)
    return row, ref


def hf_compiled_vs_eager(hf, B: int, S: int, args, device, seed: int, vocab_size: int):
    """``hf``'s compiled and uncompiled steps on one filled cache: ``(decoder, token, compiled
    logits, eager logits, seconds of the first compiled step)``, the decoder left at position
    ``S + 1`` for timing."""
    token = torch.randint(
        0, vocab_size, (B,), device=device, generator=torch.Generator(device=device).manual_seed(seed)
    )
    dec = HFDecoder(hf, B, point_len(S, args), args.hf_compile_mode)
    dec.fill(S, torch.Generator(device=device).manual_seed(seed + 1))
    # the uncompiled step first: the compiled one is then checked against it
    compiled = dec.fwd
    dec.fwd, dec.compiled = hf.forward, False
    eager = dec.step(token).float()
    dec.fwd, dec.compiled = compiled, args.hf_compile_mode is not None
    dec.seek(S)
    t0 = time.perf_counter()
    got = dec.step(token).float()
    return dec, token, got, eager, time.perf_counter() - t0


def gemma_float32_check(hf, B: int, S: int, args, device, seed: int, vocab_size: int, tol: float) -> dict:
    """The Gemma rows' check: compiled against uncompiled steps of a float32 copy of ``hf`` (same
    weights) on a cache filled as the timed one is.

    In bfloat16 the two differ by 0.1 to 0.9 (relative) at this random initialisation, on the CPU
    too, and in float32 they agree to about 1e-4: Gemma 4 RMS-normalises q and k and scales the scores
    by 1, not 1/sqrt(D), so a random model's attention is sharp enough that a rounding difference
    changes which keys a head weighs, and that compounds over the layers. A bfloat16 comparison
    cannot tell a wrong step from rounding; the float32 one checks the harness (cache filling,
    positions, the compiled graph) and HF's compiled K=V step.

    A float32 cache of the whole batch may not fit beside the models (B=16 at 32k needs over 100
    GB): the check then runs on one row at the same context, which exercises the same code, and
    ``at`` says where it ran. Where even that does not fit, it reports the failure (``ok`` False)."""
    import copy

    hf32 = copy.deepcopy(hf).float()
    err, at, error = float("nan"), None, None
    for rows in dict.fromkeys((B, 1)):
        try:
            dec, _, got, eager, _ = hf_compiled_vs_eager(hf32, rows, S, args, device, seed, vocab_size)
        except torch.OutOfMemoryError:
            error = f"out of memory at B={rows} S={S}"
        else:
            err, at, error = rel_err(got, eager), f"B={rows} S={S}", None
            del dec, got, eager
        if args.hf_compile_mode:
            torch._dynamo.reset()
        free(device)  # out of the except block: its traceback no longer holds the partial cache
        if error is None:
            break
    del hf32
    free(device)
    out = {"gemma_float32_compiled_vs_eager_rel_err": err, "at": at or f"B={B} S={S}"}
    out["ok"] = error is None and err <= tol
    return {**out, "error": error} if error else out


def hf_point(hf, system, B, S, args, device, seed: int, ref: torch.Tensor | None, model, gemma_check=None) -> dict:
    """An HF model's step at ``(B, S)``: Llama on the cache contents the qkvlab row was checked on
    (``ref``: qkvlab's eager logits there), Gemma on its own: its ``check_rel_err`` is the float32
    check of its variant (``gemma_check``, :func:`gemma_float32_check`), and its bfloat16 compiled
    step against its uncompiled step is reported beside it."""
    row = dict(system=system, B=B, context=S)
    try:
        # HF's own uncompiled step first: against qkvlab's (Llama) it checks the cache contents and
        # the harness; the compiled step is then checked against it and against qkvlab's
        dec, token, got, eager, first = hf_compiled_vs_eager(hf, B, S, args, device, seed, model.config.vocab_size)
        row["first_step_s"] = first
    except torch.OutOfMemoryError:
        free(device)
        return {**row, "error": "OOM allocating the cache"}
    row["check_compiled_vs_eager_rel_err"] = rel_err(got, eager)
    if system == "hf-llama":
        row["check_eager_rel_err"] = rel_err(eager, ref) if ref is not None else float("nan")
        row["check_rel_err"] = rel_err(got, ref) if ref is not None else float("nan")
    else:
        row["check_rel_err"] = gemma_check["gemma_float32_compiled_vs_eager_rel_err"] if gemma_check else float("nan")
        row["check"] = "float32 copy, compiled vs uncompiled step"
    for _ in range(args.warmup):  # reduce-overhead records its graphs over the first calls
        dec.step(token)
    time_row(row, dec.step, token, args, device)
    row["cache_bytes_per_token"] = dec.bytes_per_token()
    row["weight_bytes"] = weight_bytes(hf, hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
    dec = None
    if args.hf_compile_mode:
        torch._dynamo.reset()  # also frees reduce-overhead's graph memory pool before the next, larger cache
    free(device)
    return row


def wall_time(fn, device):
    """``(seconds, result)`` of ``fn()``, the GPU waited for at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def prefill_phase(
    variants: list[str], shape: dict, lengths: list[int], systems: set, args, device, dtype
) -> list[dict]:
    """Prefill tokens/s of one prompt per (system, variant) and length, uncompiled on both sides (as
    ``generate`` runs a prefill), without autograd. Every model is built first and the timed
    repetitions go round all of them in turn (A B C A B C ...), so that a drift of the GPU's
    clocks over the run falls on every row alike instead of on whichever ran last."""
    from transformers import StaticCache

    runners = []
    for variant in variants:
        model = build(variant, shape, max(lengths) + 16, device, dtype)
        if args.fuse:
            fuse_projections(model)  # the projections as the decode rows ran them
        if "qkvlab" in systems:
            runners.append(("qkvlab", variant, model))
        if "hf" in systems and variant in HF_LLAMA:
            runners.append(("hf-llama", variant, hf_llama(model)))
        elif "hf" in systems and variant in HF_GEMMA and not args.no_gemma:
            hf, _ = hf_gemma_kv(model)  # the decode rows already said why, if not
            if hf is not None:
                runners.append(("hf-gemma4-kv", variant, hf))
    rows = []
    gen = torch.Generator(device=device).manual_seed(7)
    for P in lengths:
        prompt = torch.randint(0, shape["vocab_size"], (1, P), device=device, generator=gen)
        fns, errors, times = {}, {}, {}
        for system, variant, m in runners:
            if system == "qkvlab":
                cache = m.new_cache(1, P)

                def fn(m=m, cache=cache, prompt=prompt):
                    cache.reset()
                    m.prefill(prompt, cache)
            else:
                kw = _cache_kwarg(m)

                def fn(m=m, kw=kw, prompt=prompt, P=P):
                    m(prompt, **{kw: StaticCache(config=m.config, max_cache_len=P)}, use_cache=True, logits_to_keep=1)

            fns[system, variant] = fn
            times[system, variant] = []
        with torch.no_grad():
            for rep in range(args.prefill_reps + 1):  # the first round warms every model up
                for key, fn in fns.items():
                    if key in errors:
                        continue
                    try:
                        took, _ = wall_time(fn, device)
                    except torch.OutOfMemoryError:
                        errors[key] = "OOM"
                        free(device)
                        continue
                    if rep:
                        times[key].append(took)
        for (system, variant), ts in times.items():
            row = dict(system=system, variant=variant, prompt=P, reps=len(ts), interleaved=True)
            if (system, variant) in errors:
                rows.append({**row, "error": errors[system, variant]})
                continue
            row["prefill_s"] = statistics.median(ts)
            row["prefill_tokens_per_s"] = P / row["prefill_s"]
            rows.append(row)
        fns = None
        free(device)
    runners = None
    free(device)
    return rows


class StreamText:
    """What a streaming caller does with each token: read it on the host and decode it to text.
    One object serves both systems: qkvlab's ``stream`` calls ``decode`` (a tokenizer), HF's
    ``generate`` calls ``put`` with each token (a streamer, prompt first) and ``end``."""

    def __init__(self):
        self.pieces: list[str] = []

    def decode(self, ids) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)  # any text, one character a token

    def put(self, value: torch.Tensor) -> None:
        self.pieces.append(self.decode(value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


def _generate_runner(system, m, B: int, S: int, n_long: int, args, device):
    """A function ``n -> new tokens (B, n)`` running ``system``'s own ``generate`` on a prompt of
    ``S`` random tokens, as a user calls it for fast greedy decoding, over one cache of
    ``S + n_long`` positions that every call reuses (so that no call recompiles for a new size).

    qkvlab: ``model.generate`` with the decode rows' options (its static step, compiled, fused,
    the first ``--gemv`` route); it resets the cache it is given. HF: ``generate`` with a
    ``StaticCache`` passed in and reset before each call, which transformers compiles on its own
    (its default compile config) once the cache is a static one; no stop token, so every call
    runs to its length.

    ``--generate-stream``: each call also hands every token to the host as it comes, decoded to
    text, as a caller printing them does (qkvlab: ``model.stream`` with a tokenizer; HF:
    ``generate`` with a streamer)."""
    gen = torch.Generator(device=device).manual_seed(11)
    vocab = m.config.vocab_size
    prompt = torch.randint(0, vocab, (B, S), device=device, generator=gen)
    if system == "qkvlab":
        cache = m.new_cache(B, S + n_long)
        route = args.gemv.split(",")[0]
        kw = dict(compile=args.compile_mode or False, fuse=args.fuse, gemv=False if route == "none" else route)
        if args.smoke:
            kw["cuda_graph"] = False
        if args.generate_temperature > 0:  # from the default generator: the step draws in its graph
            kw.update(temperature=args.generate_temperature, top_k=args.generate_top_k, top_p=args.generate_top_p)
        if args.generate_repetition_penalty is not None:
            kw["repetition_penalty"] = args.generate_repetition_penalty

        def run(n: int) -> torch.Tensor:
            if not args.generate_stream:
                return m.generate(prompt, n, cache=cache, **kw)[:, S:]
            sink = StreamText()
            steps = m.stream(prompt, n, cache=cache, tokenizer=sink, **kw)
            for step in steps:  # the text as it comes, kept as HF's streamer keeps it
                sink.pieces.extend(step.text)
            return steps.result.sequences[:, S:]

        return run
    from transformers import StaticCache

    cache = StaticCache(config=m.config, max_cache_len=S + n_long)
    m.generation_config.eos_token_id = None  # random weights: a stop token would end rows early
    m.generation_config.pad_token_id = 0
    if args.smoke:
        m.generation_config.disable_compile = True
    mask = torch.ones_like(prompt)
    kw = {_cache_kwarg(m): cache, "do_sample": args.generate_temperature > 0}
    if args.generate_repetition_penalty is not None:  # the same rule: l / p where l > 0, else l * p
        kw["repetition_penalty"] = args.generate_repetition_penalty
    if kw["do_sample"]:  # top_k 0 and top_p 1 turn HF's filters off (its defaults are 50 and 1)
        kw.update(
            temperature=args.generate_temperature,
            top_k=args.generate_top_k or 0,
            top_p=args.generate_top_p if args.generate_top_p is not None else 1.0,
        )

    def run(n: int) -> torch.Tensor:
        cache.reset()
        streamer = {"streamer": StreamText()} if args.generate_stream else {}
        out = m.generate(prompt, attention_mask=mask, max_new_tokens=n, **kw, **streamer)
        return out[:, S:]

    return run


def _timed_call(run, n: int, B: int, device) -> tuple[float, torch.Tensor]:
    """Seconds of ``run(n)`` (:func:`wall_time`) and its ``(B, n)`` new tokens."""
    took, out = wall_time(lambda: run(n), device)
    if out.shape != (B, n):
        raise RuntimeError(f"generate gave {tuple(out.shape)} new tokens, not {(B, n)}")
    return took, out


def generate_phase(variants: list[str], shape: dict, points: list, systems: set, args, device, dtype) -> list[dict]:
    """Decode tokens/s of each system's whole ``generate`` (its loop, sampling and stop checks
    included, as a user gets it; greedy, or sampled with ``--generate-temperature``), at each
    ``(B, S)`` point: calls of ``n_short`` and
    ``n_long`` new tokens in turn on one prompt, the time of a token the median over repetitions
    of ``(t_long - t_short) / (n_long - n_short)``, so the prompt's prefill and the call's setup
    (cache reset, the decoder's warmup and capture) cancel. The first round compiles and is not
    timed; the repetitions go round every system of a point in turn."""
    n_short, n_long = 8, 8 + args.generate_tokens
    rows = []
    for variant in variants:
        torch._dynamo.reset()  # the decode rows' compiled graphs and their memory go first
        free(device)
        max_len = max(S for _, S in points) + n_long + 16
        model = build(variant, shape, max_len, device, dtype)
        models = [("qkvlab", model)] if "qkvlab" in systems else []
        if "hf" in systems and variant in HF_LLAMA:
            models.append(("hf-llama", hf_llama(model)))
        elif "hf" in systems and variant in HF_GEMMA and not args.no_gemma:
            hf, _ = hf_gemma_kv(model)  # the decode rows already said why, if not
            if hf is not None:
                models.append(("hf-gemma4-kv", hf))
        for B, S in points:
            runners, times, errors, tokens = {}, {}, {}, {}
            for system, m in models:
                try:
                    runners[system] = _generate_runner(system, m, B, S, n_long, args, device)
                except torch.OutOfMemoryError:
                    errors[system] = "OOM allocating the cache"
                    free(device)
                times[system] = []
            for rep in range(args.generate_reps + 1):  # round 0 compiles and warms up
                for system, run in runners.items():
                    if system in errors:
                        continue
                    try:
                        (t_short, _), (t_long, out) = (_timed_call(run, n, B, device) for n in (n_short, n_long))
                    except torch.OutOfMemoryError:
                        errors[system] = "OOM"
                        free(device)
                        continue
                    except Exception as e:  # kept in the row, and the run ends with exit status 1
                        errors[system] = f"failed: {type(e).__name__}: {e}"
                        print(f"generate {system} {variant} B={B} prompt {S}: {errors[system]}", flush=True)
                        free(device)
                        continue
                    if rep:
                        times[system].append((t_short, t_long))
                    else:
                        tokens[system] = out
            for system, _ in models:
                row = dict(
                    system=system,
                    variant=variant,
                    B=B,
                    prompt=S,
                    new_tokens=[n_short, n_long],
                    stream=args.generate_stream,
                    temperature=args.generate_temperature,
                    top_k=args.generate_top_k,
                    top_p=args.generate_top_p,
                    repetition_penalty=args.generate_repetition_penalty,
                )
                if system in errors:
                    rows.append({**row, "error": errors[system]})
                    continue
                ts = times[system]
                row["reps"], row["generate_s_each"] = len(ts), ts  # (short, long) seconds, each repetition
                row["token_s"] = statistics.median((t[1] - t[0]) / (n_long - n_short) for t in ts)
                if row["token_s"] > 0:
                    row["tokens_per_s"] = B / row["token_s"]
                else:  # the calls' setup varied by more than the extra tokens took: no figure
                    row["error"] = "noise: the long call took no longer than the short one"
                sampled = args.generate_temperature > 0  # two generators' draws: no token agreement to check
                if system == "hf-llama" and "qkvlab" in tokens and not sampled:  # same weights: equal tokens
                    same = (tokens[system] == tokens["qkvlab"]).cumprod(1).sum(1).float().mean().item()
                    row["greedy_agreement_with_qkvlab"] = same / n_long
                rows.append(row)
            runners = tokens = None
            free(device)
        model = models = None
        free(device)
    return rows


# ----------------------------------------------------------------------------- report
def finish_rows(rows: list[dict], bw_gbps: float, baseline: dict) -> None:
    """Tokens/s, ratio to hf-llama QKV at the same point, fraction of the bandwidth roofline."""
    for r in rows:
        if "step_s" not in r:
            continue
        r["tokens_per_s"] = r["B"] / r["step_s"]
        r["bytes_per_step"] = r["weight_bytes"] + r["B"] * r["context"] * r["cache_bytes_per_token"]
        r["roofline_s"] = r["bytes_per_step"] / (bw_gbps * 1e9)
        r["roofline_fraction"] = r["roofline_s"] / r["step_s"]
        if "step_s_in_a_row" in r:
            r["tokens_per_s_in_a_row"] = r["B"] / r["step_s_in_a_row"]
            r["roofline_fraction_in_a_row"] = r["roofline_s"] / r["step_s_in_a_row"]
        base = baseline.get((r["B"], r["context"]))
        r["vs_hf_llama_qkv"] = r["tokens_per_s"] / base if base else None


def finish_generate_rows(rows: list[dict]) -> None:
    """Each whole-generate row's ratio to HF Llama QKV's at the same point (where that row ran)."""
    base = {(r["B"], r["prompt"]): r["tokens_per_s"] for r in rows
            if r["system"] == "hf-llama" and r["variant"] == "QKV" and "tokens_per_s" in r}  # fmt: skip
    for r in rows:
        if "tokens_per_s" in r:
            b = base.get((r["B"], r["prompt"]))
            r["vs_hf_llama_qkv"] = r["tokens_per_s"] / b if b else None


def baseline_of(rows: list[dict], extra: str | None) -> dict:
    """hf-llama QKV tokens/s per (B, context): this run's rows, else those of ``extra`` (an earlier JSON)."""
    out = {}
    if extra:
        with open(extra) as f:
            for r in json.load(f).get("rows", []):
                if r.get("system") == "hf-llama" and r.get("variant") == "QKV" and "step_s" in r:
                    out[(r["B"], r["context"])] = r["B"] / r["step_s"]
    for r in rows:
        if r.get("system") == "hf-llama" and r.get("variant") == "QKV" and "step_s" in r:
            out[(r["B"], r["context"])] = r["B"] / r["step_s"]
    return out


def targets(rows: list[dict], prefills: list[dict]) -> list[dict]:
    """The goals this benchmark measures, each with the value reached (only where both sides ran)."""
    tps = {(r["system"], r["variant"], r["B"], r["context"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    roof = {(r["variant"], r["B"], r["context"]): r["roofline_fraction"] for r in rows if r["system"] == "qkvlab"}
    roof = {k: v for k, v in roof.items() if v is not None}
    out = []

    def goal(name: str, value: float | None, need: float) -> None:
        if value is not None:
            out.append(dict(goal=name, value=value, need=need, met=value >= need))

    for (system, variant, B, S), t in sorted(tps.items()):
        if system == "qkvlab" and variant in HF_LLAMA and ("hf-llama", variant, B, S) in tps:
            goal(f"qkvlab {variant} / HF Llama {variant}, B={B} S={S}", t / tps["hf-llama", variant, B, S], 1.0)
    for B, need in ((1, 1.45), (16, 1.8)):
        base = tps.get(("hf-llama", "QKV", B, 32768))
        ours = tps.get(("qkvlab", "Q-K=V", B, 32768))
        goal(f"qkvlab Q-K=V / HF Llama QKV, B={B} S=32768", ours / base if ours and base else None, need)
    for (variant, B, S), f in sorted(roof.items()):
        if B == 1 and S == 32768:
            goal(f"qkvlab {variant} roofline fraction, B=1 S=32768", f, 0.75)
    pre = {(p["system"], p["variant"], p["prompt"]): p["prefill_tokens_per_s"] for p in prefills if "error" not in p}
    for (system, variant, P), t in sorted(pre.items()):
        if system == "qkvlab":
            hf = [v for (s, var, p), v in pre.items() if s != "qkvlab" and var == variant and p == P]
            goal(f"prefill qkvlab {variant} / HF, prompt {P}", t / hf[0] if hf else None, 1.0)
            if variant in HF_GEMMA and ("qkvlab", "QKV" if variant == "Q-K=V" else "GQA-8", P) in pre:
                qkv = pre["qkvlab", "QKV" if variant == "Q-K=V" else "GQA-8", P]
                goal(f"prefill qkvlab {variant} / its QKV counterpart, prompt {P}", t / qkv, 1.0)
    return out


def print_row(r: dict) -> None:
    head = f"{r['system']:<13} {r['variant']:<8} B={r['B']:<3} S={r['context']:<6}"
    if "error" in r:
        print(f"{head} {r['error']}", flush=True)
        return
    vs = f"{r['vs_hf_llama_qkv']:5.2f}x" if r.get("vs_hf_llama_qkv") else "  -  "
    extra = ""
    if "tokens_per_s_in_a_row" in r:
        extra = f"  in a row {r['tokens_per_s_in_a_row']:9.1f} tok/s ({r['roofline_fraction_in_a_row']:5.1%})"
    state = r.get("gpu_state")
    if state:  # what the card ran at: a slow run with lowered clocks is the card's, not the code's
        sm = state["sm_clock_MHz"]
        held = [n for n in state["clock_event_reasons"] if n != "GpuIdle"]
        extra += f"  SM {sm['min']}-{sm['max']} MHz" + (f" ({', '.join(held)})" if held else "")
    print(
        f"{head} {r['tokens_per_s']:9.1f} tok/s  {vs} HF QKV  roofline {r['roofline_fraction']:5.1%}  "
        f"check {r['check_rel_err']:.1e}  first step {r['first_step_s']:.1f} s{extra}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU, uncompiled: the checks, no timing claims")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--points", default="1x4096,1x32768,16x4096,16x32768", help="BATCHxCONTEXT,... ('none': skip)")
    ap.add_argument("--systems", default="qkvlab,hf", help="qkvlab, hf, or both")
    ap.add_argument("--prefill", default="4096,32768", help="prompt lengths for prefill tokens/s ('none': skip)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument(
        "--generate",
        default="none",
        help="comma list of BATCHxPROMPT points at which to time each system's whole generate() (greedy; 'none': skip)",
    )
    ap.add_argument("--generate-tokens", type=int, default=200, help="new tokens the long generate call adds")
    ap.add_argument("--generate-reps", type=int, default=3)
    ap.add_argument(
        "--generate-stream",
        action="store_true",
        help="the whole-generate calls stream: every token read on the host and decoded as it comes",
    )
    ap.add_argument(
        "--generate-temperature",
        type=float,
        default=0.0,
        help="the whole-generate calls sample at this temperature (0: greedy), from the default generator",
    )
    ap.add_argument("--generate-top-k", type=int, default=None, help="with --generate-temperature: top_k")
    ap.add_argument("--generate-top-p", type=float, default=None, help="with --generate-temperature: top_p")
    ap.add_argument(
        "--generate-repetition-penalty", type=float, default=None, help="the whole-generate calls' repetition penalty"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile-mode", default="default", help="qkvlab StaticDecoder compile mode ('none': eager)")
    ap.add_argument("--hf-compile-mode", default="reduce-overhead", help="torch.compile mode of HF's forward")
    ap.add_argument("--no-gemma", action="store_true", help="leave out the Gemma 4 K=V rows")
    ap.add_argument("--baseline-from", default=None, help="an earlier JSON whose hf-llama QKV rows the ratios use")
    ap.add_argument(
        "--fuse",
        action="store_true",
        help="qkvlab's decoder fuses each layer's projections into one matrix product (StaticDecoder(fuse=True)); "
        "run once with and once without, on the same machine, to compare",
    )
    ap.add_argument(
        "--gemv",
        default="none",
        help="comma list of how qkvlab's batch-1 step computes its one-row products: none (cuBLAS), kernel "
        "(qkvlab's GEMV kernel), inductor (an Inductor reduction); StaticDecoder(gemv=...). Each is a row; the "
        "first is the 'qkvlab' row the targets are checked on",
    )
    ap.add_argument(
        "--no-pdl",
        action="store_true",
        help="launch qkvlab's kernels plainly, not as programmatic dependents (QKVLAB_PDL=0): what overlap is worth",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.no_pdl:
        os.environ["QKVLAB_PDL"] = "0"
    bad = [g for g in args.gemv.split(",") if g not in ("none", "kernel", "inductor")]
    if bad:
        ap.error(f"--gemv: {bad[0]!r} is not one of none, kernel, inductor")
    try:
        import transformers
    except ImportError:
        raise SystemExit("transformers is not installed (pip install transformers)") from None
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check of the script")
    shape = SMOKE if args.smoke else ONE_B
    points, gen_points = ([] if a == "none" else [tuple(int(v) for v in p.split("x")) for p in a.split(",")]
                          for a in (args.points, args.generate))  # fmt: skip
    prefill = [] if args.prefill == "none" else [int(p) for p in args.prefill.split(",")]
    if args.smoke:
        points = [(1, 40), (2, 56)] if points else []
        prefill = [48] if prefill else []
        gen_points = [(2, 24)] if gen_points else []
        args.steps, args.warmup, args.prefill_reps = 2, 1, 1
        args.generate_tokens, args.generate_reps = 48, 2  # enough that a long call outlasts the noise
        args.compile_mode, args.hf_compile_mode = "none", "none"
    args.compile_mode = None if args.compile_mode == "none" else args.compile_mode
    args.hf_compile_mode = None if args.hf_compile_mode == "none" else args.hf_compile_mode
    if "inductor" in args.gemv.split(",") and args.compile_mode is None:
        ap.error("--gemv inductor has Inductor generate the products: it needs a compiled step (not --smoke)")
    systems = set(args.systems.split(","))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tol = TOL_FP32 if args.smoke else TOL_BF16
    env = env_info(device)
    env["transformers"] = transformers.__version__
    bw = copy_bandwidth(device, timer(device, rep_ms=200))
    print(f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}; copy bandwidth {bw:,.0f} GB/s")
    if args.smoke:
        print("smoke run: CPU, tiny shapes, uncompiled; the times below say nothing about speed")
    max_len = max([S for _, S in points] + prefill + [0]) + args.warmup + 3 * args.steps + 16
    rows, prefills, generates, checks, skipped = [], [], [], {}, {}

    def save(final: bool = False, goals: list | None = None) -> None:
        if args.smoke and not (final and args.out):  # a smoke run writes only to --out, once
            return
        finish_rows(rows, bw, baseline_of(rows, args.baseline_from))
        doc = dict(benchmark="gpu_generate_vs_hf", env=env, copy_bandwidth_GBps=bw, model=shape, dtype=str(dtype))
        doc.update(partial=not final, rows=rows, prefill=prefills, generate=generates, checks=checks)
        doc.update(skipped=skipped, args=vars(args))
        doc["targets"] = goals or []
        for path in write_json(doc, NAME, args.out):
            if final:
                print(f"wrote {path}")

    for v_i, variant in enumerate(args.variants.split(",") if points else []):
        torch._dynamo.reset()  # each model compiles afresh
        model = build(variant, shape, max_len, device, dtype)
        hf, system = None, None
        if "hf" in systems and variant in HF_LLAMA:
            hf, system = hf_llama(model), "hf-llama"
            checks[variant] = model_checks(model, hf, device, tol)
            c = checks[variant]
            print(
                f"{variant}: qkvlab vs HF Llama (same weights): forward logits rel.err {c['forward_rel_err']:.1e}, "
                f"greedy tokens agree {c['greedy_agreement']:.0%}",
                flush=True,
            )
        elif "hf" in systems and variant in HF_GEMMA and not args.no_gemma:
            hf, why = hf_gemma_kv(model)
            system = "hf-gemma4-kv"
            if hf is None:
                skipped[variant] = why
                print(f"{variant}: no HF K=V row: {why}", flush=True)
            else:
                (B0, S0), seed0 = points[0], 1000 * v_i
                checks[variant] = gemma_float32_check(
                    hf, B0, S0, args, device, seed0, model.config.vocab_size, GEMMA_TOL
                )
                c = checks[variant]
                print(
                    f"{variant}: HF Gemma 4 K=V, float32 copy at {c['at']}: compiled vs uncompiled step "
                    + (c["error"] if "error" in c else f"rel.err {c['gemma_float32_compiled_vs_eager_rel_err']:.1e}"),
                    flush=True,
                )
        for p_i, (B, S) in enumerate(points):
            seed = 1000 * v_i + 10 * p_i
            ref = None
            if "qkvlab" in systems:
                for g_i, gemv in enumerate(args.gemv.split(",")):
                    row, ref_g = qkvlab_point(model, B, S, args, device, seed, gemv)
                    if g_i:  # the first route is "qkvlab", whose rows the targets read; the others beside it
                        row["system"] = f"qkvlab gemv={gemv}"
                    ref = ref if ref is not None else ref_g
                    rows.append({"variant": variant, **row})
                    save()
            if hf is not None:
                if system == "hf-llama" and ref is None:  # the qkvlab eager step is the reference
                    token, cache = point_inputs(model, B, S, args, device, seed)
                    ref = model.decode_one(token, cache).float()
                    cache = None
                    free(device)
                row = hf_point(hf, system, B, S, args, device, seed, ref, model, checks.get(variant))
                rows.append({"variant": variant, **row})
                save()
        model = hf = None
        free(device)
    if prefill:
        torch._dynamo.reset()  # the decode points' compiled graphs and their memory go first
        free(device)
        prefills.extend(prefill_phase(args.variants.split(","), shape, prefill, systems, args, device, dtype))
        save()
    if gen_points:
        generates.extend(generate_phase(args.variants.split(","), shape, gen_points, systems, args, device, dtype))
        finish_generate_rows(generates)
        save()

    finish_rows(rows, bw, baseline_of(rows, args.baseline_from))
    print()
    for r in rows:
        print_row(r)
    for r in prefills:
        what = f"{r['prefill_tokens_per_s']:12,.0f} tok/s" if "error" not in r else r["error"]
        print(f"prefill {r['system']:<13} {r['variant']:<8} prompt {r['prompt']:<6} {what}")
    for r in generates:
        head = f"generate {r['system']:<13} {r['variant']:<8} B={r['B']:<3} prompt {r['prompt']:<6}"
        head += " streamed" if r.get("stream") else ""
        head += f" sampled at T={r['temperature']}" if r.get("temperature") else ""
        if "tokens_per_s" not in r:
            print(f"{head} {r['error']}")
            continue
        vs = f"{r['vs_hf_llama_qkv']:5.2f}x HF QKV" if r.get("vs_hf_llama_qkv") else ""
        agree = r.get("greedy_agreement_with_qkvlab")
        agree = f"  greedy tokens as qkvlab's {agree:.0%}" if agree is not None else ""
        print(f"{head} {r['tokens_per_s']:9.1f} tok/s  {vs}{agree}")
    goals = targets(rows, prefills)
    if goals:
        print("\ntargets" + (" (smoke: shapes too small to mean anything)" if args.smoke else ""))
        for g in goals:
            print(f"  {'met ' if g['met'] else 'MISS'} {g['goal']:<58} {g['value']:6.2f} (need >= {g['need']})")
    save(final=True, goals=goals)
    bad = [r for r in rows if "error" not in r and not r["check_rel_err"] <= tol]  # NaN fails too
    bad += [r for r in generates if r.get("error", "").startswith("failed")]
    bad += [{"model check": v, **c} for v, c in checks.items() if not c["ok"]]
    if bad:
        raise SystemExit(f"checks beyond tolerance {tol}, or generate calls that failed: {bad}")
    print(f"all checks within {tol}")


if __name__ == "__main__":
    main()
