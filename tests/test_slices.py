"""A study run in slices on lent machines: each slice starts from the committed rows on a fresh
machine, runs what is left, and merges back by run id without duplicates (scripts/sweep_slice.py,
scripts/merge_slice.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def ok_rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines() if '"ok"' in line]


def test_slices_continue_from_committed_rows_and_merge_by_run_id(tmp_path: Path):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16))
    base = {
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 32, "n_heads": 4},
        "data": {"source": str(tmp_path / "tokens.npy")},
        "batch_size": 4,
        "seq_len": 16,
        "max_steps": 3,
        "eval_batches": 1,
        "log": {"progress": False, "tensorboard": False},
        "device": "cpu",
    }
    study, results = tmp_path / "study", tmp_path / "results"
    sweep = {"name": "slices", "study_dir": str(study), "base": base, "grid": {"variant": ["QKV", "Q-K=V"]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cfg = str(tmp_path / "sweep.yaml")

    def one_slice(out: str, *only: str) -> dict:
        shutil.rmtree(study, ignore_errors=True)  # each slice is a fresh machine
        flags = [f"--only={o}" for o in only]
        script("sweep_slice.py", cfg, "--results", str(results), "--devices", "cpu", "--time-limit", "200",
               "--out", str(tmp_path / out), *flags)  # fmt: skip
        script("merge_slice.py", str(tmp_path / out), str(results), "--lease-s", "7")
        return json.loads((tmp_path / out / "slice.json").read_text())

    first = one_slice("out1", "variant=QKV")
    assert first["ran"] == 1 and not first["stopped"]
    (row,) = ok_rows(results)
    assert row["variant"] == "QKV" and (results / "runs" / row["run_id"] / "metrics.jsonl").is_file()
    assert (results / "sweep.yaml").is_file()

    second = one_slice("out2")  # the whole grid: QKV is already done, only Q-K=V runs
    assert second["ran"] == 1
    rows = ok_rows(results)
    assert sorted(r["variant"] for r in rows) == ["Q-K=V", "QKV"] and len({r["run_id"] for r in rows}) == 2
    slices = [json.loads(line) for line in (results / "slices.jsonl").read_text().splitlines()]
    assert [s["lease_s"] for s in slices] == [7.0, 7.0]
    third = one_slice("out3")  # nothing left: no new row
    assert third["ran"] == 0 and len(ok_rows(results)) == 2
    # merging a slice twice (a retried step of the procedure) neither adds rows nor counts its time twice
    before = (results / "slices.jsonl").read_text()
    script("merge_slice.py", str(tmp_path / "out2"), str(results), "--lease-s", "7")
    assert (results / "slices.jsonl").read_text() == before and len(ok_rows(results)) == 2


def test_a_warm_machines_slices_stop_runs_with_a_checkpoint_and_count_only_their_own(tmp_path: Path):
    """--stop-at-limit on a machine kept between calls: the slice that reaches its limit leaves the
    long run checkpointed, the next resumes it, and each slice counts only the runs it finished."""
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16))
    base = {
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 16, "n_heads": 2},
        "data": {"source": str(tmp_path / "tokens.npy")},
        "batch_size": 2,
        "seq_len": 16,
        "eval_batches": 1,
        "log": {"every": 50, "progress": False, "tensorboard": False},
        "device": "cpu",
    }
    study, results = tmp_path / "study", tmp_path / "results"
    grid = {"variant": ["Q-K=V"], "max_steps": [3, 100_000]}  # one short run, one far beyond the limit
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "warm", "study_dir": str(study), "base": base,
                                                         "grid": grid}))  # fmt: skip

    def one_slice(out: str) -> dict:  # the study folder stays: the same warm machine
        script("sweep_slice.py", str(tmp_path / "sweep.yaml"), "--results", str(results), "--devices", "cpu,cpu",
               "--time-limit", "8", "--stop-at-limit", "--out", str(tmp_path / out))  # fmt: skip
        return json.loads((tmp_path / out / "slice.json").read_text())

    from qkvlab.train import latest_checkpoint

    first = one_slice("out1")
    assert (first["ran"], first["stopped_with_checkpoint"]) == (1, 1)
    (long_run,) = [d for d in (study / "runs").iterdir() if "steps100000" in d.name]
    step = int(latest_checkpoint(long_run).name.split("-")[1])
    second = one_slice("out2")
    assert (second["ran"], second["stopped_with_checkpoint"]) == (0, 1)  # the short run was the first's
    assert int(latest_checkpoint(long_run).name.split("-")[1]) > step  # resumed from it and went on


def test_code_version_of_an_archive_copy_is_the_named_commit(monkeypatch):
    """A device slice runs a `git archive` copy of a commit: its rows carry that commit, whatever .git is around."""
    import subprocess

    from qkvlab import provenance

    def no_git(*a, **k):
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setenv("QKVLAB_GIT_COMMIT", "0123abcd")
    assert provenance.code_version() == ("0123abcd", False)  # even inside a git checkout
    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.code_version() == ("0123abcd", False)
    monkeypatch.delenv("QKVLAB_GIT_COMMIT")
    assert provenance.code_version() == (None, None)


def test_ladder_blocks_follow_block_ones_learning_rates(tmp_path):
    """Blocks 2-6 train every variant at each size's best QKV rate; a best rate at the edge of the
    range gets one more rate instead; block 1's QKV run at the chosen rate is not planned twice."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import ladder_blocks

    from qkvlab.study import expand, load_sweep

    (tmp_path / "studies").mkdir()
    (tmp_path / "lm").mkdir()
    shutil.copy(ROOT / "configs" / "lm" / "gutenberg-ladder.yaml", tmp_path / "lm")
    sweep = tmp_path / "studies" / "ladder-gutenberg.yaml"
    # Block 1 alone: the committed file with its generated part rebuilt from no rows.
    sweep.write_text(ladder_blocks.rewrite((ROOT / "configs" / "studies" / "ladder-gutenberg.yaml").read_text(), []))
    block1 = {p.run_id: p for p in expand(load_sweep(sweep))}
    assert {p.variant for p in block1.values()} == {"QKV"} and len(block1) == 18
    losses = {("gpt2-3m", 1e-3): 4.0, ("gpt2-3m", 2e-3): 3.9, ("gpt2-3m", 4e-3): 3.95}
    losses |= {("gpt2-10m", 1e-3): 3.5, ("gpt2-10m", 2e-3): 3.6, ("gpt2-10m", 4e-3): 3.7}
    rows = []
    for run_id, p in block1.items():
        key = (p.model, float(p.config["optim"]["lr"]))
        if key in losses:
            rows.append({"run_id": run_id, "status": "ok", "model": key[0], "variant_id": "q_k_v",
                         "val_loss": losses[key], "tokens_budget": 9_850_000, "config": p.config})  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script("ladder_blocks.py", str(sweep), str(results), "--write")
    text = sweep.read_text()
    assert "gpt2-10m: best rate 1.0e-3 is the lowest tried" in text and "gpt2-3m: chosen 2.0e-3" in text
    plans = expand(load_sweep(sweep))
    by_model: dict[str, set] = {}
    for p in plans:
        by_model.setdefault(p.model, set()).add((p.variant, float(p.config["optim"]["lr"])))
    assert {lr for v, lr in by_model["gpt2-10m"]} == {5e-4, 1e-3, 2e-3, 4e-3}  # one more rate, no variants yet
    assert "optim.lr: [5.0e-4, 1.0e-3, 2.0e-3, 4.0e-3]" in text
    assert {v for v, lr in by_model["gpt2-3m"] if lr == 2e-3} == set(ladder_blocks.VARIANTS)
    assert {v for v, lr in by_model["gpt2-3m"] if lr != 2e-3} == {"QKV"}
    # QKV at the chosen rate, quarter budget, seed 0: the run block 1 made, planned once.
    ids = [p.run_id for p in plans]
    assert len(ids) == len(set(ids)) and set(block1) <= set(ids)
    script("ladder_blocks.py", str(sweep), str(results), "--write")  # idempotent
    assert sweep.read_text() == text
    # The extra rate ran and is not the best: the size gets its blocks, and the extra rate's run
    # stays a point of the grid.
    (extra,) = [p for p in expand(load_sweep(sweep)) if p.model == "gpt2-10m" and p.config["optim"]["lr"] == 5e-4]
    rows.append({"run_id": extra.run_id, "status": "ok", "model": "gpt2-10m", "variant_id": "q_k_v",
                 "val_loss": 3.6, "tokens_budget": 9_850_000, "config": extra.config})  # fmt: skip
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script("ladder_blocks.py", str(sweep), str(results), "--write")
    plans = {p.run_id: p for p in expand(load_sweep(sweep))}
    assert extra.run_id in plans and "gpt2-10m: chosen 1.0e-3" in sweep.read_text()
    assert {p.variant for p in plans.values() if p.model == "gpt2-10m"} == set(ladder_blocks.VARIANTS)


def test_slice_scores_downstream_tasks_of_the_runs_it_finished(tmp_path: Path):
    """--harness-models: the finished runs of those models get lm-eval rows in the study, which the
    slice brings back (rows and each run's harness.json) and merge_slice keeps beside the training rows."""
    pytest.importorskip("lm_eval")
    from qkvlab.harness import TASKS, find_data_file

    try:
        data = find_data_file(TASKS["piqa"]).parents[1]
    except Exception as e:
        pytest.skip(str(e))
    base = {
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 32, "n_heads": 4, "max_seq_len": 512},
        "data": {"source": "stdlib", "tokenizer": "byte"},
        "batch_size": 2,
        "seq_len": 512,
        "max_steps": 2,
        "eval_batches": 1,
        "log": {"progress": False, "tensorboard": False},
        "device": "cpu",
    }
    study, results = tmp_path / "study", tmp_path / "results"
    sweep = {"name": "h", "study_dir": str(study), "base": base, "grid": {"variant": ["QKV", "Q-K=V"]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    script("sweep_slice.py", str(tmp_path / "sweep.yaml"), "--results", str(results), "--devices", "cpu",
           "--time-limit", "300", "--out", str(out), "--harness-models", "tiny", "--harness-tasks", "piqa",
           "--harness-fewshot", "0", "--harness-limit", "2", "--harness-data", str(data))  # fmt: skip
    info = json.loads((out / "slice.json").read_text())
    assert len(info["harness_scored"]) == 2  # both runs, each once
    script("merge_slice.py", str(out), str(results))
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    trained = {r["run_id"]: r for r in rows if r["status"] == "ok"}
    scored = [r for r in rows if r["status"] == "harness"]
    assert {(r["of_run"], r["metric"]) for r in scored} == {(rid, m) for rid in trained for m in ("acc", "acc_norm")}
    for r in scored:
        assert r["n"] == 2 and r["num_fewshot"] == 0 and r["variant"] == trained[r["of_run"]]["variant"]
    for rid in trained:
        assert json.loads((results / "runs" / rid / "harness.json").read_text())["rows"]
