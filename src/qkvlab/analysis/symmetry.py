"""Symmetry and diagonal dominance of attention (PAPER.md 3.3).

``logit_asymmetry``
    ``||S - S^T||_F / ||S||_F`` of the pre-softmax logits ``S = scale * q k^T (+ bias)`` of a
    self-attention map, taken **without** the causal mask (the reference backend reports
    logits before masking). 0 for a symmetric map (Q = K: ``s_ij = k_i . k_j = s_ji``, also
    under RoPE and learned absolute positions), about ``sqrt(2)`` for unrelated entries,
    2 for an antisymmetric map. The 2D positional fix "(X)+" adds an asymmetric bias, so
    (Q=K-V)+ is asymmetric by design, which this measures.
``diagonal_attention``
    Mean attention weight a query puts on its own position, ``mean_i A[i, i]`` (after mask
    and softmax), and the same for uniform attention over the visible keys as the
    baseline: ``1 / n`` without a mask, ``mean_i 1 / (i + 1)`` under a causal one. Symmetric
    maps are said to drift toward the diagonal because ``k_i . k_i = ||k_i||^2`` is large.
"""

from __future__ import annotations

import torch

from qkvlab.analysis.rank import mean
from qkvlab.errors import ConfigError


def _square(t: torch.Tensor, what: str) -> None:
    if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        raise ConfigError(
            f"{what} needs square self-attention maps (..., n, n), got shape {tuple(t.shape)}; capture "
            "the whole sequence in one pass (no KV cache)."
        )


def logit_asymmetry(s: torch.Tensor) -> torch.Tensor:
    """``||S - S^T||_F / ||S||_F`` over the last two dims of ``s`` (..., n, n); shape ``...``."""
    _square(s, "Logit asymmetry")
    s = s.double()
    num = (s - s.transpose(-1, -2)).flatten(-2).norm(dim=-1)
    den = s.flatten(-2).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def diagonal_attention(w: torch.Tensor) -> torch.Tensor:
    """Mean over queries of the weight on self, ``mean_i w[..., i, i]``; shape ``...``."""
    _square(w, "Diagonal attention")
    return w.double().diagonal(dim1=-2, dim2=-1).mean(-1)


def uniform_diagonal(n: int, causal: bool) -> float:
    """``mean_i A[i, i]`` of uniform attention over the visible keys of ``n`` positions."""
    if n < 1:
        raise ConfigError(f"A map needs at least one position, got n={n}.")
    if not causal:
        return 1.0 / n
    return float(sum(1.0 / (i + 1) for i in range(n)) / n)


def attention_symmetry(logits: list[torch.Tensor], weights: list[torch.Tensor], *, causal: bool) -> dict:
    """Per layer and head (averaged over the batch): logit asymmetry and diagonal attention.

    ``logits`` and ``weights`` are per layer ``(B, H, n, n)`` (see
    :func:`qkvlab.analysis.collect_attention`).
    """
    if len(logits) != len(weights):
        raise ConfigError(f"Got logits for {len(logits)} layers but weights for {len(weights)}.")
    asym = [logit_asymmetry(s).mean(0).tolist() for s in logits]  # (H,) per layer
    diag = [diagonal_attention(w).mean(0).tolist() for w in weights]
    n = weights[0].shape[-1] if weights else 0
    base = uniform_diagonal(n, causal) if n else None
    return {
        "logit_asymmetry": {"layers": [mean(h) for h in asym], "per_head": asym, "mean": mean(asym)},
        "diagonal_attention": {
            "layers": [mean(h) for h in diag],
            "per_head": diag,
            "mean": mean(diag),
            "uniform_baseline": base,
            "ratio_to_uniform": (mean(diag) / base) if base and mean(diag) is not None else None,
        },
    }
