"""The whole decode step in one kernel (``decode_attention_step``): cache write, RoPE, attention.

Runs the kernel under the Triton interpreter on a CPU (the CUDA cases need a GPU), against
``decode_attention_step_reference``; the reference itself is checked against the unfused
sequence the model runs (rotate, write, attend over ``positions + 1``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import needs_interpreter
from qkvlab.attention.positional import Rotary
from qkvlab.kernels import DecodeConfig, decode_attention_reference, kv_decode
from qkvlab.kernels.kv_decode import HAS_TRITON, decode_attention_step, decode_attention_step_reference

needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and a CUDA GPU")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_step(B, Hq, Hkv, S, D, *, shared, dtype=torch.float32, ragged=True, norm=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k_cache = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v_cache = None if shared else torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    k_new = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    v_new = None if shared else torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    # first slot, last slot, the middle of a split, a split boundary
    pos = torch.tensor([0, S - 1, S // 2 + 3, 64][:B]) if ragged else torch.tensor(S - 5)
    rot = Rotary(D, S + 3)
    kw = {}
    if norm:
        kw["k_norm_weight"] = (torch.rand(D, generator=g) + 0.5).to(dtype)
    moved = [t.to(device) if t is not None else None for t in (q, k_new, v_new, k_cache, v_cache, pos)]
    return moved, (rot.cos.to(device), rot.sin.to(device)), {n: t.to(device) for n, t in kw.items()}


def clone(t):
    return None if t is None else t.clone()


def run_both(tensors, table, kw, *, shared, rope_q, rope_new, derive, config=None):
    """The kernel and the reference on copies of the same caches: (out, caches) of each."""
    q, k_new, v_new, k_cache, v_cache, pos = tensors
    extra = dict(rope_cos=table[0], rope_sin=table[1]) if derive else {}
    common = dict(scale=q.shape[-1] ** -0.5, rope_table=table, rope_q=rope_q, rope_new=rope_new, **extra, **kw)
    kc, vc = clone(k_cache), clone(v_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        out = decode_attention_step(q, k_new, v_new, kc, vc, pos, config=config, **common)
    kr, vr = clone(k_cache), clone(v_cache)
    ref = decode_attention_step_reference(q, k_new, v_new, kr, vr, pos, **common)
    return (out, kc, vc), (ref, kr, vr)


def check(got, want, tol):
    out, kc, vc = got
    ref, kr, vr = want
    assert out.shape == ref.shape
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < tol, err
    torch.testing.assert_close(kc, kr, rtol=tol, atol=tol)  # the new entries (rotated: one rounding apart)
    if vc is not None:
        torch.testing.assert_close(vc, vr, rtol=0, atol=0)


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 1, 3, 7])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(
    "shared,rope_q,rope_new,derive",
    [(True, True, False, True), (True, False, False, False), (False, True, True, False), (False, False, False, False)],
    ids=["k=v+rope", "k=v", "k,v+rope", "k,v"],
)
def test_step_kernel_matches_reference(shared, rope_q, rope_new, derive, heads, splits):
    """Every split count puts the new slot in some split: first slot, last, mid-split, boundary."""
    Hq, Hkv = heads
    tensors, table, kw = make_step(4, Hq, Hkv, 200, 32, shared=shared)
    cfg = DecodeConfig(num_splits=splits, block_n=16) if splits else None
    got, want = run_both(tensors, table, kw, shared=shared, rope_q=rope_q, rope_new=rope_new, derive=derive, config=cfg)
    check(got, want, 2e-5)


@needs_interpreter
def test_step_one_position_for_all_rows_and_a_normed_shared_cache():
    tensors, table, kw = make_step(3, 4, 2, 96, 32, shared=True, ragged=False, norm=True)
    got, want = run_both(tensors, table, kw, shared=True, rope_q=True, rope_new=False, derive=True)
    check(got, want, 2e-5)
    assert tensors[5].dim() == 0


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_half_precision(dtype):
    tensors, table, kw = make_step(4, 8, 2, 160, 64, shared=False, dtype=dtype)
    got, want = run_both(tensors, table, kw, shared=False, rope_q=True, rope_new=True, derive=False)
    check(got, want, 1.5e-2)


def test_reference_is_the_unfused_sequence():
    """Rotate the query and key at the position, write the cache, attend over position + 1."""
    (q, k_new, v_new, k_cache, v_cache, pos), (cos, sin), _ = make_step(4, 4, 2, 200, 32, shared=False)
    rot = Rotary(32, 203)
    kr, vr = k_cache.clone(), v_cache.clone()
    out = decode_attention_step_reference(
        q, k_new, v_new, kr, vr, pos, scale=32**-0.5, rope_table=(cos, sin), rope_q=True, rope_new=True
    )
    k2, v2 = k_cache.clone(), v_cache.clone()
    for b in range(4):
        p = int(pos[b])
        k2[b, :, p] = rot(k_new[b : b + 1], torch.tensor(p))[0, :, 0]
        v2[b, :, p] = v_new[b, :, 0]
    qr = torch.cat([rot(q[b : b + 1], torch.tensor(int(pos[b]))) for b in range(4)])
    want = decode_attention_reference(qr, k2, v2, (pos + 1).to(torch.int32), scale=32**-0.5)
    torch.testing.assert_close(kr, k2, rtol=0, atol=1e-6)  # float32 rotations, ops in another order
    torch.testing.assert_close(vr, v2, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_bad_step_arguments_raise():
    (q, k_new, v_new, k_cache, v_cache, pos), table, _ = make_step(2, 4, 2, 64, 32, shared=False)
    step = dict(scale=0.1, rope_table=table)
    with pytest.raises(ValueError, match="v_new"):
        decode_attention_step_reference(q, k_new, None, k_cache, v_cache, pos, **step)
    with pytest.raises(ValueError, match="k_new must be"):
        decode_attention_step_reference(q, k_new[:, :1], v_new, k_cache, v_cache, pos, **step)
    with pytest.raises(ValueError, match="positions"):
        decode_attention_step_reference(q, k_new, v_new, k_cache, v_cache, pos.float(), **step)
    with pytest.raises(ValueError, match="rope_table"):
        decode_attention_step_reference(q, k_new, v_new, k_cache, v_cache, pos, scale=0.1, rope_q=True)
    with pytest.raises(ValueError, match="shared K=V"):
        decode_attention_step_reference(q, k_new, v_new, k_cache, None, pos, **step)
    short = (table[0][:10], table[1][:10])  # fewer positions than the cache
    with pytest.raises(ValueError, match="rope_table must be"):
        decode_attention_step_reference(q, k_new, v_new, k_cache, v_cache, pos, scale=0.1, rope_table=short)


def test_what_the_kernel_cannot_run_falls_back_to_the_reference_with_a_warning(monkeypatch):
    """On a CPU without the interpreter: one warning naming why, and the reference's result."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (q, k_new, v_new, k_cache, v_cache, pos), table, _ = make_step(2, 4, 2, 64, 32, shared=False)
    step = dict(scale=0.1, rope_table=table, rope_q=True, rope_new=True)
    kc, vc = k_cache.clone(), v_cache.clone()
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        out = decode_attention_step(q, k_new, v_new, kc, vc, pos, **step)
    kr, vr = k_cache.clone(), v_cache.clone()
    torch.testing.assert_close(out, decode_attention_step_reference(q, k_new, v_new, kr, vr, pos, **step))
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False], ids=["k=v", "k,v"])
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_cuda_step_kernel_matches_reference(shared, dtype, splits, monkeypatch):
    """The compiled kernel: new slots at the first, last, mid-split and boundary positions."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tensors, table, kw = make_step(4, 32, 8, 300, 64, shared=shared, dtype=dtype, device="cuda", norm=shared)
    cfg = DecodeConfig(num_splits=splits) if splits else None
    got, want = run_both(tensors, table, kw, shared=shared, rope_q=True, rope_new=not shared, derive=shared, config=cfg)
    check(got, want, 2e-4 if dtype == torch.float32 else 1.5e-2)


@needs_interpreter
def test_query_tables_other_than_the_key_roles_run_the_reference():
    """The kernel reads one pair of RoPE tables: a query rotated with other tables than a shared
    cache's key role falls back (with a warning) rather than rotate with the wrong ones."""
    (q, k_new, _, k_cache, _, pos), table, _ = make_step(2, 4, 2, 64, 32, shared=True)
    other = Rotary(32, 67, theta=500.0)
    step = dict(scale=0.1, rope_table=(other.cos, other.sin), rope_q=True, rope_cos=table[0], rope_sin=table[1])
    kc = k_cache.clone()
    with pytest.warns(RuntimeWarning, match="not the key role's"):
        out = decode_attention_step(q, k_new, None, kc, None, pos, **step)
    kr = k_cache.clone()
    torch.testing.assert_close(out, decode_attention_step_reference(q, k_new, None, kr, None, pos, **step))
    same = dict(step, rope_table=table)  # the same tables: the kernel, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_attention_step(q, k_new, None, k_cache.clone(), None, pos, **same)


def test_dependent_launch_follows_the_device_and_the_environment(monkeypatch):
    """Kernels launch as programmatic dependents on a supporting GPU unless QKVLAB_PDL=0."""
    assert not kv_decode.use_pdl(torch.device("cpu"))
    monkeypatch.setattr(kv_decode, "_pdl_supported", lambda index: True)
    monkeypatch.setattr(kv_decode, "_interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    assert kv_decode.use_pdl(cuda)
    for off in ("0", "off", "false"):
        monkeypatch.setenv("QKVLAB_PDL", off)
        assert not kv_decode.use_pdl(cuda)
    monkeypatch.setenv("QKVLAB_PDL", "1")
    assert kv_decode.use_pdl(cuda)
    monkeypatch.setattr(kv_decode, "_interpreting", lambda: True)  # the interpreter has no launch options
    assert not kv_decode.use_pdl(cuda)
