"""Projection-shared attention: variant spec, projections, positions, attention and decode backends, KV cache."""

from qkvlab.attention.backends import (
    AttentionOutput,
    DecodeStep,
    StepWrite,
    available_backends,
    get_backend,
    register_backend,
    register_decode_backend,
    select_decode_backend,
)
from qkvlab.attention.cache import CacheLayout, KVCache, LayerKVCache, LinearState, new_decode_state
from qkvlab.attention.module import Attention
from qkvlab.attention.positional import Pos2DFix, RMSNorm, Rotary
from qkvlab.attention.projections import ProjectionStrategy
from qkvlab.attention.variant import PAPER_LM_VARIANTS, VariantSpec, parse_variant

__all__ = [
    "PAPER_LM_VARIANTS",
    "Attention",
    "AttentionOutput",
    "CacheLayout",
    "DecodeStep",
    "KVCache",
    "LayerKVCache",
    "LinearState",
    "Pos2DFix",
    "ProjectionStrategy",
    "RMSNorm",
    "Rotary",
    "StepWrite",
    "VariantSpec",
    "available_backends",
    "get_backend",
    "new_decode_state",
    "parse_variant",
    "register_backend",
    "register_decode_backend",
    "select_decode_backend",
]
