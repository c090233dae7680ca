"""Model families on one set of blocks: GPT (gpt2 / llama recipes), ViT, sequence and set encoders."""

from __future__ import annotations

from torch import nn

from qkvlab.models.config import (
    CONFIG_TYPES,
    EncoderConfig,
    GPTConfig,
    SetConfig,
    TransformerConfig,
    ViTConfig,
)
from qkvlab.models.encoders import SequenceEncoder, SetEncoder, ViT
from qkvlab.models.gpt import GPT
from qkvlab.models.presets import PRESETS, get_preset, list_presets, paper_variants

MODEL_TYPES: dict[str, type[nn.Module]] = {
    "gpt": GPT,
    "encoder": SequenceEncoder,
    "vit": ViT,
    "set": SetEncoder,
}


def build_model(config: TransformerConfig) -> nn.Module:
    """The model class for ``config``'s family, freshly initialised."""
    return MODEL_TYPES[config.family](config)


__all__ = [
    "CONFIG_TYPES",
    "GPT",
    "MODEL_TYPES",
    "PRESETS",
    "EncoderConfig",
    "GPTConfig",
    "SequenceEncoder",
    "SetConfig",
    "SetEncoder",
    "TransformerConfig",
    "ViT",
    "ViTConfig",
    "build_model",
    "get_preset",
    "list_presets",
    "paper_variants",
]
