"""Fused GPU kernels (Triton) with plain-PyTorch references.

``kv_decode``: one-token decode attention over a KV cache, including a shared K=V cache whose
key role (``rope(norm(s))``) is derived from the raw cached ``s`` in registers. The attention
module reaches it through the decode-backend registry (:mod:`qkvlab.attention.backends`).
Importing this package never needs Triton; without it (or on a CPU without
``TRITON_INTERPRET=1``) :func:`decode_attention` falls back to the reference with a warning.
"""

from qkvlab.kernels.kv_decode import (
    DecodeConfig,
    decode_attention,
    decode_attention_reference,
    decode_attention_step,
    decode_attention_step_reference,
    decode_unsupported_reason,
    default_config,
)

__all__ = [
    "DecodeConfig",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_step",
    "decode_attention_step_reference",
    "decode_unsupported_reason",
    "default_config",
]
