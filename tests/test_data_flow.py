"""Data flows one way: config -> model -> the trainer's complete result -> the sweep's row -> the
reports, which read rows only. One routine merges a preset into a model config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkvlab.costs import model_costs
from qkvlab.errors import ConfigError
from qkvlab.models.config import EncoderConfig, GPTConfig
from qkvlab.models.presets import PRESETS, get_preset, with_preset
from qkvlab.study.results import RESULT_KEYS
from qkvlab.train import TrainConfig, train
from qkvlab.train.trainer import RunResult
from test_imports import import_graph

QUIET = {"log": {"progress": False, "tensorboard": False}, "device": "cpu", "eval_every": 0, "max_steps": 2}


def lm_config(out: Path, variant: str) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            **QUIET,
            "model": {"preset": "tiny", "variant": variant},
            "data": {"source": "stdlib", "tokenizer": "byte", "max_docs": 20},
            "batch_size": 4,
            "seq_len": 32,
            "out_dir": str(out),
        }
    )


# ================================================================== the trainer's result
def test_the_trainer_reports_its_model_costs_and_code_as_one_result(tmp_path: Path):
    summary = train(lm_config(tmp_path / "run", "Q-K=V"), verbose=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["model_family"] == "gpt" and summary["model_config"] == info["model"]
    model = GPTConfig.from_dict(info["model"])  # the tokenizer's vocabulary, not the preset's
    assert summary["costs"] == model_costs(model)
    assert summary["costs"]["kv_cache_bytes_per_token"] == 2 * 1 * 8 * 8 * 2  # 2 layers, K=V once, 8 x 8, bf16
    assert summary["costs"]["params_total"] == summary["params"]
    assert (summary["git_commit"], summary["git_dirty"]) == (info["git"]["commit"], info["git"]["dirty"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary

    result = RunResult.from_summary(summary)
    assert result.summary() == summary and list(result.summary()) == list(summary)  # a lossless round trip
    row = result.row()
    assert {"tokens", "val_loss", "val_ppl", "params_total", "kv_cache_bytes_per_token", "cache_reduction"} <= set(row)
    assert row["val_tokens"] == summary["val_tokens"] and row["params_trained"] == summary["params"]
    assert not set(row) & {"model_config", "model_family", "costs"}  # rows keep their format
    # A GPU's peak memory goes into the row when the trainer measured it (never on a CPU).
    assert "peak_memory_gib" not in row
    gpu = RunResult.from_summary({**summary, "device_name": "NVIDIA H100 80GB HBM3", "peak_memory_gib": 1.5})
    assert gpu.row()["peak_memory_gib"] == 1.5 and gpu.row()["device_name"] == "NVIDIA H100 80GB HBM3"


def test_a_resumed_run_reports_the_code_it_started_with(tmp_path: Path):
    config = lm_config(tmp_path / "run", "QKV")
    train(config, verbose=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    info["git"] = {"commit": "feedface", "dirty": True}
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    summary = train(config, resume=True, verbose=False)  # from its last checkpoint, under this code
    assert (summary["steps"], summary["git_commit"], summary["git_dirty"]) == (2, "feedface", True)


def test_another_family_reports_its_parameters_and_no_cache(tmp_path: Path):
    config = TrainConfig.from_dict(
        {
            **QUIET,
            "task": {"name": "synthetic", "kind": "reverse", "seq_len": 8, "n_train": 32, "n_test": 16},
            "model": {"preset": None, "d_model": 16, "n_layers": 1, "n_heads": 2, "variant": "Q=K-V"},
            "batch_size": 8,
            "out_dir": str(tmp_path / "run"),
        }
    )
    summary = train(config, verbose=False)
    assert summary["model_family"] == "encoder"
    assert summary["costs"] == model_costs(EncoderConfig.from_dict(summary["model_config"]))
    assert summary["costs"]["params_total"] == summary["params"]
    assert summary["costs"]["kv_cache_bytes_per_token"] is summary["costs"]["cache_reduction"] is None


def test_a_partial_summary_reads_back_with_nones():
    result = RunResult.from_summary({"tokens": 10, "val_loss": 2.0, "decode_tokens_per_s": 99.0, "note": "x"})
    assert result.metrics == {"val_loss": 2.0} and result.extra == {"decode_tokens_per_s": 99.0, "note": "x"}
    row = result.row()
    assert row["decode_tokens_per_s"] == 99.0 and "note" not in row
    assert {k for k in RESULT_KEYS if k in row and row[k] is None} >= {"params_total", "kv_cache_bytes_per_token"}


# ================================================================== one way
def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """Modules reachable from ``start``, packages' own ``__init__`` imports aside (every
    ``qkvlab.study.x`` runs ``qkvlab.study`` first, which is not what ``x`` needs)."""
    packages = {m for m in graph if any(n.startswith(m + ".") for n in graph)}
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [n for n in graph.get(module, ()) if n not in packages]
    return seen


@pytest.mark.parametrize(
    "reader",
    [
        "qkvlab.study.report",
        "qkvlab.study.metric_report",
        "qkvlab.study.ladder.report",
        "qkvlab.study.ladder.sections",
        "qkvlab.study.tables",
        "qkvlab.study.plots",
    ],
)
def test_reports_read_rows_and_never_reach_the_sweep_or_the_trainer(reader: str):
    reached = _closure(import_graph(deferred=True), reader)
    assert not reached & {"qkvlab.study.sweep", "qkvlab.train.trainer"}, sorted(reached)


def test_the_analysis_uses_the_study_s_public_names_only():
    import ast

    for path in Path(__file__).resolve().parents[1].joinpath("src", "qkvlab", "analysis").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qkvlab.study"):
                assert node.module != "qkvlab.study.report", f"{path.name} imports the report"
                assert not [a.name for a in node.names if a.name.startswith("_")], f"{path.name}: {node.module}"


def test_write_report_gives_a_ladder_study_the_ladder(tmp_path: Path):
    pytest.importorskip("scipy")
    from qkvlab.study import write_report
    from test_ladder_report import ladder_rows, write_study

    study = write_study(tmp_path / "s", ladder_rows()[:40], {"name": "flow", "report": "ladder"})
    report = write_report(study, plots=False)
    assert report.read_text().startswith("# Scaling ladder: flow") and (report.parent / "ladder_summary.json").is_file()


# ================================================================== presets
def test_one_routine_merges_a_preset_into_a_model_section():
    assert with_preset({"preset": "gpt2-1m", "variant": "Q-K=V"}) == {**PRESETS["gpt2-1m"], "variant": "Q-K=V"}
    assert with_preset({"n_heads": 4}, default="tiny") == {**PRESETS["tiny"], "n_heads": 4}
    assert with_preset({"preset": None, "n_heads": 4}, default="tiny") == {"n_heads": 4}
    assert with_preset({"preset": "tiny", "bogus": 1}, fields={"n_layers", "bogus"}) == {"n_layers": 2, "bogus": 1}
    skipped = with_preset({"preset": "tiny", "vocab_size": 12}, skip=("vocab_size", "max_seq_len"))
    assert skipped["vocab_size"] == 12 and "max_seq_len" not in skipped
    assert get_preset("tiny", variant="Q-K=V") == GPTConfig(**with_preset({"preset": "tiny", "variant": "Q-K=V"}))
    with pytest.raises(ConfigError, match=r"Unknown model\.preset 'tinny'"):
        with_preset({"preset": "tinny"})
