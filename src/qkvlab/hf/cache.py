"""Cache layers that let transformers' ``generate`` drive qkvlab's own attention.

A transformers ``Cache`` is a list of layer objects. The two classes here are such layers,
and they also speak the interface of :class:`qkvlab.attention.cache.LayerKVCache`
(``write`` / ``read`` / ``k`` / ``v`` / ``kv_shared``), so qkvlab's
:class:`~qkvlab.attention.module.Attention` writes into them exactly as into its own
static cache:

- :class:`SharedKVLayer` (layer type ``"qkvlab_shared_kv"``) holds **one** tensor per layer,
  the raw shared projection ``s`` before RoPE and QK-norm; the key role is derived from it
  on read and the value is ``s`` itself. ``keys`` and ``values`` are the same object.
- :class:`SeparateKVLayer` (layer type ``"qkvlab_kv"``) holds the rotated key and the value.

Both grow by concatenation, as transformers' ``DynamicLayer`` does, so the bytes held after a
``generate`` call are exactly ``tensors * batch * kv_heads * length * head_dim * dtype bytes``
per layer. Setting a model config's ``layer_types`` to these names makes
``DynamicCache(config=...)`` (what ``generate`` builds) create them; the class attribute
``_layer_type`` registers them with transformers when this module is imported.

:class:`CacheView` adapts a transformers ``Cache`` to the decode-state interface qkvlab's
:class:`~qkvlab.models.blocks.Backbone` expects (``length``, ``layers``, ``advance``, ...).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from qkvlab.attention.cache import CacheLayout
from qkvlab.errors import ConfigError

SHARED_LAYER_TYPE = "qkvlab_shared_kv"
SEPARATE_LAYER_TYPE = "qkvlab_kv"


class _GrowingLayer(CacheLayerMixin):
    """What both layer kinds share: a length, growth by concatenation, batch reshuffles."""

    is_sliding = False
    is_croppable = True
    is_compileable = False
    kv_shared = False

    # ----------------------------------------------------------- transformers side
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ConfigError(
            f"A {type(self).__name__} is written by qkvlab's attention (a qkvlab.hf model), not through "
            "Cache.update; build the cache for a stock transformers model with DynamicCache() instead."
        )

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _set(self, fn) -> None:
        """Replace every stored tensor ``t`` by ``fn(t)`` (once per distinct tensor)."""
        raise NotImplementedError

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove and self.keys is not None:
            self._set(lambda t: t[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self._set(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self._set(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self._set(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        if self.keys is not None:
            self._set(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.keys is not None and self.keys.device != self.device:
            self._set(lambda t: t.to(self.device, non_blocking=True))

    # ----------------------------------------------------------- qkvlab side
    @property
    def k(self) -> torch.Tensor:
        return self.keys

    @property
    def v(self) -> torch.Tensor:
        return self.values

    def _append(self, old: torch.Tensor | None, new: torch.Tensor, pos: int) -> torch.Tensor:
        length = 0 if old is None else old.shape[-2]
        if pos == length:
            return new.contiguous() if old is None else torch.cat([old, new], dim=-2)
        if pos + new.shape[-2] <= length:  # rewriting positions already held (after a crop, say)
            old[:, :, pos : pos + new.shape[-2]].copy_(new)
            return old
        raise ConfigError(f"Cache write at position {pos} leaves a gap: the layer holds {length} positions.")

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.keys[:, :, :length]
        return (k, k) if self.kv_shared else (k, self.values[:, :, :length])


class SharedKVLayer(_GrowingLayer):
    """One cached tensor per layer: the raw shared K=V projection, before RoPE and QK-norm."""

    _layer_type = SHARED_LAYER_TYPE
    kv_shared = True

    def __init__(self, **kwargs) -> None:
        self.keys: torch.Tensor | None = None
        self.is_initialized = False

    # transformers code reads ``layer.values``; it is the same tensor as ``keys``.
    @property
    def values(self) -> torch.Tensor | None:
        return self.keys

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None and value is not self.keys:
            raise ConfigError(
                "A shared K=V cache layer holds one tensor; its values are its keys and cannot be set apart."
            )

    def _clear(self) -> None:
        self.keys = None

    def _set(self, fn) -> None:
        self.keys = fn(self.keys)

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        if not self.is_initialized:
            self.lazy_initialization(k)
        self.keys = self._append(self.keys, k, pos)


class SeparateKVLayer(_GrowingLayer):
    """Two cached tensors per layer: the key role (rotated, normalised) and the value."""

    _layer_type = SEPARATE_LAYER_TYPE

    def __init__(self, **kwargs) -> None:
        super().__init__()

    def _clear(self) -> None:
        self.keys = self.values = None

    def _set(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        if v is None:
            raise ConfigError("A K/V cache layer needs a value tensor.")
        if not self.is_initialized:
            self.lazy_initialization(k)
        self.keys = self._append(self.keys, k, pos)
        self.values = self._append(self.values, v, pos)


def layer_class(layout: CacheLayout) -> type[_GrowingLayer]:
    return SharedKVLayer if layout.kv_shared else SeparateKVLayer


class CacheView:
    """A transformers ``Cache`` seen through qkvlab's decode-state interface.

    The backbone reads ``length`` once per forward as the position of the new tokens; the
    layers grow as they are written, so ``advance`` and ``check_room`` have nothing to do.
    """

    def __init__(self, cache: Cache, layout: CacheLayout) -> None:
        cls = layer_class(layout)
        if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is not None:
            # A DynamicCache() built without the config: give it this model's layers.
            cache.layers.extend(cls() for _ in range(layout.n_layers))
            cache.layer_class_to_replicate = None
        wrong = [type(layer).__name__ for layer in cache.layers if not isinstance(layer, cls)]
        if len(cache.layers) != layout.n_layers or wrong:
            got = f"{len(cache.layers)} layers" + (f" of type {sorted(set(wrong))}" if wrong else "")
            raise ConfigError(
                f"This qkvlab model needs a cache of {layout.n_layers} {cls.__name__} layers, got {got}; build it "
                "with DynamicCache(config=model.config) or let generate() build it."
            )
        self.cache = cache
        self.layers = cache.layers
        self.layout = layout

    @property
    def length(self) -> int:
        return self.layers[0].get_seq_length()

    def check_compatible(self, layout: CacheLayout, batch_size: int, device: torch.device) -> None:
        if layout != self.layout:
            raise ConfigError(f"The cache was made for {self.layout}, the model needs {layout}.")
        held = self.layers[0].keys
        if held is not None and held.shape[0] != batch_size:
            raise ConfigError(f"Batch of {batch_size} rows given to a cache holding {held.shape[0]} rows.")

    def check_room(self, T: int) -> None:
        return None

    def advance(self, T: int) -> None:
        return None


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the tensors of ``cache``, each storage counted once (a shared K=V layer's
    ``keys`` and ``values`` are one tensor)."""
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def cache_tensor_count(cache: Cache) -> int:
    """Distinct tensors held per layer, summed over layers."""
    n = 0
    for layer in cache.layers:
        ptrs = {
            t.untyped_storage().data_ptr()
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor) and t.numel()
        }
        n += len(ptrs)
    return n
