"""How alike are the Q, K and V projections of one attention layer?

PAPER.md 3.1 reports cosine similarities (K-V 0.73, Q-K 0.42, Q-V 0.31, averaged over
layers) without saying how they were computed, so three stated methods are offered:

``cosine``
    Cosine of the flattened weight matrices (biases left out), after head alignment
    (below). Two independent random ``n``-entry matrices give about ``N(0, 1/n)``.
``subspace``
    Per aligned head pair, the mean ``cos^2`` of the principal angles between the two
    blocks' *row spaces* (the input directions in ``R^d_model`` a head reads; the column
    space of ``W^T``): ``||Qa^T Qb||_F^2 / min(rank_a, rank_b)`` for orthonormal bases
    ``Qa``, ``Qb``. 1 for the same subspace, 0 for orthogonal ones; two random
    ``D``-dimensional subspaces of ``R^d`` give ``D / d`` on average (reported as
    ``random_baseline``). Per head, because a whole ``d x d`` projection is full rank and
    its row space is all of ``R^d``.
``cka``
    Linear CKA (Kornblith et al., 2019) of the two projections' outputs (with bias, before
    RoPE / QK-norm) on the tokens the layer really saw: ``||Yc^T Xc||_F^2 /
    (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with centred ``X``, ``Y``. Invariant to rotation and
    scale, so it needs no head alignment; independent random ``(n, p)``, ``(n, q)``
    features give about ``sqrt(p q) / n``.

**Head alignment** (grouped heads, K/V with fewer heads than Q): weights are split into
per-head blocks ``(D, d_model)`` and query head ``i`` is paired with the KV head it reads,
``i // (n_heads / n_kv_heads)``; the KV blocks are repeated over their query group (a copy
made only here, for analysis). The flattened cosine is then over the aligned stacks, so
for GQA it is the norm-weighted mean of the per-pair cosines, and for MHA it is the plain
whole-matrix cosine. Per-head values come back too.

**Shared and identity roles.** When two roles are one projection (K and V in Q-K=V), their
similarity is 1 by construction: with ``pairs="all"`` the pair is reported with
``"tied": true`` and every measure 1.0; asking for that pair by name raises
:class:`ConfigError` naming the variant and its groups. A role that is the identity
(``k_v``: Q = x) is compared as the ``d_model x d_model`` identity matrix and listed under
``"identity"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkvlab.analysis.rank import mean
from qkvlab.errors import ConfigError

ROLES = ("q", "k", "v")
ALL_PAIRS: tuple[tuple[str, str], ...] = (("q", "k"), ("q", "v"), ("k", "v"))
METHODS = ("cosine", "subspace", "cka")
CKA_MAX_TOKENS = 4096


def pair_name(pair: tuple[str, str]) -> str:
    """``("k", "v")`` -> ``"K-V"``."""
    return f"{pair[0].upper()}-{pair[1].upper()}"


def parse_pairs(pairs: str | list[str] | tuple[str, ...] | None) -> tuple[list[tuple[str, str]], bool]:
    """Role pairs from ``"all"`` / ``None`` or names like ``"K-V"``, ``"kv"``, ``"q/k"``.

    Returns ``(pairs, explicit)``; ``explicit`` is False for "all".
    """
    if pairs is None or pairs == "all" or pairs == ["all"]:
        return list(ALL_PAIRS), False
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(",") if p.strip()]
    out: list[tuple[str, str]] = []
    for raw in pairs:
        letters = [c for c in str(raw).lower() if c.isalpha()]
        if len(letters) != 2 or any(c not in ROLES for c in letters) or letters[0] == letters[1]:
            raise ConfigError(
                f"Bad projection pair {raw!r}: name two different roles of q, k, v, e.g. 'K-V', 'Q-K' or 'q-v' "
                "(or 'all')."
            )
        pair = tuple(sorted(letters, key=ROLES.index))
        if pair not in out:
            out.append(pair)  # type: ignore[arg-type]
    if not out:
        raise ConfigError("No projection pair given; name pairs like 'K-V,Q-K' or pass 'all'.")
    return out, True


# ------------------------------------------------------------------ measures
def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two same-shaped tensors flattened to vectors."""
    if a.shape != b.shape:
        raise ConfigError(f"Cosine similarity needs same-shaped tensors, got {tuple(a.shape)} and {tuple(b.shape)}.")
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def row_space(m: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis ``(r, cols)`` of the row space of ``m`` ``(rows, cols)``."""
    _, s, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return vh[:0]
    return vh[s > rtol * s[0]]


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of ``a`` and ``b`` (same width)."""
    if a.shape[-1] != b.shape[-1]:
        raise ConfigError(f"Subspaces must live in the same space: widths {a.shape[-1]} and {b.shape[-1]}.")
    qa, qb = row_space(a), row_space(b)
    if len(qa) == 0 or len(qb) == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(qa @ qb.T).clamp(0, 1)


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean ``cos^2`` of the principal angles between the row spaces of ``a`` and ``b``."""
    c = principal_cosines(a, b)
    return float((c**2).mean()) if c.numel() else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` ``(n, p)`` and ``y`` ``(n, q)`` over the same ``n`` samples."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"Linear CKA needs (samples, features) matrices over the same samples, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}."
        )
    if x.shape[0] < 2:
        raise ConfigError(f"Linear CKA needs at least 2 samples, got {x.shape[0]}.")
    x = x.detach().double()
    y = y.detach().double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    hsic = (y.T @ x).pow(2).sum()
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(hsic / denom) if denom > 0 else float("nan")


# ------------------------------------------------------------ role weights
@dataclass
class RoleWeight:
    """The projection one role is read from: its group (``"x"`` for identity) and weights."""

    group: str
    weight: torch.Tensor  # (n_heads_of_role * head_dim, d_model)
    bias: torch.Tensor | None
    n_heads: int


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every qkvlab :class:`~qkvlab.attention.Attention` in ``model`` (or ``model`` itself), in order."""
    from qkvlab.attention.module import Attention

    if isinstance(model, Attention):
        return [("", model)]
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no qkvlab Attention modules to analyse; pass a qkvlab model "
            "(GPT, SequenceEncoder, ViT, SetEncoder) or an Attention module."
        )
    return found


def role_weights(attn: nn.Module) -> dict[str, RoleWeight]:
    """Weights each role reads, from an Attention module's ``qkv.proj`` groups."""
    spec = attn.variant
    d_model = attn.o_proj.out_features
    out: dict[str, RoleWeight] = {}
    for role in ROLES:
        group = spec.source(role)
        if group == "x":
            eye = torch.eye(d_model, device=attn.o_proj.weight.device, dtype=attn.o_proj.weight.dtype)
            out[role] = RoleWeight("x", eye, None, attn.n_heads)
        else:
            lin = attn.qkv.proj[group]
            heads = lin.out_features // attn.head_dim
            out[role] = RoleWeight(group, lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), heads)
    return out


def describe_groups(attn: nn.Module) -> str:
    spec = attn.variant
    groups = ", ".join(f"{g} ({'='.join(r.upper() for r in g)})" for g in spec.groups)
    ident = f"; identity role(s): {', '.join(r.upper() for r in spec.identity_roles)}" if spec.identity_roles else ""
    return f"variant {spec.id!r} ({spec.paper_name}) has projection groups {groups}{ident}"


def aligned_blocks(a: RoleWeight, b: RoleWeight, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head blocks ``(H, head_dim, d_model)`` of ``a`` and ``b``, query heads paired with their KV head."""
    d = a.weight.shape[1]
    ba = a.weight.reshape(a.n_heads, head_dim, d)
    bb = b.weight.reshape(b.n_heads, head_dim, d)
    h = max(a.n_heads, b.n_heads)
    if h % a.n_heads or h % b.n_heads:
        raise ConfigError(f"Head counts {a.n_heads} and {b.n_heads} cannot be aligned (one must divide the other).")
    ba = ba.repeat_interleave(h // a.n_heads, dim=0)  # analysis only: never on the hot path
    bb = bb.repeat_interleave(h // b.n_heads, dim=0)
    return ba, bb


def _role_output(w: RoleWeight, x: torch.Tensor) -> torch.Tensor:
    y = x @ w.weight.to(x.dtype).T
    return y if w.bias is None else y + w.bias.to(x.dtype)


def _tokens(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Flatten ``(B, T, d)`` to ``(n, d)``, keeping at most ``max_tokens`` evenly spaced rows."""
    flat = x.reshape(-1, x.shape[-1]).double()
    if len(flat) > max_tokens:
        idx = torch.linspace(0, len(flat) - 1, max_tokens).round().long()
        flat = flat[idx]
    return flat


def _measure(values: list, per_head: list | None = None, **extra) -> dict:
    out = {"layers": values, "mean": mean(values)}
    if per_head is not None:
        out["per_head"] = per_head
    out.update(extra)
    return out


def projection_similarity(
    model: nn.Module,
    inputs: list[torch.Tensor] | None = None,
    *,
    pairs: str | list[str] | None = "all",
    cka_max_tokens: int = CKA_MAX_TOKENS,
) -> dict:
    """Similarity of the Q/K/V projections of every attention layer of ``model``.

    Args:
        model: a qkvlab model or one Attention module.
        inputs: per layer, the ``(B, T, d_model)`` tensor the attention module received
            (see :func:`qkvlab.analysis.collect_attention`); without it CKA is skipped.
        pairs: ``"all"`` or names like ``["K-V", "Q-K"]`` (see module docstring for ties).
        cka_max_tokens: CKA uses at most this many tokens per layer (evenly spaced).

    Returns ``{"K-V": {"tied", "groups", "identity", "cosine", "subspace", "cka"}, ...}``,
    each measure ``{"layers": [...], "mean": ..., "per_head": [[...]]}``.
    """
    mods = attention_modules(model)
    if inputs is not None and len(inputs) != len(mods):
        raise ConfigError(f"Got inputs for {len(inputs)} attention layers but the model has {len(mods)}.")
    wanted, explicit = parse_pairs(pairs)
    first = mods[0][1]
    result: dict = {}
    for pair in wanted:
        a_src, b_src = first.variant.source(pair[0]), first.variant.source(pair[1])
        tied = a_src == b_src
        if tied and explicit:
            raise ConfigError(
                f"{pair_name(pair)} similarity is not defined here: {describe_groups(first)}, so "
                f"{pair[0].upper()} and {pair[1].upper()} are one projection ({a_src!r}) and identical by "
                "construction. Ask for pairs of different groups, or pairs='all' (ties are reported as 1)."
            )
        entry: dict = {
            "tied": tied,
            "groups": [a_src, b_src],
            "identity": [r for r, g in zip(pair, (a_src, b_src), strict=True) if g == "x"],
        }
        cos, cos_heads, sub, sub_heads, cka = [], [], [], [], []
        baseline = None
        for li, (_, attn) in enumerate(mods):
            w = role_weights(attn)
            a, b = w[pair[0]], w[pair[1]]
            ba, bb = aligned_blocks(a, b, attn.head_dim)
            baseline = attn.head_dim / a.weight.shape[1]
            if tied:
                n = ba.shape[0]
                cos.append(1.0)
                cos_heads.append([1.0] * n)
                sub.append(1.0)
                sub_heads.append([1.0] * n)
            else:
                cos.append(flat_cosine(ba, bb))
                cos_heads.append([flat_cosine(x, y) for x, y in zip(ba, bb, strict=True)])
                heads = [subspace_overlap(x, y) for x, y in zip(ba, bb, strict=True)]
                sub_heads.append(heads)
                sub.append(mean(heads))
            if inputs is not None:
                if tied:
                    cka.append(1.0)
                else:
                    x = _tokens(inputs[li], cka_max_tokens)
                    cka.append(linear_cka(_role_output(a, x), _role_output(b, x)))
        entry["cosine"] = _measure(cos, cos_heads)
        entry["subspace"] = _measure(sub, sub_heads, random_baseline=baseline)
        if inputs is not None:
            entry["cka"] = _measure(cka)
        result[pair_name(pair)] = entry
    return result
