"""Downstream accuracy in reports: the rows ``qkvlab eval harness --study`` writes, rendered in the
study report and the ladder report beside the paper's Table 11."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from qkvlab.study.downstream import PAPER_TASKS, downstream_section, harness_rows
from qkvlab.study.paper import PAPER_TABLES
from qkvlab.study.report import write_report
from qkvlab.study.results import ResultsStore

ACC = {  # (variant, seed) -> accuracy of every paper task, and LAMBADA's
    ("QKV", 0): 0.30,
    ("Q-K=V", 0): 0.28,
    ("QKV", 1): 0.32,
    ("Q-K=V", 1): 0.33,
}


def training_row(variant: str, seed: int) -> dict[str, Any]:
    vid = {"QKV": "q_k_v", "Q-K=V": "q_kv"}[variant]
    return {
        "run_id": f"{vid}-s{seed}",
        "status": "ok",
        "variant": variant,
        "variant_id": vid,
        "model": "gpt2-3m",
        "seed": seed,
        "tokens": 1000,
        "tokens_budget": 1000,
        "val_loss": 3.0 + 0.01 * seed,
        "val_ppl": math.exp(3.0 + 0.01 * seed),
        "params_total": 4_000_000,
        "params_nonembedding": 3_000_000,
        "kv_cache_bytes_per_token": 1024,
    }


def harness_row(variant: str, seed: int, task: str, metric: str, value: float, shots: int = 5) -> dict[str, Any]:
    """As ``qkvlab.harness.runner`` appends it (the fields the report reads)."""
    run = training_row(variant, seed)["run_id"]
    return {
        "run_id": f"harness:{run}:{task}:{metric}:{shots}shot",
        "status": "harness",
        "of_run": run,
        "variant": variant,
        "paper_name": variant,
        "model": "gpt2-3m",
        "seed": seed,
        "tokens": 1000,
        "task": task,
        "metric": metric,
        "value": value,
        "stderr": 0.01,
        "n": 100,
        "num_fewshot": shots,
        "limit": None,
    }


def study_rows() -> list[dict[str, Any]]:
    rows = [training_row(v, s) for v, s in ACC]
    for (v, s), acc in ACC.items():
        for task in PAPER_TASKS:
            rows.append(harness_row(v, s, task, "acc", acc))
            rows.append(harness_row(v, s, task, "acc_norm", acc + 0.05))
        rows.append(harness_row(v, s, "lambada_openai", "acc", acc / 2))
        rows.append(harness_row(v, s, "lambada_openai", "perplexity", 1000.0 * (1 + s)))
    return rows


def write_study(folder: Path, rows: list[dict[str, Any]], sweep: dict[str, Any] | None = None) -> Path:
    store = ResultsStore(folder)
    for r in rows:
        store.append(r)
    if sweep is not None:
        (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return folder


def test_section_averages_and_changes():
    lines, records = downstream_section(study_rows())
    assert len(records) == 4
    by = {(r["variant"], r["seed"]): r for r in records}
    for (v, s), acc in ACC.items():
        r = by[(v, s)]
        assert r["avg"] == pytest.approx(acc) and r["acc"] == {t: acc for t in PAPER_TASKS}
        # Five independent tasks with a standard error of 0.01 each.
        assert r["avg_stderr"] == pytest.approx(math.sqrt(5 * 0.01**2) / 5)
        assert r["lambada_acc"] == pytest.approx(acc / 2) and r["lambada_ppl"] == 1000.0 * (1 + s)
    # Against the QKV run of the same seed, never another seed's.
    assert by[("Q-K=V", 0)]["avg_change_vs_qkv"] == pytest.approx(-0.02)
    assert by[("Q-K=V", 1)]["avg_change_vs_qkv"] == pytest.approx(+0.01)
    assert by[("QKV", 0)]["avg_change_vs_qkv"] is None
    text = "\n".join(lines)
    assert "### 5-shot, every item" in text and "| -2.0 ± 0.6 |" in text
    # The paper's numbers beside ours, quoted from the table, its missing cells said so.
    paper = PAPER_TABLES["table11"].values
    assert f"| Q-K=V | {paper['Q-K=V']['arc_challenge']:.2f} |" in text
    assert f"{paper['Q-K=V']['avg'] - paper['QKV']['avg']:+.2f}" in text
    assert "| GQA-8 | not found |" in text


def test_incomplete_tasks_give_no_average():
    rows = [harness_row("QKV", 0, t, "acc", 0.3) for t in PAPER_TASKS[:-1]]
    (record,) = downstream_section(rows)[1]
    assert record["avg"] is None and record["acc"]["winogrande"] is None
    assert downstream_section([training_row("QKV", 0)]) == ([], [])


def test_study_report_shows_the_section(tmp_path: Path):
    study = write_study(tmp_path / "s", study_rows())
    text = write_report(study, plots=False).read_text()
    assert "## Downstream accuracy (lm-evaluation-harness)" in text
    assert "4 finished runs" in text  # harness rows are not runs


def test_ladder_report_keeps_harness_rows_apart_from_its_grid(tmp_path: Path):
    pytest.importorskip("scipy")
    from qkvlab.study import SweepSpec, expand, ladder

    spec = SweepSpec.from_dict(
        {"name": "t", "report": "ladder", "base": {"model": {"preset": "gpt2-1m"}}, "grid": {"variant": ["QKV"]}}
    )
    (plan,) = expand(spec)
    train = training_row("QKV", 0) | {"run_id": plan.run_id}
    scored = [
        harness_row("QKV", 0, t, "acc", 0.3) | {"of_run": plan.run_id, "run_id": f"harness:{plan.run_id}:{t}"}
        for t in PAPER_TASKS
    ]
    study = write_study(tmp_path / "s", [train, *scored], spec.to_dict())
    report = ladder.write_ladder_report(study, plots=False)
    summary = json.loads((report.parent / "ladder_summary.json").read_text())
    assert summary["header"]["rows_from_other_configs"] == 0 and summary["header"]["runs_ok"] == 1
    (record,) = summary["downstream"]
    assert record["run"] == plan.run_id and record["avg"] == pytest.approx(0.3)
    assert "## Downstream accuracy" in report.read_text()


def test_harness_rows_filter():
    rows = study_rows()
    assert len(harness_rows(rows)) == len(rows) - len(ACC)
