"""The sort-free top-p kernel (``qkvlab.kernels.top_p``) under Triton's interpreter against the
sort in PyTorch, and the rule both keep: a token stays if the tokens more likely than it hold
less than p together."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_interpreter
from qkvlab.kernels.top_p import (
    HAS_TRITON,
    MAX_PROGRAMS,
    _launch_shape,
    top_p_cut,
    top_p_filter,
    top_p_reference,
    top_p_unsupported_reason,
)
from qkvlab.models.sampling import sample

NEG = float("-inf")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def kept(logits: torch.Tensor) -> torch.Tensor:
    return logits > NEG


@needs_interpreter
@pytest.mark.parametrize(("rows", "vocab"), [(1, 4), (3, 41), (2, 1000), (1, 3001)])
def test_kernel_keeps_what_the_sort_keeps(interpret, rows, vocab):
    """Random rows, several programs a row where the vocabulary is wide, p from small to near 1:
    the same kept set, and every kept score unchanged."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g) * 3
    for p in (0.05, 0.5, 0.9, 0.95, 0.999):
        cut, ref = top_p_cut(x, p), top_p_reference(x, p)
        assert torch.equal(kept(cut), kept(ref)), p
        assert torch.equal(cut[kept(cut)], x[kept(cut)])
    if vocab >= 1000:
        assert _launch_shape(vocab)[0] > 1  # the partial sums of several programs are added


def test_launch_shape_covers_the_row_with_at_most_max_programs():
    pytest.importorskip("triton")
    for vocab in (1, 31, 32, 33, 1000, 50_304, 151_936):
        programs, chunk = _launch_shape(vocab)
        assert programs <= MAX_PROGRAMS and chunk % 32 == 0
        assert (programs - 1) * chunk < vocab <= programs * chunk


@needs_interpreter
def test_known_case_and_ties_stay_or_go_together(interpret):
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    for p, want in {0.3: [1], 0.5: [1], 0.75: [1, 3], 0.81: [0, 1, 3]}.items():
        for fn in (top_p_cut, top_p_reference):
            assert kept(fn(logits, p)).nonzero()[:, 1].tolist() == want, (fn.__name__, p)
    # three tokens tied behind one of 0.4: only 0.4 is more likely than each, less than 0.5,
    # so all three stay (a sort would keep whichever of them it put first)
    tied = torch.tensor([[0.2, 0.4, 0.2, 0.2]]).log()
    for fn in (top_p_cut, top_p_reference):
        assert kept(fn(tied, 0.5)).tolist() == [[True, True, True, True]], fn.__name__
        assert kept(fn(tied, 0.4)).tolist() == [[False, True, False, False]], fn.__name__
    # -0.0 and 0.0 are one score
    signed = torch.tensor([[1.0, 0.0, -0.0, -5.0]])
    for fn in (top_p_cut, top_p_reference):
        assert kept(fn(signed, 0.8)).tolist() == [[True, True, True, False]], fn.__name__


@needs_interpreter
def test_filtered_rows_and_rows_without_a_distribution(interpret):
    """-inf (a top-k filter's) stays -inf; a row with NaN, +inf or nothing but -inf comes back
    as it went in, from both, so the draw that follows sees what it would have seen."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=g)
    x[0, ::3] = NEG
    x[1, 7] = float("nan")
    x[2, 11] = float("inf")
    x[3] = NEG
    for fn in (top_p_cut, top_p_reference):
        out = fn(x, 0.9)
        assert torch.equal(kept(out[0]), kept(top_p_reference(x[:1], 0.9)[0])) and not kept(out[0, ::3]).any()
        assert torch.allclose(out[1:4], x[1:4], equal_nan=True), fn.__name__
    assert torch.equal(kept(top_p_cut(x, 0.9)[4]), kept(top_p_reference(x, 0.9)[4]))


def test_the_sort_decides_where_the_kernel_does_not_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 50)
    if HAS_TRITON:
        assert "needs CUDA" in top_p_unsupported_reason(x)
    assert torch.equal(top_p_filter(x, 0.7), top_p_reference(x, 0.7))
    assert top_p_filter(x, 1.0) is x  # p = 1 keeps everything, untouched


@needs_interpreter
def test_sampling_draws_only_kept_tokens_through_the_kernel(interpret):
    """``sample`` with top-p goes through the kernel under the interpreter: its draws lie in the
    kept set, and from one seed they are the draws of the sort's filter."""
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(4))
    assert top_p_unsupported_reason(x) is None
    allowed = kept(top_p_reference(x / 0.7, 0.8))
    a = sample(x, temperature=0.7, top_p=0.8, generator=torch.Generator().manual_seed(1))
    ref_probs = top_p_reference(x / 0.7, 0.8).softmax(-1)
    q = torch.empty_like(ref_probs).exponential_(generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, (ref_probs / q).argmax(-1))
    assert allowed.gather(-1, a[:, None]).all()
