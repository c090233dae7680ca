"""`qkvlab demo` end to end at a token budget of seconds: runs, table, report, resume."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qkvlab.attention.variant import PAPER_LM_VARIANTS
from qkvlab.cli import app


def test_demo_trains_every_paper_variant_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--tokens", "6k"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == sorted(PAPER_LM_VARIANTS)
    assert all(r["status"] == "ok" and r["val_ppl"] > 1 and r["decode_tokens_per_s"] > 0 for r in rows)
    by = {r["variant"]: r for r in rows}
    assert by["Q-K=V"]["kv_cache_bytes_per_token"] * 2 == by["QKV"]["kv_cache_bytes_per_token"]
    assert "Q-MQA" in result.output and "report:" in result.output
    assert (out / "report" / "report.md").is_file()
    # A second demo finds every run done and trains nothing.
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--tokens", "6k"])
    assert again.exit_code == 0 and "8 already done" in again.output
