"""Import a pretrained model into a qkvlab run folder (``qkvlab import SRC OUT``).

``SRC`` is a transformers folder (``config.json`` + safetensors weights, sharded or not) or a
``.gguf`` file (:mod:`qkvlab.interop.gguf_import`). Architectures read from a folder, all into
qkvlab's ``llama`` recipe with the QKV / GQA / MQA variant the checkpoint has:

- ``LlamaForCausalLM`` (Llama 1-3 with plain RoPE, SmolLM / SmolLM2, TinyLlama, ...), with or
  without attention / MLP biases;
- ``MistralForCausalLM`` without a sliding window;
- ``Qwen2ForCausalLM`` without a sliding window: its q/k/v biases are kept, and the o_proj and
  MLP biases qkvlab's single ``bias`` flag also creates are zeros (the function is unchanged;
  those zeros become trainable parameters in further training);
- ``Qwen3ForCausalLM`` (QK-norm, carried over as the variant's ``+qknorm``) when its
  ``rms_norm_eps`` is qkvlab's head-norm epsilon, 1e-6.

Everything else is refused with the field or tensor that cannot be mapped: RoPE scaling
(Llama 3.1 ``llama3``, YaRN, ...), sliding windows, other activations, quantised weights,
partial rotary, pickled ``.bin`` weights. Weights are read with safetensors only (nothing is
unpickled) and stored in ``--dtype`` (float32 by default, so the imported model reproduces the
source's logits).

The output is a qkvlab run folder: ``model.safetensors`` (a qkvlab checkpoint for
:func:`qkvlab.load_model`, ``qkvlab generate``, ``qkvlab eval ppl`` and later training),
``tokenizer/`` (``tokenizer.json`` + GPT-2 style files, read by ``bpe:OUT/tokenizer``) and
``interop.json`` saying what was done.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.interop.common import check_output, dtype_of, model_from_tensors, output_folder, write_run
from qkvlab.interop.layout import block, group_tensors
from qkvlab.models.config import GPTConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

#: Fields every transformers config may carry that do not change what the weights compute.
GENERIC_FIELDS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "attention_dropout", "max_window_layers", "auto_map",
    "_attn_implementation_autoset", "_attn_implementation", "pretraining_tp", "layer_types",
    # written by the converter SmolLM was trained with; transformers' Llama does not read them
    "is_llama_config", "rope_interleaved",
    # generation defaults some configs still carry
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "diversity_penalty",
}  # fmt: skip
#: Fields that define the model, read below.
SHAPE_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window",
}  # fmt: skip


def import_model(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    max_seq_len: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Import ``src`` (a transformers folder or a ``.gguf`` file) into the qkvlab run folder ``out``.

    ``max_seq_len`` caps the context (default: the source's); returns the report written to
    ``out/interop.json``.
    """
    src = Path(src)
    torch_dtype = dtype_of(dtype)
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or max_seq_len < 1):
        raise ConfigError(f"--max-seq-len must be at least 1, got {max_seq_len} (leave it out for the source's).")
    check_output(out, force=force, inputs=(src,))
    if src.is_file() and (src.suffix.lower() == ".gguf" or _is_gguf(src)):
        from qkvlab.interop.gguf_import import read_gguf

        cfg, tensors, tok, info = read_gguf(src, max_seq_len=max_seq_len)
    elif src.is_dir() and (src / "config.json").is_file():
        cfg, tensors, tok, info = read_hf_folder(src, max_seq_len=max_seq_len)
    else:
        raise ConfigError(
            f"{str(src)!r} is neither a transformers model folder (with config.json) nor a .gguf file; "
            "point qkvlab import at one of those."
        )
    model = model_from_tensors(cfg, tensors, where=str(src)).to(torch_dtype)
    report = {
        "action": "import",
        "source": str(src.resolve()),
        **info,
        "variant": cfg.variant.id,
        "paper_name": cfg.variant.paper_name,
        "dtype": dtype,
        "params": sum(p.numel() for p in model.parameters()),
    }
    with output_folder(out, force=force, inputs=(src,)) as tmp:
        if tok is not None:
            from qkvlab.interop.tokenizer import write_tokenizer_folder

            hf_tok, eot, specials = tok
            write_tokenizer_folder(tmp / "tokenizer", hf_tok, eot_token=eot, source=str(src), specials=specials)
            report["tokenizer"] = {"eot_token": eot, **specials}
        else:
            report["tokenizer"] = None
        write_run(tmp, model, report=report)
    return report


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# --------------------------------------------------------------------------- transformers folders
def _refuse(where: str, field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: config field {field}={value!r} cannot be mapped to qkvlab: {why}.")


_MISSING = object()


def _field(raw: dict[str, Any], where: str, name: str, kind: type, default: Any = _MISSING) -> Any:
    """``raw[name]`` checked to be a positive int (``kind`` int) or a finite number (float); a
    field that is absent or null takes ``default`` where there is one."""
    value = raw.get(name)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"{where}: config.json has no {name!r}, which qkvlab needs to build the model.")
        return default
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _refuse(where, name, value, "it must be a positive integer")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(where, name, value, "it must be a finite number")
    return float(value)


def hf_config(raw: dict[str, Any], where: str, max_seq_len: int | None) -> tuple[GPTConfig, str]:
    """The qkvlab config of a transformers ``config.json`` (as a dict) and the family name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: config.json holds a {type(raw).__name__}, not a JSON object of settings.")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _refuse(where, "architectures", archs, "it must be a list of class names")
    arch = archs[0] if archs else None
    family = ARCHITECTURES.get(arch or "")
    if family is None:
        raise ConfigError(
            f"{where}: architecture {arch or raw.get('model_type')!r} is not supported; qkvlab imports "
            f"{', '.join(ARCHITECTURES)} (and GGUF files)."
        )
    unknown = sorted(set(raw) - GENERIC_FIELDS - SHAPE_FIELDS)
    if unknown:
        raise _refuse(where, unknown[0], raw[unknown[0]], f"qkvlab has no equivalent for {unknown[0]!r}")
    if raw.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", raw["hidden_act"], "qkvlab's SwiGLU uses silu")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise _refuse(where, "pretraining_tp", raw["pretraining_tp"], "only 1 (no tensor-parallel slicing) is read")
    if raw.get("use_sliding_window") or (family == "mistral" and raw.get("sliding_window") is not None):
        field = "use_sliding_window" if "use_sliding_window" in raw else "sliding_window"
        raise _refuse(where, field, raw[field], "qkvlab attends over the whole context (no sliding window)")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise _refuse(where, "layer_types", raw["layer_types"], "every layer must be full attention")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ("default", None):
        field = "rope_parameters" if "rope_parameters" in raw else "rope_scaling"
        raise _refuse(where, field, rope, f"RoPE type {rope_type!r}; qkvlab's RoPE is the plain one")
    if isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(where, "partial_rotary_factor", rope["partial_rotary_factor"], "qkvlab rotates whole heads")
    theta = _field(rope if isinstance(rope, dict) and rope.get("rope_theta") is not None else raw,
                   where, "rope_theta", float, 10000.0)  # fmt: skip
    n_heads = _field(raw, where, "num_attention_heads", int)
    d_model = _field(raw, where, "hidden_size", int)
    head_dim = _field(raw, where, "head_dim", int, d_model // n_heads)
    n_kv = _field(raw, where, "num_key_value_heads", int, n_heads)
    eps = _field(raw, where, "rms_norm_eps", float, 1e-6)
    qk_norm = family == "qwen3"
    if qk_norm and eps != 1e-6:
        raise _refuse(where, "rms_norm_eps", eps, "Qwen3's QK-norm would need it, and qkvlab's head norms use 1e-6")
    if family == "qwen2":
        bias = True  # q/k/v biases in Qwen2's code; the others are written as zeros
    else:
        bias = bool(raw.get("attention_bias", False)) or bool(raw.get("mlp_bias", False))
    ctx = _field(raw, where, "max_position_embeddings", int, 2048)
    cfg = GPTConfig(
        recipe="llama",
        n_layers=_field(raw, where, "num_hidden_layers", int),
        d_model=d_model,
        n_heads=n_heads,
        head_dim=head_dim,
        d_ff=_field(raw, where, "intermediate_size", int),
        vocab_size=_field(raw, where, "vocab_size", int),
        max_seq_len=min(ctx, max_seq_len) if max_seq_len is not None else ctx,
        norm_eps=eps,
        rope_theta=theta,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bias=bias,
        attn_dropout=_field(raw, where, "attention_dropout", float, 0.0),
        init_std=_field(raw, where, "initializer_range", float, 0.02),
        variant=VariantSpec("q_k_v", n_kv_heads=None if n_kv == n_heads else n_kv, pos="rope", qk_norm=qk_norm),
    )
    return cfg, family


def _read_safetensors(folder: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" ({', '.join(pickled[:2])} are pickled and are not read)" if pickled else ""
        raise ConfigError(f"{where}: no safetensors weights (model.safetensors or its index){hint}.")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{where}: cannot read {name}: {e}.") from None
    return tensors


def hf_tensors(raw: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """qkvlab state dict from a Llama-layout transformers state dict; every source tensor used."""
    src = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}  # a derived buffer
    used: set[str] = set()

    def take(name: str, *, optional: bool = False) -> torch.Tensor | None:
        if name not in src:
            if optional:
                return None
            raise ConfigError(f"{where}: tensor {name!r} is missing from the weights.")
        used.add(name)
        return src[name]

    out = {"wte.weight": take("model.embed_tokens.weight"), "backbone.norm.weight": take("model.norm.weight")}
    head = take("lm_head.weight", optional=True)
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, out["wte.weight"]):
            raise ConfigError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the embedding.")
    elif head is None:
        raise ConfigError(f"{where}: tensor 'lm_head.weight' is missing (tie_word_embeddings is false).")
    else:
        out["lm_head.weight"] = head
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", block(i)
        out[b + "norm1.weight"] = take(h + "input_layernorm.weight")
        out[b + "norm2.weight"] = take(h + "post_attention_layernorm.weight")
        roles = {
            r: (take(h + f"self_attn.{r}_proj.weight"), take(h + f"self_attn.{r}_proj.bias", optional=True))
            for r in ("q", "k", "v")
        }
        out.update(group_tensors(roles, cfg, i, where=where))
        if cfg.variant.qk_norm:
            out[b + "attn.q_norm.weight"] = take(h + "self_attn.q_norm.weight")
            out[b + "attn.k_norm.weight"] = take(h + "self_attn.k_norm.weight")
        for ours, theirs in (("attn.o_proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                             ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")):  # fmt: skip
            w = take(h + theirs + ".weight")
            out[b + ours + ".weight"] = w
            bias = take(h + theirs + ".bias", optional=True)
            if cfg.bias:
                out[b + ours + ".bias"] = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    left = sorted(set(src) - used)
    if left:
        raise ConfigError(f"{where}: tensor {left[0]!r} has no place in a qkvlab model ({len(left)} such tensors).")
    return out


def hf_tokenizer(folder: Path, raw_cfg: dict[str, Any]):
    """(tokenizers.Tokenizer, end-of-text token, special tokens) of a transformers folder, or None."""
    from tokenizers import Tokenizer as HFTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own untyped Exception for a bad file
        raise ConfigError(
            f"{folder}: tokenizer.json cannot be read ({str(e).rstrip('.')}); replace it with the model's own, or "
            "move it away to import the weights without a tokenizer."
        ) from None
    try:
        tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tcfg = {}

    def name(key: str) -> str | None:
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None and raw_cfg.get(f"{key}_id") is not None:
            ids = raw_cfg[f"{key}_id"]
            value = tok.id_to_token(ids[0] if isinstance(ids, list) else ids)
        return value

    specials = {"bos_token": name("bos_token"), "eos_token": name("eos_token"), "pad_token": name("pad_token")}
    eot = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else specials["eos_token"]
    if eot is None:
        return None
    return tok, eot, specials


def read_hf_folder(folder: Path, *, max_seq_len: int | None = None):
    where = str(folder)
    try:
        raw_cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read config.json: {e}.") from None
    cfg, family = hf_config(raw_cfg, where, max_seq_len)
    tensors = hf_tensors(_read_safetensors(folder, where), cfg, where)
    notes = []
    if family == "qwen2":
        notes.append(
            "Qwen2's q/k/v biases are kept; the o_proj and MLP biases qkvlab's bias flag adds are zeros (same "
            "function; they become trainable in further training)."
        )
    info = {"format": "transformers", "architecture": raw_cfg["architectures"][0], "family": family, "notes": notes}
    return cfg, tensors, hf_tokenizer(folder, raw_cfg), info
