"""Studies: sweeps over variants x model sizes x token budgets x seeds, a results store, reports.

Example::

    from qkvlab.study import load_sweep, run_sweep, write_report

    summary = run_sweep(load_sweep("configs/studies/lm-variants-tiny.yaml"))
    print(write_report(summary.study_dir))  # studies/lm-variants-tiny/report/report.md

The library never imports this package; it builds on :mod:`qkvlab.train`. Data flows one way:

* :mod:`~qkvlab.study.spec` (the sweep file), :mod:`~qkvlab.study.metrics` and
  :mod:`~qkvlab.study.paper` (the paper's numbers, as data) are leaves;
* :mod:`~qkvlab.study.grid` expands a sweep into grid points, each a train config with a run id;
* :mod:`~qkvlab.study.sweep` trains each point; the trainer returns the run's complete result
  (:class:`~qkvlab.train.trainer.RunResult`: metrics, the model's resolved config, family and
  costs, the code version) and the sweep appends it, with the point's labels, as one row of the
  :mod:`~qkvlab.study.results` store;
* the reports, :mod:`~qkvlab.study.report` and :mod:`~qkvlab.study.ladder`, read the rows (and the
  study's name and report settings); they share :mod:`~qkvlab.study.tables` and
  :mod:`~qkvlab.study.plots` and import neither the sweep nor the trainer.
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
