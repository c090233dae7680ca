"""``qkvlab eval harness``: run the shipped tasks on checkpoints, write results a report can read.

Each evaluated run folder gets ``harness.json``::

    {"format": "qkvlab-harness/1", "rows": [
        {"task": "hellaswag", "metric": "acc_norm", "value": 0.2612, "stderr": 0.0044, "n": 10042,
         "num_fewshot": 5, "limit": null, "lm_eval_version": "0.4.13", "qkvlab_commit": "...", ...},
        ...]}

one row per (task, metric), replacing an earlier row of the same checkpoint, task, metric,
shot count and limit; other rows stay. With ``study=DIR`` the same rows are appended to
``DIR/results.jsonl`` with ``status: "harness"`` and a ``run_id`` of
``harness:<run>:<task>:<metric>:<k>shot[:limit<N>]``: readers of training rows select
``status == "ok"`` and never see them, and a rerun's row replaces the earlier one (the last
row of a ``run_id`` wins). ``of_run`` names the training run, whose variant, model, seed and
token count are copied in when the study has its row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from qkvlab.errors import ConfigError
from qkvlab.harness.data import TASK_DIR, TaskSpec, file_sha256, find_data_file, resolve_tasks
from qkvlab.provenance import now, process_code_version
from qkvlab.study.downstream import HARNESS_STATUS as STATUS

FORMAT = "qkvlab-harness/1"
RESULTS_NAME = "harness.json"
#: Row fields copied from a study's training row of the same run.
TRAINING_KEYS = (
    "variant",
    "variant_id",
    "model",
    "seed",
    "tokens",
    "tokens_budget",
    "params_total",
    "params_nonembedding",
)


def _quiet_lm_eval() -> None:
    """No network, no progress bars from datasets, only lm-eval's errors in the log."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Bootstrapped standard errors (LAMBADA's perplexity) in this process: no worker pool
    # forked from a process that holds a GPU context.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    import datasets

    datasets.disable_progress_bars()
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_folder(path: Path) -> Path:
    """Where a checkpoint's results go (:func:`qkvlab.train.state.results_folder`): never inside a
    checkpoint folder that a resumed run would prune."""
    from qkvlab.train.state import results_folder

    return results_folder(path)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def result_rows(results: dict[str, Any], specs: list[TaskSpec]) -> list[dict[str, Any]]:
    """One row per (task, metric) from what ``lm_eval.simple_evaluate`` returned."""
    rows = []
    for spec in specs:
        metrics = results["results"].get(spec.harness_name)
        if metrics is None:
            continue
        n = (results.get("n-samples") or {}).get(spec.harness_name, {})
        better = (results.get("higher_is_better") or {}).get(spec.harness_name, {})
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or name == "alias":
                continue
            rows.append(
                {
                    "task": spec.name,
                    "harness_task": spec.harness_name,
                    "metric": name,
                    "value": _number(value),
                    "stderr": _number(metrics.get(f"{name}_stderr,{filt}")),
                    "n": n.get("effective"),
                    "n_total": n.get("original"),
                    "num_fewshot": (results.get("n-shot") or {}).get(spec.harness_name),
                    "higher_is_better": better.get(name),
                    "task_version": (results.get("versions") or {}).get(spec.harness_name),
                }
            )
    return rows


def _merge(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` into ``path`` (atomically), replacing rows they repeat."""
    from qkvlab.checkpoint import atomic_write

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("checkpoint"), r.get("task"), r.get("metric"), r.get("num_fewshot"), r.get("limit"))

    old: list[dict[str, Any]] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            old = list(data.get("rows") or []) if isinstance(data, dict) else []
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"Cannot read {str(path)!r} ({e}); move it away and rerun.") from None
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    text = json.dumps({"format": FORMAT, "rows": merged}, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _study_rows(study: Path, run: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from qkvlab.study.results import ResultsStore

    store = ResultsStore(study)
    runs = (study / "runs").resolve()
    folder = run.resolve()
    name = folder.name
    if folder.is_relative_to(runs) and folder != runs:
        name = folder.relative_to(runs).parts[0]  # a checkpoint inside runs/<run_id>/
    training = store.latest().get(name) or {}
    out = []
    for r in rows:
        run_id = f"harness:{name}:{r['task']}:{r['metric']}:{r['num_fewshot']}shot"
        if r.get("limit") is not None:
            run_id += f":limit{r['limit']}"
        extra = {k: training[k] for k in TRAINING_KEYS if k in training}
        out.append({"run_id": run_id, "status": STATUS, "of_run": name, **extra, **r})
    for row in out:
        store.append(row)
    return out


def evaluate_runs(
    paths: list[str | os.PathLike],
    tasks: str | list[str] | None = None,
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    data_root: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    truncate: str = "error",
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    study: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate each checkpoint in ``paths`` on ``tasks``; returns every result row.

    Writes ``harness.json`` into each run folder (unless ``write=False``) and, with
    ``study``, the rows into the study's results store. All inputs are checked (tasks, data
    files, checkpoints, tokenizers) before the first evaluation starts.
    """
    from qkvlab.harness import register, require_lm_eval

    version = require_lm_eval()
    if not paths:
        raise ConfigError("Name at least one run folder or checkpoint to evaluate.")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be an integer >= 0, got {num_fewshot!r}.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit must be an integer >= 1, got {limit!r}.")
    if not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise ConfigError(f"--bootstrap-iters must be an integer >= 0, got {bootstrap_iters!r}.")
    specs = resolve_tasks(tasks)
    files = {spec.name: find_data_file(spec, data_root) for spec in specs}
    if study is not None and Path(study).exists() and not Path(study).is_dir():
        raise ConfigError(f"--study {str(study)!r} is a file; pass the study folder (holding results.jsonl).")
    _quiet_lm_eval()
    QkvlabLM = register()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qkvlab.harness.model import TRUNCATE, inspect_checkpoint, resolve_device, resolve_dtype

    if truncate not in TRUNCATE:
        raise ConfigError(f"--truncate must be 'error' or 'left', got {truncate!r}.")
    resolve_dtype(dtype, resolve_device(device))

    # Every checkpoint and tokenizer is checked (no weights loaded) before the first evaluation.
    tokenizers = [inspect_checkpoint(p, tokenizer)[2] for p in paths]
    meta = {"data_root": str(Path(data_root).expanduser().resolve())} if data_root is not None else {}
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
    commit, dirty = process_code_version()
    all_rows: list[dict[str, Any]] = []
    for path, tok in zip(paths, tokenizers, strict=True):
        t0, started = time.perf_counter(), now()
        lm = QkvlabLM(
            path=path, tokenizer=tok, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
            truncate=truncate,
        )  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes; stdout may carry JSON
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[s.harness_name for s in specs],
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                verbosity="ERROR",
            )
        spec_model = lm.model.config.variant
        common = {
            "limit": limit,
            "fewshot_seed": 1234,  # lm-eval's default, which simple_evaluate used
            "lm_eval_version": version,
            "qkvlab_commit": commit,
            "qkvlab_dirty": dirty,
            "checkpoint": lm.checkpoint,
            "train_step": getattr(lm, "train_step", None),
            "variant_id": spec_model.id,
            "paper_name": spec_model.paper_name,
            "tokenizer": lm.tok.spec,
            "max_length": lm.max_length,
            "truncate": truncate,
            "truncated_requests": lm.truncated,
            "batch_size": lm.batch_size,
            "device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "started": started,
            "finished": now(),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        rows = []
        for r in result_rows(results, specs):
            file = files[r["task"]]
            rows.append({**r, **common, "data_file": str(file), "data_sha256": file_sha256(file)})
        if write:
            _merge(run_folder(Path(path)) / RESULTS_NAME, rows)
        if study is not None:
            rows = _study_rows(Path(study), run_folder(Path(path)), rows)
        all_rows.extend(rows)
        del lm, results  # one model in memory at a time
        if progress:
            print(f"{common['checkpoint']}: {len(specs)} task(s) in {common['wall_s']:.1f} s")
    return all_rows
