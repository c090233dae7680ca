"""Capture attention weights and pre-softmax logits from any qkvlab model, and draw them.

:func:`capture_attention` is a context manager that puts hooks on every
:class:`~qkvlab.attention.Attention` in a model (GPT, SequenceEncoder, ViT, SetEncoder: all
are built on that one module). While it is active each attention call runs with
``need_weights=True``, which routes it through the ``reference`` backend (plain math), and
the hooks record the layer's input, its logits (``scale * q k^T + bias``, *without* the
causal or padding mask) and its weights (after mask and softmax); the module still returns
what its caller asked for, so the model runs unchanged. :func:`collect_attention` runs one
forward pass under it::

    cap = collect_attention(model, idx)            # idx: (B, T) token ids for a GPT
    cap.layers[0].weights.shape                    # (B, n_heads, T, T)
    plot_attention_grid(cap, "maps.png")           # layers x heads, first sample

The figures need matplotlib, imported only when a figure is drawn.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkvlab.analysis.similarity import attention_modules
from qkvlab.errors import ConfigError


@dataclass
class LayerAttention:
    """One attention call: where it ran and what it computed (tensors detached)."""

    name: str  # module path, e.g. "backbone.blocks.0.attn"
    causal: bool
    inputs: torch.Tensor | None  # (B, T, d_model): what the attention module received
    logits: torch.Tensor  # (B, Hq, T, S): scale * q k^T (+ 2D-fix bias), no mask
    weights: torch.Tensor  # (B, Hq, T, S): softmax over visible keys


@dataclass
class AttentionCapture:
    """Per attention call, in call order (one per layer for one forward pass)."""

    layers: list[LayerAttention] = field(default_factory=list)
    output: Any = None

    @property
    def weights(self) -> list[torch.Tensor]:
        return [layer.weights for layer in self.layers]

    @property
    def logits(self) -> list[torch.Tensor]:
        return [layer.logits for layer in self.layers]

    @property
    def inputs(self) -> list[torch.Tensor]:
        missing = [layer.name for layer in self.layers if layer.inputs is None]
        if missing:
            raise ConfigError("Layer inputs were not kept; capture with keep_inputs=True.")
        return [layer.inputs for layer in self.layers]  # type: ignore[misc]


def _refuse_linear(name: str, attn: nn.Module) -> None:
    spec = attn.variant
    if getattr(spec, "linear", False):
        raise ConfigError(
            f"Attention {name or '(model)'} uses {spec.paper_name} ({spec.id}): linear attention forms no "
            "softmax score map, so there are no attention weights or logits to collect. Projection "
            "similarity and rank still apply (analyze with maps=False)."
        )


@contextlib.contextmanager
def capture_attention(
    model: nn.Module, *, keep_inputs: bool = True, device: str | torch.device | None = "cpu"
) -> Iterator[AttentionCapture]:
    """Record every attention call of ``model`` inside the ``with`` block.

    Args:
        model: a qkvlab model or an Attention module.
        keep_inputs: also keep each layer's input ``(B, T, d_model)`` (needed for CKA).
        device: where captured tensors are stored (``None``: where they were computed).
    """
    mods = attention_modules(model)
    for name, attn in mods:
        _refuse_linear(name, attn)
    cap = AttentionCapture()
    names = {id(m): n for n, m in mods}
    pending: list[tuple[torch.Tensor, bool]] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(device) if device is not None else t

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        pending.append((x, bool(kwargs.get("need_weights", False))))
        return args, {**kwargs, "need_weights": True}

    def post(module, args, kwargs, output):
        x, asked = pending.pop()
        y, res = output
        if res.weights is None or res.logits is None:
            raise ConfigError(
                f"Attention {names[id(module)]!r} returned no weights under need_weights=True; its backend "
                "cannot report them. Use backend='reference'."
            )
        cap.layers.append(
            LayerAttention(
                names[id(module)],
                bool(module.causal),
                keep(x) if keep_inputs else None,
                keep(res.logits),
                keep(res.weights),
            )
        )
        return output if asked else y

    handles = []
    try:
        for _, attn in mods:
            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(post, with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_attention(
    model: nn.Module,
    inputs: torch.Tensor | tuple | list,
    *,
    keep_inputs: bool = True,
    device: str | torch.device | None = "cpu",
    **forward_kwargs: Any,
) -> AttentionCapture:
    """One forward pass of ``model`` in eval mode with every attention layer captured.

    ``inputs`` is what the model takes (token ids ``(B, T)`` for GPT and SequenceEncoder,
    images ``(B, C, H, W)`` for ViT, features ``(B, N, F)`` for SetEncoder), or a tuple of
    positional arguments; ``forward_kwargs`` go to the model (e.g. ``padding_mask``). Do not
    pass a KV cache: maps are taken over the whole sequence at once.
    """
    if forward_kwargs.get("cache") is not None:
        raise ConfigError("collect_attention takes the whole sequence at once; do not pass a KV cache.")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model, keep_inputs=keep_inputs, device=device) as cap:
            cap.output = model(*args, **forward_kwargs)
    finally:
        model.train(was_training)
    return cap


# ------------------------------------------------------------------ figures
def _figure(rows: int, cols: int, size: float = 1.6):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "Attention-map figures need matplotlib, which is not installed: `pip install matplotlib` "
            "(or skip figures, e.g. `qkvlab analyze --no-plots`)."
        ) from None
    fig = Figure(figsize=(max(3.0, size * cols + 1), max(2.5, size * rows + 0.8)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _maps(capture: AttentionCapture | list[torch.Tensor]) -> list[torch.Tensor]:
    maps = capture.weights if isinstance(capture, AttentionCapture) else list(capture)
    if not maps:
        raise ConfigError("No attention maps to draw: the capture is empty (did the model run?).")
    return maps


def _sample(w: torch.Tensor, sample: int) -> torch.Tensor:
    if not 0 <= sample < w.shape[0]:
        raise ConfigError(f"sample={sample} is out of range: the batch has {w.shape[0]} sequences.")
    return w[sample].float().cpu()


def _vmax(m: torch.Tensor) -> float:
    """Colour scale top: the 99th percentile, so the few near-1 weights of early causal rows do not wash
    out the rest of the map."""
    top = float(torch.quantile(m.flatten().float(), 0.99)) if m.numel() else 1.0
    return top if top > 0 else float(m.max()) or 1.0


def plot_attention_grid(
    capture: AttentionCapture | list[torch.Tensor], path: str | Path, *, sample: int = 0, title: str | None = None
) -> Path:
    """Layers x heads grid of the attention weights of one sequence of the batch; returns ``path``."""
    maps = _maps(capture)
    n_heads = max(w.shape[1] for w in maps)
    fig, axes = _figure(len(maps), n_heads)
    for li, w in enumerate(maps):
        w = _sample(w, sample)
        for h in range(n_heads):
            ax = axes[li][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < w.shape[0]:
                ax.imshow(w[h].numpy(), cmap="viridis", vmin=0, vmax=_vmax(w[h]), interpolation="nearest")
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_variants(maps: dict[str, AttentionCapture | list[torch.Tensor]], path: str | Path, *, sample: int = 0) -> Path:
    """Variants side by side: one row per variant, one column per layer, weights averaged over heads."""
    if not maps:
        raise ConfigError("plot_variants needs at least one variant's maps, e.g. {'QKV': capture}.")
    per = {name: _maps(m) for name, m in maps.items()}
    n_layers = max(len(v) for v in per.values())
    fig, axes = _figure(len(per), n_layers, size=2.0)
    for ri, (name, layers) in enumerate(per.items()):
        for li in range(n_layers):
            ax = axes[ri][li]
            ax.set_xticks([])
            ax.set_yticks([])
            if li < len(layers):
                m = _sample(layers[li], sample).mean(0)
                ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=_vmax(m), interpolation="nearest")
            if ri == 0:
                ax.set_title(f"layer {li} (head mean)", fontsize=8)
            if li == 0:
                ax.set_ylabel(textwrap.fill(name, 22), fontsize=8)
    return _save(fig, path)


def plot_task_grid(
    maps: dict[tuple[str, str], AttentionCapture | list[torch.Tensor]],
    path: str | Path,
    *,
    layer: int = 0,
    sample: int = 0,
    title: str | None = None,
) -> Path:
    """Rows: tasks, columns: variants (the paper's appendix figure); one layer, weights averaged over heads.

    ``maps`` is keyed by ``(task, variant)`` in the order rows and columns should appear; a
    missing pair leaves its cell empty.
    """
    if not maps:
        raise ConfigError("plot_task_grid needs at least one (task, variant) capture.")
    tasks = list(dict.fromkeys(t for t, _ in maps))
    variants = list(dict.fromkeys(v for _, v in maps))
    fig, axes = _figure(len(tasks), len(variants), size=1.8)
    for ri, task in enumerate(tasks):
        for ci, variant in enumerate(variants):
            ax = axes[ri][ci]
            ax.set_xticks([])
            ax.set_yticks([])
            cap = maps.get((task, variant))
            if cap is not None:
                layers = _maps(cap)
                if not 0 <= layer < len(layers):
                    raise ConfigError(f"layer={layer} is out of range: the model has {len(layers)} attention layers.")
                m = _sample(layers[layer], sample).mean(0)
                ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=_vmax(m), interpolation="nearest")
            if ri == 0:
                ax.set_title(textwrap.fill(variant, 14), fontsize=8)
            if ci == 0:
                ax.set_ylabel(task, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_similarity(similarity: dict, path: str | Path, *, title: str | None = None) -> Path:
    """Per-layer similarity of each projection pair, one panel per method (from :func:`projection_similarity`)."""
    methods = [m for m in ("cosine", "subspace", "cka") if any(m in e for e in similarity.values())]
    if not methods:
        raise ConfigError("Nothing to plot: the similarity result holds no measures.")
    fig, axes = _figure(1, len(methods), size=3.0)
    for ax, method in zip(axes[0], methods, strict=True):
        base = None
        for pair, entry in similarity.items():
            if method not in entry:
                continue
            vals = entry[method]["layers"]
            label = pair + (" (tied)" if entry["tied"] else "")
            ax.plot(range(len(vals)), vals, marker="o", linestyle="--" if entry["tied"] else "-", label=label)
            base = entry[method].get("random_baseline")
        if method == "subspace" and base is not None:
            ax.axhline(base, color="grey", linewidth=0.8, linestyle=":", label="random")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_spectra(spectra: dict[str, list[list[float]]], path: str | Path, *, title: str | None = None) -> Path:
    """Normalised singular values (``s / s[0]``, log scale) of each projection, one panel per group."""
    if not spectra:
        raise ConfigError("Nothing to plot: no projection spectra (every role is the identity?).")
    fig, axes = _figure(1, len(spectra), size=3.0)
    for ax, (group, layers) in zip(axes[0], spectra.items(), strict=True):
        for li, s in enumerate(layers):
            top = s[0] if s and s[0] > 0 else 1.0
            ax.semilogy([v / top for v in s], label=f"layer {li}")
        ax.set_title(f"proj.{group}", fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
