"""Effective rank of projections and of attention maps.

Two definitions, both reported (PAPER.md 3.1 does not say which one the paper used):

- **entropy effective rank** (Roy & Vetterli, 2007): with singular values ``s`` and
  ``p = s / sum(s)``, ``erank = exp(-sum p log p)``. A matrix with ``k`` equal non-zero
  singular values has erank ``k``; it is a real number between 1 and ``min(m, n)``.
- **energy rank** at a fraction ``f``: the fewest singular values whose squares reach
  ``f`` of ``sum(s**2)`` (the squared Frobenius norm), here at 90% and 99%.

A projection is one ``nn.Linear`` weight ``(out, d_model)`` per group, so a shared group
(``kv`` in Q-K=V) has one rank; roles with no projection (identity) have none.
"""

from __future__ import annotations

import math

import torch

from qkvlab.errors import ConfigError

ENERGY_FRACTIONS = (0.9, 0.99)


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values of ``m`` (..., rows, cols), descending, in float64 on the CPU."""
    if m.dim() < 2:
        raise ConfigError(f"Effective rank needs a matrix (or a batch of them), got shape {tuple(m.shape)}.")
    return torch.linalg.svdvals(m.detach().to("cpu", torch.float64))


def entropy_rank(s: torch.Tensor) -> torch.Tensor:
    """``exp`` of the Shannon entropy of ``s / s.sum()`` over the last dim; 0 for an all-zero ``s``."""
    s = s.to(torch.float64).clamp_min(0)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))


def energy_rank(s: torch.Tensor, fraction: float) -> torch.Tensor:
    """How many of the largest ``s`` (descending, last dim) hold ``fraction`` of ``sum(s**2)``."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"Energy fraction must be in (0, 1], got {fraction}.")
    e = s.to(torch.float64) ** 2
    cum = e.cumsum(-1)
    # A tiny tolerance so that exactly reaching the fraction counts despite rounding.
    need = fraction * cum[..., -1:] * (1 - 1e-12)
    return (cum < need).sum(-1) + 1


def rank_summary(m: torch.Tensor) -> dict[str, float]:
    """Entropy rank, energy ranks at 90% / 99%, and the full rank bound ``min(rows, cols)`` of one matrix."""
    if m.dim() != 2:
        raise ConfigError(f"rank_summary takes one 2-D matrix, got shape {tuple(m.shape)}.")
    s = singular_values(m)
    out = {"entropy": float(entropy_rank(s)), "full": int(min(m.shape))}
    for f in ENERGY_FRACTIONS:
        out[energy_key(f)] = int(energy_rank(s, f))
    return out


def energy_key(fraction: float) -> str:
    return f"energy{round(100 * fraction)}"


def batched_rank(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy and energy ranks of every matrix in ``maps`` (..., n, n); each result has shape ``...``."""
    s = singular_values(maps)
    out = {"entropy": entropy_rank(s)}
    for f in ENERGY_FRACTIONS:
        out[energy_key(f)] = energy_rank(s, f).to(torch.float64)
    return out


def mean(values) -> float | None:
    """Mean of a flat or nested list of numbers, ``None`` when empty or not finite."""
    flat: list[float] = []

    def walk(v):
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif v is not None:
            flat.append(float(v))

    walk(values)
    if not flat:
        return None
    m = sum(flat) / len(flat)
    return m if math.isfinite(m) else None
