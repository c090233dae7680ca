"""Model configs: plain dataclasses that validate themselves and round-trip through dicts.

``TransformerConfig`` holds what every family shares (shape, variant, recipe); each
family adds its own fields. A recipe fills in defaults that are left as ``None``:

======== ========= ====== ====== ========= ====================
recipe   norm      MLP    bias   positions tied embeddings (GPT)
======== ========= ====== ====== ========= ====================
gpt2     LayerNorm GELU   yes    learned   yes   (the paper's setup)
llama    RMSNorm   SwiGLU no     rope      no
======== ========= ====== ====== ========= ====================

A positional scheme named in the variant (``"q_kv+rope"``) wins over the recipe's.
Linear attention (``"Q=K=V+linear"``) refuses RoPE, so with the ``llama`` recipe name
``+none`` or ``+learned`` in the variant.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    "gpt2": {"norm": "layernorm", "mlp": "gelu", "bias": True, "pos": "learned", "tie_embeddings": True},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "bias": False, "pos": "rope", "tie_embeddings": False},
}

#: Weight initialisations (``TransformerConfig.init``).
INIT_SCHEMES = ("scaled", "paper")


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """ConfigError unless ``value`` is an integer >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        default = " (or leave it unset for the default)" if optional else ""
        raise ConfigError(f"{name} must be a positive integer{default}, got {value!r}.")


def _check_number(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """ConfigError unless ``value`` is a finite number for which ``ok(value)`` holds."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{name} must be {expected}, got {value!r}.")


def _check_flag(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false (or leave it unset for the recipe's choice), got {value!r}.")


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """SwiGLU width with about the parameters of a 4*d GELU MLP: 8/3 d, rounded up."""
    h = int(8 * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclass
class TransformerConfig:
    """Shape and variant of a transformer backbone.

    Args:
        n_layers, d_model, n_heads: the usual.
        head_dim: width per head; default ``d_model // n_heads``.
        d_ff: MLP hidden width; default ``4 * d_model`` (GELU) or :func:`swiglu_hidden` (SwiGLU).
        variant: a :class:`VariantSpec` or a string such as ``"Q-K=V"`` or ``"q_kv+gqa4"``.
        recipe: ``"gpt2"`` or ``"llama"`` (see module docstring).
        max_seq_len: longest sequence the model (and its caches) can hold.
        dropout: residual dropout; ``attn_dropout`` on attention probabilities;
            ``emb_dropout`` after the embedding.
        norm, mlp, bias: override the recipe's choice.
        backend: attention backend from the registry (``"sdpa"``, ``"reference"``).
        linear_feature: feature map of linear attention (variants ``+linear``): ``"elu+1"``
            (default) or ``"relu"``; see :mod:`qkvlab.attention.linear`.
        linear_decay: decay ``lam`` in (0, 1] of the linear-attention state (1 = none;
            below 1 causal models only). The normaliser is not decayed (DESIGN.md).
        init_std: standard deviation of the normal initialisation of weight matrices.
        init: ``"scaled"`` (GPT-2's rule: the attention output and MLP down projections get
            ``init_std / sqrt(2 * n_layers)``) or ``"paper"`` (every weight matrix, those two
            included, gets ``init_std``, as the paper's own model classes do).
    """

    causal: ClassVar[bool] = True
    family: ClassVar[str] = "transformer"

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    head_dim: int | None = None
    d_ff: int | None = None
    variant: VariantSpec | str | dict = field(default_factory=VariantSpec)
    recipe: str = "gpt2"
    max_seq_len: int = 256
    dropout: float = 0.0
    attn_dropout: float = 0.0
    emb_dropout: float = 0.0
    norm: str | None = None
    mlp: str | None = None
    bias: bool | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pos2d_channels: int = 10
    init_std: float = 0.02
    init: str = "scaled"
    backend: str = "sdpa"
    linear_feature: str = "elu+1"
    linear_decay: float = 1.0

    def __post_init__(self) -> None:
        from qkvlab.attention.backends import get_backend
        from qkvlab.attention.linear import check_decay, get_feature_map

        get_backend(self.backend)  # unknown name: ConfigError listing the registered ones
        if not isinstance(self.recipe, str) or self.recipe not in RECIPES:
            raise ConfigError(f"Unknown recipe {self.recipe!r}; use one of {', '.join(RECIPES)}.")
        for name in ("n_layers", "d_model", "n_heads", "max_seq_len", "pos2d_channels"):
            check_positive_int(name, getattr(self, name))
        for name in ("head_dim", "d_ff"):
            check_positive_int(name, getattr(self, name), optional=True)
        _check_flag("bias", self.bias)
        for name in ("dropout", "attn_dropout", "emb_dropout"):
            v = getattr(self, name)
            _check_number(name, v, lambda x: 0 <= x < 1, "a probability in [0, 1) such as 0.1")
        _check_number("norm_eps", self.norm_eps, lambda x: x > 0, "a small positive number such as 1e-5")
        _check_number("rope_theta", self.rope_theta, lambda x: x > 0, "a positive number such as 10000")
        defaults = RECIPES[self.recipe]
        if self.norm is None:
            self.norm = defaults["norm"]
        if self.mlp is None:
            self.mlp = defaults["mlp"]
        if self.bias is None:
            self.bias = defaults["bias"]
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}.")
        _check_number("init_std", self.init_std, lambda x: x > 0, "a positive number such as 0.02")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}.")
        if self.mlp not in ("gelu", "swiglu"):
            raise ConfigError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}.")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly or change n_heads."
                )
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else swiglu_hidden(self.d_model)
        variant = VariantSpec.parse(self.variant)
        if variant.pos is None:
            variant = variant.replace(pos=self.default_pos())
        if variant.n_kv_heads == self.n_heads:
            if variant.n_kv_heads > 1:
                warnings.warn(
                    f"Variant {variant.id!r} asks for {variant.n_kv_heads} KV heads on a model with "
                    f"n_heads={self.n_heads}: that is MHA, so it is built (and named) as MHA.",
                    stacklevel=3,
                )
            variant = variant.replace(n_kv_heads=None)
        get_feature_map(self.linear_feature)
        check_decay(self.linear_decay, causal=self.causal or not variant.linear)
        self.linear_decay = float(self.linear_decay)
        if variant.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}; use pos 'learned' or 'none'.")
        variant.validate(n_heads=self.n_heads, head_dim=self.head_dim, d_model=self.d_model, causal=self.causal)
        self.variant = variant

    def default_pos(self) -> str:
        return RECIPES[self.recipe]["pos"]

    @property
    def n_kv_heads(self) -> int:
        return self.variant.kv_heads(self.n_heads)

    # --------------------------------------------------------------- dict I/O
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variant"] = self.variant.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"Unknown {cls.__name__} field(s): {sorted(unknown)}. Known: {sorted(names)}.")
        return cls(**d)

    def replace(self, **changes: Any) -> TransformerConfig:
        d = self.to_dict()
        d.update(changes)
        return type(self).from_dict(d)


@dataclass
class GPTConfig(TransformerConfig):
    """Causal decoder language model. ``tie_embeddings`` defaults to the recipe's choice."""

    family: ClassVar[str] = "gpt"
    vocab_size: int = 50304
    tie_embeddings: bool | None = None

    def __post_init__(self) -> None:
        check_positive_int("vocab_size", self.vocab_size)
        _check_flag("tie_embeddings", self.tie_embeddings)
        super().__post_init__()
        if self.tie_embeddings is None:
            self.tie_embeddings = RECIPES[self.recipe]["tie_embeddings"]


@dataclass
class EncoderConfig(TransformerConfig):
    """Non-causal sequence encoder that labels every token (synthetic tasks)."""

    causal: ClassVar[bool] = False
    family: ClassVar[str] = "encoder"
    vocab_size: int = 16
    n_labels: int | None = None

    def __post_init__(self) -> None:
        check_positive_int("vocab_size", self.vocab_size)
        check_positive_int("n_labels", self.n_labels, optional=True)
        super().__post_init__()
        if self.n_labels is None:
            self.n_labels = self.vocab_size


@dataclass
class ViTConfig(TransformerConfig):
    """Vision transformer classifier: patches + a class token, non-causal."""

    causal: ClassVar[bool] = False
    family: ClassVar[str] = "vit"
    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    n_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "n_classes"):
            check_positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                "pick a patch size that tiles the image."
            )
        n_tokens = (self.image_size // self.patch_size) ** 2 + 1
        if self.max_seq_len < n_tokens:
            self.max_seq_len = n_tokens
        super().__post_init__()


@dataclass
class SetConfig(TransformerConfig):
    """Permutation-equivariant set encoder (no positions) scoring each element.

    ``allow_pos2d``: accept the paper's 2D fix ("(X)+" variants) over the elements' indices in
    the set. That makes the encoder depend on the order of the set (no longer equivariant); the
    paper's Table 3 has "+" rows for set anomaly all the same, so this is an explicit opt-in
    for reproducing them. Other positional schemes are always refused.
    """

    causal: ClassVar[bool] = False
    family: ClassVar[str] = "set"
    in_features: int = 512
    allow_pos2d: bool = False

    def default_pos(self) -> str:
        return "none"

    def __post_init__(self) -> None:
        check_positive_int("in_features", self.in_features)
        if not isinstance(self.allow_pos2d, bool):
            raise ConfigError(f"allow_pos2d must be true or false, got {self.allow_pos2d!r}.")
        super().__post_init__()
        if self.variant.pos != "none" or (self.variant.pos2d and not self.allow_pos2d):
            hint = (
                "Drop the positional scheme from the variant."
                if self.variant.pos != "none"
                else "Drop '2d' / '+' from the variant, or set allow_pos2d=true to use the 2D fix over "
                "the elements' indices (the encoder then depends on the order of the set)."
            )
            raise ConfigError(
                f"A set encoder must be permutation-equivariant, so it takes no positions; got variant "
                f"{self.variant.id!r}. {hint}"
            )


CONFIG_TYPES: dict[str, type[TransformerConfig]] = {
    c.family: c for c in (GPTConfig, EncoderConfig, ViTConfig, SetConfig)
}
