"""Export a qkvlab GPT to a folder transformers loads (``qkvlab export RUN OUT --format hf``).

Two targets (``arch``):

``stock``
    A class transformers ships: ``LlamaForCausalLM`` for the ``llama`` layout (RMSNorm, SwiGLU,
    RoPE) and ``GPT2LMHeadModel`` for the ``gpt2`` layout (LayerNorm, GELU, learned positions).
    Separate projections (QKV, GQA, MQA) map one to one. A projection-shared variant is
    *expanded*: the shared weights are written into each role (Q-K=V: the same matrix as
    ``k_proj`` and ``v_proj``). The logits are the same, and the folder serves anywhere that
    serves Llama or GPT-2 (vLLM, llama.cpp after conversion, ...), but the stock cache stores a
    key and a value tensor per layer: for a K=V variant twice the bytes of the native cache.
    GPT-2 has no grouped heads, so a GQA/MQA ``gpt2`` model's K/V heads are repeated there.
``native``
    :class:`qkvlab.hf.QkvlabForCausalLM`, which runs qkvlab's own attention inside
    transformers; a K=V variant caches one tensor per layer in ``generate``. Loading needs
    ``import qkvlab.hf`` first (it registers the class with the Auto classes).

``auto`` picks ``native`` for a variant whose key and value share a projection (the point of
K=V is its cache) and ``stock`` otherwise. Every export is checked: the exported model's
logits on a random batch are compared with qkvlab's and the difference is recorded in
``qkvlab-export.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from qkvlab.checkpoint import load_model, read_metadata
from qkvlab.errors import ConfigError
from qkvlab.interop.common import (
    check_output,
    checkpoint_file,
    dtype_of,
    output_folder,
    relative_error,
    require,
    tokenizer_folder,
    train_config,
)
from qkvlab.interop.layout import block, repeat_kv_heads, role_tensors
from qkvlab.models.config import GPTConfig

ARCHS = ("auto", "stock", "native")
FORMATS = ("hf",)
REPORT = "qkvlab-export.json"
#: The largest relative logit difference an export may show in float32 before it is refused.
MAX_REL_ERROR = 1e-4


def stock_family(cfg: GPTConfig) -> str:
    """``"llama"`` or ``"gpt2"``: the stock transformers class that computes ``cfg`` exactly."""
    v = cfg.variant
    why = []
    if v.linear:
        why.append("linear attention")
    if v.qk_norm:
        why.append("QK-norm")
    if v.pos2d:
        why.append("the 2D positional fix")
    layout = (cfg.norm, cfg.mlp, v.pos)
    if not why and layout == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    if not why and layout == ("layernorm", "gelu", "learned") and cfg.n_heads * cfg.head_dim == cfg.d_model:
        return "gpt2"
    if not why:
        why.append(f"norm={cfg.norm}, mlp={cfg.mlp}, positions={v.pos}, heads*head_dim={cfg.n_heads * cfg.head_dim}")
    raise ConfigError(
        f"No stock transformers class computes this model ({'; '.join(why)}): Llama needs rmsnorm/swiglu/rope and "
        "GPT-2 layernorm/gelu/learned with heads*head_dim == d_model. Export it with --arch native."
    )


# --------------------------------------------------------------------------- stock models
def llama_model(model, special: dict[str, int | None]):
    """A ``LlamaForCausalLM`` holding ``model``'s weights (shared projections expanded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=bool(cfg.tie_embeddings),
        attention_bias=bool(cfg.bias),
        mlp_bias=bool(cfg.bias),
        hidden_act="silu",
        attention_dropout=cfg.attn_dropout,
        initializer_range=cfg.init_std,
        **special,
    )
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["backbone.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
    for i in range(cfg.n_layers):
        b, h = block(i), f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
        for role, (w, bias) in role_tensors(sd, cfg, i).items():
            out[h + f"self_attn.{names[role]}.weight"] = w
            if cfg.bias:
                out[h + f"self_attn.{names[role]}.bias"] = bias
        for ours, theirs in (("attn.o_proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                             ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")):  # fmt: skip
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
            if cfg.bias:
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    hf = LlamaForCausalLM(hf_cfg)
    _load_exact(hf, out)
    return hf


def gpt2_model(model, special: dict[str, int | None]):
    """A ``GPT2LMHeadModel`` holding ``model``'s weights (shared projections expanded, K/V heads
    repeated for GQA/MQA)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function="gelu",  # exact erf GELU, as torch.nn.GELU()
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.emb_dropout,
        attn_pdrop=cfg.attn_dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=bool(cfg.tie_embeddings),
        **special,
    )
    sd = model.state_dict()

    def bias(name: str, n: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(n, dtype=sd["wte.weight"].dtype))

    d = cfg.d_model
    out = {
        "transformer.wte.weight": sd["wte.weight"],
        "transformer.wpe.weight": sd["backbone.wpe.weight"],
        "transformer.ln_f.weight": sd["backbone.norm.weight"],
        "transformer.ln_f.bias": bias("backbone.norm.bias", d),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = block(i), f"transformer.h.{i}."
        roles = role_tensors(sd, cfg, i)
        ws, bs = [], []
        for role in ("q", "k", "v"):
            w, bb = roles[role]
            if role != "q":
                w, bb = (
                    repeat_kv_heads(w, cfg.n_kv_heads, cfg.n_heads),
                    repeat_kv_heads(bb, cfg.n_kv_heads, cfg.n_heads),
                )
            ws.append(w)
            bs.append(bb)
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight.
        out[h + "attn.c_attn.weight"] = torch.cat(ws, 0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat(bs, 0)
        out[h + "attn.c_proj.weight"] = sd[b + "attn.o_proj.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = bias(b + "attn.o_proj.bias", d)
        out[h + "mlp.c_fc.weight"] = sd[b + "mlp.up.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = bias(b + "mlp.up.bias", cfg.d_ff)
        out[h + "mlp.c_proj.weight"] = sd[b + "mlp.down.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = bias(b + "mlp.down.bias", d)
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
            out[h + theirs + ".bias"] = bias(b + ours + ".bias", d)
    hf = GPT2LMHeadModel(hf_cfg)
    _load_exact(hf, out)
    return hf


def native_model(model, special: dict[str, int | None]):
    """A :class:`qkvlab.hf.QkvlabForCausalLM` holding ``model``'s weights."""
    from qkvlab.hf import QkvlabConfig, QkvlabForCausalLM

    hf = QkvlabForCausalLM(QkvlabConfig(qkvlab=model.config.to_dict(), **special))
    hf.model.load_state_dict(model.state_dict(), strict=True)
    return hf


def _load_exact(hf, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` into ``hf``; every parameter must be given (tied ones aside)."""
    own = hf.state_dict()
    tied = set(getattr(hf, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(own) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(f"Export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    hf.load_state_dict(tensors, strict=False)


# --------------------------------------------------------------------------- tokenizer
def export_tokenizer(weights: Path, out: Path, max_len: int) -> dict[str, Any]:
    """Write the run's tokenizer as transformers files; returns what was written (and special ids)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    from qkvlab.data.tokenizers import EOT_TEXT, find_gpt2_files
    from qkvlab.interop.tokenizer import bpe_from_files, byte_tokenizer

    folder = tokenizer_folder(weights)
    meta: dict[str, Any] = {}
    if folder is not None and (folder / "tokenizer.json").is_file():
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        source = f"{folder}/tokenizer.json"
    elif folder is not None:
        tok = bpe_from_files(folder / "vocab.json", folder / "merges.txt")
        source = f"{folder}/vocab.json + merges.txt"
    else:
        name = (train_config(read_metadata(weights)).get("data") or {}).get("tokenizer")
        if name == "byte":
            tok, source = byte_tokenizer(), "byte"
        elif isinstance(name, str) and name.startswith("gpt2"):
            vocab, merges = find_gpt2_files(name.partition(":")[2] or None)
            tok, source = bpe_from_files(vocab, merges), f"gpt2 ({vocab.parent})"
        else:
            return {"tokenizer": None, "note": "the checkpoint records no tokenizer; none was written"}
    if folder is not None and (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except ValueError:
            meta = {}
    eot = meta.get("eot_token") or EOT_TEXT
    specials = {
        "bos_token": meta.get("bos_token") or eot,
        "eos_token": meta.get("eos_token") or eot,
        "pad_token": meta.get("pad_token"),
    }
    specials = {k: v for k, v in specials.items() if v is not None and tok.token_to_id(v) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **specials)
    fast.save_pretrained(str(out))
    ids = {k.replace("_token", "_token_id"): tok.token_to_id(v) for k, v in specials.items()}
    return {"tokenizer": source, **specials, "ids": ids}


# --------------------------------------------------------------------------- entry point
def export_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str = "auto",
    dtype: str = "fp32",
    force: bool = False,
) -> dict[str, Any]:
    """Export the qkvlab checkpoint ``src`` (file, checkpoint or run folder) to the folder ``out``.

    Returns the report also written to ``out/qkvlab-export.json``.
    """
    require("transformers", "Export to transformers")
    if arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}.")
    torch_dtype = dtype_of(dtype)
    weights = checkpoint_file(src)
    check_output(out, force=force, inputs=(src, weights))
    model = load_model(weights).eval()
    cfg = model.config
    if not isinstance(cfg, GPTConfig):
        raise ConfigError(f"Only GPT language models export to transformers; {str(weights)!r} holds a {cfg.family!r}.")
    v = cfg.variant
    if v.linear:
        raise ConfigError(
            f"Variant {v.id!r} uses linear attention, which no transformers cache layer holds; it cannot be exported."
        )
    if arch == "auto":
        arch = "native" if v.kv_shared else "stock"
    family = stock_family(cfg) if arch == "stock" else "qkvlab"
    with output_folder(out, force=force, inputs=(src, weights)) as tmp:
        tok_info = export_tokenizer(weights, tmp, cfg.max_seq_len)
        special = dict(tok_info.get("ids") or {})
        build = {"llama": llama_model, "gpt2": gpt2_model, "qkvlab": native_model}[family]
        hf = build(model, special).eval()
        err = _check_logits(model, hf)
        if err > MAX_REL_ERROR:
            raise ConfigError(
                f"The exported {type(hf).__name__} does not reproduce the qkvlab logits (relative difference "
                f"{err:.2e} > {MAX_REL_ERROR:g}); this is a bug in the export mapping, please report it."
            )
        hf.generation_config.bos_token_id = special.get("bos_token_id")
        hf.generation_config.eos_token_id = special.get("eos_token_id")
        hf.generation_config.pad_token_id = special.get("pad_token_id", special.get("eos_token_id"))
        _quietly(lambda: hf.to(torch_dtype).save_pretrained(str(tmp)))
        report = _report(weights, cfg, hf, family, arch, dtype, torch_dtype, err, tok_info)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _quietly(fn) -> None:
    """Run ``fn`` without transformers' progress bars (the command prints its own summary)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        fn()
    finally:
        if was:
            logging.enable_progress_bar()


@torch.no_grad()
def _check_logits(model, hf) -> float:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, min(16, cfg.max_seq_len)), generator=gen)
    ours = model(idx).float()
    theirs = hf(input_ids=idx, use_cache=False).logits.float()
    return relative_error(theirs, ours)


def _report(weights, cfg, hf, family, arch, dtype, torch_dtype, err, tok_info) -> dict[str, Any]:
    v = cfg.variant
    elem = torch.empty((), dtype=torch_dtype).element_size()
    native_tensors = v.cached_tensors
    if family == "qkvlab":
        tensors, kv_heads = native_tensors, cfg.n_kv_heads
    else:
        tensors = 2
        kv_heads = cfg.n_kv_heads if family == "llama" else cfg.n_heads
    per_token = cfg.n_layers * tensors * kv_heads * cfg.head_dim * elem
    native = cfg.n_layers * native_tensors * cfg.n_kv_heads * cfg.head_dim * elem
    notes = []
    if family != "qkvlab" and v.sharing != "q_k_v":
        note = (
            f"{v.paper_name} expanded into {type(hf).__name__}: the shared projection is written into each role it "
            "serves, so the logits are the same"
        )
        if per_token != native:
            note += (
                f", but the cache holds {tensors} tensors per layer ({per_token:,} B/token at {dtype}) where "
                f"qkvlab's holds {native_tensors} ({native:,} B/token); --arch native keeps qkvlab's cache"
            )
        notes.append(note + ".")
    if family == "gpt2" and cfg.n_kv_heads != cfg.n_heads:
        notes.append(f"GPT-2 has no grouped heads: the {cfg.n_kv_heads} K/V heads are repeated to {cfg.n_heads}.")
    if family == "qkvlab":
        notes.append("Load with: import qkvlab.hf; AutoModelForCausalLM.from_pretrained(OUT) (no trust_remote_code).")
    return {
        "source": str(weights),
        "format": "hf",
        "arch": arch,
        "class": type(hf).__name__,
        "variant": v.id,
        "paper_name": v.paper_name,
        "dtype": dtype,
        "cached_tensors_per_layer": tensors,
        "kv_cache_bytes_per_token": per_token,
        "native_kv_cache_bytes_per_token": native,
        "max_relative_logit_difference_fp32": err,
        **{k: tok_info[k] for k in ("tokenizer", "note") if k in tok_info},
        "notes": notes,
    }
