"""qkvlab: projection-shared attention (Q-K=V, Q=K-V, Q=K=V, ...) crossed with GQA/MQA."""

from qkvlab.attention import KVCache, VariantSpec, parse_variant
from qkvlab.checkpoint import load_into, load_model, save_model
from qkvlab.errors import ConfigError
from qkvlab.models import (
    GPT,
    EncoderConfig,
    GPTConfig,
    SequenceEncoder,
    SetConfig,
    SetEncoder,
    ViT,
    ViTConfig,
    build_model,
    get_preset,
)

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "ConfigError",
    "EncoderConfig",
    "GPTConfig",
    "KVCache",
    "SequenceEncoder",
    "SetConfig",
    "SetEncoder",
    "VariantSpec",
    "ViT",
    "ViTConfig",
    "build_model",
    "get_preset",
    "load_into",
    "load_model",
    "parse_variant",
    "save_model",
]
