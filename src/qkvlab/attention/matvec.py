"""The switch between ``F.linear`` and one-row products for a batch-1 decode step.

The model's call sites for projections, the MLP and the head go through :func:`linear` /
:func:`apply_linear`. Outside :func:`use_gemv` they are ``F.linear`` / ``module(x)``. Inside it
(a decode step, e.g. ``StaticDecoder(gemv=...)``), a one-row product takes one of two routes:

- ``"kernel"`` (or True): qkvlab's Triton kernel (:mod:`qkvlab.kernels.gemv`), on CUDA (or under
  the Triton interpreter), as the opaque operator ``torch.ops.qkvlab.gemv``. Its module (and
  Triton) is imported only when this route is first turned on.
- ``"inductor"``: while ``torch.compile`` traces, the product is written as a multiply and a sum
  in float32, which Inductor generates as a reduction kernel of its own and can fuse with the
  elementwise code around it (SwiGLU before the down projection, a residual add after).
  Outside a trace it is ``F.linear`` (eagerly, the multiply would materialise the whole matrix).

Anything that needs gradients keeps ``F.linear``, and so does a product under autocast: autocast
casts ``F.linear``'s inputs to its dtype, which neither route would do, so the result's dtype (and
the KV cache's) would differ from the model's outside the step.

The call sites may also pass the norm before a product and the residual added after it
(``linear(x, w, norm=..., residual=...)``): in the static one-token step a block hands its
RMSNorm to its fused projections and gate+up and its residual stream to its output and down
projections, and the kernel route computes both inside the product's kernel (the others compute
them as separate operations, the same result). Likewise SwiGLU's ``silu(gate) * up`` is made by
the down projection's kernel as it reads the fused gate and up products (:func:`swiglu_linear`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from qkvlab.attention.positional import RMSNorm
from qkvlab.errors import ConfigError

#: What ``StaticDecoder(gemv=...)`` accepts (True is "kernel"; ``use_gemv`` takes all but "auto").
GEMV_MODES = ("auto", False, True, "kernel", "inductor")

_ENABLED: bool | str = False  # False, "kernel" or "inductor"


def gemv_mode(mode: object, *, allow_auto: bool = False) -> bool | str:
    """``mode`` as False, ``"kernel"`` or ``"inductor"`` (or ``"auto"`` where allowed); anything
    else is a :class:`ConfigError`."""
    if mode is True:
        return "kernel"
    if mode is False or mode in ("kernel", "inductor") or (allow_auto and mode == "auto"):
        return mode
    raise ConfigError(f"gemv must be one of {GEMV_MODES}, got {mode!r}.")


def check_gemv(mode: object, compile: bool | str) -> bool | str:
    """:func:`gemv_mode` of ``mode`` (``"auto"`` allowed), refusing the Inductor route without ``compile``."""
    mode = gemv_mode(mode, allow_auto=True)
    if mode == "inductor" and not compile:
        raise ConfigError(
            "gemv='inductor' has Inductor generate the matrix-vector products, so it needs compile=True "
            "(or a compile mode); without compiling use gemv=True (qkvlab's kernel)."
        )
    return mode


def resolve_gemv(mode: bool | str, device: torch.device) -> bool | str:
    """A checked ``mode`` with ``"auto"`` decided for ``device``: the kernel on CUDA where Triton
    is installed (it reads the weights closer to the copy rate than cuBLAS's one-row products,
    measured in docs/benchmarks.md), else False."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return False
    from qkvlab.kernels.gemv import HAS_TRITON

    return "kernel" if HAS_TRITON else False


@contextlib.contextmanager
def use_gemv(mode: bool | str = True) -> Iterator[None]:
    """Route one-row :func:`linear` calls inside the block (a decode step); see the module doc."""
    global _ENABLED
    mode = gemv_mode(mode)
    if mode == "kernel":
        from qkvlab.kernels import gemv as _registers_the_op  # noqa: F401  (torch.ops.qkvlab.gemv)
    old, _ENABLED = _ENABLED, mode
    try:
        yield
    finally:
        _ENABLED = old


def gemv_enabled() -> bool | str:
    """The route in force: False, ``"kernel"`` or ``"inductor"``."""
    return _ENABLED


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: torch.nn.Module | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + F.linear(norm(x), w, bias)`` (each part where given), or a one-row route inside
    :func:`use_gemv` where it applies. The kernel route computes an :class:`RMSNorm` ``norm`` and
    the residual add in the product's own kernel; any other norm module runs as it is."""
    if _ENABLED and x.numel() == x.shape[-1] and _routable(x, w):
        if _ENABLED == "kernel":
            norm_weight = _kernel_norm(norm, x)
            if norm is not None and norm_weight is None:  # a norm the kernel does not compute: first
                x, norm = norm(x), None
            if _kernel_takes(x, w, bias, norm_weight, residual):
                eps = norm.eps if norm is not None else 1e-6
                return torch.ops.qkvlab.gemv(x, w, bias, norm_weight, eps, residual)
        if _ENABLED == "inductor" and torch.compiler.is_compiling() and w.dim() == 2:
            y = reduction_linear(norm(x) if norm is not None else x, w, bias)
            return y if residual is None else y + residual
    y = F.linear(norm(x) if norm is not None else x, w, bias)
    return y if residual is None else y + residual


def swiglu_linear(
    gate_up: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``residual + F.linear(silu(gate) * up, w, bias)`` for ``gate_up = [gate | up]`` (SwiGLU's
    fused gate and up products side by side): the kernel route makes the input as it reads it."""
    if (
        _ENABLED == "kernel"
        and gate_up.numel() == gate_up.shape[-1]
        and _routable(gate_up, w)
        and _kernel_takes(gate_up, w, bias, None, residual, glu=True)
    ):
        return torch.ops.qkvlab.gemv(gate_up, w, bias, None, 1e-6, residual, True)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w, bias, residual=residual)


def _routable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a one-row route may compute ``F.linear(x, w)``: not when it must record gradients,
    nor under autocast for ``x``'s device (autocast would cast ``F.linear``'s inputs; see the module doc)."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _kernel_norm(norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor | None:
    """The weight of a norm the kernel computes itself (qkvlab's RMSNorm in ``x``'s dtype), or None."""
    if norm is not None and type(norm) is RMSNorm and norm.weight.dtype == x.dtype:
        return norm.weight
    return None


def reduction_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of a one-row ``x`` as a float32 multiply and sum, rounded to ``w``'s dtype."""
    y = (x.reshape(1, w.shape[1]).float() * w.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(w.dtype).reshape(*x.shape[:-1], w.shape[0])


def apply_linear(
    module: torch.nn.Module,
    x: torch.Tensor,
    *,
    norm: torch.nn.Module | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + module(norm(x))`` (each part where given); a plain ``nn.Linear`` goes through
    :func:`linear` inside :func:`use_gemv`.

    Only an exact ``nn.Linear``: a subclass or a wrapper (an adapter, a quantised layer) has its
    own forward, which is called as it is.
    """
    if _ENABLED and type(module) is torch.nn.Linear:
        return linear(x, module.weight, module.bias, norm=norm, residual=residual)
    y = module(norm(x) if norm is not None else x)
    return y if residual is None else y + residual


def _kernel_takes(x, w, bias, norm_weight=None, residual=None, glu=False) -> bool:
    from qkvlab.kernels.gemv import gemv_unsupported_reason

    return gemv_unsupported_reason(x, w, bias, norm_weight, residual, glu) is None


__all__ = [
    "GEMV_MODES",
    "apply_linear",
    "check_gemv",
    "gemv_enabled",
    "gemv_mode",
    "linear",
    "reduction_linear",
    "resolve_gemv",
    "swiglu_linear",
    "use_gemv",
]
