"""The GPU benchmark scripts' CPU smoke modes: they still run, check and report (no timing is asserted).

The full runs need a CUDA GPU (``benchmarks/results/`` holds their output); these keep the scripts
from rotting between those runs: every correctness check a script makes before timing runs here
on tiny shapes, a failed check exits non-zero, and the results are read from the JSON each
script writes to ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_interpreter

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """``benchmarks/name`` run with ``args`` on this checkout's sources, whatever it exits with."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    env.pop("OUT", None)  # nothing lands in a device machine's output folder
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def run_script(name: str, *args: str, interpret: bool = False) -> str:
    proc = script(name, "--smoke", *args, interpret=interpret)
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_gpu_generate_smoke_budget_batches(tmp_path):
    """Graph-step checks pass, and a budget holds twice the K=V rows (a K=V cache is half the bytes)."""
    run_script("gpu_generate.py", "--budget-decode", "--out", str(tmp_path / "gpu_generate.json"))
    doc = json.loads((tmp_path / "gpu_generate.json").read_text())
    decode = {variant: b["decode"] for variant, b in doc["budget"].items()}
    assert set(decode) == {"QKV", "Q-K=V", "GQA-8", "Q-GQA-8"}, doc["budget"]
    assert all(r["static_tokens_per_s"] > 0 and r["graph_rel_err"] < 1e-4 for r in decode.values()), decode
    batch = {variant: r["B"] for variant, r in decode.items()}
    assert batch["Q-K=V"] >= 2 * batch["QKV"], batch
    assert batch["Q-GQA-8"] >= 2 * batch["GQA-8"], batch
    assert {(r["variant"], r["B"], r["context"]) for r in doc["rows"]} == {
        (v, b, s) for v in decode for b, s in ((1, 64), (2, 96))
    }, doc["rows"]


def test_profile_generate_smoke_reports_kinds_bandwidth_and_prefill(tmp_path):
    """The step profile splits time by kind with the bandwidth the matrix products achieve on the
    weights, and profiles a prefill per variant (fused, as the benchmark's rows run)."""
    run_script("profile_generate.py", "--fuse", "--hf", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "profile_generate_graph_fused.json").read_text())
    steps = {(r["system"], r["variant"]): r for r in doc["records"] if r["what"] == "decode step"}
    prefills = {r["variant"]: r for r in doc["records"] if r["what"] == "prefill"}
    # HF's step beside qkvlab's where transformers has the variant (Llama: QKV)
    assert set(steps) == {("qkvlab", "QKV"), ("qkvlab", "Q-K=V"), ("hf-llama", "QKV")}, doc["records"]
    assert set(prefills) == {"QKV", "Q-K=V"}, doc["records"]
    for r in steps.values():
        mm, att = r["kinds"]["matrix products"], r["kinds"]["attention"]  # SDPA on the CPU for both
        assert r["step_us"] > 0 and mm["us"] > 0 and mm["gbps"] == pytest.approx(mm["bytes"] / mm["us"] / 1e3)
        tensors = {"QKV": 2, "Q-K=V": 1}[r["variant"]]  # K and V, or the one shared K=V tensor
        assert att["bytes"] == r["B"] * r["context"] * tensors * 2 * 64 * 2  # 2 layers x 64 wide x bf16
        assert r["roofline_us"] > 0
    assert steps["qkvlab", "QKV"]["mode"] == "graph, fused" and steps["hf-llama", "QKV"]["mode"] == "eager"
    for v in ("QKV", "Q-K=V"):  # the lead-in of qkvlab's step: no graph on the CPU, so no replay
        lead = steps["qkvlab", v]["lead_in"]
        assert lead["waited_step_us"] > 0 and lead["waited_replay_us"] is None, lead
        assert set(lead["host_us"]) == {"step", "token_copy", "position_fill"} and min(lead["host_us"].values()) > 0
    assert (
        steps["qkvlab", "QKV"]["kinds"]["matrix products"]["bytes"]
        == steps["hf-llama", "QKV"]["kinds"]["matrix products"]["bytes"]
    )
    assert all(p["wall_us"] > 0 and p["fused"] and p["top"] for p in prefills.values())
    assert (tmp_path / "profile_generate_graph_fused.txt").read_text().count("prefill ") == 2


@needs_interpreter
def test_gpu_decode_smoke_checks_every_method(tmp_path):
    """Each method of the decode benchmark is checked against the fp32 reference before timing;
    the checks are read from the JSON the benchmark writes."""
    run_script("gpu_decode.py", "--out", str(tmp_path / "gpu_decode.json"), interpret=True)
    doc = json.loads((tmp_path / "gpu_decode.json").read_text())
    assert len(doc["points"]) == 2 and not any("failed" in p for p in doc["points"]), doc["points"]
    for point in doc["points"]:
        errors = {name: m["rel_err"] for name, m in point["methods"].items() if "rel_err" in m}
        assert len(errors) >= 5 and max(errors.values()) < 1e-2, errors


@needs_interpreter
def test_gpu_decode_sweeps_the_configs_it_is_given(tmp_path):
    """--sweep-configs times the given launch configs against the default, each checked first."""
    out = tmp_path / "gpu_decode.json"
    configs = '[{"block_n": 16, "num_stages": 2}]'
    run_script("gpu_decode.py", "--sweep", "--no-main", "--sweep-configs", configs, "--out", str(out), interpret=True)
    sweep = json.loads(out.read_text())["sweep"]
    rows = [r for r in sweep if r["which"] == "rope_kv" and "num_splits" not in r["config"]]
    assert {json.dumps(r["config"], sort_keys=True) for r in rows} == {"{}", '{"block_n": 16, "num_stages": 2}'}
    assert all(r["rel_err"] < 1e-2 for r in rows), rows
    splits = [r for r in sweep if r["which"] == "rope_kv" and "num_splits" in r["config"]]
    assert splits and all(r["rel_err"] < 1e-2 for r in splits), splits  # the split phase ran, checked
    bad = script("gpu_decode.py", "--sweep-configs", '{"block_n": 16}')
    assert bad.returncode == 2 and "--sweep-configs" in bad.stderr and "not a list" in bad.stderr


def test_gpu_gemv_smoke_checks_every_launch_shape(tmp_path):
    """The GEMV benchmark's checks on the CPU (interpreter): the kernel's own launch shape and a sweep's."""
    pytest.importorskip("triton", reason="the kernel needs Triton (the dev extra)")
    out = run_script("gpu_gemv.py", "--out", str(tmp_path / "gemv.json"), interpret=True)
    rows = json.loads((tmp_path / "gemv.json").read_text())["rows"]
    assert len(rows) == 2, out
    for r in rows:
        assert len(r["max_abs_err"]) == 8 and max(r["max_abs_err"].values()) < 0.05, r  # bf16 outputs near 1


@needs_interpreter
def test_gpu_gemv_fold_smoke_checks_every_launch_shape(tmp_path):
    """The folded products' checks on the CPU (interpreter): each of the step's variants of the
    product (norm, residual, SwiGLU input, plain) at the kernel's own launch shape, that shape
    folded, and every shape of the smoke sweep, rows and columns past the weight's edge."""
    run_script("gpu_gemv_fold.py", "--out", str(tmp_path / "fold.json"), interpret=True)
    rows = json.loads((tmp_path / "fold.json").read_text())["rows"]
    assert [r["step_variant"] for r in rows] == ["norm", "residual", "glu", "plain"]
    for r in rows:
        errs = r["max_abs_err"]
        assert {"auto", "auto, fold 8"} <= set(errs) and len(errs) == 10 and max(errs.values()) < 0.05, r
    for bad_folds, msg in (("8,0", "'8,0' is not a comma list of positive integers"), ("1,6", "a power of two")):
        bad = script("gpu_gemv_fold.py", "--smoke", "--folds", bad_folds)
        assert bad.returncode == 2 and msg in bad.stderr, bad.stderr


@needs_interpreter
def test_gpu_gemv_fold_smoke_fails_when_the_product_is_wrong(monkeypatch):
    """A product that drops the residual makes the smoke run exit non-zero."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_gemv_fold as fold

    real = fold.gemv
    monkeypatch.setattr(fold, "gemv", lambda *a, residual=None, **kw: real(*a, **kw))
    assert fold.main(["--smoke"]) == 1


@needs_interpreter
def test_gpu_weight_prefetch_smoke_checks_the_stack_against_its_reference(tmp_path):
    """The layer stack the prefetch benchmark times computes what its float32 reference does."""
    run_script("gpu_weight_prefetch.py", "--out", str(tmp_path / "wp.json"), interpret=True)
    doc = json.loads((tmp_path / "wp.json").read_text())
    assert doc["rel_err_vs_reference"] < 0.05
    assert [r["mode"] for r in doc["rows"]] == ["none", "fork"] and all(r["max_abs_diff"] == 0 for r in doc["rows"])


def test_profile_stream_smoke_times_every_call(tmp_path):
    run_script("profile_stream.py", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "profile_stream.json").read_text())
    assert set(doc["rates"]) == {"stream+text", "stream", "generate", "steps"}
    assert all(math.isfinite(r["us_per_token"]) for r in doc["rates"].values())  # no timing claim on a CPU
    assert doc["split"]["gpu_events"] == 0  # a CPU run has no GPU timeline to split


def test_profile_stream_times_and_profiles_the_calls_asked_for(tmp_path):
    args = ("--calls", "steps", "--profile-call", "generate", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "5")
    run_script("profile_stream.py", "--out", str(tmp_path), *args)
    doc = json.loads((tmp_path / "profile_stream.json").read_text())
    assert set(doc["rates"]) == {"steps"} and doc["args"]["profile_call"] == "generate"
    assert (doc["args"]["temperature"], doc["args"]["top_p"], doc["args"]["top_k"]) == (0.8, 0.9, 5)
    bad = script("profile_stream.py", "--smoke", "--calls", "steps,decode")
    assert bad.returncode == 2 and "'decode' is not a call" in bad.stderr, bad.stderr[-2000:]


def test_profile_stream_splits_a_timeline_at_each_step(monkeypatch):
    """Synthetic trace: steps of a product then a sampling kernel, with an idle gap before the next
    step; the split finds the period, the busy time, what follows the last product and the gap."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import profile_stream

    events, ts = [], 0.0
    for _ in range(12):
        for name, dur, gap in (("emb_0", 2.0, 0.0), ("_gemv_kernel", 90.0, 0.0), ("argmax", 6.0, 2.0)):
            events.append(dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur))
            ts += dur + gap
    events.append(dict(ph="X", cat="cuda_runtime", name="cudaEventSynchronize", ts=0.0, dur=50.0))
    split = profile_stream.split_trace(events, "emb", n_tokens=12, skip=2)
    assert split["step_starts"] == 12 and split["tokens"] == 8
    assert split["period_us"] == 100.0 and split["busy_us"] == 98.0
    assert split["after_last_product"] == {"argmax": {"median_us": 6.0, "per_token": 1.0}}
    assert split["gaps_us_per_token"] == {"argmax -> emb_0": 2.0}
    assert split["host_calls_per_token"]["cudaEventSynchronize"]["per_token"] == 1 / 12


@needs_interpreter
def test_gpu_persistent_mlp_smoke_matches_the_two_kernels_exactly(tmp_path):
    """The persistent MLP (one program) gives the two GEMV kernels' output bit for bit, and its
    barrier leaves the arrival count at 0 with the generation moved on by one."""
    run_script("gpu_persistent_mlp.py", "--out", str(tmp_path / "pm.json"), interpret=True)
    doc = json.loads((tmp_path / "pm.json").read_text())
    assert doc["max_abs_err"] == 0 and doc["barrier"] == [0, 1]


@needs_interpreter
def test_gpu_persistent_mlp_smoke_fails_when_the_outputs_differ(monkeypatch):
    """A reference that is not what the kernel computes makes the smoke run exit non-zero."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_persistent_mlp as pm

    two = pm.mlp_two_kernels
    monkeypatch.setattr(pm, "mlp_two_kernels", lambda *a, **kw: two(*a, **kw) * 2)
    assert pm.main(["--smoke"]) == 1


@needs_interpreter
def test_gpu_weight_prefetch_stops_when_the_stack_is_not_its_reference(monkeypatch, capsys):
    """A stack that drops the attention's residual is caught before anything is timed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_weight_prefetch as wp
    from qkvlab.kernels import gemv as gemv_mod

    def no_residual(x, w, *a, residual=None, **kw):
        return gemv_mod.gemv(x, w, *a, **kw)

    monkeypatch.setattr(wp, "gemv", no_residual)
    assert wp.main(["--smoke"]) == 1
    assert "does not compute its reference" in capsys.readouterr().out


def test_gpu_generate_vs_hf_smoke_checks_both_sides(tmp_path):
    """qkvlab and transformers side by side: HF Llama holds the qkvlab weights and agrees (logits, greedy
    tokens, the decode step on the same cache); every variant has its qkvlab and its HF row."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    out = run_script("gpu_generate_vs_hf.py", "--generate", "1x24", "--out", str(tmp_path / "vs_hf.json"))
    doc = json.loads((tmp_path / "vs_hf.json").read_text())
    rows = doc["rows"]
    got = {(r["system"], r["variant"]) for r in rows}
    assert {("qkvlab", v) for v in ("QKV", "Q-K=V", "GQA-8", "Q-GQA-8")} <= got, out
    assert {("hf-llama", "QKV"), ("hf-llama", "GQA-8")} <= got, out
    gemma = {("hf-gemma4-kv", "Q-K=V"), ("hf-gemma4-kv", "Q-GQA-8")}
    assert gemma <= got or set(doc["skipped"]) == {"Q-K=V", "Q-GQA-8"}, out  # no Gemma 4: the reason is kept
    assert len(rows) == 2 * len(got) and max(r["check_rel_err"] for r in rows) < 1e-4, rows  # two points each
    hf_rows = [r for r in rows if r["system"] != "qkvlab"]  # each HF row checks its eager step apart
    assert all(r["check_compiled_vs_eager_rel_err"] < 1e-4 for r in hf_rows), hf_rows
    assert all(r["check_eager_rel_err"] < 1e-4 for r in hf_rows if r["system"] == "hf-llama"), hf_rows
    assert all(r["roofline_fraction"] > 0 and r["vs_hf_llama_qkv"] for r in rows), rows
    # steps also timed back to back: the same bytes over that step time
    for r in rows:
        assert r["tokens_per_s_in_a_row"] == pytest.approx(r["B"] / r["step_s_in_a_row"]), r
        assert r["roofline_fraction_in_a_row"] == pytest.approx(r["roofline_s"] / r["step_s_in_a_row"]), r
    assert "in a row" in out
    for variant, check in doc["checks"].items():
        if variant in ("QKV", "GQA-8"):  # HF Llama, same weights: logits and 16 greedy tokens agree
            assert check["forward_rel_err"] < 1e-4 and check["greedy_agreement"] == 1.0, doc["checks"]
        else:  # Gemma: its rows' check, on a float32 copy (uncompiled here: the harness only)
            assert check["ok"] and check["gemma_float32_compiled_vs_eager_rel_err"] < 1e-4, doc["checks"]
    for r in rows:
        if r["system"] == "hf-gemma4-kv":
            assert r["check_rel_err"] == doc["checks"][r["variant"]]["gemma_float32_compiled_vs_eager_rel_err"]
            assert r["check"].startswith("float32 copy"), r
    assert {(p["system"], p["variant"]) for p in doc["prefill"]} == got and doc["env"]["transformers"]
    # each system's whole generate(), timed by the difference of a short and a long call
    gens = {(g["system"], g["variant"]): g for g in doc["generate"]}
    assert set(gens) == got, doc["generate"]
    for g in gens.values():  # a token's time: the median over repetitions of (long - short) / extra tokens
        (n_short, n_long), each = g["new_tokens"], g["generate_s_each"]
        assert g["reps"] == len(each) == 2 and n_long > n_short, g
        assert g["token_s"] == pytest.approx(statistics.median((b - a) / (n_long - n_short) for a, b in each)), g
        if g["token_s"] > 0:  # tiny CPU calls can be noisier than the extra tokens: then no figure, said so
            assert g["tokens_per_s"] == pytest.approx(g["B"] / g["token_s"]), g
        else:
            assert g["error"].startswith("noise") and "tokens_per_s" not in g, g
    for v in ("QKV", "GQA-8"):  # the same weights, greedy: the same tokens
        assert gens["hf-llama", v]["greedy_agreement_with_qkvlab"] == 1.0, gens["hf-llama", v]
    base = gens["hf-llama", "QKV"]
    assert "tokens_per_s" not in base or base["vs_hf_llama_qkv"] == 1.0
    assert "generate qkvlab" in out


def test_gpu_generate_vs_hf_streams_the_whole_generate_calls(tmp_path):
    """--generate-stream: each system's generate hands every token to the host as it comes
    (qkvlab's stream with a tokenizer, HF's generate with a streamer), with the same greedy tokens."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    out = run_script(
        "gpu_generate_vs_hf.py",
        *("--variants", "QKV", "--points", "none", "--prefill", "none", "--generate", "1x24", "--generate-stream"),
        *("--out", str(tmp_path / "vs_hf.json")),
    )
    gens = {g["system"]: g for g in json.loads((tmp_path / "vs_hf.json").read_text())["generate"]}
    assert set(gens) == {"qkvlab", "hf-llama"} and all(g["stream"] for g in gens.values()), gens
    assert not any(g.get("error", "").startswith("failed") for g in gens.values()), gens
    assert gens["hf-llama"]["greedy_agreement_with_qkvlab"] == 1.0, gens
    assert "generate qkvlab        QKV      B=2   prompt 24     streamed" in out


def test_gpu_generate_vs_hf_samples_the_whole_generate_calls(tmp_path):
    """--generate-temperature: both systems' generate calls sample (qkvlab inside its step, HF with
    do_sample and its filters as asked); two generators' draws, so no token agreement is claimed."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    out = run_script(
        "gpu_generate_vs_hf.py",
        *("--variants", "QKV", "--points", "none", "--prefill", "none", "--generate", "1x24"),
        *("--generate-temperature", "0.8", "--generate-top-k", "20", "--generate-top-p", "0.9"),
        *("--out", str(tmp_path / "vs_hf.json")),
    )
    gens = {g["system"]: g for g in json.loads((tmp_path / "vs_hf.json").read_text())["generate"]}
    assert set(gens) == {"qkvlab", "hf-llama"}, gens
    assert all((g["temperature"], g["top_k"], g["top_p"]) == (0.8, 20, 0.9) for g in gens.values()), gens
    assert not any(g.get("error", "").startswith("failed") for g in gens.values()), gens
    assert "greedy_agreement_with_qkvlab" not in gens["hf-llama"], gens
    assert "generate qkvlab        QKV      B=2   prompt 24     sampled at T=0.8" in out


def test_gpu_generate_vs_hf_penalised_greedy_calls_agree(tmp_path):
    """--generate-repetition-penalty: both systems apply the same penalty (HF's processor, qkvlab's
    step), so greedy calls on the same weights still give the same tokens."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    run_script(
        "gpu_generate_vs_hf.py",
        *("--variants", "QKV", "--points", "none", "--prefill", "none", "--generate", "1x24"),
        *("--generate-repetition-penalty", "1.3", "--out", str(tmp_path / "vs_hf.json")),
    )
    gens = {g["system"]: g for g in json.loads((tmp_path / "vs_hf.json").read_text())["generate"]}
    assert all(g["repetition_penalty"] == 1.3 for g in gens.values()), gens
    assert gens["hf-llama"]["greedy_agreement_with_qkvlab"] == 1.0, gens


def test_the_hf_harness_agrees_with_qkvlab_at_a_long_filled_cache(monkeypatch):
    """The side-by-side decode check at the benchmark's context length: HF Llama's step over a
    StaticCache filled and positioned by the harness equals qkvlab's step over its own cache, to
    fp32 rounding, and within the script's bf16 tolerance in bf16 (both on the CPU, uncompiled)."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_generate import build, fill_cache
    from gpu_generate_vs_hf import TOL_BF16, HFDecoder, hf_llama, rel_err

    # The benchmark's attention width (32 heads of 64): rotary inverse frequencies rounded to
    # bf16 put HF's step 0.32 away at this position there, while a narrow model hid it.
    shape = dict(recipe="llama", n_layers=1, d_model=2048, n_heads=32, d_ff=256, vocab_size=500)
    S = 4096
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, TOL_BF16)):
        model = build("QKV", shape, S + 8, "cpu", dtype)
        token = torch.tensor([7, 11])
        cache = model.new_cache(2, S + 8)
        fill_cache(cache, S, torch.Generator().manual_seed(1))
        ref = model.decode_one(token, cache).float()
        dec = HFDecoder(hf_llama(model), 2, S + 8, None)
        dec.fill(S, torch.Generator().manual_seed(1))
        assert all(torch.equal(a.keys[:, :, :S], b.k[:, :, :S]) for a, b in zip(dec.layers, cache.layers, strict=True))
        got = dec.step(token)
        assert rel_err(got.float(), ref) < tol, dtype
        # without autograd, as qkvlab's step runs: HF timed with grad on would carry its overhead
        assert got.grad_fn is None and not got.requires_grad


def _tiny_gemma_harness(monkeypatch):
    """The side-by-side benchmark's module, a tiny HF Gemma 4 K=V model and uncompiled CPU args, for
    its float32 check (skips without transformers or without Gemma 4 in it)."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    import argparse
    import types

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_generate_vs_hf as vs_hf

    config = types.SimpleNamespace(
        vocab_size=256, d_model=64, d_ff=128, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, max_seq_len=128,
        rope_theta=10000.0,
    )  # fmt: skip
    holder = torch.nn.Linear(1, 1)
    holder.config = config
    hf, why = vs_hf.hf_gemma_kv(holder)
    if hf is None:
        pytest.skip(why)
    args = argparse.Namespace(hf_compile_mode=None, smoke=True)
    monkeypatch.setattr(vs_hf, "point_len", lambda S, args: S + 16)
    return vs_hf, hf, args


def test_the_gemma_float32_check_catches_a_harness_that_loses_its_position(monkeypatch):
    """The Gemma rows' check (compiled against uncompiled steps of a float32 copy) passes on the
    harness as it is and fails by far when the harness does not put the cache back at S before the
    second step: the failure it is there to catch (uncompiled on both sides here, on the CPU)."""
    import torch

    vs_hf, hf, args = _tiny_gemma_harness(monkeypatch)
    good = vs_hf.gemma_float32_check(hf, 2, 40, args, torch.device("cpu"), 3, 256, vs_hf.GEMMA_TOL)
    assert good["ok"] and good["gemma_float32_compiled_vs_eager_rel_err"] < 1e-5, good
    seek, calls = vs_hf.HFDecoder.seek, []

    def seek_once(self, S):  # the fill's seek happens; the one before the second step is lost
        calls.append(S)
        if len(calls) == 1:
            seek(self, S)

    monkeypatch.setattr(vs_hf.HFDecoder, "seek", seek_once)  # so the second step lands at S + 1
    bad = vs_hf.gemma_float32_check(hf, 2, 40, args, torch.device("cpu"), 3, 256, vs_hf.GEMMA_TOL)
    assert calls == [40, 40] and not bad["ok"], bad
    assert bad["gemma_float32_compiled_vs_eager_rel_err"] > 10 * vs_hf.GEMMA_TOL, bad


def test_the_gemma_float32_check_falls_back_to_one_row_when_the_batch_does_not_fit(monkeypatch):
    """A float32 cache of the whole batch out of memory (as B=16 at 32k is beside the models): the
    check runs on one row at the same context and says so; where nothing fits it fails, naming why."""
    import torch

    vs_hf, hf, args = _tiny_gemma_harness(monkeypatch)
    real, tried = vs_hf.hf_compiled_vs_eager, []

    def fits_rows(limit):
        def run(hf, rows, *a, **k):
            tried.append(rows)
            if rows > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(hf, rows, *a, **k)

        return run

    monkeypatch.setattr(vs_hf, "hf_compiled_vs_eager", fits_rows(1))
    got = vs_hf.gemma_float32_check(hf, 4, 40, args, torch.device("cpu"), 3, 256, vs_hf.GEMMA_TOL)
    assert tried == [4, 1] and got["ok"] and got["at"] == "B=1 S=40" and "error" not in got, got
    assert got["gemma_float32_compiled_vs_eager_rel_err"] < 1e-5
    tried.clear()
    monkeypatch.setattr(vs_hf, "hf_compiled_vs_eager", fits_rows(0))
    got = vs_hf.gemma_float32_check(hf, 4, 40, args, torch.device("cpu"), 3, 256, vs_hf.GEMMA_TOL)
    assert tried == [4, 1] and not got["ok"] and got["error"] == "out of memory at B=1 S=40", got


def test_compile_decode_reports_the_kernel_a_launch_compiles(tmp_path, monkeypatch):
    """The offline compile of the split kernel (no GPU): the launch's constants, a register count
    from the cubin, the residency the launch heuristic would compute from it, and a tile loop with
    its tensor-core products and barriers; a wider tile needs more registers and shared memory."""
    from qkvlab.kernels import kv_decode

    if not kv_decode.HAS_TRITON:
        pytest.skip("Triton is not installed")
    import os

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this Triton has no bundled cuobjdump")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import compile_decode

    out = tmp_path / "compile.json"
    assert (
        compile_decode.main(
            ["--head-dim", "64", "--groups", "4", "--configs", '[{}, {"block_n": 64}]', "--out", str(out)]
        )
        == 0
    )
    wide, narrow = json.loads(out.read_text())["rows"]
    assert (wide["block_n"], narrow["block_n"]) == (128, 64)  # the launch's own choice at D=64 with RoPE: 128
    for row in (wide, narrow):
        assert row["registers"] > 0 and row["spill_bytes"] == 0
        assert row["programs_per_sm"] == kv_decode.resident_programs(
            row["registers"], row["shared_bytes"], row["num_warps"]
        )
        assert row["loop"]["mma"] > 0 and row["loop"]["bar"] > 0 and row["loop"]["cp.async"] > 0, row
        seq = row["loop_sequence"].split()  # in order, runs merged: as many barriers as counted
        assert "DEPBAR" in seq
        assert (
            sum(int(op.split("x")[1]) if "x" in op else 1 for op in seq if op.split("x")[0] == "BAR")
            == row["loop"]["bar"]
        )
    assert wide["registers"] > narrow["registers"] and wide["shared_bytes"] > narrow["shared_bytes"]
    assert wide["loop"]["mma"] == 2 * narrow["loop"]["mma"]  # twice the keys a tile: twice the products


def test_benchmark_json_names_the_source_commit(monkeypatch):
    """Every benchmark's environment record names the commit of the qkvlab it imports:
    QKVLAB_GIT_COMMIT where set (also over git, which on a copied tree can name another
    commit), else git in a checkout, else None."""
    import subprocess as sp

    from qkvlab import provenance

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchutil

    monkeypatch.delenv("QKVLAB_GIT_COMMIT", raising=False)
    head = sp.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert benchutil.source_commit().split("+")[0] == head.stdout.strip()
    monkeypatch.setenv("QKVLAB_GIT_COMMIT", "0123abc")
    assert benchutil.source_commit() == "0123abc"

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert benchutil.source_commit() == "0123abc"
    monkeypatch.delenv("QKVLAB_GIT_COMMIT")
    assert benchutil.source_commit() is None


def test_ab_pairs_sign_test_and_summary(monkeypatch):
    """The pairs' statistics: the exact sign test's known values, and a summary that pairs each
    row's before and after by pair and counts the wins."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_pairs

    assert ab_pairs.sign_test_p(3, 3) == 0.25
    assert ab_pairs.sign_test_p(6, 6) == 2 / 64
    assert ab_pairs.sign_test_p(0, 6) == 2 / 64
    assert ab_pairs.sign_test_p(4, 5) == 2 * (1 + 5) / 32
    assert ab_pairs.sign_test_p(2, 4) == 1.0

    def run(pair, side, tps):
        return {
            "pair": pair,
            "side": side,
            "rows": [dict(system="qkvlab", variant="Q-K=V", B=1, context=8, tokens_per_s=tps)],
        }

    runs = [run(0, "before", 100.0), run(0, "after", 110.0), run(1, "after", 99.0), run(1, "before", 90.0)]
    (s,) = ab_pairs.summarise(runs)
    assert s["before_tokens_per_s"] == [100.0, 90.0] and s["after_tokens_per_s"] == [110.0, 99.0]
    assert s["after_wins"] == 2 and abs(s["geomean_ratio"] - 1.1) < 1e-12


def test_ab_pairs_pairs_whole_generate_rows_apart_from_decode_rows(monkeypatch):
    """A run's generate rows are paired as rows of their own (the prompt as the context); rows
    without a tokens/s (a failed system, a noisy difference) are left out, not paired as zero."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_pairs

    doc = {
        "rows": [dict(system="qkvlab", variant="QKV", B=1, context=64, tokens_per_s=50.0)],
        "generate": [
            dict(system="qkvlab", variant="QKV", B=1, prompt=64, tokens_per_s=40.0),
            dict(system="hf-llama", variant="QKV", B=1, prompt=64, error="failed: boom"),
        ],
    }
    rows = ab_pairs.timed_rows(doc)
    assert [ab_pairs.row_key(r) for r in rows] == [("qkvlab", "QKV", 1, 64), ("generate qkvlab", "QKV", 1, 64)]
    runs = [{"pair": 0, "side": side, "rows": rows} for side in ("before", "after")]
    assert [s["system"] for s in ab_pairs.summarise(runs)] == ["generate qkvlab", "qkvlab"]


def test_ab_pairs_pairs_steps_back_to_back_as_rows_of_their_own(monkeypatch, tmp_path):
    """A step row's back-to-back rate is paired under "<system> in a row", beside its waited rate,
    and --summary-of prints an earlier JSON's table with this summary, running nothing."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_pairs

    def run(pair, side, waited, in_a_row):
        row = dict(system="qkvlab", variant="QKV", B=1, context=64, tokens_per_s=waited)
        return {"pair": pair, "side": side, "rows": [dict(row, tokens_per_s_in_a_row=in_a_row)]}

    runs = [run(0, "before", 100.0, 110.0), run(0, "after", 99.0, 111.1), run(1, "after", 101.0, 111.1)]
    runs.append(run(1, "before", 100.0, 110.0))
    summary = {s["system"]: s for s in ab_pairs.summarise(runs)}
    assert summary["qkvlab"]["ratios"] == [0.99, 1.01] and summary["qkvlab"]["after_wins"] == 1
    assert summary["qkvlab in a row"]["ratios"] == pytest.approx([1.01, 1.01])
    assert summary["qkvlab in a row"]["after_wins"] == 2
    (tmp_path / "ab.json").write_text(json.dumps({"runs": runs}))
    proc = script("ab_pairs.py", "--summary-of", str(tmp_path / "ab.json"))
    assert proc.returncode == 0 and "qkvlab in a row QKV B=1 S=64" in proc.stdout, proc.stderr
    (tmp_path / "other.json").write_text("[1, 2]")
    proc = script("ab_pairs.py", "--summary-of", str(tmp_path / "other.json"))
    assert proc.returncode == 2 and "not a JSON this script wrote" in proc.stderr and "Traceback" not in proc.stderr


@needs_interpreter
def test_ab_pairs_smoke_runs_both_trees_in_alternating_order(tmp_path):
    """One pair on the CPU against a copy of this src: both sides ran, every row is paired."""
    import shutil

    before = tmp_path / "src_before"
    shutil.copytree(ROOT / "src" / "qkvlab", before / "qkvlab", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "ab.json"
    run_script(
        "ab_pairs.py", "--before-src", str(before), "--pairs", "2", "--out", str(out), "--",
        "--variants", "Q-K=V", "--systems", "qkvlab", "--prefill", "none", "--no-gemma", "--generate", "1x32",
        interpret=True,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert [(r["pair"], r["side"]) for r in doc["runs"]] == [(0, "before"), (0, "after"), (1, "after"), (1, "before")]
    assert doc["summary"] and all(s["pairs"] == 2 and len(s["ratios"]) == 2 for s in doc["summary"])
    assert {s["system"] for s in doc["summary"]} == {"qkvlab", "qkvlab in a row", "generate qkvlab"}
    assert doc["before_sha256"] == doc["after_sha256"]  # the same code on both sides


def test_ab_pairs_tree_digest_tells_trees_apart(tmp_path):
    import ab_pairs

    for name in ("a", "b"):
        (tmp_path / name / "qkvlab" / "kernels").mkdir(parents=True)
        (tmp_path / name / "qkvlab" / "__init__.py").write_text("")
        (tmp_path / name / "qkvlab" / "kernels" / "gemv.py").write_text("x = 1\n")
    assert ab_pairs.tree_digest(tmp_path / "a") == ab_pairs.tree_digest(tmp_path / "b")
    (tmp_path / "b" / "qkvlab" / "kernels" / "gemv.py").write_text("x = 2\n")
    assert ab_pairs.tree_digest(tmp_path / "a") != ab_pairs.tree_digest(tmp_path / "b")
    (tmp_path / "b" / "qkvlab" / "kernels" / "gemv.py").write_text("x = 1\n")
    (tmp_path / "b" / "qkvlab" / "kernels" / "notes.txt").write_text("not code")  # only .py files count
    assert ab_pairs.tree_digest(tmp_path / "a") == ab_pairs.tree_digest(tmp_path / "b")


def test_ab_pairs_names_a_tree_without_qkvlab(tmp_path):
    proc = script("ab_pairs.py", "--before-src", str(tmp_path), "--smoke")
    assert proc.returncode == 2 and "no qkvlab package there" in proc.stderr and "Traceback" not in proc.stderr


def test_ab_pairs_keeps_the_runs_before_a_failure(tmp_path):
    """A side that fails (here: an 'after' tree whose package cannot import) stops the pairs with
    one line, and the JSON already holds the runs before it and says where it stopped."""
    import shutil

    before = tmp_path / "src_before"
    shutil.copytree(ROOT / "src" / "qkvlab", before / "qkvlab", ignore=shutil.ignore_patterns("__pycache__"))
    after = tmp_path / "src_after"
    (after / "qkvlab").mkdir(parents=True)
    (after / "qkvlab" / "__init__.py").write_text("raise ImportError('a broken tree')\n")
    out = tmp_path / "ab.json"
    proc = script(
        "ab_pairs.py", "--before-src", str(before), "--after-src", str(after), "--pairs", "2", "--smoke",
        "--out", str(out), "--", "--variants", "Q-K=V", "--systems", "qkvlab", "--prefill", "none", "--no-gemma",
    )  # fmt: skip
    assert proc.returncode == 1 and "pair 0 after: gpu_generate_vs_hf.py failed (exit 1); stopping" in proc.stdout
    doc = json.loads(out.read_text())
    assert [(r["pair"], r["side"]) for r in doc["runs"]] == [(0, "before")]
    assert doc["stopped"] == {"pair": 0, "side": "after", "why": "exit 1"}


def test_ab_pairs_sides_can_differ_by_their_environment_alone(tmp_path):
    """--after-env reaches the 'after' runs only (here a PYTHONHOME that stops the interpreter, so
    the 'before' run passes and the 'after' one fails), both sides run this src without
    --before-src, and the JSON records each side's variables; mistakes are one line each."""
    out = tmp_path / "ab.json"
    proc = script(
        "ab_pairs.py", "--after-env", f"PYTHONHOME={tmp_path / 'nowhere'}", "--pairs", "1", "--smoke",
        "--out", str(out), "--", "--variants", "Q-K=V", "--systems", "qkvlab", "--prefill", "none", "--no-gemma",
    )  # fmt: skip
    assert proc.returncode == 1 and "pair 0 after: gpu_generate_vs_hf.py failed" in proc.stdout, proc.stdout
    doc = json.loads(out.read_text())
    assert [(r["pair"], r["side"]) for r in doc["runs"]] == [(0, "before")]
    assert doc["before_env"] == {} and doc["after_env"] == {"PYTHONHOME": str(tmp_path / "nowhere")}
    assert doc["before_src"] == doc["after_src"]
    for argv, says in (
        (["--after-env", "QKVLAB_PDL"], "--after-env 'QKVLAB_PDL': give NAME=VALUE"),
        (["--before-env", "=1"], "--before-env '=1': give NAME=VALUE"),
        (["--before-env", "A=1", "--after-env", "A=1"], "--before-src is required"),
    ):
        bad = script("ab_pairs.py", *argv, "--smoke")
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_ab_pairs_names_a_run_over_its_time_limit(tmp_path):
    out = tmp_path / "ab.json"
    proc = script(
        "ab_pairs.py", "--before-src", str(ROOT / "src"), "--pairs", "1", "--timeout", "1", "--smoke",
        "--out", str(out), "--", "--variants", "Q-K=V", "--systems", "qkvlab",
    )  # fmt: skip
    assert proc.returncode == 1 and "failed (over its 1 s limit); stopping" in proc.stdout
    assert "Traceback (most recent call last)" not in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["runs"] == [] and doc["stopped"]["why"] == "over its 1 s limit"


class _FakeNVML:
    """A stand-in for ``pynvml``: each sample reads the next of ``readings`` (SM MHz, memory MHz,
    temperature, power in mW, reason bits), ``None`` for a sample whose query fails."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVMLError = type("NVMLError", (Exception,), {})
    nvmlClocksEventReasonNone, nvmlClocksEventReasonAll = 0, 0xF
    nvmlClocksEventReasonGpuIdle, nvmlClocksEventReasonSwPowerCap, nvmlClocksEventReasonHwSlowdown = 1, 4, 8
    nvmlClocksEventReasonApplicationsClocksSetting = nvmlClocksEventReasonUserDefinedClocks = 2

    def __init__(self, readings):
        self.readings, self.now = list(readings), None

    def nvmlDeviceGetClockInfo(self, handle, kind):
        if kind == self.NVML_CLOCK_SM:  # the first query of a sample takes the next reading
            self.now = self.readings.pop(0) if self.readings else self.now
        if self.now is None:
            raise self.NVMLError("not supported")
        return self.now[0] if kind == self.NVML_CLOCK_SM else self.now[1]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self.now[2]

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.now[3]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self.now[4]


def test_gpu_watch_reports_the_clocks_and_the_reasons_the_card_held_them_down(monkeypatch, capsys):
    """A sample as the measurement starts (here idle) and one as it ends (here at its power cap);
    a sample whose query fails is dropped; reasons are named from NVML's own constants, and the
    side-by-side benchmark's row line names the clocks and any reason but idleness."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch

    import benchutil

    fake = _FakeNVML([(345, 2619, 31, 70_000, 1), None, (1755, 2619, 62, 699_500, 4)])
    monkeypatch.setattr(benchutil, "_nvml_handle", lambda device: (fake, "handle"))
    with benchutil.GpuWatch(torch.device("cuda"), interval=60) as watch:  # no sample between the ends
        watch._sample()  # the failing query
    assert watch.summary() == dict(
        samples=2,
        sm_clock_MHz=dict(min=345, median=1050, max=1755),
        mem_clock_MHz=dict(min=2619, median=2619, max=2619),
        temperature_C_max=62,
        power_W_max=699.5,
        clock_event_reasons=["GpuIdle", "SwPowerCap"],
    )
    # one bit, one name: the first of two that share a bit, neither None nor All
    names = {1: "GpuIdle", 2: "ApplicationsClocksSetting", 4: "SwPowerCap", 8: "HwSlowdown"}
    assert benchutil._reason_names(fake) == names
    from gpu_generate_vs_hf import print_row

    row = dict(system="qkvlab", variant="Q-GQA-8", B=1, context=32768, tokens_per_s=800.0, vs_hf_llama_qkv=None)
    row.update(roofline_fraction=0.7, check_rel_err=0.03, first_step_s=3.0, gpu_state=watch.summary())
    print_row(row)
    assert capsys.readouterr().out.rstrip().endswith("SM 345-1755 MHz (SwPowerCap)")


def test_gpu_watch_samples_while_the_work_runs_and_is_off_without_cuda(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import time

    import torch

    import benchutil

    with benchutil.GpuWatch(torch.device("cpu")) as watch:  # no CUDA: no thread, no NVML
        pass
    assert watch.summary() is None and watch._thread is None
    fake = _FakeNVML([(1980, 2619, 40, 300_000, 0)] * 1000)
    monkeypatch.setattr(benchutil, "_nvml_handle", lambda device: (fake, "handle"))
    with benchutil.GpuWatch(torch.device("cuda"), interval=0.005) as watch:
        time.sleep(0.2)
    assert watch.summary()["samples"] >= 4 and not watch._thread.is_alive()
    assert watch.summary()["clock_event_reasons"] == []


def test_gpu_watch_finds_the_card_by_uuid_else_pci_bus_id(monkeypatch):
    """Never by index: NVML's order need not be CUDA's. No NVML, or a card it cannot find: no watch."""
    import types

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchutil

    class NVMLError(Exception):
        pass

    known = {"GPU-1234-abcd": "by uuid", "00000000:1B:00.0": "by bus"}

    def find(key):
        if key not in known:
            raise NVMLError(key)
        return known[key]

    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByUUID=find, nvmlDeviceGetHandleByPciBusId=find
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    props = types.SimpleNamespace(uuid="1234-abcd", pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    assert benchutil._nvml_handle(cuda) == (nvml, "by uuid")
    props.uuid = "5678"  # a UUID NVML does not know: the bus id
    assert benchutil._nvml_handle(cuda) == (nvml, "by bus")
    props.pci_bus_id = 0x2C
    assert benchutil._nvml_handle(cuda) is None
    assert benchutil._nvml_handle(torch.device("cpu")) is None

    def no_driver():
        raise NVMLError("driver not loaded")

    nvml.nvmlInit = no_driver
    props.uuid = "1234-abcd"
    assert benchutil._nvml_handle(cuda) is None


def test_a_whole_generate_call_that_fails_is_kept_in_its_row_and_the_others_still_run(monkeypatch):
    """The whole-generate phase: a system whose ``generate`` raises gets its error in its row (which
    makes the run exit with status 1), and the other systems of the point are still timed."""
    pytest.importorskip("transformers", reason="the side-by-side benchmark needs transformers (the dev extra)")
    import argparse

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_generate_vs_hf as vs_hf

    real = vs_hf._generate_runner

    def hf_breaks(system, m, *a):
        run = real(system, m, *a)
        if system == "qkvlab":
            return run

        def broken(n):
            raise RuntimeError("no cache for you")

        return broken

    monkeypatch.setattr(vs_hf, "_generate_runner", hf_breaks)
    args = argparse.Namespace(
        generate_tokens=40,
        generate_reps=2,
        generate_stream=False,
        generate_temperature=0.0,
        generate_top_k=None,
        generate_top_p=None,
        generate_repetition_penalty=None,
        no_gemma=True,
        smoke=True,
        compile_mode=None,
        fuse=False,
        gemv="none",
    )
    rows = vs_hf.generate_phase(
        ["QKV"], vs_hf.SMOKE, [(1, 16)], {"qkvlab", "hf"}, args, torch.device("cpu"), torch.float32
    )
    by = {r["system"]: r for r in rows}
    assert by["hf-llama"]["error"] == "failed: RuntimeError: no cache for you", rows
    assert by["qkvlab"]["reps"] == 2 and by["qkvlab"]["new_tokens"] == [8, 48] and by["qkvlab"]["tokens_per_s"] > 0


@needs_interpreter
def test_gpu_read_chain_smoke_checks_every_read_and_the_stack(tmp_path):
    """Every chain runs on the CPU (interpreter); the read kernel sums what torch.sum does, past a
    buffer's end too, and the stack it stands beside computes its float32 reference."""
    run_script("gpu_read_chain.py", "--out", str(tmp_path / "rc.json"), interpret=True)
    doc = json.loads((tmp_path / "rc.json").read_text())
    modes = ["kernels", "gemv+read", "read+decode", "reads", "reads-early", "reads+1", "layer-reads", "one-read"]
    assert [r["mode"] for r in doc["rows"]] == modes
    assert [r["kernels_per_step"] for r in doc["rows"]][3:] == [10, 10, 12, 2, 1]  # two layers in the smoke stack
    assert max(doc["read_check_rel_err"].values()) < 1e-3 and "odd length, early" in doc["read_check_rel_err"]
    assert doc["rel_err_vs_reference"] < 0.05
    bad = script("gpu_read_chain.py", "--smoke", "--modes", "reads,writes")
    assert bad.returncode == 2 and "'writes' is not one of" in bad.stderr, bad.stderr


@needs_interpreter
def test_gpu_read_chain_stops_when_a_read_skips_bytes(monkeypatch, capsys):
    """A read launched with one program too few (the end of the buffer unread) is caught before timing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_read_chain as rc

    real = rc.Reader.programs
    monkeypatch.setattr(rc.Reader, "programs", lambda self, n, tiles: max(1, real(self, n, tiles) - 1))
    assert rc.main(["--smoke"]) == 1
    assert "does not sum what it reads" in capsys.readouterr().out
