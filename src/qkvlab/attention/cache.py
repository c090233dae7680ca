"""Decode state: a static KV cache that stores a shared key/value tensor once, and the
fixed-size state of linear attention.

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

A linear-attention model (variant ``+linear``) keeps no per-token cache: its layers carry a
:class:`LinearState` (per KV head a matrix ``S`` of ``head_dim x head_dim`` and a vector
``n``) whose size does not depend on the sequence length. :func:`new_decode_state` (what
``GPT.new_cache`` calls) builds whichever of the two the model needs.
"""

from __future__ import annotations

import weakref
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
    linear: bool = False

    @property
    def tensors_per_layer(self) -> int:
        """Per layer: 1 or 2 cached tensors (K=V shared or not); linear attention holds S and n."""
        if self.linear:
            return 2
        return 1 if self.kv_shared else 2

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """``(1 if K=V else 2) * n_kv_heads * head_dim * dtype bytes * n_layers``; 0 for linear attention."""
        if self.linear:
            return 0
        elem = torch.empty((), dtype=dtype).element_size()
        return self.n_layers * self.tensors_per_layer * self.n_kv_heads * self.head_dim * elem

    def state_bytes(self, dtype: torch.dtype) -> int:
        """Fixed bytes per sequence: ``n_layers * n_kv_heads * (D*D + D) * dtype bytes`` for linear
        attention (the state ``S`` and normaliser ``n``), 0 for a KV cache."""
        if not self.linear:
            return 0
        elem = torch.empty((), dtype=dtype).element_size()
        return self.n_layers * self.n_kv_heads * (self.head_dim * self.head_dim + self.head_dim) * elem


class _OwnedLayer:
    """A layer of a whole-model decode state, which holds its layers: the layer refers back to it
    weakly, so that the state is freed (its GPU memory with it) as soon as its last user drops
    it, not at a later garbage collection."""

    def __init__(self, owner: _DecodeState):
        self._owner = weakref.ref(owner)

    @property
    def owner(self) -> _DecodeState:
        owner = self._owner()
        if owner is None:
            raise ConfigError(
                "This layer's cache or state was freed: keep the whole cache (model.new_cache(...)) while using "
                "its layers."
            )
        return owner


class LayerKVCache(_OwnedLayer):
    """One layer's cache. ``k`` and ``v`` are the same tensor object when K=V is shared."""

    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor):
        super().__init__(owner)
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

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Write one position given as a device tensor (no host sync: graph-safe).

        ``pos`` is 0-d (the same position in every row) or ``(B,)`` (one per row: a ragged
        batch). ``k`` (and ``v``) are ``(B, Hkv, 1, D)``; for a shared layer leave ``v`` as None.
        """
        self.owner._check(k, 1)
        if not self.kv_shared and v is None:
            raise ValueError("a K/V layer cache needs a value tensor")
        if pos.dim() == 1:
            idx = pos.view(-1, 1, 1, 1).expand(k.shape)
            self.k.scatter_(2, idx, k)
            if not self.kv_shared:
                self.v.scatter_(2, idx, v)
            return
        idx = pos.reshape(1)
        self.k.index_copy_(2, idx, k)
        if not self.kv_shared:
            self.v.index_copy_(2, idx, v)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first ``length`` positions: ``(k, v)``, the same view twice if shared."""
        k = self.k[:, :, :length]
        return (k, k) if self.kv_shared else (k, self.v[:, :, :length])


class _DecodeState:
    """What a KV cache and a linear-attention state share: sizes, position, storages, checks.

    Subclasses set ``noun`` and ``alloc_hint`` (for error messages), fill ``layers`` and say
    which tensors a layer holds in :meth:`_layer_tensors`.
    """

    noun = "decode state"
    alloc_hint = "model.new_cache(batch_size)"

    def __init__(self, layout: CacheLayout, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        if batch_size < 1 or max_len < 1:
            raise ConfigError(
                f"{type(self).__name__} needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}."
            )
        self.layout = layout
        self.batch_size = batch_size
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        # A ragged batch (prompts of different lengths) keeps each row's own length here, a
        # (B,) integer tensor on the device; ``length`` is then the longest row's. None: every
        # row is ``length`` long.
        self.row_lengths: torch.Tensor | None = None
        self.layers: list = []

    @staticmethod
    def _layer_tensors(layer) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes really allocated: the sum over distinct storages."""
        return sum(st.nbytes() for st in self._storages().values())

    def _storages(self) -> dict[int, torch.UntypedStorage]:
        # Meta tensors all report data_ptr 0, so tell them apart by identity there.
        meta = self.device.type == "meta"
        out: dict[int, torch.UntypedStorage] = {}
        for layer in self.layers:
            for t in self._layer_tensors(layer):
                st = t.untyped_storage()
                out[id(t) if meta else st.data_ptr()] = st
        return out

    @property
    def n_tensors(self) -> int:
        """Distinct tensors allocated."""
        return len(self._storages())

    def advance(self, n: int) -> None:
        self.length += n
        if self.row_lengths is not None:
            self.row_lengths += n  # in place: a captured decode step reads this tensor

    def set_row_lengths(self, lengths: torch.Tensor) -> None:
        """Mark the state as ragged after a prefill: row ``b`` holds ``lengths[b]`` tokens.

        Each row's tokens sit at positions ``0 .. lengths[b] - 1`` (its own positions), and
        ``length`` becomes the longest row's; later one-token steps write row ``b`` at
        ``lengths[b]`` and advance every row by one.
        """
        if lengths.shape != (self.batch_size,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ConfigError(
                f"row lengths must be an integer tensor of shape ({self.batch_size},), got {lengths.dtype} "
                f"{tuple(lengths.shape)}."
            )
        longest = int(lengths.max())
        if int(lengths.min()) < 1 or longest > self.max_len:
            raise ConfigError(f"row lengths must lie in [1, max_len={self.max_len}], got {lengths.tolist()}.")
        self.row_lengths = lengths.to(device=self.device, dtype=torch.long).clone()
        self.length = longest

    def check_compatible(self, layout: CacheLayout, batch_size: int, device: torch.device) -> None:
        """Raise a clear error if this state was built for another model, batch or device."""
        if layout != self.layout:
            raise ConfigError(
                f"This {self.noun} was allocated for {self.layout} but the model needs {layout}; "
                f"allocate it with {self.alloc_hint}."
            )
        if batch_size != self.batch_size:
            raise ConfigError(f"Batch of {batch_size} rows given to a {self.noun} allocated for {self.batch_size}.")
        if device.type != self.device.type or (device.index or 0) != (self.device.index or 0):
            raise ConfigError(
                f"The {self.noun} is on {self.device} but the model runs on {device}; allocate it on the "
                f"model's device ({self.alloc_hint} does this) or move the model."
            )


class KVCache(_DecodeState):
    """Static cache for all layers of one model; see the module docstring.

    Args:
        layout: per-layer layout (from :meth:`for_model` usually).
        batch_size: rows decoded together.
        max_len: positions allocated; writing past it raises :class:`ConfigError`.
        dtype, device: of the stored tensors; they must match the model's activations.
    """

    noun = "KV cache"
    alloc_hint = "KVCache.for_model(model, ...)"

    def __init__(
        self,
        layout: CacheLayout,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(layout, batch_size, max_len, dtype, device)
        if layout.linear:
            raise ConfigError(
                "A linear-attention model keeps a fixed-size state, not a KV cache; build it with "
                "model.new_cache(batch_size) or LinearState.for_model(model, batch_size)."
            )
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
        max_len, dtype, device = _resolve_for_model(model, max_len, dtype, device)
        return cls(model.cache_layout(), batch_size, max_len, dtype=dtype, device=device)

    # ------------------------------------------------------------------ bytes
    @property
    def bytes_per_token(self) -> int:
        """Analytic bytes per cached token (all layers), from the layout and dtype."""
        return self.layout.bytes_per_token(self.dtype)

    @staticmethod
    def _layer_tensors(layer: LayerKVCache) -> tuple[torch.Tensor, ...]:
        return (layer.k, layer.v)  # the same tensor twice when K=V is shared: one storage

    @property
    def measured_bytes_per_token(self) -> float:
        return self.nbytes / (self.batch_size * self.max_len)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.length = 0
        self.row_lengths = None

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ConfigError(
                f"KV cache full: {self.length} positions used + {T} new > max_len={self.max_len}. "
                "Allocate a longer cache (KVCache.for_model(model, batch_size, max_len=...)) or "
                "generate fewer tokens."
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


def _resolve_for_model(
    model: torch.nn.Module,
    max_len: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> tuple[int, torch.dtype, torch.device | str]:
    """``max_len`` (default and bound: ``max_seq_len``), the activation dtype and the model's device."""
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
    return max_len, dtype or param.dtype, device or param.device


class LayerLinearState(_OwnedLayer):
    """One layer's linear-attention state: ``S`` ``(B, Hkv, D, D)`` and ``n`` ``(B, Hkv, D)``.

    :func:`qkvlab.attention.linear.recurrent` updates both in place.
    """

    def __init__(self, owner: LinearState, S: torch.Tensor, n: torch.Tensor):
        super().__init__(owner)
        self.S = S
        self.n = n


class LinearState(_DecodeState):
    """Fixed-size decode state of a linear-attention model (all layers); replaces the KV cache.

    Per layer and KV head it holds ``S = sum_s lam^(t-s) phi(k_s) v_s^T`` (``head_dim x head_dim``)
    and ``n = sum_s phi(k_s)`` (``head_dim``), see :mod:`qkvlab.attention.linear`. Its size does
    not depend on how many tokens it has seen: ``bytes_per_token == 0`` and ``nbytes`` (measured
    from the storages) equals ``layout.state_bytes(dtype) * batch_size``. It has the interface the
    GPT uses for a :class:`KVCache` (``length``, ``layers``, ``reset``, ``advance``, ...).

    Args:
        layout: the model's layout (``layout.linear`` must be True).
        batch_size: rows decoded together.
        max_len: positions the state may advance to (learned position embeddings end at the
            model's ``max_seq_len``); it allocates nothing per position.
        dtype: of the state; :meth:`for_model` uses float32 for half-precision models, since
            the state is a running sum over every token seen.

    Example::

        state = model.new_cache(batch_size=1)       # a LinearState for a '+linear' variant
        logits = model.prefill(prompt, state)
        logits = model.decode_one(logits.argmax(-1), state)
        state.nbytes                                # the same after 10 or 10,000 tokens
    """

    noun = "linear-attention state"
    alloc_hint = "model.new_cache(batch_size)"

    def __init__(
        self,
        layout: CacheLayout,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if not layout.linear:
            raise ConfigError(
                "LinearState is the decode state of linear attention (variants with '+linear'); this "
                "model uses softmax attention: build a KV cache with model.new_cache(batch_size)."
            )
        super().__init__(layout, batch_size, max_len, dtype, device)
        B, H, D = batch_size, layout.n_kv_heads, layout.head_dim
        self.layers = [
            LayerLinearState(
                self,
                torch.zeros((B, H, D, D), dtype=dtype, device=self.device),
                torch.zeros((B, H, D), dtype=dtype, device=self.device),
            )
            for _ in range(layout.n_layers)
        ]

    @staticmethod
    def state_dtype(activation_dtype: torch.dtype) -> torch.dtype:
        """float32 for half-precision activations (a long running sum), else the activation dtype."""
        return torch.float32 if activation_dtype in (torch.float16, torch.bfloat16) else activation_dtype

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LinearState:
        """A zero state matching ``model.cache_layout()``; dtype as :meth:`state_dtype` unless given."""
        explicit = dtype
        max_len, act_dtype, device = _resolve_for_model(model, max_len, dtype, device)
        dtype = explicit if explicit is not None else cls.state_dtype(act_dtype)
        return cls(model.cache_layout(), batch_size, max_len, dtype=dtype, device=device)

    # ------------------------------------------------------------------ bytes
    @property
    def bytes_per_token(self) -> int:
        """0: the state does not grow with the sequence."""
        return 0

    @property
    def measured_bytes_per_token(self) -> float:
        """0.0: the allocation does not depend on the length (``nbytes`` is fixed at construction)."""
        return 0.0

    @property
    def state_bytes(self) -> int:
        """Analytic bytes of the whole state (all layers, all rows)."""
        return self.layout.state_bytes(self.dtype) * self.batch_size

    @staticmethod
    def _layer_tensors(layer: LayerLinearState) -> tuple[torch.Tensor, ...]:
        return (layer.S, layer.n)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything seen: zero S and n in place, length 0."""
        for layer in self.layers:
            layer.S.zero_()
            layer.n.zero_()
        self.length = 0
        self.row_lengths = None

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ConfigError(
                f"Linear-attention state at position {self.length} + {T} new > max_len={self.max_len} "
                "(positions past it have no embedding). Create it with a larger max_len "
                "(model.new_cache(batch_size, max_len=...)) or generate fewer tokens."
            )

    def __repr__(self) -> str:
        return (
            f"LinearState(layers={self.layout.n_layers}, B={self.batch_size}, Hkv={self.layout.n_kv_heads}, "
            f"D={self.layout.head_dim}, dtype={self.dtype}, length={self.length}, nbytes={self.nbytes})"
        )


def new_decode_state(
    model: torch.nn.Module,
    batch_size: int,
    max_len: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache | LinearState:
    """The decode state ``model`` needs: a :class:`LinearState` for linear attention, else a :class:`KVCache`."""
    cls = LinearState if model.cache_layout().linear else KVCache
    return cls.for_model(model, batch_size, max_len, dtype=dtype, device=device)
