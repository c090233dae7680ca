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

Anything that needs gradients keeps ``F.linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from qkvlab.errors import ConfigError

#: What ``use_gemv`` / ``StaticDecoder(gemv=...)`` accept (True is "kernel").
GEMV_MODES = (False, True, "kernel", "inductor")

_ENABLED: bool | str = False  # False, "kernel" or "inductor"


def gemv_mode(mode: object) -> bool | str:
    """``mode`` as False, ``"kernel"`` or ``"inductor"``; anything else is a :class:`ConfigError`."""
    if mode is True:
        return "kernel"
    if mode is False or mode in ("kernel", "inductor"):
        return mode
    raise ConfigError(f"gemv must be one of {GEMV_MODES}, got {mode!r}.")


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


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or a one-row route inside :func:`use_gemv` where it applies."""
    if _ENABLED and x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        if _ENABLED == "kernel" and _kernel_takes(x, w, bias):
            return torch.ops.qkvlab.gemv(x, w, bias)
        if _ENABLED == "inductor" and torch.compiler.is_compiling() and w.dim() == 2:
            return reduction_linear(x, w, bias)
    return F.linear(x, w, bias)


def reduction_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of a one-row ``x`` as a float32 multiply and sum, rounded to ``w``'s dtype."""
    y = (x.reshape(1, w.shape[1]).float() * w.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(w.dtype).reshape(*x.shape[:-1], w.shape[0])


def apply_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` goes through :func:`linear` inside :func:`use_gemv`.

    Only an exact ``nn.Linear``: a subclass or a wrapper (an adapter, a quantised layer) has its
    own forward, which is called as it is.
    """
    if _ENABLED and type(module) is torch.nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)


def _kernel_takes(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    from qkvlab.kernels.gemv import gemv_unsupported_reason

    return gemv_unsupported_reason(x, w, bias) is None


__all__ = ["GEMV_MODES", "apply_linear", "gemv_enabled", "gemv_mode", "linear", "reduction_linear", "use_gemv"]
