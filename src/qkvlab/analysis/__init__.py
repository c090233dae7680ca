"""Why sharing works or fails: projection similarity, effective rank, attention symmetry, maps.

PAPER.md 3.1-3.3 explains Q-K=V by K/V redundancy (cosine K-V 0.73 vs Q-K 0.42, Q-V 0.31;
effective rank 687 / 702 of 1024) and the failures of Q=K by symmetric score maps, without
giving its methods. This package computes those quantities with stated methods, on any
model built on the one :class:`~qkvlab.attention.Attention` module:

- :mod:`.similarity`: cosine of flattened weights, per-head subspace overlap (principal
  angles), linear CKA of outputs; grouped heads are aligned query head -> its KV head;
  shared roles are tied (1 by construction) or refused when asked for by name.
- :mod:`.rank`: entropy effective rank and 90% / 99% energy ranks of projections and maps.
- :mod:`.symmetry`: ``||S - S^T|| / ||S||`` of unmasked logits, diagonal attention.
- :mod:`.maps`: :func:`collect_attention` (hooks route attention through the reference
  math and capture logits and weights) and figures (matplotlib, imported lazily).
- :mod:`.runner`: :func:`analyze_model`, :func:`analyze_checkpoint`.

From Python::

    from qkvlab.analysis import analyze_model, collect_attention, projection_similarity
    result, extras = analyze_model(model, idx)          # idx: a (B, T) batch of token ids
    result["similarity"]["K-V"]["cosine"]["mean"]
    result["symmetry"]["logit_asymmetry"]["per_head"]   # [layer][head]

From the shell (a GPT checkpoint is fed windows of the corpus it was trained on; other
families take ``--data inputs.npy`` or random inputs)::

    qkvlab analyze runs/tiny/model.safetensors --out runs/tiny/analysis
    qkvlab analyze runs/a runs/b --out cmp --seq-len 128 --pairs K-V,Q-K --json

which writes ``analysis.json``, ``attention_maps.png`` (layers x heads), ``similarity.png``
and ``spectra.png`` per checkpoint, and ``variants.png`` (maps side by side) for several.
"""

from qkvlab.analysis.maps import (
    AttentionCapture,
    LayerAttention,
    capture_attention,
    collect_attention,
    plot_attention_grid,
    plot_similarity,
    plot_spectra,
    plot_variants,
)
from qkvlab.analysis.rank import batched_rank, energy_rank, entropy_rank, rank_summary, singular_values
from qkvlab.analysis.runner import analyze_checkpoint, analyze_model, map_ranks, projection_ranks
from qkvlab.analysis.similarity import (
    flat_cosine,
    linear_cka,
    principal_cosines,
    projection_similarity,
    role_weights,
    subspace_overlap,
)
from qkvlab.analysis.symmetry import attention_symmetry, diagonal_attention, logit_asymmetry, uniform_diagonal

__all__ = [
    "AttentionCapture",
    "LayerAttention",
    "analyze_checkpoint",
    "analyze_model",
    "attention_symmetry",
    "batched_rank",
    "capture_attention",
    "collect_attention",
    "diagonal_attention",
    "energy_rank",
    "entropy_rank",
    "flat_cosine",
    "linear_cka",
    "logit_asymmetry",
    "map_ranks",
    "plot_attention_grid",
    "plot_similarity",
    "plot_spectra",
    "plot_variants",
    "principal_cosines",
    "projection_ranks",
    "projection_similarity",
    "rank_summary",
    "role_weights",
    "singular_values",
    "subspace_overlap",
    "uniform_diagonal",
]
