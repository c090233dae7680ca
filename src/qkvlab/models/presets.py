"""Named model presets: the paper's two LM shapes and a size ladder for both recipes.

Ladder names give the approximate *non-embedding* parameter count (Kaplan et al., 2020),
which does not depend on the tokenizer; with the GPT-2 vocabulary the top rung is about
355M parameters in all.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from qkvlab.errors import ConfigError
from qkvlab.models.config import GPTConfig

_PAPER = {
    # PAPER.md 2.4: layers / d / heads (head dim 64) / FFN; vocab 50,304; 2048 context; every
    # weight matrix initialised N(0, 0.02) (the paper's code; with optim.decay auto this also
    # decays every parameter, as the paper does).
    "paper-300m": dict(n_layers=20, d_model=1024, n_heads=16, d_ff=4096, dropout=0.1, init="paper"),
    "paper-1.2b": dict(n_layers=22, d_model=2048, n_heads=32, d_ff=8192, dropout=0.1, init="paper"),
}

# (name suffix, n_layers, d_model, n_heads); at least 8 heads, a multiple of 4, so that
# GQA-4 is real grouping (4 KV heads < n_heads) on every rung.
_LADDER = [
    ("0.3m", 3, 96, 8),
    ("1m", 5, 128, 8),
    ("3m", 7, 192, 8),
    ("10m", 12, 256, 8),
    ("30m", 10, 512, 8),
    ("85m", 12, 768, 12),
    ("300m", 24, 1024, 16),
]

#: The variants the paper ran at each preset; ladder rungs use the 300M list.
PAPER_VARIANTS = {
    "paper-300m": ["QKV", "Q-K=V", "Q=K-V", "Q=K=V", "GQA-4", "MQA", "Q-GQA-4", "Q-MQA"],
    "paper-1.2b": ["QKV", "Q-K=V", "GQA-8", "MQA", "Q-GQA-8", "Q-MQA"],
}


def _build() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for name, shape in _PAPER.items():
        presets[name] = dict(recipe="gpt2", vocab_size=50304, max_seq_len=2048, **shape)
    for recipe in ("gpt2", "llama"):
        for suffix, n_layers, d_model, n_heads in _LADDER:
            presets[f"{recipe}-{suffix}"] = dict(
                recipe=recipe, n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab_size=50304, max_seq_len=1024
            )
    presets["tiny"] = dict(recipe="gpt2", n_layers=2, d_model=64, n_heads=8, vocab_size=256, max_seq_len=256)
    presets["tiny-llama"] = dict(recipe="llama", n_layers=2, d_model=64, n_heads=8, vocab_size=256, max_seq_len=256)
    return presets


PRESETS: dict[str, dict[str, Any]] = _build()
#: The preset of a train config whose ``model`` section names none.
DEFAULT_PRESET = "tiny"


def list_presets() -> list[str]:
    return list(PRESETS)


def with_preset(
    section: Mapping[str, Any],
    *,
    fields: Collection[str] | None = None,
    skip: Collection[str] = (),
    default: str | None = None,
) -> dict[str, Any]:
    """A config's ``model`` section on top of its preset: the keyword arguments of a model config.

    ``section["preset"]`` names the preset (absent: ``default``; None: no preset); its other
    keys win over the preset's. ``fields`` (a config class's field names) leaves out every other
    key, the preset's and the section's; ``skip`` leaves out preset fields a family takes from
    elsewhere (a task's vocabulary or length). The one place a preset is merged into a model
    config::

        with_preset({"preset": "gpt2-1m", "variant": "Q-K=V"})   # gpt2-1m's shape, the variant given
    """
    preset = section.get("preset", default)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"Unknown model.preset {preset!r}; available: {', '.join(PRESETS)}.")
    base = {k: v for k, v in PRESETS[preset].items() if k not in skip} if preset is not None else {}
    merged = {**base, **{k: v for k, v in section.items() if k != "preset"}}
    return merged if fields is None else {k: v for k, v in merged.items() if k in fields}


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` for preset ``name``; keyword overrides win (e.g. ``variant="Q-K=V"``)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}.")
    return GPTConfig(**with_preset({**overrides, "preset": name}))


def paper_variants(name: str) -> list[str]:
    """Default variant list for a preset: the paper's own list, else the 300M one."""
    return list(PAPER_VARIANTS.get(name, PAPER_VARIANTS["paper-300m"]))
