"""GPT decoder language model with KV-cached generation.

Two recipes share this code (see :mod:`qkvlab.models.config`): ``gpt2`` is the paper's
setup (LayerNorm, GELU, learned positions, biases, tied embeddings) and ``llama`` the
modern one (RMSNorm, SwiGLU, RoPE, no biases).

Example::

    model = GPT(GPTConfig(variant="Q-K=V", vocab_size=256))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20)  # cached by default
"""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.attention.cache import CacheLayout, KVCache, LinearState, new_decode_state
from qkvlab.errors import ConfigError
from qkvlab.models.blocks import Backbone, init_weights
from qkvlab.models.config import GPTConfig


class GPT(nn.Module):
    """Causal language model. ``forward(idx)`` with ``idx`` ``(B, T)`` returns logits ``(B, T, V)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # Press & Wolf (2017)

    def cache_layout(self) -> CacheLayout:
        return self.backbone.cache_layout()

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        position: torch.Tensor | None = None,
    ):
        """Logits for ``idx``; with ``cache`` the tokens continue the cached prefix.

        ``padding_mask`` is ``(B, cached + T)`` bool, True for real tokens (keys).
        With ``need_weights`` returns ``(logits, [AttentionOutput per layer])``.
        ``position`` (a 0-d integer tensor on the device) runs the static one-token step of
        :class:`~qkvlab.models.decoding.StaticDecoder` at that position; the cache is not
        advanced then.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ConfigError(
                f"GPT expects token ids of shape (batch, seq) and integer dtype, got shape "
                f"{tuple(idx.shape)} and dtype {idx.dtype}."
            )
        h = self.backbone(
            self.wte(idx), cache=cache, padding_mask=padding_mask, need_weights=need_weights, position=position
        )
        if need_weights:
            h, infos = h
            return self.lm_head(h), infos
        return self.lm_head(h)

    # ------------------------------------------------------------- generation
    def new_cache(self, batch_size: int, max_len: int | None = None, **kw) -> KVCache | LinearState:
        """A KV cache, or the fixed-size :class:`LinearState` of a linear-attention variant."""
        return new_decode_state(self, batch_size, max_len, **kw)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the prompt through the model, filling ``cache``; returns the last logits ``(B, V)``."""
        if cache.length:
            raise ConfigError("prefill needs an empty cache; call cache.reset() first.")
        return self(idx, cache=cache)[:, -1]

    @torch.no_grad()
    def decode_one(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step: ``token`` ``(B,)`` or ``(B, 1)`` at position ``cache.length``; returns ``(B, V)``."""
        return self(token.view(-1, 1), cache=cache)[:, -1]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: KVCache | None = None,
        use_cache: bool = True,
        cuda_graph: bool | str = "auto",
        compile: bool | str = False,
    ) -> torch.Tensor:
        """Extend ``idx`` ``(B, T)`` by ``max_new_tokens``; returns ``(B, T + max_new_tokens)``.

        ``cuda_graph`` (True, or ``"auto"``, the default: on CUDA only) decodes with
        :class:`~qkvlab.models.decoding.StaticDecoder`, one CUDA-graph replay per token; False
        keeps the dynamic step. On an H100 (1.28B llama-recipe model, bf16, batch 1, 4k and 32k)
        the graph replay ran 3-12x the tokens/s of the dynamic step, which is bound by host-side
        launches (``benchmarks/results/gpu_generate.json``). ``compile=True`` runs the static
        step through ``torch.compile`` first (see :class:`~qkvlab.models.decoding.StaticDecoder`),
        graphed or not (a mode name picks Inductor's mode); it needs a KV cache.

        ``temperature=0`` is greedy; otherwise sample from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely tokens if given. Cached decoding is the
        default; ``use_cache=False`` recomputes the whole prefix each step (for checks).
        """
        B, T = idx.shape
        total = T + max_new_tokens
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if total > self.config.max_seq_len:
            raise ConfigError(
                f"Prompt of {T} tokens + {max_new_tokens} new = {total} exceeds max_seq_len="
                f"{self.config.max_seq_len}; shorten the prompt or generate fewer tokens."
            )
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}.")
        if not temperature >= 0 or temperature == float("inf"):  # NaN fails the first test
            raise ConfigError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}.")
        if cuda_graph not in (True, False, "auto"):
            raise ConfigError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}.")
        if compile and (not use_cache or self.config.variant.linear):
            raise ConfigError(
                "compile=True compiles the static decode step over a KV cache: it needs use_cache=True and "
                f"softmax attention (variant {self.config.variant.id!r}, use_cache={use_cache})."
            )
        out = torch.empty(B, total, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        if max_new_tokens == 0:
            return out
        if use_cache:
            if cache is None:
                cache = self.new_cache(B, total)
            else:
                cache.reset()
            logits = self.prefill(idx, cache)
        else:
            logits = self(idx)[:, -1]
        step = None
        auto = cuda_graph == "auto" and cache is not None and cache.device.type == "cuda"
        if use_cache and (compile or cuda_graph is True or (auto and isinstance(cache, KVCache))):
            from qkvlab.models.decoding import StaticDecoder

            step = StaticDecoder(self, cache, cuda_graph=cuda_graph, compile=compile).step
        elif use_cache:
            step = lambda tok: self.decode_one(tok, cache)  # noqa: E731
        for t in range(T, total):
            nxt = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
            out[:, t] = nxt
            if t + 1 == total:
                break
            logits = step(nxt) if step is not None else self(out[:, : t + 1])[:, -1]
        return out


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ``(B,)`` from logits ``(B, V)``: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
