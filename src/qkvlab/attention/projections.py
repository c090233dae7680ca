"""Projection strategy: turn ``x`` into raw (q, k, v) with each shared group computed once.

Each group of the variant's sharing is one ``nn.Linear`` named after the group
(``proj.q``, ``proj.kv``, ``proj.qkv`` ...), so the state-dict keys say which variant
a checkpoint holds. Roles in one group come back as *the same tensor object*; a role
in no group is the input itself. Widths: a group holding ``q`` has one head per query
head; a group of only ``k`` and/or ``v`` has ``n_kv_heads`` heads.

Inference fusion (:class:`FusedLinears`, :func:`fuse_projections`): for decoding, the groups'
weights (and biases) can be concatenated into one matrix so a layer's projections are ONE
matrix product, split afterwards (at batch 1 one larger matrix-vector product runs closer to
the memory bandwidth than two or three small ones, and it is one kernel instead of several).
The concatenation is a snapshot of the parameters in a non-persistent buffer: the state dict,
checkpoints and the parameters themselves are unchanged, and training never uses it
(``train()`` drops it, and so does a forward that autograd records). It is meant for frozen
inference weights; see :class:`FusedLinears` for how it is kept in sync.
"""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.attention.matvec import apply_linear, linear
from qkvlab.attention.variant import ROLES, VariantSpec
from qkvlab.errors import ConfigError

# Bumped whenever a fused buffer is created or dropped anywhere (not when one is refreshed in
# place): a recorded CUDA graph reads the buffers it was captured with, so a decoder compares
# this number to know when to look again (see StaticDecoder).
_EPOCH = [0]


def fusion_epoch() -> int:
    """A counter that changes whenever any module's fused buffers are created or dropped."""
    return _EPOCH[0]


class FusedLinears:
    """Mixin: run several ``nn.Linear`` layers of the same input as one matrix product, for inference.

    A module using it calls :meth:`_init_fusion` in ``__init__``, lists its layers (in output
    order) in :meth:`_fusion_linears` and computes them with :meth:`_fused_outputs` (None when
    not fused: then it calls the layers as usual).

    :meth:`fuse` concatenates the layers' weights (and biases) into the non-persistent buffers
    ``_fused_weight`` / ``_fused_bias``; the forward then does one ``F.linear`` and splits the
    result into views, one per layer. Nothing else changes: the parameters, the state dict
    (keys, shapes, values) and checkpoints are the same fused or not. The buffers cost one more
    copy of those weights in memory (:meth:`unfuse` frees it) and follow ``.to()`` / ``.half()``
    (elementwise casts, so they stay equal to the cast parameters).

    Fusing is for inference with frozen weights; the snapshot is kept honest this way:

    - :meth:`fuse` refuses a module in training mode (``ConfigError``), and ``train()`` unfuses;
    - a forward that autograd records (grad enabled and a fused weight requiring grad) unfuses
      and runs the layers, so gradients always reach the parameters;
    - ``load_state_dict`` unfuses (the parameters are about to change);
    - an eager forward compares the parameters' version counters and addresses with those at the
      snapshot and re-copies them in place when they moved (an optimizer step or ``copy_`` under
      ``no_grad`` while fused); :meth:`fuse` does the same, and also notices a replaced
      ``Parameter``. Inside ``torch.compile`` and CUDA-graph replay there is no such check (no
      host work in the step): :class:`~qkvlab.models.decoding.StaticDecoder` fuses when it is
      built, so change weights before building a decoder, or build a new one after. Writes
      through ``.data`` bump no version counter and are not seen: call :meth:`fuse` after them.

    On a CPU the fused product gave bit-identical results to the separate ones in our checks (each
    output column is the same dot product); a GPU library may pick another kernel for the wider
    matrix, so there results agree to rounding.
    """

    def _init_fusion(self) -> None:
        self.register_buffer("_fused_weight", None, persistent=False)
        self.register_buffer("_fused_bias", None, persistent=False)
        self._fused_sizes: tuple[int, ...] | None = None
        self._fused_watch: list[tuple[torch.Tensor, int, int | None]] = []
        self._fused_members: list[torch.Tensor] = []

    def _fusion_linears(self) -> list[nn.Linear]:
        """The layers one product replaces, in output order (each subclass names its own)."""
        raise NotImplementedError

    @property
    def fused(self) -> bool:
        """Whether the forward runs the layers as one matrix product."""
        return self._fused_weight is not None

    def _members(self) -> list[torch.Tensor]:
        out = []
        for lin in self._fusion_linears():
            out.append(lin.weight)
            if lin.bias is not None:
                out.append(lin.bias)
        return out

    @staticmethod
    def _stamp(t: torch.Tensor) -> tuple[torch.Tensor, int, int | None]:
        # Inference tensors (made under torch.inference_mode) keep no version counter.
        return t, t.data_ptr(), None if t.is_inference() else t._version

    def _moved(self) -> bool:
        """A parameter changed since the snapshot (version counter or storage moved)."""
        return any(t.data_ptr() != ptr or (ver is not None and t._version != ver) for t, ptr, ver in self._fused_watch)

    @property
    def fusion_stale(self) -> bool:
        """Fused, but the parameters changed (or were replaced) since the snapshot."""
        if self._fused_weight is None:
            return False
        members = self._members()
        same = len(members) == len(self._fused_members) and all(
            a is b for a, b in zip(members, self._fused_members, strict=False)
        )
        return not same or self._moved()

    def fuse(self) -> bool:
        """Concatenate the layers into one matrix product (or refresh a stale snapshot).

        Returns True if the forward now runs one product; False where there is nothing to
        fuse (fewer than two layers) or the layers differ in dtype, device or having a bias.
        Raises :class:`ConfigError` in training mode (call ``eval()`` first).
        """
        if self.training:
            raise ConfigError(
                f"{type(self).__name__}.fuse() is for inference and this module is in training mode; call "
                "model.eval() first (train() undoes the fusion)."
            )
        if self._fused_weight is not None and not self.fusion_stale:
            return True
        return self._snapshot()

    @torch.no_grad()
    def _snapshot(self) -> bool:
        """Copy the layers' weights into the fused buffers: in place where the shapes allow it (a
        recorded CUDA graph keeps reading the same memory), else into new ones."""
        linears = self._fusion_linears()
        if len(linears) < 2:
            self.unfuse()
            return False
        ws = [lin.weight for lin in linears]
        bs = [lin.bias for lin in linears]
        has_bias = bs[0] is not None
        if any((b is not None) != has_bias for b in bs) or len({(w.dtype, w.device) for w in ws}) != 1:
            self.unfuse()
            return False
        w = torch.cat([t.detach() for t in ws])
        b = torch.cat([t.detach() for t in bs]) if has_bias else None
        old_w, old_b = self._fused_weight, self._fused_bias
        in_place = (
            old_w is not None
            and (old_w.shape, old_w.dtype, old_w.device) == (w.shape, w.dtype, w.device)
            and (old_b is None) == (b is None)
        )
        if in_place:
            old_w.copy_(w)
            if b is not None:
                old_b.copy_(b)
        else:
            self._fused_weight, self._fused_bias = w, b
            _EPOCH[0] += 1
        self._fused_sizes = tuple(t.shape[0] for t in ws)
        self._fused_members = self._members()
        self._fused_watch = [self._stamp(t) for t in self._fused_members]
        return True

    def unfuse(self) -> None:
        """Drop the fused buffers; the forward runs the layers one by one again."""
        if self._fused_weight is not None:
            _EPOCH[0] += 1
        self._fused_weight = self._fused_bias = None
        self._fused_sizes = None
        self._fused_watch, self._fused_members = [], []

    def _fused_outputs(self, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, ...] | None:
        """The layers' outputs from one product of ``norm(x)`` (views of it), or None when not fused."""
        product = self._fused_product(x, norm)
        return None if product is None else product.split(self._fused_sizes, dim=-1)

    def _fused_product(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor | None:
        """The one product of ``norm(x)`` with the fused matrix (the layers' outputs side by side), or None."""
        if self._fused_weight is None:
            return None
        if not torch.compiler.is_compiling():
            if torch.is_grad_enabled() and any(t.requires_grad for t in self._fused_members):
                self.unfuse()  # autograd records this forward: the parameters must be used
                return None
            if self._moved() and not self._snapshot():
                return None
        return linear(x, self._fused_weight, self._fused_bias, norm=norm)

    # ------------------------------------------------------------- training / loading unfuse
    def train(self, mode: bool = True):
        if mode:
            self.unfuse()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self.unfuse()
        return super()._load_from_state_dict(*args, **kwargs)


def check_fuse(fuse: bool | str, model: nn.Module) -> bool:
    """Check a ``fuse=`` argument (True, False or ``"auto"``: only in eval mode) against
    ``model``; returns whether to fuse it."""
    if fuse not in (True, False, "auto"):
        raise ConfigError(f"fuse must be True, False or 'auto', got {fuse!r}.")
    if fuse is True and model.training:
        raise ConfigError(
            "fuse=True fuses the projections for inference, but the model is in training mode; call "
            "model.eval() first, or pass fuse='auto' (fuse only in eval mode) or False."
        )
    return fuse is True or (fuse == "auto" and not model.training)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every :class:`FusedLinears` module of ``model`` for inference (refreshing stale ones).

    Each attention layer's projection groups become one matrix product, and the SwiGLU MLP's
    gate and up projections another. Returns how many modules run fused. Raises
    :class:`ConfigError` if ``model`` is in training mode. The state dict is unchanged; undo with
    :func:`unfuse_projections` or ``model.train()``.
    """
    if model.training:
        raise ConfigError(
            "Fusing projections is for inference and the model is in training mode; call model.eval() first."
        )
    return sum(1 for m in model.modules() if isinstance(m, FusedLinears) and m.fuse())


def unfuse_projections(model: nn.Module) -> None:
    """Undo :func:`fuse_projections` (frees the fused copies of the weights)."""
    for m in model.modules():
        if isinstance(m, FusedLinears):
            m.unfuse()


class ProjectionStrategy(FusedLinears, nn.Module):
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

    :meth:`fuse` (inference only, see :class:`FusedLinears`) runs all groups as one matrix
    product; the roles are then views of its output (strided along the width), shared roles
    still one tensor object. A single group is one product already and is left as it is.
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
        self._init_fusion()

    def _fusion_linears(self) -> list[nn.Linear]:
        return list(self.proj.values())

    def forward(
        self, x: torch.Tensor, norm: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v sources of ``norm(x)`` (``norm``, where given, is the block's input norm: a
        one-row step may compute it inside the fused product, see :mod:`qkvlab.attention.matvec`)."""
        if norm is not None and "x" in self._source.values():
            x, norm = norm(x), None  # a role that is the (normalised) input itself needs it as a tensor
        fused = self._fused_outputs(x, norm)
        if fused is not None:
            out = dict(zip(self.proj.keys(), fused, strict=True))  # one product, split per group
        else:
            x = norm(x) if norm is not None else x
            out = {g: apply_linear(layer, x) for g, layer in self.proj.items()}  # each group computed once
        out["x"] = x
        return out[self._source["q"]], out[self._source["k"]], out[self._source["v"]]
