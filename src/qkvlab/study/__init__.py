"""Studies: sweeps over variants x model sizes x token budgets x seeds, a results store, reports.

Example::

    from qkvlab.study import load_sweep, run_sweep, write_report

    summary = run_sweep(load_sweep("configs/studies/lm-variants-tiny.yaml"))
    print(write_report(summary.study_dir))  # studies/lm-variants-tiny/report/report.md

The library never imports this package; it builds on :mod:`qkvlab.train`, imported lazily.
Data flows one way: :mod:`~qkvlab.study.spec` (the sweep file), :mod:`~qkvlab.study.metrics`
and :mod:`~qkvlab.study.paper` (the paper's numbers, as data) are leaves; the sweep writes
rows to the :mod:`~qkvlab.study.results` store and the report reads them.
"""

from qkvlab.study.report import pareto_front, summarize_group, write_report
from qkvlab.study.results import RESULT_KEYS, ResultsStore, TruncatedLineWarning, read_jsonl, read_metrics
from qkvlab.study.spec import SweepSpec, load_sweep, parse_tokens
from qkvlab.study.sweep import RunPlan, SweepSummary, default_run_fn, expand, parse_devices, run_id_for, run_sweep

__all__ = [
    "RESULT_KEYS",
    "ResultsStore",
    "RunPlan",
    "SweepSpec",
    "SweepSummary",
    "TruncatedLineWarning",
    "default_run_fn",
    "expand",
    "load_sweep",
    "pareto_front",
    "parse_devices",
    "parse_tokens",
    "read_jsonl",
    "read_metrics",
    "run_id_for",
    "run_sweep",
    "summarize_group",
    "write_report",
]
