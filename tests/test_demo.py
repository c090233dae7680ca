"""`qkvlab demo` end to end at a token budget of seconds: runs, table, report, resume.

The default test trains two variants; the demo of all eight (the same code path, four times
the training) is marked ``slow`` and runs with ``make test-all`` or ``pytest -m slow``.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qkvlab.attention.variant import PAPER_LM_VARIANTS
from qkvlab.cli import app
from qkvlab.study import demo


def run_demo(out) -> tuple[object, dict[str, dict]]:
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--tokens", "6k"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" and r["val_ppl"] > 1 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert "report:" in result.output and (out / "report" / "report.md").is_file()
    return result, {r["variant"]: r for r in rows}


def test_demo_trains_the_variants_writes_the_report_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PAPER_LM_VARIANTS", ("QKV", "Q-K=V"))
    out = tmp_path / "demo"
    result, by = run_demo(out)
    assert sorted(by) == ["Q-K=V", "QKV"] and "Q-K=V" in result.output
    assert by["Q-K=V"]["kv_cache_bytes_per_token"] * 2 == by["QKV"]["kv_cache_bytes_per_token"]
    # A second demo finds every run done and trains nothing.
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--tokens", "6k"])
    assert again.exit_code == 0 and "2 already done" in again.output


@pytest.mark.slow
def test_demo_trains_every_paper_variant(tmp_path):
    result, by = run_demo(tmp_path / "demo")
    assert sorted(by) == sorted(PAPER_LM_VARIANTS) and "Q-MQA" in result.output
    assert by["Q-K=V"]["kv_cache_bytes_per_token"] * 2 == by["QKV"]["kv_cache_bytes_per_token"]
