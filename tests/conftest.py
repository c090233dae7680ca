"""Shared helpers: the variant grid on tiny models; the mark for tests that run Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from qkvlab.kernels.kv_decode import HAS_TRITON, _interpreter_problem

# Tests that run a kernel under Triton's interpreter need Triton and an interpreter that passes
# the kernels' own probe (Triton 3.6's fails it with numpy 2; the entry points then fall back).
INTERPRETER_PROBLEM = _interpreter_problem() if HAS_TRITON else "Triton is not installed"
needs_interpreter = pytest.mark.skipif(
    INTERPRETER_PROBLEM is not None, reason=f"no working Triton interpreter: {INTERPRETER_PROBLEM}"
)

SHARINGS = ["q_k_v", "q_kv", "qk_v", "qkv", "qv_k", "k_v"]
# Tiny shape: 4 query heads of width 8, d_model 32 (so the identity role of k_v fits).
N_HEADS = 4
HEADS = {"mha": None, "gqa2": 2, "mqa": 1}
POSITIONS = ["none", "learned", "rope"]
RECIPES = ["gpt2", "llama"]


def valid_heads(sharing: str) -> list[str]:
    """Head sharing is valid unless the query shares a projection (or K/V is the identity)."""
    q_group = next((g for g in sharing.split("_") if "q" in g), "")
    tied = len(q_group) > 1
    identity_kv = not any(r in sharing for r in "kv")
    return ["mha"] if tied or identity_kv else list(HEADS)


def variant_id(sharing: str, heads: str, pos: str, qk_norm: bool = False) -> str:
    parts = [sharing]
    if heads != "mha":
        parts.append(heads)
    parts.append(pos)
    if qk_norm:
        parts.append("qknorm")
    return "+".join(parts)


GRID = [
    (sharing, heads, pos, recipe)
    for sharing in SHARINGS
    for heads in valid_heads(sharing)
    for pos in POSITIONS
    for recipe in RECIPES
]


def grid_ids(case) -> str:
    return "-".join(case)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spy_decoders(monkeypatch) -> list[tuple]:
    """``(decoder, keyword arguments)`` of every StaticDecoder built from now on."""
    from qkvlab.models.decoding import StaticDecoder

    built = []
    init = StaticDecoder.__init__

    def spy(self, *a, **kw):
        built.append((self, kw))
        init(self, *a, **kw)

    monkeypatch.setattr(StaticDecoder, "__init__", spy)
    return built
