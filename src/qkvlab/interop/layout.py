"""Names and shapes of a qkvlab GPT's tensors, and the attention roles behind them.

qkvlab stores one ``nn.Linear`` per projection *group* (``attn.qkv.proj.kv`` for Q-K=V); other
formats store one per *role* (q, k, v). :func:`role_tensors` reads the three roles of a layer
from a qkvlab state dict (the identity where a role has no projection), and
:func:`group_tensors` writes roles back as groups, refusing roles that should share a tensor
but do not hold the same values.
"""

from __future__ import annotations

import torch

from qkvlab.attention.variant import ROLES
from qkvlab.errors import ConfigError
from qkvlab.models.config import GPTConfig


def block(i: int) -> str:
    return f"backbone.blocks.{i}."


def proj(i: int, group: str) -> str:
    return f"{block(i)}attn.qkv.proj.{group}."


def role_tensors(sd: dict[str, torch.Tensor], cfg: GPTConfig, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``role -> (weight (out, d_model), bias (out,))`` of layer ``i``; a bias of zeros where the
    model has none, the identity where the role is the input itself."""
    v = cfg.variant
    out = {}
    for role in ROLES:
        group = v.source(role)
        if group == "x":
            ref = next(iter(sd.values()))
            w = torch.eye(cfg.d_model, dtype=ref.dtype)
            b = torch.zeros(cfg.d_model, dtype=ref.dtype)
        else:
            w = sd[proj(i, group) + "weight"]
            b = sd.get(proj(i, group) + "bias")
            b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
        out[role] = (w, b)
    return out


def group_tensors(
    roles: dict[str, tuple[torch.Tensor, torch.Tensor | None]], cfg: GPTConfig, i: int, *, where: str
) -> dict[str, torch.Tensor]:
    """qkvlab state-dict entries of layer ``i``'s projections from per-role tensors.

    Roles that ``cfg.variant`` shares must hold equal tensors; a role the variant takes from
    the input must be the identity with no bias. Anything else would drop information, so
    it is refused, naming ``where`` (the source).
    """
    v = cfg.variant
    sd: dict[str, torch.Tensor] = {}
    for role in ROLES:
        w, b = roles[role]
        group = v.source(role)
        if group == "x":
            if not torch.equal(w, torch.eye(cfg.d_model, dtype=w.dtype)) or (b is not None and b.any()):
                raise ConfigError(f"{where}: variant {v.id!r} has no {role} projection, but the source has one.")
            continue
        key = proj(i, group)
        if key + "weight" in sd:
            if not (torch.equal(sd[key + "weight"], w) and _same_bias(sd.get(key + "bias"), b)):
                raise ConfigError(
                    f"{where}: variant {v.id!r} shares {group.upper()} but the source's {'/'.join(group)} "
                    "projections differ; convert it with 'qkvlab convert' instead."
                )
            continue
        sd[key + "weight"] = w
        if cfg.bias:
            sd[key + "bias"] = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        elif b is not None and b.any():
            raise ConfigError(f"{where}: the source has a {role} bias but the qkvlab config has bias=False.")
    return sd


def _same_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return (a is None or not a.any()) and (b is None or not b.any())
    return torch.equal(a, b)


def repeat_kv_heads(w: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """Rows of a K or V projection repeated so that each query head has its own copy (query
    head h reads KV head ``h // (n_heads // n_kv)``, as in qkvlab and transformers)."""
    if n_kv == n_heads:
        return w
    shape = w.shape
    heads = w.reshape(n_kv, shape[0] // n_kv, *shape[1:])
    return heads.repeat_interleave(n_heads // n_kv, dim=0).reshape(-1, *shape[1:])
