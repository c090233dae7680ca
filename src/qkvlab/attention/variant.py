"""The variant spec: projection sharing x head sharing x positions x QK-norm.

A variant is data, not code. Projection sharing is a partition of (a subset of) the
roles {q, k, v} into groups; each group is one learned projection, and a role that
belongs to no group is the identity (the block input itself). Our ids write groups
joined by ``_`` with the roles of a group as letters, in q, k, v order:

====== ================ ======================
id     paper notation    cached at decode
====== ================ ======================
q_k_v  QKV              K and V
q_kv   Q-K=V            one tensor (K = V)
qk_v   Q=K-V            K and V
qkv    Q=K=V            one tensor
qv_k   Q=V-K            K and V
k_v    K-V (Q = x)      K and V
====== ================ ======================

Head sharing is ``n_kv_heads`` (``None`` means one KV head per query head, MHA).
Modifiers follow the base, joined by ``+``: ``gqa4`` / ``mqa`` / ``mha``, a positional
scheme ``none`` / ``learned`` / ``rope``, ``2d`` for the paper's 2D positional fix
"(X)+", ``qknorm`` and ``linear`` for kernelised linear attention (paper App. A: under
Q=K=V it is a recurrence with a fixed-size state; see :mod:`qkvlab.attention.linear`).
Linear attention has no score map for RoPE or the 2D fix to act on, so ``linear`` with
``rope`` or ``2d`` is refused. The paper's notation parses as well, a linear variant
written with a " (linear)" suffix::

    >>> VariantSpec.parse("Q-GQA-4")
    VariantSpec(sharing='q_kv', n_kv_heads=4, pos=None, pos2d=False, qk_norm=False, linear=False)
    >>> VariantSpec.parse("(Q=K-V)+").paper_name
    '(Q=K-V)+'
    >>> VariantSpec.parse("q_kv+mqa+rope").id
    'q_kv+mqa+rope'
    >>> VariantSpec.parse("Q=K=V+linear").paper_name
    'Q=K=V (linear)'
    >>> VariantSpec.parse("Q=K=V (linear)").id
    'qkv+linear'
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from qkvlab.errors import ConfigError

ROLES = ("q", "k", "v")
POSITIONAL_SCHEMES = ("none", "learned", "rope")

#: The paper's names for the sharing patterns it studies (and the two it omits).
SHARING_PAPER_NAMES = {
    "q_k_v": "QKV",
    "q_kv": "Q-K=V",
    "qk_v": "Q=K-V",
    "qkv": "Q=K=V",
    "qv_k": "Q=V-K",
    "k_v": "K-V",
}

#: The eight language-model variants of the paper's Table 4 (300M, GQA with 4 KV heads).
PAPER_LM_VARIANTS = ("QKV", "Q-K=V", "Q=K-V", "Q=K=V", "GQA-4", "MQA", "Q-GQA-4", "Q-MQA")

_HELP = (
    "Write a variant as our id, e.g. 'q_kv', 'q_kv+gqa4+rope', 'qk_v+2d', or in the paper's "
    "notation, e.g. 'QKV', 'Q-K=V', 'Q=K-V', 'Q=K=V', 'GQA-4', 'MQA', 'Q-GQA-4', 'Q-MQA', "
    "'(Q=K-V)+', 'Q=K=V (linear)'. Sharing ids: " + ", ".join(SHARING_PAPER_NAMES) + "; modifiers: "
    "gqaN, mqa, mha, none, learned, rope, 2d, qknorm, linear (softmax is the default)."
)


def normalize_sharing(sharing: str) -> str:
    """Canonical form of a sharing id: roles in q, k, v order, groups ordered by first role.

    Raises :class:`ConfigError` for letters other than q/k/v, a role named twice or an
    empty group.
    """
    if not isinstance(sharing, str) or not sharing:
        raise ConfigError(f"Sharing must be a non-empty string like 'q_kv', got {sharing!r}. {_HELP}")
    groups = sharing.lower().split("_")
    seen: set[str] = set()
    out = []
    for group in groups:
        if not group or any(c not in ROLES for c in group):
            raise ConfigError(
                f"Bad sharing {sharing!r}: each '_'-separated group must be letters from q, k, v. {_HELP}"
            )
        if len(set(group)) != len(group) or seen & set(group):
            raise ConfigError(f"Bad sharing {sharing!r}: every role may appear at most once. {_HELP}")
        seen |= set(group)
        out.append("".join(r for r in ROLES if r in group))
    out.sort(key=lambda g: ROLES.index(g[0]))
    return "_".join(out)


@dataclass(frozen=True)
class VariantSpec:
    """Which projections an attention layer has and how its cache is laid out.

    Args:
        sharing: projection sharing id (see module docstring), e.g. ``"q_kv"``.
        n_kv_heads: number of key/value heads; ``None`` for MHA (one per query head),
            ``1`` for MQA. Must divide the model's ``n_heads``.
        pos: positional scheme ``"none"``, ``"learned"`` (absolute, added to the input)
            or ``"rope"``; ``None`` takes the model recipe's default.
        pos2d: add the paper's 2D positional fix "(X)+" to the score map (non-causal only).
        qk_norm: RMS-normalise the query and key roles per head (never the value).
        linear: kernelised linear attention instead of softmax (id ``+linear``, paper name
            ``"... (linear)"``); decodes with a fixed-size state instead of a KV cache.
    """

    sharing: str = "q_k_v"
    n_kv_heads: int | None = None
    pos: str | None = None
    pos2d: bool = False
    qk_norm: bool = False
    linear: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sharing", normalize_sharing(self.sharing))
        if self.n_kv_heads is not None and (
            isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1
        ):
            raise ConfigError(f"n_kv_heads must be a positive integer or None (MHA), got {self.n_kv_heads!r}.")
        if self.pos is not None and self.pos not in POSITIONAL_SCHEMES:
            raise ConfigError(
                f"Unknown positional scheme {self.pos!r}; use one of {', '.join(POSITIONAL_SCHEMES)} "
                "(or leave it unset to take the model recipe's default)."
            )
        if self.linear and self.pos == "rope":
            raise ConfigError(
                f"Variant {self.sharing}+rope+linear: RoPE is not supported with linear attention (it "
                "would have to rotate the feature maps, not the roles). Use learned absolute positions "
                "('+learned', the gpt2 recipe) or none ('+none'); with the llama recipe name one of them "
                "in the variant, e.g. 'Q=K=V+linear+none'."
            )
        if self.linear and self.pos2d:
            raise ConfigError(
                f"Variant {self.sharing}+2d+linear: the 2D positional fix acts on a softmax score map, "
                "which linear attention does not form. Drop '+2d' / the '(X)+' form, or drop '+linear'."
            )

    # ----------------------------------------------------------------- structure
    @property
    def groups(self) -> tuple[str, ...]:
        """The projection groups, e.g. ``("q", "kv")`` for ``q_kv``."""
        return tuple(self.sharing.split("_"))

    def source(self, role: str) -> str:
        """The group a role is read from, or ``"x"`` when it is the identity."""
        for g in self.groups:
            if role in g:
                return g
        return "x"

    @property
    def identity_roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if self.source(r) == "x")

    @property
    def kv_shared(self) -> bool:
        """Key and value come from one tensor, so the cache stores it once."""
        return self.source("k") == self.source("v")

    @property
    def qk_shared(self) -> bool:
        """Query and key come from one tensor, so the score map is symmetric."""
        return self.source("q") == self.source("k")

    @property
    def cached_tensors(self) -> int:
        """Tensors cached per layer: 1 when K and V share, else 2."""
        return 1 if self.kv_shared else 2

    def kv_heads(self, n_heads: int) -> int:
        return n_heads if self.n_kv_heads is None else self.n_kv_heads

    def validate(self, *, n_heads: int, head_dim: int, d_model: int, causal: bool) -> None:
        """Check the spec against a model's shape; raise :class:`ConfigError` if it cannot work."""
        g = self.kv_heads(n_heads)
        if g > n_heads or n_heads % g:
            raise ConfigError(
                f"n_kv_heads={g} must divide n_heads={n_heads} (variant {self.id!r}); "
                f"choose one of {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}."
            )
        if g != n_heads:
            q_src = self.source("q")
            tied = [r for r in ("k", "v") if self.source(r) == q_src]
            if tied:
                raise ConfigError(
                    f"Variant {self.id!r} ties the query with {'/'.join(tied).upper()} but asks for "
                    f"n_kv_heads={g} < n_heads={n_heads}: a projection shared with the query has one "
                    "head per query head, so it cannot be grouped. Use MHA (drop gqa/mqa) or a "
                    "sharing that keeps Q separate, e.g. 'q_kv'."
                )
            if self.identity_roles and any(r in self.identity_roles for r in ("k", "v")):
                raise ConfigError(
                    f"Variant {self.id!r} uses the identity for {'/'.join(self.identity_roles).upper()} "
                    f"which has n_heads={n_heads} heads, so it cannot have n_kv_heads={g}. Use MHA."
                )
        if self.identity_roles and n_heads * head_dim != d_model:
            raise ConfigError(
                f"Variant {self.id!r} uses the input itself as {'/'.join(self.identity_roles).upper()}, "
                f"which needs n_heads * head_dim == d_model, but {n_heads} * {head_dim} != {d_model}. "
                f"Set head_dim={d_model // n_heads} or give every role a projection."
            )
        if self.pos2d and causal:
            raise ConfigError(
                f"The 2D positional fix ('{self.paper_name}') is for non-causal models only: the causal "
                "mask already breaks the score map's symmetry. Drop '+2d' / the '(X)+' form, or use "
                "a non-causal model (encoder, ViT, set encoder)."
            )

    # --------------------------------------------------------------------- names
    @property
    def id(self) -> str:
        """Our canonical id, e.g. ``q_kv+gqa4+rope``; parses back to an equal spec."""
        parts = [self.sharing]
        if self.n_kv_heads is not None:
            parts.append("mqa" if self.n_kv_heads == 1 else f"gqa{self.n_kv_heads}")
        if self.pos is not None:
            parts.append(self.pos)
        if self.pos2d:
            parts.append("2d")
        if self.qk_norm:
            parts.append("qknorm")
        if self.linear:
            parts.append("linear")
        return "+".join(parts)

    @property
    def paper_name(self) -> str:
        """The paper's notation for sharing, head sharing and the 2D fix (e.g. ``Q-GQA-4``).

        A linear variant gets the suffix ``" (linear)"``, e.g. ``"Q=K=V (linear)"``.
        """
        base = SHARING_PAPER_NAMES.get(self.sharing) or "-".join("=".join(r.upper() for r in g) for g in self.groups)
        g = self.n_kv_heads
        if g is not None:
            heads = "MQA" if g == 1 else f"GQA-{g}"
            if self.sharing == "q_k_v":
                base = heads
            elif self.sharing == "q_kv":
                base = f"Q-{heads}"
            else:
                base = f"{base}+{heads}"
        if self.linear:
            return f"{base} (linear)"  # never with pos2d: __post_init__ refuses the pair
        return f"({base})+" if self.pos2d else base

    def __str__(self) -> str:
        return self.id

    def replace(self, **changes: Any) -> VariantSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str | VariantSpec | dict) -> VariantSpec:
        """Parse our id or the paper's notation; see the module docstring."""
        if isinstance(text, VariantSpec):
            return text
        if isinstance(text, dict):
            unknown = set(text) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"Unknown variant field(s) {sorted(unknown)} in {text!r}.")
            return cls(**text)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"Empty or non-string variant {text!r}. {_HELP}")
        raw = text
        # Blanks may stand at the ends and around the separators + - = _ ( ) ("Q - K = V",
        # "Q=K=V (linear)"); between two letters or digits they are refused, not deleted: "q k v"
        # is not "qkv", nor "GQA-1 6" GQA-16.
        s = text.strip().replace("⁺", "+").replace("≠", "-")
        s = re.sub(r"\s*([-+=_()])\s*", r"\1", s)
        if re.search(r"\s", s):
            raise ConfigError(f"Cannot parse variant {raw!r}: it has a blank inside a name; remove it. {_HELP}")
        linear = False
        kind = re.fullmatch(r"(.+)\((linear|softmax)\)", s, flags=re.IGNORECASE)
        if kind:  # the paper-name form "Q=K=V (linear)"
            s, linear = kind.group(1), kind.group(2).lower() == "linear"
        pos2d = False
        m = re.fullmatch(r"\((.+)\)\+(.*)", s)
        if m:
            pos2d = True
            base, *mods = m.group(1).split("+")
            rest = m.group(2)
            mods += [p for p in rest.split("+") if p] if rest else []
        else:
            base, *mods = s.split("+")
        fields: dict[str, Any] = {"pos2d": pos2d}
        fields.update(_parse_base(base, raw))
        if kind:
            fields["linear"] = linear
        # A second base in paper notation may follow: "Q=K-V+GQA-4" or "K-V+MQA".
        for mod in mods:
            _apply_modifier(fields, mod, raw)
        return cls(**fields)


def _parse_base(base: str, raw: str) -> dict[str, Any]:
    if re.fullmatch(r"[qkv_]+", base):
        return {"sharing": normalize_sharing(base)}
    up = base.upper()
    m = re.fullmatch(r"(Q-)?(GQA-?(\d+)|MQA|MHA)", up)
    if m:
        g = None if m.group(2) == "MHA" else 1 if m.group(2) == "MQA" else int(m.group(3))
        return {"sharing": "q_kv" if m.group(1) else "q_k_v", "n_kv_heads": g}
    if up == "QKV":
        return {"sharing": "q_k_v"}
    if re.fullmatch(r"[QKV=\-]+", up):
        groups = up.split("-")
        if all(re.fullmatch(r"[QKV](=[QKV])*", g) for g in groups):
            try:
                return {"sharing": normalize_sharing("_".join(g.replace("=", "").lower() for g in groups))}
            except ConfigError:
                pass
    raise ConfigError(f"Cannot parse variant {raw!r}: {base!r} is neither a sharing id nor paper notation. {_HELP}")


def _apply_modifier(fields: dict[str, Any], mod: str, raw: str) -> None:
    low = mod.lower()
    m = re.fullmatch(r"(gqa)-?(\d+)|kv(\d+)", low)
    if low in ("mqa", "mha") or m:
        if "n_kv_heads" in fields:
            raise ConfigError(f"Variant {raw!r} names head sharing twice. {_HELP}")
        fields["n_kv_heads"] = 1 if low == "mqa" else None if low == "mha" else int(m.group(2) or m.group(3))
        if fields["n_kv_heads"] == 0:
            raise ConfigError(f"Variant {raw!r}: the number of KV heads must be at least 1.")
    elif low in POSITIONAL_SCHEMES:
        if "pos" in fields:
            raise ConfigError(f"Variant {raw!r} names the positional scheme twice. {_HELP}")
        fields["pos"] = low
    elif low in ("2d", "pos2d"):
        fields["pos2d"] = True
    elif low in ("qknorm", "qk_norm", "qk-norm"):
        fields["qk_norm"] = True
    elif low in ("linear", "softmax"):
        if "linear" in fields:
            raise ConfigError(f"Variant {raw!r} names the attention kind (linear / softmax) twice. {_HELP}")
        fields["linear"] = low == "linear"
    else:
        raise ConfigError(f"Unknown modifier {mod!r} in variant {raw!r}. {_HELP}")


def parse_variant(text: str | VariantSpec | dict) -> VariantSpec:
    """Shorthand for :meth:`VariantSpec.parse`."""
    return VariantSpec.parse(text)
