"""The results store of a study: one JSON line per finished run, and a folder per run.

A study folder looks like this::

    study_dir/
      results.jsonl         # one JSON object per line: a finished, skipped or failed run
      sweep.yaml            # the sweep that filled it (written by run_sweep)
      runs/<run_id>/        # the trainer's out_dir: config.yaml, run.json, metrics.jsonl, weights
      report/               # written by the reports (qkvlab.study.report, qkvlab.study.ladder)

``results.jsonl`` is append-only. Each row is written with one ``write`` call, then flushed
and fsynced, so a killed writer leaves at most one truncated last line; readers skip such a
line with a warning. When a run appears more than once (it failed, then succeeded on a
rerun), the last row wins. A row's ``status`` is one of:

* ``"ok"``: the run finished; it has the metrics and costs listed in :data:`RESULT_KEYS`. Such a
  row is the grid point's labels (run id, variant, model, budget, seed, axes), the run's own
  result as its trainer reported it (:meth:`qkvlab.train.trainer.RunResult.row`: metrics, the
  model's costs, the code version) and the sweep's record of it (the train config, times);
* ``"skipped"``: the grid point cannot be built (e.g. Q=K with grouped KV heads);
  ``reason`` holds the :class:`~qkvlab.errors.ConfigError` message;
* ``"failed"``: the run raised; ``error`` holds the message. A rerun of the sweep retries it.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"
RUNS_DIR = "runs"
REPORT_DIR = "report"
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"

#: Keys every ``"ok"`` row carries (values may be None where a run did not report them).
RESULT_KEYS = (
    "run_id",
    "status",
    "variant",
    "variant_id",
    "model",
    "params_total",
    "params_attention",
    "tokens",
    "tokens_budget",
    "seed",
    "val_loss",
    "val_ppl",
    "train_tokens_per_s",
    "kv_cache_bytes_per_token",
    "cache_reduction",
    "config",
    "started",
    "finished",
    "out_dir",
)


#: Fields of an ``"ok"`` row that hold a number (or None): a row whose value there is not one came
#: from a hand edit or another tool, and would break every table it reached.
NUMBER_KEYS = frozenset(
    {
        "params_total", "params_attention", "params_nonembedding", "params_trained", "tokens", "tokens_budget",
        "max_steps", "steps", "seed", "val_loss", "val_ppl", "val_acc", "val_seq_acc", "val_auroc", "train_loss",
        "train_tokens_per_s", "train_time_s", "decode_tokens_per_s", "kv_cache_bytes_per_token", "cache_reduction",
        "decode_state_bytes", "flops_per_token", "mfu", "steady_mfu", "steady_tokens_per_s", "peak_memory_gib",
        "wall_s", "world_size",
    }
)  # fmt: skip
NAME_KEYS = ("run_id", "variant_id")  # every table is keyed by these
TEXT_KEYS = ("variant", "model")  # shown where present


class UnusableRowWarning(UserWarning):
    """A finished row lacks a field the report needs or holds a field of the wrong type; it was left out."""


def row_problem(row: dict[str, Any]) -> str | None:
    """What makes an ``"ok"`` row unusable in a report, or None."""
    for key in NAME_KEYS:
        if not isinstance(row.get(key), str):
            return f"{key} is {row.get(key)!r}, not a name" if key in row else f"it has no {key}"
    for key in TEXT_KEYS:
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"{key} is {row[key]!r}, not a name"
    for key, value in row.items():
        numeric = key in NUMBER_KEYS or key.endswith(("_loss", "_ppl"))
        if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{key} is {value!r}, not a number"
    return None


def usable_rows(rows: list[dict[str, Any]], path: str | os.PathLike) -> list[dict[str, Any]]:
    """``rows`` without those :func:`row_problem` finds fault with, each left out with a warning."""
    kept = []
    for row in rows:
        problem = row_problem(row)
        if problem is None:
            kept.append(row)
        else:
            warnings.warn(
                f"{str(path)!r}: left out run {row.get('run_id')!r}, whose row cannot be reported ({problem}); "
                "fix or remove that line.",
                UnusableRowWarning,
                stacklevel=2,
            )
    return kept


class TruncatedLineWarning(UserWarning):
    """A JSONL line could not be decoded (usually the last line of a killed writer); it was skipped."""


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, in order; undecodable lines are skipped with a warning.

    A missing file reads as no rows.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            where = "its last line" if number == len(lines) else f"line {number}"
            warnings.warn(
                f"{str(path)!r}: skipped {where}, which is not valid JSON (a writer was probably killed "
                f"mid-line): {line[:80]!r}",
                TruncatedLineWarning,
                stacklevel=2,
            )
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (train rows have ``loss``, eval rows ``val_loss``)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def row_value(row: dict[str, Any], key: str) -> Any:
    """A dotted key of a row's resolved config (``task.kind``, ``model.d_model``), else of the row."""
    node: Any = row.get("config") or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return row.get(key) if node is None else node


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively (results stay strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class ResultsStore:
    """Reads and appends the ``results.jsonl`` of one study folder.

    Example::

        store = ResultsStore("studies/tiny")
        store.append({"run_id": "q_kv-tiny-t1e4-s0-0123abcd", "status": "ok", ...})
        done = store.finished_ids()
    """

    def __init__(self, study_dir: str | os.PathLike):
        self.study_dir = Path(study_dir)
        self.path = self.study_dir / RESULTS_FILE
        self._lock = threading.Lock()

    def run_dir(self, run_id: str) -> Path:
        """The folder of one run (the trainer's ``out_dir``)."""
        return self.study_dir / RUNS_DIR / run_id

    def append(self, row: dict[str, Any]) -> None:
        """Append one row as a single line, then flush and fsync.

        If the file ends in a truncated line (a killed writer), a newline is written first so
        that the new row starts on a line of its own.
        """
        if not row.get("run_id") or not row.get("status"):
            raise ValueError(f"a results row needs a run_id and a status, got keys {sorted(row)}")
        line = json.dumps(_finite(row), allow_nan=False, default=str) + "\n"
        with self._lock:
            self.study_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every row in file order (a run may appear more than once)."""
        return read_jsonl(self.path)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last row of each run, keyed by run_id, in order of first appearance."""
        out: dict[str, dict[str, Any]] = {}
        for row in self.read():
            if "run_id" in row:
                out[row["run_id"]] = row
        return out

    def finished_ids(self) -> set[str]:
        """Run ids whose last row says the run finished (status ``"ok"``)."""
        return {run_id for run_id, row in self.latest().items() if row.get("status") == STATUS_OK}
