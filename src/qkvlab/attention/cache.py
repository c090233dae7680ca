"""A static, pre-allocated KV cache that stores a shared key/value tensor once.

Layout per layer: ``(B, n_kv_heads, max_len, head_dim)``. For a variant whose key and
value come from one projection (``q_kv``, ``qkv``, ...) the layer holds **one** tensor,
the raw shared projection ``s`` *before* RoPE and QK-norm; the key role is derived from
it on read (``rope(norm(s))``) and the value is ``s`` itself. Otherwise it holds a key
tensor (already rotated and normalised) and a value tensor.

Example::

    cache = KVCache.for_model(model, batch_size=1, max_len=256)
    logits = model(prompt, cache=cache)         # prefill, writes positions 0..T-1
    logits = model(next_token, cache=cache)     # decode one token at position T
    cache.bytes_per_token, cache.nbytes         # analytic vs real allocation
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvlab.errors import ConfigError


@dataclass(frozen=True)
class CacheLayout:
    """What one model needs cached: the same for every layer."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    kv_shared: bool

    @property
    def tensors_per_layer(self) -> int:
        return 1 if self.kv_shared else 2

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """``(1 if K=V else 2) * n_kv_heads * head_dim * dtype bytes * n_layers``."""
        elem = torch.empty((), dtype=dtype).element_size()
        return self.n_layers * self.tensors_per_layer * self.n_kv_heads * self.head_dim * elem


class LayerKVCache:
    """One layer's cache. ``k`` and ``v`` are the same tensor object when K=V is shared."""

    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.owner = owner
        self.k = k
        self.v = v

    @property
    def kv_shared(self) -> bool:
        return self.k is self.v

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Write ``(B, Hkv, T, D)`` entries at positions ``pos .. pos+T-1`` in place.

        For a shared layer pass the shared tensor as ``k`` and leave ``v`` as None.
        """
        T = k.shape[2]
        self.owner._check(k, pos + T)
        self.k[:, :, pos : pos + T].copy_(k)
        if not self.kv_shared:
            if v is None:
                raise ValueError("a K/V layer cache needs a value tensor")
            self.v[:, :, pos : pos + T].copy_(v)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first ``length`` positions: ``(k, v)``, the same view twice if shared."""
        k = self.k[:, :, :length]
        return (k, k) if self.kv_shared else (k, self.v[:, :, :length])


class KVCache:
    """Static cache for all layers of one model; see the module docstring.

    Args:
        layout: per-layer layout (from :meth:`for_model` usually).
        batch_size: rows decoded together.
        max_len: positions allocated; writing past it raises :class:`ConfigError`.
        dtype, device: of the stored tensors; they must match the model's activations.
    """

    def __init__(
        self,
        layout: CacheLayout,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1 or max_len < 1:
            raise ConfigError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}.")
        self.layout = layout
        self.batch_size = batch_size
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        shape = (batch_size, layout.n_kv_heads, max_len, layout.head_dim)
        self.layers: list[LayerKVCache] = []
        for _ in range(layout.n_layers):
            k = torch.zeros(shape, dtype=dtype, device=self.device)
            v = k if layout.kv_shared else torch.zeros(shape, dtype=dtype, device=self.device)
            self.layers.append(LayerKVCache(self, k, v))

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Allocate a cache matching ``model.cache_layout()``.

        dtype and device default to the model's; inside ``torch.autocast`` the dtype defaults
        to the autocast dtype, which is what the projections then produce.
        """
        param = next(model.parameters())
        kind = param.device.type
        if dtype is None and kind in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        max_len = max_len if max_len is not None else model.config.max_seq_len
        if max_len > model.config.max_seq_len:
            raise ConfigError(
                f"Cache max_len={max_len} exceeds the model's max_seq_len={model.config.max_seq_len}; "
                "positions past it have no embedding. Use max_len <= max_seq_len."
            )
        return cls(
            model.cache_layout(),
            batch_size,
            max_len,
            dtype=dtype or param.dtype,
            device=device or param.device,
        )

    # ------------------------------------------------------------------ bytes
    @property
    def bytes_per_token(self) -> int:
        """Analytic bytes per cached token (all layers), from the layout and dtype."""
        return self.layout.bytes_per_token(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes really allocated: the sum over distinct storages."""
        return sum(st.nbytes() for st in self._storages().values())

    def _storages(self) -> dict[int, torch.UntypedStorage]:
        # Meta tensors all report data_ptr 0, so tell them apart by identity there.
        meta = self.device.type == "meta"
        out: dict[int, torch.UntypedStorage] = {}
        for layer in self.layers:
            for t in (layer.k, layer.v):
                st = t.untyped_storage()
                out[id(t) if meta else st.data_ptr()] = st
        return out

    @property
    def measured_bytes_per_token(self) -> float:
        return self.nbytes / (self.batch_size * self.max_len)

    @property
    def n_tensors(self) -> int:
        """Distinct tensors allocated (one per layer when K=V is shared)."""
        return len(self._storages())

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.length = 0

    def advance(self, n: int) -> None:
        self.length += n

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ConfigError(
                f"KV cache full: {self.length} positions used + {T} new > max_len={self.max_len}. "
                "Allocate a longer cache (KVCache.for_model(model, batch_size, max_len=...)) or "
                "generate fewer tokens."
            )

    def check_compatible(self, layout: CacheLayout, batch_size: int, device: torch.device) -> None:
        """Raise a clear error if this cache was built for another model, batch or device."""
        if layout != self.layout:
            raise ConfigError(
                f"This KV cache was allocated for {self.layout} but the model needs {layout}; "
                "allocate it with KVCache.for_model(model, ...)."
            )
        if batch_size != self.batch_size:
            raise ConfigError(f"Batch of {batch_size} rows given to a KV cache allocated for {self.batch_size}.")
        if device.type != self.device.type or (device.index or 0) != (self.device.index or 0):
            raise ConfigError(
                f"KV cache is on {self.device} but the model runs on {device}; allocate the cache on "
                "the model's device (KVCache.for_model(model, ...) does this) or move the model."
            )

    def _check(self, t: torch.Tensor, end: int) -> None:
        if t.dtype != self.dtype:
            raise ConfigError(
                f"KV cache dtype is {self.dtype} but the model produced {t.dtype} keys/values; "
                f"allocate the cache with dtype={t.dtype} (KVCache.for_model(model, dtype=...))."
            )
        if end > self.max_len:
            raise ConfigError(f"KV cache write up to position {end} exceeds max_len={self.max_len}.")

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.layout.n_layers}, tensors/layer={self.layout.tensors_per_layer}, "
            f"B={self.batch_size}, Hkv={self.layout.n_kv_heads}, max_len={self.max_len}, D={self.layout.head_dim}, "
            f"dtype={self.dtype}, length={self.length}, bytes/token={self.bytes_per_token})"
        )
