"""GPT decoder language model with KV-cached generation.

Two recipes share this code (see :mod:`qkvlab.models.config`): ``gpt2`` is the paper's
setup (LayerNorm, GELU, learned positions, biases, tied embeddings) and ``llama`` the
modern one (RMSNorm, SwiGLU, RoPE, no biases).

Example::

    model = GPT(GPTConfig(variant="Q-K=V", vocab_size=256))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20)  # cached by default
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qkvlab.attention.cache import CacheLayout, KVCache, LinearState, new_decode_state
from qkvlab.attention.matvec import apply_linear
from qkvlab.errors import ConfigError
from qkvlab.models.blocks import Backbone, init_weights
from qkvlab.models.config import GPTConfig
from qkvlab.models.generation import GenerateOutput, GenerationStream, compact_prompt, run
from qkvlab.models.sampling import sample

__all__ = ["GPT", "sample"]


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
        ``position`` (an integer tensor on the device: 0-d, or ``(B,)`` for a ragged cache) runs
        the static one-token step of :class:`~qkvlab.models.decoding.StaticDecoder` at that
        position; the cache is not advanced then.
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
        return apply_linear(self.lm_head, h)

    # ------------------------------------------------------------- generation
    def new_cache(self, batch_size: int, max_len: int | None = None, **kw) -> KVCache | LinearState:
        """A KV cache, or the fixed-size :class:`LinearState` of a linear-attention variant."""
        return new_decode_state(self, batch_size, max_len, **kw)

    @torch.no_grad()
    def prefill(
        self, idx: torch.Tensor, cache: KVCache | LinearState, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the prompt through the model, filling ``cache``; returns each row's last logits ``(B, V)``.

        ``attention_mask`` ``(B, T)`` (True / 1 for real tokens; left or right padding, or any
        mix) makes a ragged batch: each row's real tokens are packed to the front, so row ``b``
        holds positions ``0 .. len_b - 1``, its own, and the cache keeps per-row lengths
        (``cache.row_lengths``) that later one-token steps (``decode_one``,
        :class:`~qkvlab.models.decoding.StaticDecoder`) continue from. Only the last position's
        logits are computed (a long prompt never materialises ``(B, T, V)``).
        """
        if cache.length:
            raise ConfigError("prefill needs an empty cache; call cache.reset() first.")
        self._check_ids(idx)
        if attention_mask is None:
            return self.lm_head(self.backbone(self.wte(idx), cache=cache)[:, -1])
        if attention_mask.shape != idx.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt has {tuple(idx.shape)}; "
                "pass one flag per token, True (1) for real tokens."
            )
        mask = attention_mask.to(device=idx.device, dtype=torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ConfigError("Every row of the prompt needs at least one real token (attention_mask all False).")
        packed, lengths = compact_prompt(idx, mask)
        B, L = packed.shape
        if bool((lengths == L).all()):  # the same length in every row once packed: nothing ragged
            return self.lm_head(self.backbone(self.wte(packed), cache=cache)[:, -1])
        if isinstance(cache, LinearState):
            return self._prefill_rows(packed, lengths, cache)
        h = self.backbone(self.wte(packed), cache=cache)  # causal: a row never reads past its end
        last = h.gather(1, (lengths - 1).view(B, 1, 1).expand(B, 1, h.shape[-1])).squeeze(1)
        cache.set_row_lengths(lengths)
        return self.lm_head(last)

    def _prefill_rows(self, packed: torch.Tensor, lengths: torch.Tensor, state: LinearState) -> torch.Tensor:
        """A ragged prompt into a linear-attention state, row by row.

        The recurrent state would take in the padding after a short row (its decay counts every
        position), so each row runs alone and its state is copied into the batch's.
        """
        out = []
        for b, n in enumerate(lengths.tolist()):
            row = LinearState(state.layout, 1, state.max_len, dtype=state.dtype, device=state.device)
            out.append(self.lm_head(self.backbone(self.wte(packed[b : b + 1, :n]), cache=row)[:, -1]))
            for dst, src in zip(state.layers, row.layers, strict=True):
                dst.S[b].copy_(src.S[0])
                dst.n[b].copy_(src.n[0])
        state.set_row_lengths(lengths)
        return torch.cat(out)

    @staticmethod
    def _check_ids(idx: torch.Tensor) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ConfigError(
                f"GPT expects token ids of shape (batch, seq) and integer dtype, got shape "
                f"{tuple(idx.shape)} and dtype {idx.dtype}."
            )

    @torch.no_grad()
    def decode_one(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step: ``token`` ``(B,)`` or ``(B, 1)`` at position ``cache.length`` (per row if ragged); ``(B, V)``."""
        return self(token.view(-1, 1), cache=cache)[:, -1]

    def generate(
        self,
        idx: torch.Tensor | Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_token_ids: Sequence[int] | torch.Tensor | None = None,
        stop_strings: Sequence[str] | str | None = None,
        tokenizer: Any = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        cache: KVCache | LinearState | None = None,
        use_cache: bool = True,
        cuda_graph: bool | str = "auto",
        compile: bool | str = False,
        fuse: bool | str = False,
        gemv: bool | str = "auto",
        return_dict: bool = False,
    ) -> torch.Tensor | GenerateOutput:
        """Extend ``idx`` ``(B, T)`` by up to ``max_new_tokens``; returns ``(B, T + max_new_tokens)``.

        With ``return_dict=True`` returns a :class:`~qkvlab.models.generation.GenerateOutput`
        instead: the same ``sequences`` plus each row's new ``tokens``, their ``lengths``, the
        ``finish_reasons`` and (with a ``tokenizer``) the ``texts``.

        ``temperature=0`` is greedy; otherwise sample from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely tokens and then to the smallest set whose
        probability reaches ``top_p``, if given. ``repetition_penalty`` (> 1 discourages) scales
        the logits of every token already in the row first. A row ends at any of
        ``stop_token_ids`` (kept as its last token) or at the token completing one of
        ``stop_strings`` (matched on text decoded by ``tokenizer``); after its end the row's
        ``sequences`` hold ``pad_token_id``, and nothing after the stop is returned.

        A ragged batch: pass ``attention_mask`` (True / 1 for real tokens, any padding side) or a
        list of token lists (left-padded with ``pad_token_id`` in ``sequences``). Each row is
        positioned from its own first token and gets what it gets alone (see
        :mod:`qkvlab.models.generation`).

        ``cuda_graph`` (True, or ``"auto"``, the default: on CUDA only) decodes with
        :class:`~qkvlab.models.decoding.StaticDecoder`, one CUDA-graph replay per token, because
        the dynamic step of a small or medium model is bound by host-side kernel launches; False
        keeps the dynamic step. ``compile=True`` runs the static step through ``torch.compile``
        first (see :class:`~qkvlab.models.decoding.StaticDecoder`), graphed or not (a mode name
        picks Inductor's mode); it needs a KV cache. ``fuse=True`` (or ``"auto"``: only in eval
        mode) runs each attention layer's projections, and the SwiGLU MLP's gate and up, as one
        matrix product each (faster at small batches, where each product is short; the fused
        matrices are a second copy of those weights until ``model.train()`` or
        :func:`~qkvlab.attention.projections.unfuse_projections`). ``gemv`` picks how a batch-1
        static step computes its matrix-vector products: ``"auto"`` (the default: the kernel on
        CUDA with Triton, else cuBLAS), False (cuBLAS), True / ``"kernel"`` (qkvlab's one-row
        kernel, on CUDA) or ``"inductor"`` (with ``compile``); see :mod:`qkvlab.attention.matvec`.
        Calls that pass the same ``cache`` with the same options reuse the static step of the
        last one (compiled, its graph captured): a program that generates again and again keeps
        one cache for it. The step is recorded again where the weights moved (``model.to()``,
        weights loaded with ``assign=True``) or the mode, autocast or decode backend changed.
        The model keeps that step until its next call over another cache, without holding the
        cache.

        Cached decoding is the default; ``use_cache=False`` recomputes the whole prefix each
        step (for checks). :meth:`stream` yields the same tokens step by step.
        """
        steps = GenerationStream(run(self, idx, max_new_tokens, **self._generate_kwargs(locals())))
        for _ in steps:
            pass
        return steps.result if return_dict else steps.result.sequences

    def stream(
        self,
        idx: torch.Tensor | Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_token_ids: Sequence[int] | torch.Tensor | None = None,
        stop_strings: Sequence[str] | str | None = None,
        tokenizer: Any = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        cache: KVCache | LinearState | None = None,
        use_cache: bool = True,
        cuda_graph: bool | str = "auto",
        compile: bool | str = False,
        fuse: bool | str = False,
        gemv: bool | str = "auto",
    ) -> GenerationStream:
        """:meth:`generate` as an iterator: one :class:`~qkvlab.models.generation.GenerationStep` per token.

        Each step holds the token of every row, which rows took it, the rows that ended there
        and (with a ``tokenizer``) each row's new text. After the loop, ``stream.result`` is what
        ``generate(..., return_dict=True)`` returns. Arguments are checked at this call; the
        model runs as the iterator is consumed (under the autocast context active then).

        Example::

            for step in model.stream(prompt, 64, tokenizer=tok, stop_strings=["\n\n"]):
                print(step.text[0], end="", flush=True)
        """
        return GenerationStream(run(self, idx, max_new_tokens, **self._generate_kwargs(locals()), stream=True))

    @staticmethod
    def _generate_kwargs(args: dict) -> dict:
        skip = {"self", "idx", "max_new_tokens", "return_dict", "__class__"}
        return {k: v for k, v in args.items() if k not in skip}
