"""A transformers causal LM that runs qkvlab's own GPT: every variant, one attention stack.

:class:`QkvlabForCausalLM` holds a :class:`qkvlab.models.gpt.GPT` as ``self.model`` and
hands it a :class:`~qkvlab.hf.cache.CacheView` of the transformers cache, so ``generate``,
``Trainer``, PEFT and lm-eval's ``hf`` model drive the same attention code as qkvlab's own
``generate``. A K=V variant's cache holds one tensor per layer (the raw shared projection,
before RoPE); see :mod:`qkvlab.hf.cache`.

Positions are those of qkvlab: the tokens of a row sit at ``0, 1, ...`` counted from the
first cached slot. ``attention_mask`` masks padded keys; with left padding the real tokens of
a padded row therefore start at a later position. Under RoPE only relative positions enter
the scores, so this changes nothing; under learned positions (the ``gpt2`` recipe) pad on
the right or generate row by row.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from qkvlab.attention.positional import Pos2DFix, Rotary, sinusoid_features
from qkvlab.errors import ConfigError
from qkvlab.hf.cache import CacheView
from qkvlab.hf.configuration import QkvlabConfig
from qkvlab.models.gpt import GPT


class QkvlabPreTrainedModel(PreTrainedModel):
    config: QkvlabConfig
    config_class = QkvlabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights come from the checkpoint, or from qkvlab's own initialisation when the model
        # is built from a config. Only the fixed tables held as non-persistent buffers (RoPE's
        # cos/sin, the 2D fix's features) are missing after a meta-device load: rebuild them.
        if isinstance(module, Rotary):
            fresh = Rotary(module.cos.shape[1] * 2, module.max_seq_len, self.config.gpt_config().rope_theta)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)
        elif isinstance(module, Pos2DFix):
            n = module.row.shape[0]
            module.row.copy_(sinusoid_features(n, module.m_row))
            module.col.copy_(sinusoid_features(n, module.m_col))


class QkvlabForCausalLM(QkvlabPreTrainedModel, GenerationMixin):
    """qkvlab's GPT as a transformers causal LM (see the module docstring)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: QkvlabConfig) -> None:
        super().__init__(config)
        gpt_config = config.gpt_config()
        if gpt_config.variant.linear:
            raise ConfigError(
                f"Variant {gpt_config.variant.id!r} uses linear attention, whose fixed-size state has no "
                "transformers cache layer; use qkvlab's own generate for it."
            )
        self.model = GPT(gpt_config)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.wte

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def _prepare_static_cache(self, *args, **kwargs):
        raise ConfigError(
            "A qkvlab model decodes with transformers' dynamic cache (its layers grow as qkvlab's attention writes "
            "them); drop cache_implementation='static'."
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        gpt = self.model
        x = gpt.wte(input_ids) if inputs_embeds is None else inputs_embeds
        view = CacheView(cache, gpt.cache_layout()) if cache is not None else None
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    "A qkvlab model takes a 2D attention_mask (batch, cached + new tokens), 1 for real tokens."
                )
            if not bool(attention_mask.all()):
                mask = attention_mask.bool()
        h = gpt.backbone(x, cache=view, padding_mask=mask)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = gpt.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
