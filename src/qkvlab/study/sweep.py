"""Sweeps: the grid of a study run by one runner, resumably, one results row per run.

The sweep file's format and its parsed form, :class:`~qkvlab.study.spec.SweepSpec`, are described
in :mod:`qkvlab.study.spec`; its grid points and their run ids in :mod:`qkvlab.study.grid`.
:func:`run_sweep` records the points that cannot be built as ``"skipped"``, runs the others
in order, appends one row per finished run to ``results.jsonl`` and skips runs already finished
there, so a killed sweep resumes where it stopped; a run whose folder already holds files is
resumed with the trainer's own ``resume=True``.

A row is the grid point's labels, the run's own result (:class:`~qkvlab.train.trainer.RunResult`:
metrics, the resolved model's family and costs, the code version it ran) and the sweep's timing;
the sweep adds nothing it would have to work out again.

With several devices, one thread per device takes the next run from a shared queue and
trains it in a subprocess that sees only that device (``CUDA_VISIBLE_DEVICES``; its output
goes to ``study_dir/.jobs/<run_id>.log``); the parent alone writes ``results.jsonl``. A
fresh process per run also hands all GPU memory back between runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.provenance import now
from qkvlab.study.grid import (  # noqa: F401 (the grid's names, importable from here too)
    ID_EXCLUDED,
    RunPlan,
    computed_part,
    expand,
    run_id_for,
    select,
    task_of,
)
from qkvlab.study.results import RUNS_DIR, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ResultsStore, read_metrics
from qkvlab.study.spec import SWEEP_FILE, SweepSpec, format_tokens, load_sweep, parse_tokens  # noqa: F401
from qkvlab.train.config import _flat_diff, load_yaml

LOCK_FILE = ".sweep.lock"

#: ``run_fn(config, resume=...) -> summary``: trains one resolved config (a plain dict).
RunFn = Callable[..., dict[str, Any]]


# ================================================================== results rows
def _last_eval(run_dir: Path) -> dict[str, Any]:
    """The ``val_*`` metrics of the last eval row in ``metrics.jsonl`` (for a summary without them)."""
    evals = [m for m in read_metrics(run_dir) if m.get("val_loss") is not None]
    if not evals:
        return {}
    return {k: v for k, v in evals[-1].items() if k.startswith("val_") and v is not None}


def _plan_row(plan: RunPlan) -> dict[str, Any]:
    return {
        "run_id": plan.run_id,
        "variant": plan.variant,
        "variant_id": plan.variant_id,
        "model": plan.model,
        "tokens_budget": plan.tokens,
        "max_steps": plan.config.get("max_steps"),
        "seed": plan.seed,
        "axes": plan.axes,
        "out_dir": None if plan.status == STATUS_SKIPPED else str(Path(RUNS_DIR) / plan.run_id),
    }


def skipped_row(plan: RunPlan) -> dict[str, Any]:
    """The results row of a grid point that cannot be built."""
    return {**_plan_row(plan), "status": STATUS_SKIPPED, "reason": plan.reason, "config": plan.config}


def result_row(
    plan: RunPlan,
    config: dict[str, Any],
    summary: dict[str, Any],
    *,
    run_dir: Path,
    started: str,
    wall_s: float,
    resumed: bool,
) -> dict[str, Any]:
    """The results row of a finished run: the plan's labels, the run's own
    :class:`~qkvlab.train.trainer.RunResult` and the sweep's timing.

    A ``run_fn`` that reports no validation scores gets those of its last ``metrics.jsonl``
    evaluation, and no token count the plan's budget.
    """
    from qkvlab.train.trainer import RunResult

    result = RunResult.from_summary({**_last_eval(run_dir), **{k: v for k, v in summary.items() if v is not None}})
    row: dict[str, Any] = {**_plan_row(plan), "status": STATUS_OK, **result.row()}
    if row["tokens"] is None:
        row["tokens"] = plan.tokens
    row.update({"config": config, "started": started, "finished": now(), "wall_s": wall_s, "resumed": resumed})
    if task_of(config) != "lm":
        row["task"] = dict(config["task"])
    return row


def failed_row(plan: RunPlan, config: dict[str, Any], error: str, *, started: str) -> dict[str, Any]:
    return {
        **_plan_row(plan),
        "status": STATUS_FAILED,
        "error": error,
        "config": config,
        "started": started,
        "finished": now(),
    }


def _outcome(row: dict[str, Any]) -> str:
    loss, ppl, acc, wall = row.get("val_loss"), row.get("val_ppl"), row.get("val_acc"), row.get("wall_s") or 0.0
    if loss is not None and ppl is not None:
        scores = f"val loss {loss:.4f}, val ppl {ppl:.2f}"
    elif loss is not None and acc is not None:
        scores = f"val loss {loss:.4f}, val acc {acc:.4f}"
    else:
        scores = "no val loss"
    return f"{scores} ({wall:.0f} s)"


# ================================================================== running
def default_run_fn() -> RunFn:
    """:func:`qkvlab.train.train` behind the sweep's ``run_fn(config_dict, resume=...)`` contract."""
    try:
        from qkvlab.train import TrainConfig, train
    except ImportError as e:
        raise ConfigError(
            f"qkvlab sweep needs the trainer (qkvlab.train), which cannot be imported here ({e}). Reinstall "
            "qkvlab (pip install -e .), or pass run_fn= to run_sweep."
        ) from None

    def run(config: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
        return train(TrainConfig.from_dict(config), resume=resume)

    return run


def check_with_trainer(plans: Sequence[RunPlan]) -> None:
    """Validate every runnable grid point with the trainer's own config class, before the first run.

    A misspelt key in the base config then stops the sweep at once instead of failing every run.
    """
    from qkvlab.train import TrainConfig

    for plan in plans:
        if plan.status != STATUS_SKIPPED:
            try:
                TrainConfig.from_dict({**plan.config, "out_dir": "unused"})
            except ConfigError as e:
                raise ConfigError(f"Grid point {plan.run_id}: {e}") from None


def parse_devices(devices: str | Sequence[str | int] | None) -> list[str]:
    """Devices from ``"0,1"``, ``"all"``, ``"cpu"`` or a list; entries are CUDA indices or ``"cpu"``."""
    if devices is None:
        return []
    items = [s.strip() for s in devices.split(",")] if isinstance(devices, str) else [str(d).strip() for d in devices]
    items = [s for s in items if s]
    if items == ["all"]:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ConfigError("--devices all: no CUDA device is visible; run without --devices (sequential).")
        return [str(i) for i in range(count)]
    for item in items:
        if item != "cpu" and not item.isdigit():
            raise ConfigError(f"Bad device {item!r}; give CUDA indices such as '0,1', 'all', or 'cpu'.")
    wanted = [int(i) for i in items if i.isdigit()]
    if wanted:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if max(wanted) >= count:
            fix = f"use indices below {count}, or 'cpu'" if count else "run without --devices, or pass 'cpu'"
            raise ConfigError(f"Device {max(wanted)} asked for, but {count} CUDA device(s) are visible; {fix}.")
    return items


@dataclass
class SweepSummary:
    """What :func:`run_sweep` did, by run id."""

    study_dir: Path
    planned: int = 0
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # left for a later call by the time limit
    stopped: list[str] = field(default_factory=list)  # of those, stopped at the limit with a checkpoint

    def __str__(self) -> str:
        later = f", {len(self.deferred)} left for a later call (time limit)" if self.deferred else ""
        if self.stopped:
            later += f" of which {len(self.stopped)} stopped with a checkpoint (the next call resumes them)"
        return (
            f"{self.planned} grid points: {len(self.ran)} ran ({len(self.resumed)} resumed), "
            f"{len(self.already_done)} already done, {len(self.skipped)} skipped as invalid, "
            f"{len(self.failed)} failed{later}; results in {self.study_dir / 'results.jsonl'}"
        )


def run_sweep(
    spec: SweepSpec | str | os.PathLike,
    study_dir: str | os.PathLike | None = None,
    *,
    run_fn: RunFn | None = None,
    devices: str | Sequence[str | int] | None = None,
    verbose: bool = True,
    time_limit: float | None = None,
    force: bool = False,
    only: dict[str, Sequence[Any]] | None = None,
    stop_at_limit: bool = False,
) -> SweepSummary:
    """Run every grid point of ``spec`` not yet finished in ``study_dir``'s results.

    Args:
        spec: a :class:`SweepSpec` or the path of a sweep YAML.
        study_dir: the study folder; default ``spec.study_dir``, else ``studies/<name>``.
        run_fn: ``run_fn(config: dict, *, resume: bool) -> summary dict``; default
            :func:`qkvlab.train.train` (see :func:`default_run_fn`). With several devices it
            must be a module-level function, since each run happens in a subprocess.
        devices: None (sequential, the config's own device), one device (sequential on it),
            or several (one run per entry at a time; an index given twice, ``"0,0"``, runs two
            at a time on that GPU, which pays for small models that leave it idle between
            kernel launches); see :func:`parse_devices`.
        verbose: print one line per run.
        only: axis (or dotted config key) -> values: run only the grid points with one of those
            values, e.g. ``{"model": ["gpt2-3m"]}`` (see :func:`select`).
        time_limit: seconds from the call; a run is started only if it is expected to finish
            inside them (its tokens at the seconds per token that finished runs of the same
            model took here; a model with no finished run yet is always started). Runs left
            over stay pending for the next call: a sweep in slices on a machine lent for a while.
        stop_at_limit: with ``time_limit``, also start runs that will not finish in it (while
            at least ``MIN_PARTIAL_S`` is left), and at the limit stop every run still training
            with a checkpoint of the step it reached (:func:`qkvlab.train.request_stop`); the
            next call on this folder resumes them. For a machine kept between calls: a run that
            cannot finish inside one call then finishes over several, and no call ends idle
            waiting for its last runs. Runs of the default trainer only (a ``run_fn`` of one's
            own finishes its run).
        force: run into ``study_dir`` even if it holds another study (see :func:`check_same_study`);
            its ``sweep.yaml`` is replaced and its rows stay.

    One sweep at a time per study folder: a second :func:`run_sweep` on a folder whose lock
    another holds is refused at once (the worker processes of several devices run the trainer,
    not this function, so they take no lock). A ``KeyboardInterrupt`` stops the sweep at once;
    finished runs stay in ``results.jsonl`` and the next call continues with the rest.
    """
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time_limit must be a positive number of seconds, got {time_limit!r}.")
    if stop_at_limit and time_limit is None:
        raise ConfigError(
            "--stop-at-limit (stop_at_limit) stops runs at the time limit, so it needs one: "
            "give --time-limit SECONDS too."
        )
    deadline = None if time_limit is None else time.monotonic() + time_limit
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    study = Path(study_dir if study_dir is not None else spec.study_dir or Path("studies") / spec.name)
    device_list = parse_devices(devices)
    parallel = len(device_list) >= 2
    if parallel:
        _function_ref(run_fn)  # refuse a run_fn that a worker process cannot import, before any run
    plans = select(expand(spec), only)
    local_fn = run_fn or default_run_fn()  # a missing trainer fails here, before anything is written
    if run_fn is None:
        check_with_trainer(plans)
    store = ResultsStore(study)
    try:
        study.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"Cannot create the study folder {str(study)!r}: {e.strerror or e}; pick another --out."
        ) from None
    with study_lock(study):
        check_same_study(spec, study, force=force)
        atomic_write(study / SWEEP_FILE, lambda p: Path(p).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False)))
        return _run_plans(spec, plans, store, run_fn, local_fn, device_list, verbose, deadline, stop_at_limit)


def _run_plans(
    spec: SweepSpec,
    plans: list[RunPlan],
    store: ResultsStore,
    run_fn: RunFn | None,
    local_fn: RunFn,
    device_list: list[str],
    verbose: bool,
    deadline: float | None,
    stop_at_limit: bool = False,
) -> SweepSummary:
    """The runs of :func:`run_sweep`, under the study's lock."""
    study, parallel = store.study_dir, len(device_list) >= 2
    summary = SweepSummary(study_dir=study, planned=len(plans))
    latest = store.latest()
    pending: list[RunPlan] = []
    for plan in plans:
        prior = latest.get(plan.run_id, {}).get("status")
        if plan.status == STATUS_SKIPPED:
            if prior != STATUS_SKIPPED:
                store.append(skipped_row(plan))
            summary.skipped.append(plan.run_id)
        elif prior == STATUS_OK:
            summary.already_done.append(plan.run_id)
        else:
            pending.append(plan)
    say = print if verbose else (lambda *a, **k: None)
    say(
        f"sweep {spec.name!r}: {len(plans)} grid points, {len(summary.already_done)} already done, "
        f"{len(summary.skipped)} skipped as invalid, {len(pending)} to run; study folder {study}",
        flush=True,
    )
    share = max(map(device_list.count, device_list)) if parallel else None
    stops = stop_at_limit and run_fn is None  # only the default trainer answers a stop request
    fits = _Timer(store, deadline, share, partial=stops)
    record = _Recorder(store, summary, say)
    if parallel:
        limit = deadline if stops else None
        _run_parallel(pending, store, record, run_fn, device_list, fits, limit)  # None: the trainer, in each worker
    else:
        device = device_list[0] if device_list else None
        with _stop_at(deadline if stops else None):
            for k, plan in enumerate(pending, start=1):
                if not fits(plan):
                    summary.deferred.append(plan.run_id)
                    continue
                say(f"[{k}/{len(pending)}] {plan.run_id}: {plan.variant} on {plan.model}, seed {plan.seed}", flush=True)
                _run_one(plan, store, record, local_fn, device)
    say(str(summary), flush=True)
    return summary


@contextlib.contextmanager
def _stop_at(deadline: float | None) -> Iterator[None]:
    """Ask the run training in this process to stop with a checkpoint at ``deadline`` (a
    ``time.monotonic`` time; None: never)."""
    if deadline is None:
        yield
        return
    from qkvlab.train.trainer import request_stop

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), request_stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        request_stop(False)  # fired between runs: no run is left to answer it


@contextlib.contextmanager
def study_lock(study: Path) -> Iterator[None]:
    """Hold ``study/.sweep.lock`` for one sweep; a second sweep on the folder is refused at once.

    Two sweeps on one folder would run the same runs, delete each other's temporary
    checkpoints and write duplicate rows. The lock is an OS file lock, so a killed sweep
    leaves none behind.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(study / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"Another qkvlab sweep is running on {str(study)!r} (it holds {LOCK_FILE}); wait for it to finish, or "
            "run this sweep into another --out."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _computed(config: Any) -> Any:
    """A base config without the keys that do not change what a run computes (:data:`ID_EXCLUDED`)."""
    if not isinstance(config, dict):
        return config
    return {k: v for k, v in computed_part(config).items() if v != {}}  # a section left empty means its defaults


def check_same_study(spec: SweepSpec, study: Path, *, force: bool = False) -> None:
    """Refuse to run ``spec`` into a folder that holds another study (``force``: run anyway).

    The same study is a sweep with the same ``name`` and the same ``base`` as the folder's
    ``sweep.yaml`` (keys that do not change what a run computes, :data:`ID_EXCLUDED` such as
    ``device`` or ``data.cache_dir``, aside): its grid, overrides and report settings may change
    (a study grows by grid points and blocks, run in slices), but another base or name would
    mix two studies' rows in one report and overwrite the other's ``sweep.yaml``. A folder
    without a ``sweep.yaml`` is taken as the study's own: results seeded into it by hand (as
    ``scripts/sweep_slice.py`` does from committed results) continue.
    """
    stored_path = study / SWEEP_FILE
    if force or not stored_path.is_file():
        return
    where = f"choose another --out for this study, or pass --force to run into {str(study)!r} anyway"
    try:
        stored = load_yaml(stored_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        stored = None
    if not isinstance(stored, dict):
        raise ConfigError(f"{str(stored_path)!r} cannot be read, so the folder's study is unknown; {where}.")
    mine = load_yaml(yaml.safe_dump(spec.to_dict(), sort_keys=False))  # as it would be stored
    if "name" not in stored:
        raise ConfigError(f"{str(stored_path)!r} is not a study's sweep file (it has no name); {where}.")
    if stored.get("name") != mine["name"]:
        raise ConfigError(f"{str(study)!r} holds another study ({stored.get('name')!r}, not {spec.name!r}); {where}.")
    old, new = _computed(stored.get("base")), _computed(mine["base"])
    if old != new:
        keys = sorted(_flat_diff(old, new)) if isinstance(old, dict) and isinstance(new, dict) else ["base"]
        raise ConfigError(
            f"{str(study)!r} holds study {spec.name!r} with another base config (differs in {', '.join(keys[:4])}): "
            f"runs of two bases would mix in one report; {where}."
        )


#: With ``stop_at_limit``, the least time left at which a run that will not finish still starts:
#: less would go mostly to its start-up and its checkpoint.
MIN_PARTIAL_S = 120.0


class _Timer:
    """Whether a plan is expected to finish before the deadline (always, without one).

    A run's wall time is a fixed part (start-up, compilation, the final evaluation) plus its
    tokens at a rate: the line through the wall times of the finished runs of the same model
    here when they ran at two or more budgets, else the medians of their untimed part and of
    their train time per token. A rate of wall time per token alone would charge the fixed part
    four times over to a run with four times the tokens. Runs that shared their device with as
    many others as this sweep's runs will are preferred, since sharing slows each run; rows
    without ``train_time_s`` (a custom trainer) count as all rate.
    """

    def __init__(
        self, store: ResultsStore, deadline: float | None, runs_per_device: int | None = None, *, partial: bool = False
    ):
        self.store, self.deadline, self.runs_per_device, self.partial = store, deadline, runs_per_device, partial

    def estimate(self, model: str, tokens: float) -> float | None:
        """Expected wall seconds of a run of ``model`` for ``tokens`` (None: no finished run to go by)."""
        rows = [
            r
            for r in self.store.latest().values()
            if r.get("status") == STATUS_OK and r.get("model") == model and r.get("wall_s") and r.get("tokens")
        ]
        whole = [r for r in rows if not r.get("resumed")]  # a resumed run's times cover its last part only
        rows = whole or rows
        alike = [r for r in rows if r.get("runs_per_device") == self.runs_per_device]
        rows = alike or rows
        if not rows:
            return None
        if len({r["tokens"] for r in rows}) >= 2:
            # runs at two or more budgets: the line through their wall times, which puts the
            # compilation in the fixed part (a run's own train time counts it as rate)
            slope, intercept = np.polyfit([r["tokens"] for r in rows], [r["wall_s"] for r in rows], 1)
            if slope > 0 and intercept >= 0:
                return float(intercept + slope * tokens)
        fixed, rate = [], []
        for r in rows:
            train = r.get("train_time_s")
            train = train if isinstance(train, int | float) and 0 < train <= r["wall_s"] else r["wall_s"]
            fixed.append(r["wall_s"] - train)
            rate.append(train / r["tokens"])
        return statistics.median(fixed) + statistics.median(rate) * tokens

    def __call__(self, plan: RunPlan) -> bool:
        if self.deadline is None:
            return True
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        if plan.tokens is None or (self.partial and left >= MIN_PARTIAL_S):
            return True
        expected = self.estimate(plan.model, plan.tokens)
        return expected is None or expected <= left


def _device_config(config: dict[str, Any], device: str | None) -> dict[str, Any]:
    config = copy.deepcopy(config)
    if device is not None:
        config["device"] = "cpu" if device == "cpu" else f"cuda:{device}"
    return config


def _is_partial(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


@dataclass
class _Job:
    """One plan about to run: its folder, whether it resumes, its config on its device."""

    plan: RunPlan
    run_dir: Path
    resume: bool
    config: dict[str, Any]
    started: str = field(default_factory=now)
    t0: float = field(default_factory=lambda: time.perf_counter())  # looked up when called (tests set a clock)

    @classmethod
    def start(cls, plan: RunPlan, store: ResultsStore, device: str | None) -> _Job:
        run_dir = store.run_dir(plan.run_id)
        config = _device_config(plan.config, device)
        config["out_dir"] = str(run_dir)
        return cls(plan, run_dir, _is_partial(run_dir), config)


class _Recorder:
    """Appends each run's row and keeps the sweep's tally; one for the sweep, shared by the
    device threads (the store and the tally are locked)."""

    def __init__(self, store: ResultsStore, summary: SweepSummary, say: Callable[..., None]):
        self.store, self.summary, self.say = store, summary, say
        self.lock = threading.Lock()

    def done(self, job: _Job, summary: dict[str, Any], *, tag: str = "  done: ", **extra: Any) -> None:
        row = result_row(
            job.plan,
            job.config,
            dict(summary or {}),
            run_dir=job.run_dir,
            started=job.started,
            wall_s=time.perf_counter() - job.t0,
            resumed=job.resume,
        )
        row.update(extra)
        self.store.append(row)
        with self.lock:
            self.summary.ran.append(job.plan.run_id)
            if job.resume:
                self.summary.resumed.append(job.plan.run_id)
        self.say(f"{tag}{_outcome(row)}", flush=True)

    def stopped(self, job: _Job, message: str, *, tag: str = "  stopped: ") -> None:
        """A run stopped at the time limit with a checkpoint: no row; the next call resumes it."""
        with self.lock:
            self.summary.deferred.append(job.plan.run_id)
            self.summary.stopped.append(job.plan.run_id)
        self.say(f"{tag}{job.plan.run_id}: {message}", flush=True)

    def failed(self, job: _Job, error: str, *, tag: str = "  failed: ") -> None:
        self.store.append(failed_row(job.plan, job.config, error, started=job.started))
        with self.lock:
            self.summary.failed.append((job.plan.run_id, error))
        self.say(f"{tag}{error}", flush=True)


def _run_one(plan: RunPlan, store: ResultsStore, record: _Recorder, run_fn: RunFn, device: str | None) -> None:
    """Train one plan in this process and append its row (ok or failed)."""
    job = _Job.start(plan, store, device)
    try:
        result = run_fn(job.config, resume=job.resume)
    except Exception as e:
        if _is_stop(e):
            record.stopped(job, str(e))
        else:
            record.failed(job, f"{type(e).__name__}: {e}")
        return
    record.done(job, result)


def _is_stop(e: BaseException) -> bool:
    """Whether ``e`` is the trainer's answer to a stop request (its module is loaded if so)."""
    trainer = sys.modules.get("qkvlab.train.trainer")
    return trainer is not None and isinstance(e, trainer.RunStopped)


# ------------------------------------------------------------------ several devices
_WORKER = "import sys; from qkvlab.study.sweep import worker_main; sys.exit(worker_main(sys.argv[1:]))"
JOBS_DIR = ".jobs"
#: Seconds a worker asked to stop gets to save its checkpoint before it is killed.
STOP_GRACE_S = 60.0


def _function_ref(fn: RunFn | None) -> str | None:
    """``module:qualname`` of a module-level function, so a subprocess can import it."""
    if fn is None:
        return None
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in name or "." in name:
        raise ConfigError(
            f"With several devices each run happens in a subprocess, so run_fn must be a module-level function "
            f"it can import; {fn!r} is not. Define it at the top level of a module, or run on one device."
        )
    return f"{module}:{name}"


def worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: train the job file ``argv[0]`` and write its result file. Exit 0 on success."""
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    out = Path(job["result"])
    try:
        if job["run_fn"]:
            import importlib

            module, _, name = job["run_fn"].partition(":")
            run_fn = getattr(importlib.import_module(module), name)
        else:
            run_fn = default_run_fn()
            # SIGTERM (the sweep's time limit, or the sweep itself stopped): finish the step, save
            # a checkpoint and exit, so the next sweep resumes instead of starting over
            from qkvlab.train.trainer import request_stop

            signal.signal(signal.SIGTERM, lambda *_: request_stop())
        summary = run_fn(job["config"], resume=job["resume"])
        result = {"ok": True, "summary": summary}
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "stopped": _is_stop(e)}
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(result, default=str)))
    return 0 if result["ok"] else 3 if result["stopped"] else 1


def _run_parallel(
    pending: list[RunPlan],
    store: ResultsStore,
    record: _Recorder,
    run_fn: RunFn | None,
    devices: list[str],
    fits: Callable[[RunPlan], bool] = lambda plan: True,
    limit: float | None = None,
) -> None:
    """One thread per device entry takes plans from a queue and trains each in a subprocess on that
    device. At ``limit`` (a ``time.monotonic`` time) the runs still training are asked to stop with
    a checkpoint (SIGTERM, which a worker of the default trainer answers so)."""
    ref = _function_ref(run_fn)
    jobs = store.study_dir / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue[RunPlan] = queue.Queue()
    for plan in pending:
        todo.put(plan)
    stop = threading.Event()
    procs: dict[int, subprocess.Popen] = {}
    lock = record.lock
    repeated = len(set(devices)) < len(devices)

    def work(worker: int, device: str) -> None:
        label = f"{device}#{worker}" if repeated else device
        while not stop.is_set():
            try:
                plan = todo.get_nowait()
            except queue.Empty:
                return
            if not fits(plan):
                with lock:
                    record.summary.deferred.append(plan.run_id)
                continue
            job = _Job.start(plan, store, "cpu" if device == "cpu" else "0")
            job_file, result_path = jobs / f"{plan.run_id}.json", jobs / f"{plan.run_id}.result.json"
            result_path.unlink(missing_ok=True)
            job_file.write_text(
                json.dumps({"config": job.config, "resume": job.resume, "run_fn": ref, "result": str(result_path)})
            )
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if device == "cpu" else device}
            record.say(f"[device {label}] {plan.run_id}: {plan.variant} on {plan.model}, seed {plan.seed}", flush=True)
            with open(jobs / f"{plan.run_id}.log", "w") as log:
                proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(job_file)], env=env, stdout=log, stderr=log)
                with lock:
                    procs[worker] = proc
                proc.wait()
            if stop.is_set():
                return  # interrupted: not recorded, so the next sweep runs (resumes) it
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            if result and result.get("stopped"):
                record.stopped(job, result["error"].partition(": ")[2], tag=f"[device {label}] stopped ")
            elif result and result.get("ok"):
                # throughput and MFU are shared by the runs on one device
                record.done(job, result["summary"], tag=f"[device {label}] done {plan.run_id}: ",
                            runs_per_device=devices.count(device))  # fmt: skip
            else:
                error = (result or {}).get("error") or f"worker exited with {proc.returncode}; see {log.name}"
                record.failed(job, error, tag=f"[device {label}] failed {plan.run_id}: ")

    threads = [
        threading.Thread(target=work, args=(i, d), name=f"sweep-{d}-{i}", daemon=True) for i, d in enumerate(devices)
    ]

    def signal_running() -> list[subprocess.Popen]:
        with lock:
            running = [p for p in procs.values() if p.poll() is None]
        for p in running:
            p.terminate()
        return running

    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
            if limit is not None and time.monotonic() >= limit:
                signal_running()  # each saves a checkpoint, writes its result and exits
                limit = None
    except KeyboardInterrupt:
        stop.set()
        running = signal_running()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()  # an orphan still training would collide with the next sweep's run of it
        for t in threads:
            t.join(timeout=5)
        raise
