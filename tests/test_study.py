"""Sweeps, the results store and reports: grid expansion, stable ids, resume, torn lines, exact tables."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qkvlab.attention import PAPER_LM_VARIANTS
from qkvlab.errors import ConfigError
from qkvlab.study import (
    RESULT_KEYS,
    ResultsStore,
    SweepSpec,
    TruncatedLineWarning,
    expand,
    load_sweep,
    pareto_front,
    parse_devices,
    parse_tokens,
    run_sweep,
    write_report,
)
from qkvlab.study.report import rank_correlation
from qkvlab.study.sweep import default_run_fn, format_tokens

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "studies" / "lm-variants-tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BASE = {"model": {"preset": "tiny"}, "seq_len": 32, "batch_size": 4, "optim": {"lr": 1e-3}}


def spec(**grid: list[Any]) -> SweepSpec:
    return SweepSpec.from_dict({"name": "t", "base": BASE, "grid": grid})


class FakeTrainer:
    """Stands in for qkvlab.train.train: writes metrics.jsonl, returns a summary, records its calls.

    ``interrupt_on``: raise KeyboardInterrupt on that call (1-based); ``fail``: run ids that raise
    RuntimeError. Both happen after the first metrics row is written, as a killed trainer leaves it.
    """

    def __init__(self, interrupt_on: int | None = None, fail: tuple[str, ...] = ()):
        self.calls: list[tuple[str, bool]] = []
        self.interrupt_on = interrupt_on
        self.fail = fail

    def __call__(self, config: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
        out = Path(config["out_dir"])
        self.calls.append((out.name, resume))
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"step": 1, "tokens": 128, "loss": 5.0}]
        (out / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
        if len(self.calls) == self.interrupt_on:
            raise KeyboardInterrupt
        if out.name in self.fail:
            raise RuntimeError("loss is NaN at step 3")
        val_loss = 4.0 + 0.1 * config.get("seed", 0)
        rows.append({"step": 2, "tokens": 256, "loss": 4.5, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ppl = math.exp(val_loss)
        return {"tokens": 256, "steps": 2, "val_loss": val_loss, "val_ppl": ppl, "train_tokens_per_s": 1e3}


def reporting_trainer(config: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
    """A FakeTrainer that also reports what the real one does about its model and code."""
    from qkvlab.costs import model_costs
    from qkvlab.models import get_preset

    model = get_preset(config["model"]["preset"], variant=config["model"]["variant"])
    summary = FakeTrainer()(config, resume=resume)
    costs = model_costs(model)
    return {**summary, "params": costs["params_total"], "model_family": model.family, "costs": costs,
            "git_commit": "0123abc", "git_dirty": False, "val_bits": 1.5}  # fmt: skip


# ================================================================== grid expansion
def test_grid_is_the_cartesian_product_and_invalid_points_are_skipped_with_the_reason():
    variants = ["QKV", "Q-K=V", "Q=K-V+GQA-4", "GQA-8", "Q-GQA-3"]
    plans = expand(spec(variant=variants, tokens=["1e4", "2e4"], seed=[0, 1]))
    assert len(plans) == 5 * 2 * 2
    # order: tokens > seed > variant, so each seed's variants run together
    assert [(p.tokens, p.seed) for p in plans[:5]] == [(10_000, 0)] * 5
    assert [p.variant for p in plans[:5]] == variants
    first = plans[1]
    assert first.config["model"] == {"preset": "tiny", "variant": "q_kv"}
    assert (first.config["max_tokens"], first.config["seed"], first.config["optim"]) == (10_000, 0, {"lr": 1e-3})
    assert "out_dir" not in first.config

    by_variant = {p.variant_id: p for p in plans}
    assert by_variant["q_k_v"].status == by_variant["q_kv"].status == "pending"
    reasons = {vid: by_variant[vid].reason for vid in ("qk_v+gqa4", "q_k_v+gqa8", "q_kv+gqa3")}
    assert all(by_variant[vid].status == "skipped" for vid in reasons)
    assert "cannot be grouped" in reasons["qk_v+gqa4"]  # the query is tied to K: one head per query head
    assert "that is MHA, the same model as 'QKV'" in reasons["q_k_v+gqa8"]  # 8 KV heads on 8 heads
    assert "must divide n_heads=8" in reasons["q_kv+gqa3"]
    assert sum(p.status == "skipped" for p in plans) == 3 * 2 * 2


def test_other_dotted_axes_and_overrides_reach_the_config():
    s = SweepSpec.from_dict(
        {"base": BASE, "grid": {"optim.lr": [1e-3, 3e-3]}, "overrides": ["log.progress=false", "optim.lr=9e-9"]}
    )
    plans = expand(s)
    assert [p.config["optim"]["lr"] for p in plans] == [1e-3, 3e-3]  # grid values win over overrides
    assert all(p.config["log"] == {"progress": False} for p in plans)
    assert plans[0].run_id != plans[1].run_id


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"base": BASE, "grid": {"model": ["tiny-gpt"]}}, "unknown preset 'tiny-gpt'"),
        ({"base": BASE, "grid": {"variants": ["QKV"]}}, "did you mean 'variant'"),
        ({"base": BASE, "grid": {"variant": ["Q-K==V"]}}, "Cannot parse variant 'Q-K==V'"),
        ({"base": BASE, "grid": {"tokens": ["lots"]}}, "Token budget 'lots'"),
        ({"base": BASE, "grid": {"seed": []}}, "grid.seed must be a non-empty list"),
        ({"base": "no/such/base.yaml", "grid": {}}, "Base config 'no/such/base.yaml' not found"),
        ({"base": BASE, "grids": {}}, r"^Unknown sweep key 'grids'\. Did you mean 'grid'\? Valid keys: name, "),
        ({"base": BASE, "xyz": 1}, r"^Unknown sweep key 'xyz'\. Valid keys: name, study_dir, base, grid, "),
    ],
)
def test_mistakes_in_a_sweep_are_config_errors(sweep: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        expand(SweepSpec.from_dict(sweep))


def test_token_budgets_parse_and_format():
    assert [parse_tokens(t) for t in (1000, 1e6, "1e6", "400k", "2.5M", "1_000")] == [
        1000,
        1_000_000,
        1_000_000,
        400_000,
        2_500_000,
        1000,
    ]
    assert [format_tokens(n) for n in (512, 400_000, 2_500_000, 123_456)] == ["512", "4e5", "2.5e6", "123456"]
    for bad in (0, -5, 1.5, True, "1e6x"):
        with pytest.raises(ConfigError):
            parse_tokens(bad)


# ================================================================== run ids
def test_run_ids_are_readable_and_stable():
    plans = expand(spec(variant=["Q-K=V", "Q-GQA-4"], tokens=[1e4], seed=[0]))
    # Pinned: a change to how ids are computed would orphan every finished run of a study.
    assert [p.run_id for p in plans] == ["q_kv-tiny-t1e4-s0-ca5e4a10", "q_kv.gqa4-tiny-t1e4-s0-f76cd32a"]
    assert [p.run_id for p in expand(spec(variant=["Q-K=V", "Q-GQA-4"], tokens=[1e4], seed=[0]))] == [
        p.run_id for p in plans
    ]
    # The same point written differently: key order, our id instead of paper notation, 1e4 as text.
    reordered = SweepSpec.from_dict(
        {"base": dict(reversed(BASE.items())), "grid": {"seed": [0], "tokens": ["10k"], "variant": ["q_kv"]}}
    )
    assert expand(reordered)[0].run_id == plans[0].run_id
    # Where the study lives does not matter; what is trained does.
    here = SweepSpec.from_dict({"base": BASE, "grid": {"variant": ["q_kv"]}})
    moved = SweepSpec.from_dict({"base": {**BASE, "out_dir": "elsewhere"}, "grid": {"variant": ["q_kv"]}})
    assert expand(moved)[0].run_id == expand(here)[0].run_id
    changed = SweepSpec.from_dict(
        {"base": {**BASE, "optim": {"lr": 2e-3}}, "grid": {"variant": ["Q-K=V"], "tokens": [1e4], "seed": [0]}}
    )
    assert expand(changed)[0].run_id.startswith("q_kv-tiny-t1e4-s0-")
    assert expand(changed)[0].run_id != plans[0].run_id


# ================================================================== running and resuming
def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path):
    s = spec(variant=["QKV", "Q-K=V", "Q=K=V+MQA"], seed=[0, 1, 2], tokens=[256])
    plans = expand(s)
    pending = [p.run_id for p in plans if p.status == "pending"]
    assert len(pending) == 6

    killed = FakeTrainer(interrupt_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(s, tmp_path, run_fn=killed, verbose=False)
    store = ResultsStore(tmp_path)
    assert store.finished_ids() == set(pending[:2])
    assert (tmp_path / "runs" / pending[2] / "metrics.jsonl").is_file()  # the partial folder it left

    rerun = FakeTrainer()
    summary = run_sweep(s, tmp_path, run_fn=rerun, verbose=False)
    assert rerun.calls == [(pending[2], True)] + [(rid, False) for rid in pending[3:]]
    assert summary.ran == pending[2:] and summary.resumed == [pending[2]]
    assert summary.already_done == pending[:2] and len(summary.skipped) == 3
    assert store.finished_ids() == set(pending)

    again = FakeTrainer()
    assert run_sweep(s, tmp_path, run_fn=again, verbose=False).already_done == pending
    assert again.calls == []
    rows = store.read()
    assert sum(r["status"] == "skipped" for r in rows) == 3  # recorded once, not on every rerun
    assert sum(r["status"] == "ok" for r in rows) == 6


def test_result_rows_carry_what_the_run_reported_and_the_resolved_config(tmp_path: Path):
    s = spec(variant=["QKV", "Q-K=V", "Q-MQA"], seed=[1], tokens=[256])
    run_sweep(s, tmp_path, run_fn=reporting_trainer, verbose=False)
    rows = {r["variant"]: r for r in ResultsStore(tmp_path).read()}
    for row in rows.values():
        assert set(RESULT_KEYS) <= set(row)
        assert row["config"]["out_dir"] == str(tmp_path / "runs" / row["run_id"])
        assert (tmp_path / row["out_dir"]).is_dir()
        assert (row["seed"], row["tokens"], row["model"]) == (1, 256, "tiny")
        assert row["val_ppl"] == pytest.approx(math.exp(4.1)) and row["val_bits"] == 1.5  # every metric reported
        assert (row["git_commit"], row["git_dirty"], row["params_trained"]) == ("0123abc", False, row["params_total"])
    qkv, kv, mqa = rows["QKV"], rows["Q-K=V"], rows["Q-MQA"]
    # tiny: 2 layers x 8 heads x 8 dims x 2 bytes, K and V
    assert qkv["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 8 * 2 and qkv["cache_reduction"] == 0.0
    assert kv["kv_cache_bytes_per_token"] * 2 == qkv["kv_cache_bytes_per_token"] and kv["cache_reduction"] == 0.5
    assert mqa["cache_reduction"] == 1 - 1 / 16  # one shared tensor, one head of eight
    assert kv["params_attention"] < qkv["params_attention"] and kv["params_total"] < qkv["params_total"]


def test_a_run_that_reports_no_costs_gets_none_not_a_guess(tmp_path: Path):
    run_sweep(spec(variant=["Q-K=V"], tokens=[256]), tmp_path, run_fn=FakeTrainer(), verbose=False)
    (row,) = ResultsStore(tmp_path).read()
    assert set(RESULT_KEYS) <= set(row)
    assert row["kv_cache_bytes_per_token"] is row["params_total"] is row["git_commit"] is None


def test_a_failed_run_is_recorded_and_retried_by_the_next_sweep(tmp_path: Path):
    s = spec(variant=["QKV", "Q-K=V"], tokens=[256])
    ids = [p.run_id for p in expand(s)]
    summary = run_sweep(s, tmp_path, run_fn=FakeTrainer(fail=(ids[0],)), verbose=False)
    assert summary.failed == [(ids[0], "RuntimeError: loss is NaN at step 3")] and summary.ran == [ids[1]]
    assert ResultsStore(tmp_path).latest()[ids[0]]["status"] == "failed"
    retry = FakeTrainer()
    run_sweep(s, tmp_path, run_fn=retry, verbose=False)
    assert retry.calls == [(ids[0], True)]  # its folder holds files, so the trainer resumes it
    assert ResultsStore(tmp_path).finished_ids() == set(ids)


_WORKER_MODULE = """
import json, os
from pathlib import Path

def fake_train(config, *, resume=False):
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calls.txt", "a") as f:
        f.write(f"{os.environ['CUDA_VISIBLE_DEVICES']!r} {config['device']} {resume}\\n")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 64, "loss": 3.0}) + "\\n")
    return {"tokens": 64, "val_loss": 3.0, "val_ppl": 20.0}
"""


def test_several_devices_run_each_point_once_in_worker_processes(tmp_path: Path, monkeypatch):
    (tmp_path / "sweep_fake_worker.py").write_text(_WORKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    from sweep_fake_worker import fake_train

    s = spec(variant=["QKV", "Q-K=V"], tokens=[64])
    study = tmp_path / "study"
    summary = run_sweep(s, study, run_fn=fake_train, devices="cpu,cpu", verbose=False)
    ids = [p.run_id for p in expand(s)]
    assert sorted(summary.ran) == sorted(ids) and not summary.failed
    assert ResultsStore(study).finished_ids() == set(ids)
    for rid in ids:
        assert (study / "runs" / rid / "calls.txt").read_text() == "'' cpu False\n"

    def local_fn(config, *, resume=False):
        return {}

    with pytest.raises(ConfigError, match="module-level function"):
        run_sweep(spec(variant=["GQA-4"]), tmp_path / "other", run_fn=local_fn, devices="cpu,cpu", verbose=False)
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_devices_are_checked():
    assert parse_devices(None) == [] and parse_devices("cpu, cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="Bad device 'gpu0'"):
        parse_devices("gpu0")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigError, match="Device 7 asked for"):
            parse_devices("0,7")


def test_a_missing_trainer_is_a_clear_error_before_anything_runs(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "qkvlab.train", None)  # import fails
    with pytest.raises(ConfigError, match="needs the trainer"):
        default_run_fn()
    with pytest.raises(ConfigError, match="needs the trainer"):
        run_sweep(spec(variant=["QKV", "Q=K-V+MQA"]), tmp_path, verbose=False)
    assert not any(tmp_path.iterdir())


def test_a_config_mistake_stops_the_sweep_before_the_first_run(tmp_path: Path):
    pytest.importorskip("qkvlab.train")
    s = SweepSpec.from_dict({"base": {**BASE, "optim": {"lrr": 1e-3}}, "grid": {"variant": ["QKV", "Q-K=V"]}})
    with pytest.raises(ConfigError, match=r"Grid point q_k_v-tiny-.*Unknown config key 'optim\.lrr'"):
        run_sweep(s, tmp_path, verbose=False)
    assert not any(tmp_path.iterdir())


def test_validation_scores_come_from_metrics_when_the_summary_lacks_them(tmp_path: Path):
    def no_val_in_summary(config: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
        FakeTrainer()(config, resume=resume)
        return {"tokens": 256}

    run_sweep(spec(variant=["QKV"], seed=[2]), tmp_path, run_fn=no_val_in_summary, verbose=False)
    (row,) = ResultsStore(tmp_path).read()
    assert (row["val_loss"], row["val_ppl"]) == (pytest.approx(4.2), pytest.approx(math.exp(4.2)))


def test_a_sweep_with_the_real_trainer(tmp_path: Path):
    pytest.importorskip("qkvlab.train")
    s = SweepSpec.from_dict(
        {
            "name": "real",
            "base": {
                "model": {"preset": "tiny"},
                "data": {"source": "stdlib", "tokenizer": "byte", "max_docs": 30, "cache_dir": str(tmp_path / "cache")},
                "schedule": {"warmup_steps": 1},
                "log": {"every": 1, "progress": False, "tensorboard": False},
                "batch_size": 4,
                "seq_len": 32,
                "eval_every": 2,
                "eval_batches": 2,
            },
            "grid": {"variant": ["QKV", "Q-K=V"], "tokens": [512]},
        }
    )
    summary = run_sweep(s, tmp_path / "study", verbose=False)
    assert len(summary.ran) == 2 and not summary.failed, summary.failed
    rows = {r["variant"]: r for r in ResultsStore(tmp_path / "study").read()}
    assert rows["Q-K=V"]["cache_reduction"] == 0.5 and rows["QKV"]["tokens"] == 512
    # tiny: 2 layers x 8 heads x 8 dims x 2 bytes (bf16), K and V; Q-K=V stores one tensor
    assert rows["QKV"]["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 8 * 2 == 2 * rows["Q-K=V"]["kv_cache_bytes_per_token"]
    assert all(math.isfinite(r["val_ppl"]) and r["params_total"] == r["params_trained"] for r in rows.values())
    for row in rows.values():  # what the trainer wrote, unchanged: the sweep works nothing out again
        summary = json.loads((tmp_path / "study" / row["out_dir"] / "summary.json").read_text())
        assert summary["model_family"] == "gpt" and summary["model_config"]["variant"]["sharing"] in ("q_k_v", "q_kv")
        assert {k: row[k] for k in summary["costs"]} == summary["costs"] and row["git_commit"] == summary["git_commit"]
    report = write_report(tmp_path / "study", plots=False).read_text()
    assert "| Q-K=V | 1 |" in report


# ================================================================== the results file
def test_reading_tolerates_a_truncated_last_line(tmp_path: Path):
    store = ResultsStore(tmp_path)
    store.append({"run_id": "a", "status": "ok", "val_loss": 1.0})
    store.append({"run_id": "b", "status": "ok", "val_loss": float("nan")})  # stored as null: strict JSON
    with open(store.path, "a") as f:
        f.write('{"run_id": "c", "stat')  # a writer killed mid-line
    with pytest.warns(TruncatedLineWarning, match="its last line"):
        rows = store.read()
    assert [r["run_id"] for r in rows] == ["a", "b"] and rows[1]["val_loss"] is None
    store.append({"run_id": "c", "status": "ok"})  # starts on a fresh line
    with pytest.warns(TruncatedLineWarning, match="line 3"):
        assert sorted(store.finished_ids()) == ["a", "b", "c"]


# ================================================================== reports
def _row(run_id: str, variant: str, variant_id: str, model: str, tokens: int, seed: int, ppl: float, **extra) -> dict:
    return {
        "run_id": run_id,
        "status": "ok",
        "variant": variant,
        "variant_id": variant_id,
        "model": model,
        "tokens_budget": tokens,
        "tokens": tokens,
        "seed": seed,
        "val_loss": math.log(ppl),
        "val_ppl": ppl,
        "train_tokens_per_s": 1000.0 + seed,
        "out_dir": f"runs/{run_id}",
        "git_commit": "0123456789abcdef",
        "git_dirty": False,
        "finished": "2026-01-01T00:00:00+0000",
        **extra,
    }


KV = {"q_k_v": (512, 0.0, 1000), "q_kv": (256, 0.5, 900), "q_kv+mqa": (32, 0.9375, 850)}


def _fake_study(root: Path) -> Path:
    """A study with known numbers: 3 variants x seeds on tiny/1e4, plus a second size and a second budget."""
    store = ResultsStore(root)
    points = [
        ("QKV", "q_k_v", "tiny", 10_000, 0, 10.0),
        ("QKV", "q_k_v", "tiny", 10_000, 1, 12.0),
        ("Q-K=V", "q_kv", "tiny", 10_000, 0, 11.5),
        ("Q-K=V", "q_kv", "tiny", 10_000, 1, 11.5),
        ("Q-MQA", "q_kv+mqa", "tiny", 10_000, 0, 13.2),
        ("QKV", "q_k_v", "gpt2-1m", 10_000, 0, 8.0),
        ("Q-K=V", "q_kv", "gpt2-1m", 10_000, 0, 8.4),
        ("QKV", "q_k_v", "tiny", 20_000, 0, 9.0),
    ]
    for variant, vid, model, tokens, seed, ppl in points:
        run_id = f"{vid}-{model}-t{tokens}-s{seed}"
        kv, reduction, params = KV[vid]
        scale = 3 if model == "gpt2-1m" else 1
        extra = {"decode_tokens_per_s": 500.0} if model == "gpt2-1m" else {}
        store.append(
            _row(
                run_id,
                variant,
                vid,
                model,
                tokens,
                seed,
                ppl,
                kv_cache_bytes_per_token=kv * scale,
                cache_reduction=reduction,
                params_total=params * scale * 1000,
                params_attention=params * scale * 100,
                **extra,
            )
        )
        metrics = [
            {"step": 1, "tokens": tokens // 2, "loss": 3.0},
            {"step": 2, "tokens": tokens, "loss": 2.5, "val_loss": math.log(ppl), "val_ppl": ppl},
        ]
        run_dir = root / "runs" / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    store.append(
        {
            "run_id": "qk_v.gqa4-tiny-t10000-s0",
            "status": "skipped",
            "variant": "Q=K-V+GQA-4",
            "variant_id": "qk_v+gqa4",
            "model": "tiny",
            "tokens_budget": 10_000,
            "seed": 0,
            "reason": "Variant 'qk_v+gqa4' ties the query with K but asks for n_kv_heads=4",
        }
    )
    store.append({"run_id": "x", "status": "failed", "variant": "MQA", "model": "tiny", "error": "RuntimeError: boom"})
    return root


def _table(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The markdown table under ``## heading`` as {first cell: {column: cell}}."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def test_report_tables_are_computed_from_the_results(tmp_path: Path):
    study = _fake_study(tmp_path / "study")
    md = write_report(study).read_text()
    assert "4 finished runs" not in md and "8 finished runs, 1 skipped grid points, 1 failed runs" in md
    assert f"`{study / 'results.jsonl'}`" in md and "`0123456789ab` (8 runs)" in md

    tiny = _table(md, "tiny, 1e4 tokens")
    assert list(tiny) == ["QKV", "Q-K=V", "Q-MQA"]
    qkv, kv, mqa = tiny["QKV"], tiny["Q-K=V"], tiny["Q-MQA"]
    # QKV: PPL 10 and 12 -> mean 11, sample std sqrt(2); loss = log PPL
    assert (qkv["n"], qkv["Val PPL"], qkv["Δ PPL vs QKV"]) == ("2", "11.00 ± 1.41", "baseline")
    loss_mean, loss_std = (math.log(10) + math.log(12)) / 2, abs(math.log(12) - math.log(10)) / math.sqrt(2)
    assert qkv["Val loss"] == f"{loss_mean:.4f} ± {loss_std:.4f}" == "2.3937 ± 0.1289"
    assert (kv["Val PPL"], kv["Δ PPL vs QKV"]) == ("11.50 ± 0.00", "+4.55%")  # 11.5 / 11 - 1
    assert (mqa["n"], mqa["Val PPL"], mqa["Δ PPL vs QKV"]) == ("1", "13.20", "+20.00%")  # 13.2 / 11 - 1
    assert [tiny[v]["KV cache B/token"] for v in tiny] == ["512", "256", "32"]
    assert [tiny[v]["Cache reduction"] for v in tiny] == ["0.0%", "50.0%", "93.8%"]
    assert (qkv["KV cache @32k"], qkv["Params"], qkv["Attn params"]) == ("16.00 MiB", "1.00M", "100.0k")
    assert (qkv["Train tok/s"], qkv["Decode tok/s"]) == ("1,000", "n/a")  # mean of 1000 and 1001, rounded

    small = _table(md, "gpt2-1m, 1e4 tokens")
    assert (small["Q-K=V"]["Δ PPL vs QKV"], small["Q-K=V"]["Decode tok/s"]) == ("+5.00%", "500")
    assert _table(md, "tiny, 2e4 tokens")["QKV"]["Val PPL"] == "9.00"

    skipped = _table(md, "Skipped grid points")
    assert skipped["Q=K-V+GQA-4"]["Seeds"] == "0" and "ties the query" in skipped["Q=K-V+GQA-4"]["Reason"]
    assert _table(md, "Failed runs")["`x`"]["Error"] == "RuntimeError: boom"

    pngs = sorted(p.name for p in (study / "report").glob("*.png"))
    assert pngs == [
        "ladder-params-1e4-tokens.png",
        "ladder-tokens-tiny.png",
        "loss-gpt2-1m-t1e4.png",
        "loss-tiny-t1e4.png",
        "loss-tiny-t2e4.png",
        "pareto-gpt2-1m-t1e4.png",
        "pareto-tiny-t1e4.png",
    ]
    for name in pngs:
        data = (study / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"]({name})" in md


def test_report_sets_the_papers_table4_beside_ours(tmp_path: Path):
    study = _fake_study(tmp_path / "study")
    md = write_report(study, plots=False, paper_table="table4").read_text()
    beside = _table(md, "Beside the paper")
    assert list(beside) == ["QKV", "Q-K=V", "Q=K-V", "Q=K=V", "GQA-4", "MQA", "Q-GQA-4", "Q-MQA"]
    assert (beside["Q-K=V"]["Paper Val PPL"], beside["Q-K=V"]["Paper Δ vs QKV"]) == ("5.27", "+3.1%")
    assert beside["Q-K=V"]["Our Δ, tiny, 1e4 tokens"] == "+4.55%"  # from the results, as in the main table
    assert beside["Q-MQA"]["Our Δ, tiny, 1e4 tokens"] == "+20.00%"
    assert beside["Q=K=V"]["Our Δ, tiny, 1e4 tokens"] == "n/a"  # not run
    assert beside["QKV"]["Our Δ, gpt2-1m, 1e4 tokens"] == "baseline"
    # tiny/1e4: QKV 0, Q-K=V +4.5%, Q-MQA +20%; paper 0, 3.1%, 4.8%: same order, rho = +1
    assert "our order by change vs QKV (best first): QKV < Q-K=V < Q-MQA" in md
    assert "over these 3 variants: +1.00." in md
    with pytest.raises(ConfigError, match="not a perplexity table"):
        write_report(study, plots=False, paper_table="table2")


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert rank_correlation([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share their mean rank
    assert rank_correlation([1, 2], [2, 1]) is None
    assert rank_correlation([1, 2, 3], [4, 4, 4]) is None  # nothing to rank on one side


def test_rank_correlation_without_scipy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import fails
    with pytest.raises(ConfigError, match=r"needs scipy.*qkvlab\[plots\]"):
        rank_correlation([1, 2, 3], [1, 3, 2])


def test_pareto_front_keeps_the_points_nothing_beats():
    # (cache reduction %, PPL change %): QKV, Q-K=V, Q=K-V (no saving, worse), Q-MQA, GQA-4 (beaten by Q-MQA)
    points = [(0.0, 0.0), (50.0, 1.0), (0.0, 2.0), (96.9, 5.0), (75.0, 6.0)]
    assert pareto_front(points) == [0, 1, 3]


def test_a_report_needs_a_results_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"No results\.jsonl"):
        write_report(tmp_path)


# ================================================================== the shipped sweep
def test_the_example_sweep_loads_and_expands():
    s = load_sweep(EXAMPLE)
    plans = expand(s)
    assert s.name == "lm-variants-tiny" and s.base["data"]["source"] == "stdlib"  # base read relative to the file
    assert len(plans) == 10 * 2 and all(p.status == "pending" for p in plans)
    assert [p.variant for p in plans[:8]] == list(PAPER_LM_VARIANTS)
    assert {p.config["max_tokens"] for p in plans} == {400_000} and {p.seed for p in plans} == {0, 1}
    assert len({p.run_id for p in plans}) == 20
    try:
        from qkvlab.train import TrainConfig
    except ImportError:
        return
    for plan in plans:  # every grid point is a config the trainer accepts
        TrainConfig.from_dict({**plan.config, "out_dir": "unused"})


def test_paper_table3_columns_are_dataset_names_the_vision_task_knows():
    from qkvlab.data.vision import DATASETS
    from qkvlab.study.paper import PAPER_TABLES
    from qkvlab.tasks import TASKS

    table = PAPER_TABLES["table3"]
    assert table.group_by == "task.dataset" and table.metric == "val_acc"
    # vision columns are dataset names; the Anomaly column is the task's name (group_by task.name)
    assert {d for row in table.values.values() for d in row} <= set(DATASETS) | {"anomaly"}
    assert "anomaly" in TASKS and all("anomaly" in row for row in table.values.values())
    # The paper's text names the best rows; the numbers must say the same.
    best = {col: max(table.values, key=lambda v: table.values[v].get(col, 0.0)) for col in ("tinyimagenet", "anomaly")}
    assert best == {"tinyimagenet": "Q=K=V", "anomaly": "(Q=K-V)+"}


def test_paper_tables_are_well_formed_data():
    """The shipped paper_tables.json: variants in the paper's notation, rates in [0, 1], each
    Table 4 change consistent with its perplexities (printed to 0.01 and 0.001: within 0.0025)."""
    from qkvlab.attention import VariantSpec
    from qkvlab.study.metrics import METRICS
    from qkvlab.study.paper import DATA_FILE, PAPER_TABLES

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"qkvlab.study" = ["{DATA_FILE}"]' in pyproject  # shipped in the wheel too
    assert list(PAPER_TABLES) == ["table2", "table3", "table4", "table11"]
    for table in PAPER_TABLES.values():
        # Table 11's metric is lm-eval's accuracy, in the rows `qkvlab eval harness` writes.
        assert (table.metric in METRICS or table.metric == "acc") and table.source.startswith("PAPER.md")
        for variant, row in table.values.items():
            assert VariantSpec.parse(variant).paper_name == variant
            if table.metric == "val_acc":
                assert all(0.0 <= x <= 1.0 for x in row.values()), (variant, row)
    table4 = PAPER_TABLES["table4"].values
    for variant, row in table4.items():
        assert abs(row["val_ppl"] / table4["QKV"]["val_ppl"] - 1 - row["delta"]) <= 0.0025, variant
    for variant, row in PAPER_TABLES["table11"].values.items():  # Avg: the mean of the five, to 0.01
        tasks = [v for k, v in row.items() if k != "avg"]
        assert len(tasks) in (0, 5) and (not tasks or abs(sum(tasks) / 5 - row["avg"]) <= 0.01), variant


def test_report_shows_linear_attention_state_not_a_zero_cache(tmp_path: Path):
    store = ResultsStore(tmp_path)
    common = dict(kv_cache_dtype="bfloat16", params_total=1000, params_attention=100)
    store.append(
        _row(
            "a",
            "QKV",
            "q_k_v+learned",
            "tiny",
            100,
            0,
            10.0,
            kv_cache_bytes_per_token=512,
            cache_reduction=0.0,
            **common,
        )
    )
    store.append(
        _row(
            "b",
            "QKV (linear)",
            "q_k_v+learned+linear",
            "tiny",
            100,
            0,
            11.0,
            kv_cache_bytes_per_token=0,
            cache_reduction=1.0,
            decode_state_bytes=4608,
            **common,
        )
    )
    md = write_report(tmp_path, plots=False).read_text()
    table = _table(md, "tiny, 100 tokens")
    assert table["QKV"]["Δ PPL vs QKV"] == "baseline"  # the linear row is not the baseline
    lin = table["QKV (linear)"]
    assert lin["Δ PPL vs QKV"] == "+10.00%"
    assert lin["KV cache B/token"] == "0 (fixed 4.50 KiB state)" and lin["Cache reduction"] == "n/a"


def test_report_says_when_it_cannot_draw_loss_curves(tmp_path: Path):
    """A study rebuilt from its results.jsonl alone (no run folders) gets a line instead of a silent gap."""
    pytest.importorskip("matplotlib")
    store = ResultsStore(tmp_path / "s")
    for i, (v, vid) in enumerate((("QKV", "q_k_v"), ("Q-K=V", "q_kv"))):
        store.append(_row(f"r{i}", v, vid, "tiny", 10_000, 0, 10.0 + i, out_dir=f"runs/r{i}"))
    md = write_report(tmp_path / "s").read_text()
    assert md.count("Loss curves: not drawn") == 1 and "loss-" not in md
    run = tmp_path / "s" / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 100, "loss": 3.0}) + "\n")
    md = write_report(tmp_path / "s").read_text()
    assert "Loss curves: not drawn" not in md and "](loss-" in md


def test_a_grid_of_init_from_runs_takes_the_checkpoints_model_and_variant(tmp_path: Path):
    """Uptraining sweeps: a point that starts from a checkpoint is labelled with the checkpoint's
    variant and folder, checked like the trainer checks it, and a variant that differs is refused."""
    import numpy as np

    from qkvlab import GPT, GPTConfig, save_model
    from qkvlab.study.sweep import check_with_trainer

    folder = tmp_path / "q-kv-fit"
    save_model(GPT(GPTConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=64, variant="Q-GQA-2")), folder)
    np.save(tmp_path / "tokens.npy", np.arange(4096, dtype=np.uint16) % 64)
    base = {"init_from": str(folder), "data": {"source": str(tmp_path / "tokens.npy")}, "seq_len": 16}
    plans = expand(SweepSpec.from_dict({"base": base, "grid": {"tokens": [256, 512]}}))
    assert [(p.variant, p.model, p.tokens, p.status) for p in plans] == [
        ("Q-GQA-2", "q-kv-fit", 256, "pending"),
        ("Q-GQA-2", "q-kv-fit", 512, "pending"),
    ]
    check_with_trainer(plans)  # the trainer takes these configs as they are
    same = expand(SweepSpec.from_dict({"base": base, "grid": {"tokens": [256], "variant": ["Q-GQA-2"]}}))
    assert same[0].run_id == plans[0].run_id  # naming the checkpoint's own variant changes nothing
    (other,) = expand(SweepSpec.from_dict({"base": base, "grid": {"tokens": [256], "variant": ["QKV"]}}))
    assert other.status == "skipped" and "model.variant='q_k_v' differs from the checkpoint init_from" in other.reason
