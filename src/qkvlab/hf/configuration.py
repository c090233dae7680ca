"""The transformers config of a native qkvlab model (``model_type: "qkvlab"``)."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import ALLOWED_ATTN_LAYER_TYPES

from qkvlab.hf.cache import SEPARATE_LAYER_TYPE, SHARED_LAYER_TYPE
from qkvlab.models.config import GPTConfig


@strict
class QkvlabConfig(PreTrainedConfig):
    """A qkvlab :class:`~qkvlab.models.config.GPTConfig` carried inside a transformers config.

    ``qkvlab`` (the GPT config as a dict, variant included) is the one source of truth; the
    usual transformers fields (``hidden_size``, ``num_hidden_layers``, ``num_key_value_heads``,
    ...) are filled from it so tools that read them (generation, PEFT, lm-eval) see the right
    shape. ``layer_types`` names the cache layer each attention layer needs:
    ``"qkvlab_shared_kv"`` (one tensor, K=V) or ``"qkvlab_kv"`` (key and value), which makes
    transformers' ``DynamicCache(config=...)`` build :mod:`qkvlab.hf.cache` layers.
    """

    model_type = "qkvlab"

    qkvlab: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    layer_types: list[str] | None = None
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        gpt = self.gpt_config()
        self.qkvlab = gpt.to_dict()
        self.vocab_size = gpt.vocab_size
        self.hidden_size = gpt.d_model
        self.intermediate_size = gpt.d_ff
        self.num_hidden_layers = gpt.n_layers
        self.num_attention_heads = gpt.n_heads
        self.num_key_value_heads = gpt.n_kv_heads
        self.head_dim = gpt.head_dim
        self.max_position_embeddings = gpt.max_seq_len
        self.tie_word_embeddings = bool(gpt.tie_embeddings)
        kind = SHARED_LAYER_TYPE if gpt.variant.kv_shared else SEPARATE_LAYER_TYPE
        self.layer_types = [kind] * gpt.n_layers
        super().__post_init__(**kwargs)

    def gpt_config(self) -> GPTConfig:
        """The qkvlab config this transformers config carries (qkvlab's tiny default if none)."""
        return GPTConfig.from_dict(dict(self.qkvlab)) if self.qkvlab else GPTConfig(vocab_size=256)

    def validate_layer_type(self) -> None:
        allowed = (*ALLOWED_ATTN_LAYER_TYPES, SHARED_LAYER_TYPE, SEPARATE_LAYER_TYPE)
        bad = sorted({t for t in self.layer_types or [] if t not in allowed})
        if bad:
            raise ValueError(f"layer_types {bad} are not cache layer types of a qkvlab model.")
