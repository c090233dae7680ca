"""The switch between ``F.linear`` and the one-row kernel (:mod:`qkvlab.kernels.gemv`).

The model's call sites for projections, the MLP and the head go through :func:`linear` /
:func:`apply_linear`. Outside :func:`use_gemv` they are ``F.linear`` / ``module(x)``; inside it
(a decode step, e.g. ``StaticDecoder(gemv=True)``) a one-row product on CUDA runs the kernel.
The kernel module (and Triton) is imported only when the switch is first turned on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_ENABLED = False


@contextlib.contextmanager
def use_gemv(enabled: bool = True) -> Iterator[None]:
    """Route one-row :func:`linear` calls to the kernel inside the block (a decode step)."""
    global _ENABLED
    if enabled:
        from qkvlab.kernels import gemv as _registers_the_op  # noqa: F401  (torch.ops.qkvlab.gemv)
    old, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = old


def gemv_enabled() -> bool:
    return _ENABLED


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the one-row kernel inside :func:`use_gemv` where it applies.

    The kernel has no backward, so anything that needs gradients keeps ``F.linear``.
    """
    if (
        _ENABLED
        and x.numel() == x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and _kernel_takes(x, w, bias)
    ):
        return torch.ops.qkvlab.gemv(x, w, bias)
    return F.linear(x, w, bias)


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


__all__ = ["apply_linear", "gemv_enabled", "linear", "use_gemv"]
