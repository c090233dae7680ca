"""Projection strategy: turn ``x`` into raw (q, k, v) with each shared group computed once.

Each group of the variant's sharing is one ``nn.Linear`` named after the group
(``proj.q``, ``proj.kv``, ``proj.qkv`` ...), so the state-dict keys say which variant
a checkpoint holds. Roles in one group come back as *the same tensor object*; a role
in no group is the input itself. Widths: a group holding ``q`` has one head per query
head; a group of only ``k`` and/or ``v`` has ``n_kv_heads`` heads.
"""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.attention.variant import ROLES, VariantSpec


class ProjectionStrategy(nn.Module):
    """Logical Q/K/V projections of one attention layer.

    Args:
        d_model: input width.
        n_heads: query heads.
        head_dim: width of one head.
        variant: the variant spec (sharing and ``n_kv_heads``); validated by the caller.
        bias: add a bias to every projection (the paper's GPT-2 recipe does).

    ``forward(x)`` takes ``x`` of shape ``(B, T, d_model)`` and returns ``(q, k, v)`` of
    shapes ``(B, T, n_heads * head_dim)``, ``(B, T, n_kv * head_dim)`` and the same for
    ``v``; shared roles are the identical tensor.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, variant: VariantSpec, bias: bool = True):
        super().__init__()
        self.variant = variant
        n_kv = variant.kv_heads(n_heads)
        self.proj = nn.ModuleDict()
        for group in variant.groups:
            width = (n_heads if "q" in group else n_kv) * head_dim
            self.proj[group] = nn.Linear(d_model, width, bias=bias)
        self._source = {r: variant.source(r) for r in ROLES}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = {g: layer(x) for g, layer in self.proj.items()}  # each group computed once
        out["x"] = x
        return out[self._source["q"]], out[self._source["k"]], out[self._source["v"]]
