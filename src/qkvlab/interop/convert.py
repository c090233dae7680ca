"""Convert a trained QKV model to K=V and/or fewer KV heads (``qkvlab convert CKPT OUT --to ...``).

Two steps, each optional, in this order:

1. **Head grouping** (``--kv-heads N``, or a target such as ``Q-GQA-4`` / ``MQA``): the key and
   value heads of each group of ``n_kv / N`` adjacent heads are mean-pooled into one (weights and
   biases), as the GQA paper (Ainslie et al., 2023) does before uptraining. Query head ``h`` used
   KV head ``h // G`` before and uses the pooled head that contains it after. Pooling only
   merges heads; more KV heads than the source has are refused. ``--pool fit`` fits the pooled
   head to every source head of its group instead, each through its own map folded into the
   query heads that read that source head (:func:`_pool_fitted`, :func:`fit_common`).
2. **Sharing K and V** (a ``q_kv`` target such as ``Q-K=V``): one projection ``s = W x + b``
   replaces the key and value projections. The key role becomes ``rope(norm(s))`` and the value
   ``s`` (qkvlab's K=V semantics), so no choice of ``W`` keeps both roles in general; ``--init``
   picks it per layer (and per KV head):

   ``key``
       ``W = W_k``: every key is exactly the source's key (after RoPE and QK-norm too), the
       values are the (unrotated) pre-RoPE keys.
   ``value``
       ``W = W_v``: every value is exactly the source's value; keys are ``rope(norm(W_v x))``.
   ``mean``
       ``W = (W_k + W_v) / 2``.
   ``fit``
       Data-aware, fitted on calibration activations ``x`` (the attention inputs of the source
       model on ``--calib`` text). The query and output projections can absorb part of the
       change exactly: a value map ``B`` (any ``D x D``) folds into ``W_o`` (the output is
       linear in the values), and a key map ``R`` folds into ``W_q`` as ``R^T`` when it
       commutes with RoPE (per rotated pair a scaled rotation, ``R = a I + b J``; with learned
       or no positions any ``D x D``; with QK-norm ``R = I``, since the norm sits between).
       ``fit`` minimises, per KV head, the relative squared errors of both roles::

           E||k - R s||^2 / E||k||^2  +  E||v - B s||^2 / E||v||^2,      s = W x + b

       by exact block-coordinate steps: ``B`` and ``R`` by least squares given ``W``, and ``W``
       in closed form given ``B`` and ``R`` (the input covariance cancels there), descending
       from each of ``key``, ``value`` and ``mean`` and keeping the best, so it never does worse
       than those on the calibration data. When the source's values are a linear function of
       its keys (or its keys one of its values, up to such an ``R``) the conversion is exact.

3. **Output refit** (``--refit-output``, with calibration text; any target): the conversion runs
   layer by layer on two token streams, the source's and the converted model's. Each layer is
   converted on the activations the converted model gives it (so ``fit`` sees the errors of the
   layers below), then its ``o_proj`` is refitted by least squares to reproduce the source's
   attention output on the source's stream (:func:`refit_linear`). On SmolLM2-135M this is what
   made the largest difference before any training (docs/interop.md).

QK-norm weights are kept (the key role is still ``norm(s)``); biases are converted with their
weights. Refused: a source that already shares projections, linear attention, a target that
would also change positions or QK-norm, and sharing patterns other than Q-K=V.

The output is a qkvlab run folder (``model.safetensors``, ``interop.json`` with the per-layer
errors when calibration data is given, ``tokenizer/``) that training can start from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from qkvlab.attention.variant import VariantSpec
from qkvlab.checkpoint import load_model, read_metadata
from qkvlab.errors import ConfigError
from qkvlab.interop.common import (
    check_output,
    checkpoint_file,
    dtype_of,
    model_from_tensors,
    output_folder,
    tokenizer_folder,
    train_config,
    write_run,
)
from qkvlab.interop.layout import block, proj
from qkvlab.models.config import GPTConfig

INITS = ("key", "value", "mean", "fit")
FIT_ITERATIONS = 200
#: Ridge of the o_proj refit, relative to the mean eigenvalue of its input covariance: conditioning
#: only (1e-4 fitted SmolLM2-135M less well on held-out text, 1e-2 worse again in its first layers).
REFIT_RIDGE = 1e-6


# --------------------------------------------------------------------------- target
def target_config(cfg: GPTConfig, to: str | None, kv_heads: int | None) -> GPTConfig:
    """The converted model's config; refuses conversions that are not pooling and/or K=V sharing."""
    src = cfg.variant
    if src.linear:
        raise ConfigError(f"Source variant {src.id!r} uses linear attention; convert works on softmax attention.")
    if src.sharing != "q_k_v":
        raise ConfigError(
            f"convert starts from separate Q, K and V projections, but the source is {src.paper_name} ({src.id})."
        )
    t = VariantSpec.parse(to) if to else src
    if t.sharing not in ("q_k_v", "q_kv"):
        raise ConfigError(
            f"convert makes Q-K=V and groups KV heads; target {t.paper_name} ({t.id}) would tie the query, which "
            "has no exact or fitted conversion here."
        )
    if t.pos is not None and t.pos != src.pos:
        raise ConfigError(f"Target {t.id!r} changes the positional scheme ({src.pos} -> {t.pos}); convert keeps it.")
    if t.linear or t.pos2d:
        raise ConfigError(f"Target {t.id!r} changes the attention kind; convert keeps softmax attention.")
    if t.qk_norm and not src.qk_norm:
        raise ConfigError(
            f"Target {t.id!r} adds QK-norm, which the source does not have; it would change the model without weights "
            "to match. Drop '+qknorm' (a source's QK-norm is kept)."
        )
    n_src = cfg.n_kv_heads
    n_kv = kv_heads if kv_heads is not None else t.kv_heads(cfg.n_heads) if t.n_kv_heads is not None else n_src
    if isinstance(n_kv, int) and n_kv < 1:
        raise ConfigError(f"--kv-heads must be at least 1 (1 is MQA), got {n_kv}.")
    if not isinstance(n_kv, int) or n_src % n_kv:
        divisors = [d for d in range(1, n_src + 1) if n_src % d == 0]
        raise ConfigError(
            f"The source has {n_src} KV heads; pooling adjacent heads reaches {divisors}, not {n_kv!r} "
            "(more heads than the source would have to be invented)."
        )
    variant = src.replace(sharing=t.sharing, n_kv_heads=None if n_kv == cfg.n_heads else n_kv)
    if variant == src:
        raise ConfigError(f"Target {variant.id!r} is the source's own variant; there is nothing to convert.")
    return cfg.replace(variant=variant.to_dict())


# --------------------------------------------------------------------------- calibration
@torch.no_grad()
def attention_input_moments(model, tokens: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, ``E[x x^T]`` of the attention input ``x`` augmented with a constant 1
    (``(d+1) x (d+1)``, float64), from the source model run on ``tokens`` ``(N, T)``."""
    blocks = model.backbone.blocks
    sums = [torch.zeros(model.config.d_model + 1, model.config.d_model + 1, dtype=torch.float64) for _ in blocks]
    count = [0]

    def hook(i):
        def fn(module, inputs, output):
            xa = _augment(output)
            sums[i] += xa.T @ xa
            if i == 0:
                count[0] += xa.shape[0]

        return fn

    handles = [b.norm1.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        for start in range(0, tokens.shape[0], batch_size):
            model(tokens[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


def calibration_tokens(weights: Path, source: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """``(n, seq_len)`` windows of ``source`` text tokenised with the checkpoint's tokenizer."""
    from qkvlab.data.corpus import load_corpus
    from qkvlab.interop.common import run_tokenizer

    tok = run_tokenizer(weights)
    if tok is None:
        raise ConfigError(
            f"{str(weights)!r} records no tokenizer, so the calibration text cannot be tokenised; give the run a "
            "tokenizer/ folder."
        )
    ids: list[int] = []
    for doc in load_corpus(source).documents:
        ids.extend(tok.encode(doc))
        ids.append(tok.eot_id)
        if len(ids) >= n_tokens:
            break
    n = min(len(ids), n_tokens) // seq_len
    if n < 1:
        raise ConfigError(f"Calibration text {source!r} has {len(ids)} tokens, fewer than one window of {seq_len}.")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


# --------------------------------------------------------------------------- fitting
def rope_commuting_fit(M: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """Least-squares ``R`` in ``k ~ R s`` restricted to maps that commute with RoPE.

    ``M = E[k s^T]`` and ``N = E[s s^T]`` (``(..., D, D)``); RoPE rotates pairs ``(i, i + D/2)``,
    and the maps that commute with every such rotation are, per pair, ``[[a, -b], [b, a]]`` (a
    complex scalar ``c = a + ib``), fitted as ``c = E[k conj(s)] / E[|s|^2]`` with
    ``k = k_i + i k_{i+D/2}``.
    """
    D = M.shape[-1]
    i = torch.arange(D // 2, device=M.device)
    j = i + D // 2
    den = (N[..., i, i] + N[..., j, j]).clamp_min(1e-30)
    a = (M[..., i, i] + M[..., j, j]) / den
    b = (M[..., j, i] - M[..., i, j]) / den
    R = torch.zeros_like(M)
    R[..., i, i], R[..., j, j], R[..., i, j], R[..., j, i] = a, a, -b, b
    return R


def _tr(x: torch.Tensor) -> torch.Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


def fit_common(
    Z: torch.Tensor, is_key: list[bool], C: torch.Tensor, *, key_map: str, iterations: int = FIT_ITERATIONS
) -> dict[str, torch.Tensor]:
    """One projection ``s = W x`` per head that ``n`` roles share, each through its own foldable map.

    ``Z``: ``(H, n, D, d+1)``, role ``r`` of head ``h`` is the map ``Z[h, r]`` of the augmented
    input (bias last); ``is_key[r]``: a key role, matched as ``R s`` with ``R`` per ``key_map``
    (``"rope"``: commutes with RoPE, ``"free"``: any, ``"identity"``), else a value role, matched
    as ``B s`` with any ``B``; ``C``: ``E[x x^T]`` of the augmented input. Minimises, per head,
    ``sum_r E||z_r - M_r s||^2 / E||z_r||^2`` by exact block-coordinate steps (the maps by least
    squares given ``W``, ``W`` in closed form given the maps), descending from the mean of the
    roles and from each role alone and keeping the best, so it is never worse than those.
    Returns ``W`` ``(H, D, d+1)``, the maps ``(H, n, D, D)`` and the relative errors ``(H, n)``
    of the roles' mean with identity maps (``start``) and of the fit (``end``).

    Every step keeps ``W`` in the row space of the stacked roles, so ``W = T Zs`` and the fit runs
    on the ``nD x nD`` Gram matrices ``G = Zs C Zs^T`` instead of the ``(d+1) x (d+1)`` covariance.
    Each step needs ``T G`` once: every role's cross term is a block of it and every error a trace
    of ``D x D`` products. The starts descend together, as one more batch dimension, each frozen
    once it stops improving, so each ends exactly where it would alone.
    """
    H, n, D = Z.shape[0], Z.shape[1], Z.shape[2]
    eye = torch.eye(D, dtype=Z.dtype, device=Z.device).expand(H, D, D)
    Zs = Z.reshape(H, n * D, -1)
    G = Zs @ C @ Zs.transpose(1, 2)
    blocks = [slice(r * D, (r + 1) * D) for r in range(n)]  # role r is sel_r Zs, sel_r = [0 .. I .. 0]
    energy = torch.stack([_tr(G[:, b, b]) for b in blocks], -1).clamp_min(1e-30)  # (H, n): E||z_r||^2

    def t(x):
        return x.transpose(-2, -1)

    def ridge(N):  # a relative ridge for the solves
        return N + eye * (1e-12 * _tr(N)[..., None, None] / D)

    def fit_maps(TG, N):  # least squares of each role on s = T Zs: (T G sel_r^T)^T (T G T^T)^-1
        maps, Nr = [], ridge(N)
        for r, b in enumerate(blocks):
            if not is_key[r] or key_map == "free":
                maps.append(t(torch.linalg.solve(Nr, TG[..., b])))  # Nr is symmetric
            elif key_map == "identity":
                maps.append(eye.expand_as(N))
            else:
                maps.append(rope_commuting_fit(t(TG[..., b]), Nr))
        return torch.stack(maps, -3)

    def errors(TG, N, maps):  # E||z_r - M_r s||^2 / e_r = (e_r - 2 tr(M_r T G sel_r^T) + tr(M_r N M_r^T)) / e_r
        cross = torch.stack([_tr(maps[..., r, :, :] @ TG[..., b]) for r, b in enumerate(blocks)], -1)
        return (energy - 2 * cross + _tr(maps @ N.unsqueeze(-3) @ t(maps))) / energy

    def descend(T):  # T: (S, H, D, nD), one descent per start
        TG = T @ G
        N = TG @ t(T)
        maps = fit_maps(TG, N)
        best = [errors(TG, N, maps).sum(-1), T, maps]
        active = torch.ones(T.shape[0], dtype=torch.bool, device=T.device)
        for _ in range(iterations):
            scaled = maps / energy[..., None, None]
            lhs = (t(maps) @ scaled).sum(-3)
            rhs = torch.cat(t(scaled).unbind(-3), -1)  # sum_r M_r^T sel_r / e_r: block r is M_r^T / e_r
            T_new = torch.linalg.solve(lhs, rhs)
            TG_new = T_new @ G
            N_new = TG_new @ t(T_new)
            # W's scale is free (the maps absorb it); keep it at the first role's energy for conditioning.
            c = torch.sqrt(energy[:, 0] / _tr(N_new).clamp_min(1e-30))[..., None, None]
            # A start that stopped improving keeps its T: it ends where it would have alone.
            keep = active[:, None, None, None]
            T = torch.where(keep, c * T_new, T)
            TG = torch.where(keep, c * TG_new, TG)
            N = torch.where(keep, c * c * N_new, N)
            maps = fit_maps(TG, N)
            total = errors(TG, N, maps).sum(-1)
            better = (total < best[0]) & active[:, None]
            gain = torch.where(better, best[0] - total, torch.zeros_like(total))
            best = [
                torch.where(better, total, best[0]),
                torch.where(better[..., None, None], T, best[1]),
                torch.where(better[..., None, None, None], maps, best[2]),
            ]
            active = active & (gain > 1e-8 * best[0]).any(-1)
            if not bool(active.any()):
                break
        return best

    # The constrained problem can have several stationary points: descend from the simple starts
    # (the mean of the roles, and each role alone) and keep the best per head.
    sel = torch.zeros(n, H, D, n * D, dtype=Z.dtype, device=Z.device)
    for r, b in enumerate(blocks):
        sel[r, :, :, b] = eye
    mean = sel.mean(0)
    threads = torch.get_num_threads()
    if Z.device.type == "cpu":
        torch.set_num_threads(1)  # products and solves of small matrices: threads cost ~400x here (MKL, 2 cores)
    try:
        err, Ts, maps = descend(torch.cat([mean[None], sel]))
    finally:
        torch.set_num_threads(threads)
    pick, heads = err.argmin(0), torch.arange(H, device=Z.device)
    T, maps = Ts[pick, heads], maps[pick, heads]
    TG = mean @ G
    start = errors(TG, TG @ t(mean), torch.stack([eye] * n, -3))
    TG = T @ G
    return {"W": T @ Zs, "maps": maps, "start": start, "end": errors(TG, TG @ t(T), maps)}


def fit_shared(
    K: torch.Tensor, V: torch.Tensor, C: torch.Tensor, *, key_map: str, iterations: int = FIT_ITERATIONS
) -> dict[str, torch.Tensor]:
    """The ``fit`` init for the KV heads of one layer (see the module docstring): :func:`fit_common`
    with two roles, the key ``K`` and the value ``V`` (each ``(H, D, d+1)``). Returns ``W``, ``R``,
    ``B`` and the relative errors ``(H, 2)`` of both roles for the ``mean`` init (``start``) and for
    the fit (``end``)."""
    res = fit_common(torch.stack([K, V], 1), [True, False], C, key_map=key_map, iterations=iterations)
    return {"W": res["W"], "R": res["maps"][:, 0], "B": res["maps"][:, 1], "start": res["start"], "end": res["end"]}


def role_errors(K: torch.Tensor, V: torch.Tensor, W: torch.Tensor, C: torch.Tensor) -> tuple[float, float]:
    """Relative errors ``E||k - s||^2 / E||k||^2`` and the same for ``v`` when ``s = W x``."""
    dk, dv = K - W, V - W
    ek = torch.trace(K @ C @ K.T).clamp_min(1e-30)
    ev = torch.trace(V @ C @ V.T).clamp_min(1e-30)
    return float(torch.trace(dk @ C @ dk.T) / ek), float(torch.trace(dv @ C @ dv.T) / ev)


# --------------------------------------------------------------------------- conversion
def pool_heads(t: torch.Tensor, n_src: int, n_dst: int) -> torch.Tensor:
    """Mean of each group of ``n_src // n_dst`` adjacent heads of a ``(n_src * D, ...)`` tensor."""
    if n_src == n_dst:
        return t
    rows = t.shape[0] // n_src
    return t.reshape(n_dst, n_src // n_dst, rows, *t.shape[1:]).mean(1).reshape(n_dst * rows, *t.shape[1:])


def _layer_tensors(i: int, src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], ctx: dict[str, Any],
                   C: torch.Tensor | None) -> dict[str, Any]:  # fmt: skip
    """Convert layer ``i``'s attention from the source tensors ``src`` into ``out`` (in place), with
    ``C`` the layer's input moments (``None``: no calibration); returns the layer's diagnostics.
    Reads only ``src``, so a layer can be converted again with other moments."""
    cfg, init, share = ctx["cfg"], ctx["init"], ctx["share"]
    n_src, n_dst, D, G = cfg.n_kv_heads, ctx["n_dst"], cfg.head_dim, ctx["group"]
    for r in ("k", "v"):
        for part in ("weight", "bias"):
            out.pop(proj(i, r) + part, None)
    if ctx["pool"] == "fit":
        return _pool_fitted(i, src, out, ctx, C)
    K = pool_heads(_augmented_role(src, i, "k"), n_src, n_dst)  # (n_dst * D, d + 1): bias last
    V = pool_heads(_augmented_role(src, i, "v"), n_src, n_dst)
    info: dict[str, Any] = {"layer": i}
    if not share:
        _write_projection(out, i, "k", K, cfg.bias)
        _write_projection(out, i, "v", V, cfg.bias)
        return info
    W = K if init == "key" else V if init == "value" else (K + V) / 2
    R = B = None
    if init == "fit":
        res = _fit_on(ctx, fit_shared, K.view(n_dst, D, -1), V.view(n_dst, D, -1), C, key_map=ctx["key_map"])
        W, R, B = res["W"].reshape(n_dst * D, -1), res["R"], res["B"]
        start, end = res["start"].tolist(), res["end"].tolist()
        info["heads"] = [
            {"mean_init_key_error": s[0], "mean_init_value_error": s[1], "key_error": e[0], "value_error": e[1]}
            for s, e in zip(start, end, strict=True)
        ]
        info["key_error"] = sum(e[0] for e in end) / n_dst
        info["value_error"] = sum(e[1] for e in end) / n_dst
    elif C is not None:
        info["key_error"], info["value_error"] = role_errors(K, V, W, C)
    _fold_maps(i, src, out, cfg, R, B, per=G)  # query head h reads KV head h // G
    _write_projection(out, i, "kv", W, cfg.bias)
    return info


def _write_projection(out: dict[str, torch.Tensor], i: int, group: str, W: torch.Tensor, bias: bool) -> None:
    """Store ``[W | b]`` (bias last) as layer ``i``'s ``group`` projection."""
    out[proj(i, group) + "weight"] = W[:, :-1]
    if bias:
        out[proj(i, group) + "bias"] = W[:, -1]


def _fold_maps(i, src, out, cfg: GPTConfig, R: torch.Tensor | None, B: torch.Tensor | None, *, per: int) -> None:
    """Write layer ``i``'s query and output projections with per-KV-head maps folded in: query head
    ``h`` takes ``R[h // per]^T`` into its ``q_proj`` rows (and bias) and ``B[h // per]`` into its
    ``o_proj`` columns (``R``, ``B``: ``(N, D, D)``; None: the source's projections as they are)."""
    D = cfg.head_dim
    wq = src[proj(i, "q") + "weight"].to(torch.float64, copy=True)
    bq = src.get(proj(i, "q") + "bias")
    bq = None if bq is None else bq.to(torch.float64, copy=True)
    wo = src[block(i) + "attn.o_proj.weight"].to(torch.float64, copy=True)
    if R is not None:
        for h in range(cfg.n_heads):
            j, rows = h // per, slice(h * D, (h + 1) * D)
            wq[rows] = R[j].T @ wq[rows]
            if bq is not None:
                bq[rows] = R[j].T @ bq[rows]
            wo[:, rows] = wo[:, rows] @ B[j]
    out[proj(i, "q") + "weight"] = wq
    if bq is not None:
        out[proj(i, "q") + "bias"] = bq
    out[block(i) + "attn.o_proj.weight"] = wo


def _fit_on(ctx: dict[str, Any], fit, *args, **kw) -> dict[str, torch.Tensor]:
    """Run ``fit`` on the conversion's device (``ctx["device"]``: the model's; a GPU makes the
    many tiny float64 solves of a fit with several roles fast) and bring the result to the CPU."""
    device = ctx["device"]
    res = fit(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), **kw)
    return {k: v.cpu() for k, v in res.items()}


def _augmented_role(src: dict[str, torch.Tensor], i: int, role: str) -> torch.Tensor:
    """``[W | b]`` of layer ``i``'s ``role`` projection (``b`` zeros without a bias), float64."""
    w = src[proj(i, role) + "weight"].to(torch.float64)
    b = src.get(proj(i, role) + "bias")
    b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.to(torch.float64)
    return torch.cat([w, b[:, None]], 1)


def _pool_fitted(i: int, src, out, ctx, C: torch.Tensor) -> dict[str, Any]:
    """``--pool fit`` for layer ``i``: each pooled head is fitted to every source head of its group,
    each through its own map, folded into the query heads that read that source head (``R^T`` into
    ``q_proj``) and into their ``o_proj`` columns (``B``). With K=V one projection serves all the
    group's keys and values (:func:`fit_common` with ``2m`` roles); without, the keys and the values
    are pooled by two such fits."""
    cfg, share = ctx["cfg"], ctx["share"]
    n_dst, D, key_map = ctx["n_dst"], cfg.head_dim, ctx["key_map"]
    m = cfg.n_kv_heads // n_dst
    K = _augmented_role(src, i, "k").view(n_dst, m, D, -1)
    V = _augmented_role(src, i, "v").view(n_dst, m, D, -1)
    if share:
        res = _fit_on(ctx, fit_common, torch.cat([K, V], 1), [True] * m + [False] * m, C, key_map=key_map)
        R, B = res["maps"][:, :m], res["maps"][:, m:]
        fits = {"kv": res}
        key_err, value_err = res["end"][:, :m], res["end"][:, m:]
        start_k, start_v = res["start"][:, :m], res["start"][:, m:]
    else:
        rk = _fit_on(ctx, fit_common, K, [True] * m, C, key_map=key_map)
        rv = _fit_on(ctx, fit_common, V, [False] * m, C, key_map=key_map)
        R, B = rk["maps"], rv["maps"]
        fits = {"k": rk, "v": rv}
        key_err, value_err, start_k, start_v = rk["end"], rv["end"], rk["start"], rv["start"]
    # Query head h read source KV head h // per_src, now map (g, jj) of pooled head g: flat index.
    per_src = cfg.n_heads // cfg.n_kv_heads
    _fold_maps(i, src, out, cfg, R.reshape(-1, D, D), B.reshape(-1, D, D), per=per_src)
    for group, res in fits.items():
        _write_projection(out, i, group, res["W"].reshape(n_dst * D, -1), cfg.bias)
    heads = [
        {
            "mean_init_key_error": float(start_k[g].mean()),
            "mean_init_value_error": float(start_v[g].mean()),
            "key_error": float(key_err[g].mean()),
            "value_error": float(value_err[g].mean()),
        }
        for g in range(n_dst)
    ]
    return {
        "layer": i,
        "heads": heads,
        "key_error": sum(h["key_error"] for h in heads) / n_dst,
        "value_error": sum(h["value_error"] for h in heads) / n_dst,
    }


@torch.no_grad()
def convert_model(
    model,
    target: GPTConfig,
    *,
    init: str = "mean",
    moments: list[torch.Tensor] | None = None,
    tokens: torch.Tensor | None = None,
    refit_output: bool = False,
    pool: str = "mean",
    batch_size: int = 8,
) -> tuple[Any, list[dict[str, Any]]]:
    """The converted GPT and per-layer diagnostics (see the module docstring).

    ``moments`` (from :func:`attention_input_moments`) calibrate every layer on the source's
    activations at once. ``refit_output`` calibrates layer by layer on ``tokens`` instead (see
    :func:`_convert_sequential`); the converted model is then on ``model``'s device.
    """
    cfg = model.config
    if init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, got {init!r}.")
    share = target.variant.kv_shared
    check_pool(pool, cfg, target, init)
    if refit_output and tokens is None:
        raise ConfigError("--refit-output fits each layer on calibration activations; pass --calib TEXT (a corpus).")
    if pool == "fit" and moments is None and not refit_output:
        raise ConfigError("--pool fit is fitted on calibration activations; pass --calib TEXT (a corpus).")
    if init == "fit" and share and moments is None and not refit_output:
        raise ConfigError("--init fit is fitted on calibration activations; pass --calib TEXT (a corpus).")
    # Only the attention projections are computed on (in float64); the rest is copied as it is.
    src = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = dict(src)
    n_dst = target.n_kv_heads
    v = cfg.variant
    ctx = {
        "cfg": cfg,
        "init": init,
        "share": share,
        "n_dst": n_dst,
        "group": cfg.n_heads // n_dst,  # query heads per KV head after conversion
        "key_map": "identity" if v.qk_norm else "rope" if v.pos == "rope" else "free",
        "pool": pool,
        "device": next(model.parameters()).device,
    }
    if refit_output:
        return _convert_sequential(model, target, src, out, ctx, tokens, batch_size)
    layers = [_layer_tensors(i, src, out, ctx, None if moments is None else moments[i]) for i in range(cfg.n_layers)]
    return model_from_tensors(target, out, where="convert"), layers


POOLS = ("mean", "fit")


def check_pool(pool: str, cfg: GPTConfig, target: GPTConfig, init: str) -> None:
    """Refuse a ``--pool`` that is unknown, pools nothing, or cannot go with ``init``."""
    if pool not in POOLS:
        raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}.")
    if pool == "mean":
        return
    if target.n_kv_heads == cfg.n_kv_heads:
        raise ConfigError(
            f"--pool fit: the target keeps the source's {cfg.n_kv_heads} KV heads, so nothing is pooled; drop --pool "
            "or give fewer heads (--kv-heads, or a target such as Q-MQA)."
        )
    if target.variant.kv_shared and init != "fit":
        raise ConfigError(
            f"--pool fit fits the shared K=V projection to the source's heads, which --init {init} does not do; "
            "use --init fit with it."
        )


def _in_batches(f, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([f(x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)])


def _augment(x: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` -> ``(N, n + 1)`` float64 rows with a constant 1 appended (for the bias)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64).cpu()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def _moments(f, h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``E[x x^T]`` of ``x = f(h)`` augmented with a constant 1, over every token of ``h``, in batches."""
    total = None
    for s in range(0, h.shape[0], batch_size):
        x = _augment(f(h[s : s + batch_size]))
        total = x.T @ x if total is None else total + x.T @ x
    return total / (h.shape[0] * h.shape[1])


def _o_proj_moments(old, new, hs: torch.Tensor, hn: torch.Tensor, batch_size: int, bias: bool):
    """``E[a a^T]``, ``E[a a'^T]``, ``E[a' a'^T]`` of the o_proj inputs of block ``old`` on the
    source stream ``hs`` (``a``) and of block ``new`` on the converted stream ``hn`` (``a'``),
    augmented with a constant 1 when o_proj has a bias."""
    grab: list[torch.Tensor] = []
    hooks = [b.attn.o_proj.register_forward_hook(lambda m, i, o: grab.append(i[0])) for b in (old, new)]
    sums = None
    try:
        for s in range(0, hs.shape[0], batch_size):
            grab.clear()
            old.attn(old.norm1(hs[s : s + batch_size]))
            new.attn(new.norm1(hn[s : s + batch_size]))
            a, b = (_augment(g) if bias else g.reshape(-1, g.shape[-1]).to(torch.float64).cpu() for g in grab)
            part = (a.T @ a, a.T @ b, b.T @ b)
            sums = part if sums is None else tuple(x + y for x, y in zip(sums, part, strict=True))
    finally:
        for h in hooks:
            h.remove()
    n = hs.shape[0] * hs.shape[1]
    return tuple(x / n for x in sums)


def refit_linear(
    source: list[torch.Tensor], start: list[torch.Tensor], Css: torch.Tensor, Csn: torch.Tensor, Cnn: torch.Tensor
) -> tuple[list[torch.Tensor], float, float]:
    """Least-squares refit of a linear layer to reproduce the source layer's outputs from new inputs.

    ``source`` / ``start``: ``[weight]`` or ``[weight, bias]`` of the source layer and of the layer
    as converted so far; ``Css = E[a a^T]``, ``Csn = E[a a'^T]``, ``Cnn = E[a' a'^T]`` of the source
    inputs ``a`` and the new inputs ``a'`` (augmented with a 1 when there is a bias). Returns the
    refitted ``[weight(, bias)]`` and the relative errors ``E||W a' - W_src a||^2 / E||W_src a||^2``
    before (``start``) and after; ``start`` itself where the refit would not lower the error.
    """

    def joined(ts):
        return (
            torch.cat([ts[0].to(torch.float64), ts[1].to(torch.float64)[:, None]], 1)
            if len(ts) == 2
            else ts[0].to(torch.float64)
        )

    Ws, W0 = joined(source), joined(start)
    ridge = REFIT_RIDGE * _tr(Cnn) / Cnn.shape[0] * torch.eye(Cnn.shape[0], dtype=Cnn.dtype)
    W = torch.linalg.solve(Cnn + ridge, Csn.T @ Ws.T).T  # (Cnn + λI) W^T = Csn^T Ws^T; Cnn symmetric
    ref = _tr(Ws @ Css @ Ws.T).clamp_min(1e-30)

    def error(M: torch.Tensor) -> float:
        return float((_tr(M @ Cnn @ M.T) - 2 * _tr(Ws @ Csn @ M.T) + _tr(Ws @ Css @ Ws.T)).clamp_min(0) / ref)

    before, after = error(W0), error(W)
    if after >= before:  # e.g. a conversion that is already exact: the ridge would only add to it
        return [t.to(torch.float64) for t in start], before, before
    return ([W[:, :-1], W[:, -1]] if len(source) == 2 else [W]), before, after


def _convert_sequential(model, target: GPTConfig, src, out, ctx, tokens: torch.Tensor, batch_size: int):
    """Convert layer by layer, each on the activations it will see, and refit its output.

    Two token streams run side by side through the source and the converted model. At layer
    ``i``, the ``fit`` moments are those of the converted stream (the errors of the layers below
    included), and then ``o_proj`` is refitted by least squares so that the converted layer's
    attention output on its own stream matches the source's on the source stream:
    ``W_o' = W_o E[a a'^T] E[a' a'^T]^-1`` (a tiny ridge for conditioning), which takes up
    what the shared projection could not keep (the changed attention pattern included) and
    the drift the layers below left. Only the attention projections change.
    """
    cfg = ctx["cfg"]
    device = next(model.parameters()).device
    # A placeholder for every layer (mean init: no moments needed); each is replaced in turn.
    placeholder = {**ctx, "init": "mean" if ctx["init"] == "fit" else ctx["init"], "pool": "mean"}
    for i in range(cfg.n_layers):
        _layer_tensors(i, src, out, placeholder, None)
    new = model_from_tensors(target, out, where="convert").to(device).eval()
    params = new.state_dict()
    idx = tokens.to(device)
    hs = model.wte(idx)
    if model.backbone.wpe is not None:  # learned positions join the stream before the first block
        hs = hs + model.backbone.wpe(torch.arange(idx.shape[1], device=device))
    hn = hs.clone()
    layers = []
    for i in range(cfg.n_layers):
        old, blk = model.backbone.blocks[i], new.backbone.blocks[i]
        C = _moments(blk.norm1, hn, batch_size)
        info = _layer_tensors(i, src, out, ctx, C)
        for name in params:
            if name.startswith(block(i) + "attn.") and name in out:
                params[name].copy_(out[name])
        names = [block(i) + "attn.o_proj.weight"] + ([block(i) + "attn.o_proj.bias"] if cfg.bias else [])
        moments = _o_proj_moments(old, blk, hs, hn, batch_size, bias=cfg.bias)
        fitted, info["output_error_before"], info["output_error"] = refit_linear(
            [src[n] for n in names], [out[n] for n in names], *moments
        )
        for name, value in zip(names, fitted, strict=True):
            out[name] = value
            params[name].copy_(value)
        hs = _in_batches(old, hs, batch_size)
        hn = _in_batches(blk, hn, batch_size)
        info["stream_error"] = float((hn - hs).double().pow(2).sum() / hs.double().pow(2).sum().clamp_min(1e-30))
        layers.append(info)
    return new, layers


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str = "Q-K=V",
    init: str = "mean",
    kv_heads: int | None = None,
    calib: str | None = None,
    calib_tokens: int = 32768,
    calib_seq_len: int = 512,
    device: str = "cpu",
    dtype: str = "fp32",
    force: bool = False,
    refit_output: bool = False,
    pool: str = "mean",
) -> dict[str, Any]:
    """Convert the qkvlab checkpoint ``src`` and write the run folder ``out``; returns the report.

    ``refit_output`` calibrates layer by layer and refits each ``o_proj`` (see
    :func:`convert_model`); ``pool="fit"`` fits pooled heads instead of averaging them. Both need
    ``calib``."""
    if init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, got {init!r}.")
    if calib_seq_len < 2:
        raise ConfigError(f"--calib-seq-len must be at least 2 (a window of tokens), got {calib_seq_len}.")
    torch_dtype = dtype_of(dtype)
    weights = checkpoint_file(src)
    check_output(out, force=force, inputs=(src, weights))  # before the (possibly long) calibration pass
    model = load_model(weights, device=device).eval()
    cfg = model.config
    if not isinstance(cfg, GPTConfig):
        raise ConfigError(f"convert works on GPT language models; {str(weights)!r} holds a {cfg.family!r}.")
    target = target_config(cfg, to, kv_heads)
    check_pool(pool, cfg, target, init)
    moments = tokens = None
    calib_info = None
    if calib is not None:
        seq = min(calib_seq_len, cfg.max_seq_len)
        if calib_tokens < seq:
            raise ConfigError(
                f"--calib-tokens must be at least one calibration window ({seq} tokens), got {calib_tokens}."
            )
        tokens = calibration_tokens(weights, calib, calib_tokens, seq)
        if not refit_output:
            moments = attention_input_moments(model, tokens)
        mode = "sequential" if refit_output else "parallel"
        calib_info = {"source": calib, "tokens": int(tokens.numel()), "seq_len": seq, "mode": mode}
    elif refit_output:
        raise ConfigError("--refit-output fits each layer on calibration activations; pass --calib TEXT (a corpus).")
    elif pool == "fit":
        raise ConfigError("--pool fit is fitted on calibration activations; pass --calib TEXT (a corpus).")
    elif init == "fit" and target.variant.kv_shared:
        raise ConfigError("--init fit is fitted on calibration activations; pass --calib TEXT (a corpus).")
    if refit_output:  # layer by layer on the calibration device
        new, layers = convert_model(model, target, init=init, tokens=tokens, refit_output=True, pool=pool)
        new = new.cpu()
    else:
        new, layers = convert_model(model, target, init=init, moments=moments, pool=pool)
    src_v, dst_v = cfg.variant, target.variant
    elem = torch.empty((), dtype=torch.bfloat16).element_size()

    def kv_bytes(c: GPTConfig) -> int:
        return c.n_layers * c.variant.cached_tensors * c.n_kv_heads * c.head_dim * elem

    report: dict[str, Any] = {
        "action": "convert",
        "source": str(weights.resolve()),
        "source_variant": src_v.id,
        "source_paper_name": src_v.paper_name,
        "variant": dst_v.id,
        "paper_name": dst_v.paper_name,
        "init": init if dst_v.kv_shared else None,
        "kv_heads": {
            "source": cfg.n_kv_heads,
            "target": target.n_kv_heads,
            "pooling": None if target.n_kv_heads == cfg.n_kv_heads else f"{pool} of adjacent heads",
        },
        "pool": pool if target.n_kv_heads != cfg.n_kv_heads else None,
        "kv_cache_bytes_per_token_bf16": {"source": kv_bytes(cfg), "target": kv_bytes(target)},
        "calibration": calib_info,
        "refit_output": refit_output,
        "dtype": dtype,
        "layers": layers,
    }
    notes = []
    if target.n_kv_heads != cfg.n_kv_heads:
        m = cfg.n_kv_heads // target.n_kv_heads
        notes.append(
            f"K/V heads mean-pooled in adjacent groups of {m}."
            if pool == "mean"
            else f"K/V heads of each adjacent group of {m} fitted as one on the calibration activations, each source "
            "head through its own map, folded into q_proj (R^T) and o_proj (B) of the query heads that read it."
        )
    if dst_v.kv_shared:
        notes.append(
            {
                "key": "W_kv = W_k: the key path (RoPE, QK-norm included) is the source's exactly.",
                "value": "W_kv = W_v: the value path is the source's exactly.",
                "mean": "W_kv = (W_k + W_v) / 2.",
                "fit": "W_kv fitted on the calibration activations; q_proj absorbs the fitted key map (R^T) and "
                "o_proj the value map (B), per head.",
            }[init]
        )
    if refit_output:
        before = sum(lay["output_error_before"] for lay in layers) / len(layers)
        after = sum(lay["output_error"] for lay in layers) / len(layers)
        report["mean_output_error_before_refit"], report["mean_output_error"] = before, after
        notes.append(
            "Calibrated layer by layer on the converted model's own activations, and o_proj refitted by least squares "
            f"to the source's attention outputs (relative error, mean over layers: {before:.3g} -> {after:.3g})."
        )
    if src_v.qk_norm:
        notes.append("QK-norm weights kept: the key role is norm(s), the value s.")
    report["notes"] = notes
    errs = [(lay.get("key_error"), lay.get("value_error")) for lay in layers if "key_error" in lay]
    if errs:
        report["mean_key_error"] = sum(e[0] for e in errs) / len(errs)
        report["mean_value_error"] = sum(e[1] for e in errs) / len(errs)
    source_tc = train_config(read_metadata(weights))
    with output_folder(out, force=force, inputs=(src, weights)) as tmp:
        tok_src = tokenizer_folder(weights)
        if tok_src is None:
            _write_named_tokenizer(tmp / "tokenizer", (source_tc.get("data") or {}).get("tokenizer"))
        write_run(tmp, new.to(torch_dtype), report=report, tokenizer_from=tok_src)
    return report


def _write_named_tokenizer(folder: Path, name: str | None) -> None:
    """Give a converted run whose source named ``byte`` / ``gpt2`` its own ``tokenizer/`` folder."""
    from qkvlab.data.tokenizers import EOT_TEXT, find_gpt2_files
    from qkvlab.interop.tokenizer import bpe_from_files, byte_tokenizer, write_tokenizer_folder

    if name == "byte":
        tok = byte_tokenizer()
    elif isinstance(name, str) and name.startswith("gpt2"):
        tok = bpe_from_files(*find_gpt2_files(name.partition(":")[2] or None))
    else:
        return
    write_tokenizer_folder(folder, tok, eot_token=EOT_TEXT, source=name)
