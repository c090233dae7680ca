"""Read a GGUF file (llama.cpp's format) into a qkvlab config, state dict and tokenizer.

Read through the ``gguf`` package (pure Python): every tensor is dequantised to float32 with
``gguf.quants.dequantize``; a quantisation type that package cannot dequantise is refused,
naming it. Architectures: ``llama`` (Llama, SmolLM, Mistral without a sliding window, ...),
``qwen2`` and ``qwen3``.

llama.cpp rotates RoPE pairs that are adjacent (``x[2i], x[2i+1]``), while transformers and
qkvlab rotate pairs half a head apart (``x[i], x[i + D/2]``). To run the same function with
adjacent pairs, llama.cpp's converter reorders the rows of the query and key projections of
``llama`` models, per head: row ``2i + j`` of the GGUF head is row ``j * D/2 + i`` of the
original head. :func:`unpermute_rope_rows` puts them back. ``qwen2`` / ``qwen3`` models run
llama.cpp's half-apart ("NEOX") rotation and are stored unpermuted.

The tokenizer is rebuilt from the file's vocabulary (``tokenizer.ggml.tokens``), merges and
token types (control tokens become special tokens) with the split rules named by
``tokenizer.ggml.pre`` (:data:`qkvlab.interop.tokenizer.PRE_TOKENIZERS`); only byte-level BPE
vocabularies (``tokenizer.ggml.model = gpt2``) are rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.interop.common import require
from qkvlab.interop.layout import block, proj
from qkvlab.models.config import GPTConfig

ARCHITECTURES = ("llama", "qwen2", "qwen3")
#: GGUF tensor name (per layer, after ``blk.N.``) -> qkvlab name (after ``backbone.blocks.N.``).
LAYER_TENSORS = {
    "attn_norm.weight": "norm1.weight",
    "ffn_norm.weight": "norm2.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_output.bias": "attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
}
ROLE_TENSORS = {"attn_q": "q", "attn_k": "k", "attn_v": "v"}
# GGUF token types (llama.cpp's llama_token_type): 3 control, 4 user-defined.
CONTROL, USER_DEFINED = 3, 4


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head reordering of query / key rows (see the module docstring).

    ``w`` is ``(n_heads * D, ...)`` (a weight or a bias). GGUF row ``2i + j`` of a head holds
    original row ``j * D/2 + i``: view each head as ``(D/2, 2)``, swap to ``(2, D/2)``.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The reordering llama.cpp applies (the inverse of :func:`unpermute_rope_rows`); for tests."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


class _Fields:
    """Typed access to a GGUF file's key-value metadata with clear errors."""

    def __init__(self, reader, where: str) -> None:
        self.reader = reader
        self.where = where

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # the gguf package raises plain errors for malformed values
            raise ConfigError(f"{self.where}: cannot read GGUF key {key!r}: {e}.") from None

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.where}: GGUF key {key!r} is missing; the file is not a complete model.")
        return value


def _nice_float(x: float) -> float:
    """A float32-stored constant (1e-05 read back as 9.99999974e-06) as the decimal it was."""
    return float(f"{float(np.float32(x)):.6g}")


def gguf_config(fields: _Fields, arch: str, tensor_shapes: dict[str, tuple[int, ...]], max_seq_len: int | None):
    where = fields.where
    n_layers = int(fields.need(f"{arch}.block_count"))
    d_model = int(fields.need(f"{arch}.embedding_length"))
    n_heads = int(fields.need(f"{arch}.attention.head_count"))
    n_kv = int(fields.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(fields.get(f"{arch}.attention.key_length", d_model // n_heads))
    value_dim = int(fields.get(f"{arch}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ConfigError(
            f"{where}: key width {head_dim} differs from value width {value_dim}; qkvlab needs them equal."
        )
    rot = int(fields.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ConfigError(
            f"{where}: RoPE on {rot} of {head_dim} head dims (partial rotary); qkvlab rotates whole heads."
        )
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConfigError(f"{where}: GGUF key {arch}.rope.scaling.type={scaling!r}; qkvlab's RoPE is the plain one.")
    if fields.get(f"{arch}.attention.sliding_window") is not None:
        raise ConfigError(f"{where}: the model uses a sliding window; qkvlab attends over the whole context.")
    vocab = tensor_shapes["token_embd.weight"][0]
    ctx = int(fields.get(f"{arch}.context_length", 2048))
    eps = _nice_float(fields.need(f"{arch}.attention.layer_norm_rms_epsilon"))
    qk_norm = arch == "qwen3"
    if qk_norm and eps != 1e-6:
        raise ConfigError(f"{where}: Qwen3's QK-norm epsilon is {eps:g}; qkvlab's head norms use 1e-6.")
    has_bias = any(k.endswith(".bias") for k in tensor_shapes)
    return GPTConfig(
        recipe="llama",
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        head_dim=head_dim,
        d_ff=int(fields.need(f"{arch}.feed_forward_length")),
        vocab_size=int(vocab),
        max_seq_len=min(ctx, max_seq_len) if max_seq_len is not None else ctx,
        norm_eps=eps,
        rope_theta=_nice_float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_shapes,
        bias=has_bias,
        variant=VariantSpec("q_k_v", n_kv_heads=None if n_kv == n_heads else n_kv, pos="rope", qk_norm=qk_norm),
    )


def dequantize(tensor, where: str) -> torch.Tensor:
    """A GGUF tensor as float32 in PyTorch layout (rows = output features)."""
    gguf = require("gguf", "Reading GGUF files")
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ConfigError(
            f"{where}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, a type the gguf package cannot "
            "dequantise; convert the file to F16, Q8_0 or another type gguf.quants reads (llama-quantize)."
        ) from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dimension first
    return torch.from_numpy(np.array(data, dtype=np.float32, copy=True).reshape(shape))


def gguf_tokenizer(fields: _Fields):
    """(tokenizers.Tokenizer, end-of-text token, special tokens) from the file's vocabulary, or None."""
    from qkvlab.interop.tokenizer import PRE_TOKENIZERS, byte_level_bpe

    where = fields.where
    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise ConfigError(
            f"{where}: tokenizer.ggml.model={kind!r}; qkvlab rebuilds byte-level BPE vocabularies ('gpt2') only."
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(
            f"{where}: tokenizer.ggml.pre={pre!r} names split rules qkvlab does not know; known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}."
        )
    tokens = list(fields.need("tokenizer.ggml.tokens"))
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConfigError(f"{where}: the GGUF vocabulary repeats a token; it cannot be a BPE vocabulary.")
    special = [t for t, k in zip(tokens, types, strict=True) if k == CONTROL]
    added = [t for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED]
    tok = byte_level_bpe(vocab, merges, pre=pre, special_tokens=special, added_tokens=added)

    def name(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    specials = {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding")}
    eot = "<|endoftext|>" if "<|endoftext|>" in vocab else specials["eos_token"]
    if eot is None:
        return None
    return tok, eot, specials


def read_gguf(path: Path, *, max_seq_len: int | None = None):
    """(qkvlab config, qkvlab state dict, tokenizer or None, info) of the GGUF file ``path``."""
    gguf = require("gguf", "Reading GGUF files")
    where = str(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # ValueError / struct errors for a corrupt or foreign file
        raise ConfigError(f"{where}: not a readable GGUF file ({e}).") from None
    fields = _Fields(reader, where)
    arch = fields.need("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: GGUF architecture {arch!r} is not supported; qkvlab imports {ARCHITECTURES}.")
    by_name = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in by_name.items()}
    if "token_embd.weight" not in shapes:
        raise ConfigError(f"{where}: tensor 'token_embd.weight' is missing; the file is not a language model.")
    cfg = gguf_config(fields, arch, shapes, max_seq_len)
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return dequantize(by_name[name], where)

    sd["wte.weight"] = take("token_embd.weight")
    sd["backbone.norm.weight"] = take("output_norm.weight")
    if "output.weight" in by_name:
        sd["lm_head.weight"] = take("output.weight")
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads, "v": cfg.n_kv_heads}
    for i in range(cfg.n_layers):
        g = f"blk.{i}."
        for ours_gguf, ours in LAYER_TENSORS.items():
            if g + ours_gguf in by_name:
                sd[block(i) + ours] = take(g + ours_gguf)
        for name, role in ROLE_TENSORS.items():
            for part in ("weight", "bias"):
                key = f"{g}{name}.{part}"
                if key not in by_name:
                    continue
                t = take(key)
                if arch == "llama" and role in ("q", "k"):
                    t = unpermute_rope_rows(t, heads[role])
                sd[proj(i, role) + part] = t
        if cfg.bias:  # qkvlab's bias flag covers every projection: zeros where the file has none
            for name in ("attn.qkv.proj.q", "attn.qkv.proj.k", "attn.qkv.proj.v", "attn.o_proj", "mlp.gate",
                         "mlp.up", "mlp.down"):  # fmt: skip
                w = sd.get(block(i) + name + ".weight")
                if w is not None:
                    sd.setdefault(block(i) + name + ".bias", torch.zeros(w.shape[0]))
    left = sorted(set(by_name) - used)
    if left:
        raise ConfigError(f"{where}: tensor {left[0]!r} has no place in a qkvlab model ({len(left)} such tensors).")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    info = {
        "format": "gguf",
        "architecture": arch,
        "family": arch,
        "name": fields.get("general.name"),
        "tensor_types": types,
        "notes": [
            f"Dequantised from {', '.join(types)} to float32: the weights are the quantised model's, "
            "not the original's."
        ],
    }
    if arch == "llama":
        info["notes"].append("Query and key rows reordered back from llama.cpp's adjacent-pair RoPE layout.")
    return cfg, sd, gguf_tokenizer(fields), info
