"""Sweeps: a grid of training configs that one runner executes, resumably.

The sweep file's format and its parsed form, :class:`~qkvlab.study.spec.SweepSpec`, are described
in :mod:`qkvlab.study.spec`.

Each grid point gets a readable, stable id, e.g. ``q_kv-gpt2-1m-t1e6-s0-3f9a0c12``: the
variant id, the model, the budget, the seed and 8 hex digits of a SHA-256 of the resolved
config. Points that cannot be built (the query tied to a key or value with grouped KV heads;
GQA-N on a model with N heads, which is MHA and would repeat another run) are recorded as
``"skipped"`` with the reason. :func:`run_sweep` runs the others in order, appends one row
per finished run to ``results.jsonl`` and skips runs already finished there, so a killed
sweep resumes where it stopped; a run whose folder already holds files is resumed with the
trainer's own ``resume=True``.

With several devices, one thread per device takes the next run from a shared queue and
trains it in a subprocess that sees only that device (``CUDA_VISIBLE_DEVICES``; its output
goes to ``study_dir/.jobs/<run_id>.log``); the parent alone writes ``results.jsonl``. A
fresh process per run also hands all GPU memory back between runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvlab.attention.variant import VariantSpec
from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.provenance import code_version, now
from qkvlab.study.results import RUNS_DIR, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ResultsStore, read_metrics
from qkvlab.study.spec import (
    AXES,
    SWEEP_FILE,
    SweepSpec,
    format_tokens,
    get_dotted,
    load_sweep,
    parse_tokens,
)
from qkvlab.train.config import _flat_diff, load_yaml, parse_value, set_dotted

#: Config keys left out of the run id: they do not change what a run computes.
ID_EXCLUDED = ("out_dir", "device", "log.progress", "log.tensorboard", "data.cache_dir")
DEFAULT_PRESET = "tiny"  # the trainer's default when a config names no preset
LOCK_FILE = ".sweep.lock"

#: ``run_fn(config, resume=...) -> summary``: trains one resolved config (a plain dict).
RunFn = Callable[..., dict[str, Any]]


# ================================================================== grid points
@dataclass
class RunPlan:
    """One grid point: its id, its labels and the resolved train config (``out_dir`` unset).

    ``status`` is ``"pending"`` or ``"skipped"`` (then ``reason`` says why).
    """

    run_id: str
    variant: str
    variant_id: str
    model: str
    tokens: int | None
    seed: int
    config: dict[str, Any]
    axes: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    reason: str | None = None


def task_of(config: dict[str, Any]) -> str:
    """The task name of a train config dict (``"lm"`` when it has no ``task`` section)."""
    task = config.get("task")
    return str(task.get("name", "lm")) if isinstance(task, dict) else "lm"


def model_config_for(config: dict[str, Any]):
    """The model config a train config asks for, resolved as the trainer does.

    For the language model (:class:`~qkvlab.models.GPTConfig`) the vocabulary is the preset's
    (the trainer uses the tokenizer's), which changes neither the attention layers nor the
    KV cache; only :class:`GPTConfig` fields are read, the trainer itself rejects unknown keys.
    Another task resolves its own model config (``model_config`` of its class); None when
    the task cannot say without its data.
    """
    if task_of(config) != "lm":
        from qkvlab.tasks import model_config
        from qkvlab.train import TrainConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "GQA-N on N heads is MHA" is reported as a skip instead
            return model_config(TrainConfig.from_dict({**config, "out_dir": "unused"}))
    from qkvlab.models.config import GPTConfig
    from qkvlab.models.presets import PRESETS

    model = dict(config.get("model") or {})
    preset = model.pop("preset", DEFAULT_PRESET)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"Unknown model.preset {preset!r}; available: {', '.join(PRESETS)}.")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = {**(PRESETS[preset] if preset else {}), **{k: v for k, v in model.items() if k in known}}
    if "max_seq_len" not in model and config.get("seq_len") is not None:
        fields["max_seq_len"] = config["seq_len"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GQA-N on N heads is MHA" is reported as a skip instead
        return GPTConfig(**fields)


def _model_name(config: dict[str, Any]) -> str:
    preset = (config.get("model") or {}).get("preset", DEFAULT_PRESET)
    return str(preset) if preset else "custom"


def _why_invalid(config: dict[str, Any], spec: VariantSpec, model: str) -> str | None:
    """Why this grid point cannot run (None when it can)."""
    try:
        cfg = model_config_for(config)
    except ConfigError as e:
        return str(e)
    if cfg is None:  # the task cannot resolve its model without data: the run itself will tell
        return None
    g = spec.n_kv_heads
    if g is not None and g > 1 and g == cfg.n_heads:
        same = spec.replace(n_kv_heads=None).paper_name
        return (
            f"Variant {spec.paper_name!r} asks for {g} KV heads on {model!r}, which has n_heads={cfg.n_heads}: "
            f"that is MHA, the same model as {same!r}, so it would repeat that run. Drop it from the grid or "
            f"use fewer KV heads (a divisor of {cfg.n_heads})."
        )
    return None


def computed_part(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a train config without the keys of :data:`ID_EXCLUDED`: what the run computes."""
    out = copy.deepcopy(config)
    for key in ID_EXCLUDED:
        parent, _, last = key.rpartition(".")
        node = get_dotted(out, parent) if parent else out
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def run_id_for(config: dict[str, Any], *, variant_id: str, model: str, tokens: int | None, seed: int) -> str:
    """A readable id plus 8 hex digits of a SHA-256 of the config (keys in :data:`ID_EXCLUDED` left out)."""
    hashed = computed_part(config)
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    if tokens is not None:
        budget = f"-t{format_tokens(tokens)}"
    else:
        budget = f"-steps{config['max_steps']}" if config.get("max_steps") is not None else ""
    readable = f"{variant_id.replace('+', '.')}-{model}{budget}-s{seed}"
    if task_of(config) != "lm":  # e.g. reverse-qk_v.2d-custom-steps1000-s0-...
        task = config["task"]
        readable = f"{task.get('kind') or task.get('name')}-{readable}"
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", readable) + f"-{digest}"


def expand(spec: SweepSpec) -> list[RunPlan]:
    """The grid's points: each block's Cartesian product in the order model > tokens > other
    axes > seed > variant, blocks in order, a point shared by two blocks once.

    A misspelt variant or preset raises :class:`ConfigError`; a point that cannot be built
    (see the module docstring) comes back with ``status="skipped"`` and the reason.
    """
    base = copy.deepcopy(spec.base)
    base.pop("out_dir", None)  # each run's out_dir is its folder in the study, set when it runs
    for key, value in spec.overrides.items():
        set_dotted(base, key, value)
    plans: list[RunPlan] = []
    seen: set[str] = set()
    for block in spec.grid if isinstance(spec.grid, list) else [spec.grid]:
        for plan in _expand_block(base, block):
            if plan.run_id not in seen:
                seen.add(plan.run_id)
                plans.append(plan)
    return plans


def _expand_block(base: dict[str, Any], block: dict[str, list[Any]]) -> list[RunPlan]:
    from qkvlab.models.presets import PRESETS

    grid = dict(block)
    for preset in grid.get("model", []):
        if preset not in PRESETS:
            near = difflib.get_close_matches(str(preset), PRESETS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"grid.model: unknown preset {preset!r}.{hint} Available: {', '.join(PRESETS)}.")
    if "variant" in grid:
        grid["variant"] = [VariantSpec.parse(v).id for v in grid["variant"]]
    if "tokens" in grid:
        grid["tokens"] = [parse_tokens(t) for t in grid["tokens"]]
    for seed in grid.get("seed", []):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"grid.seed: {seed!r} is not an integer; write seeds as e.g. [0, 1, 2].")
    extra = [k for k in grid if k not in AXES]
    order = [k for k in ("model", "tokens", *extra, "seed", "variant") if k in grid]

    plans: list[RunPlan] = []
    checked_shapes: set[str] = set()
    for values in itertools.product(*(grid[k] for k in order)):
        point = dict(zip(order, values, strict=True))
        config = copy.deepcopy(base)
        for axis, value in point.items():
            set_dotted(config, AXES.get(axis, axis), value)
        if "max_tokens" in config and config["max_tokens"] is not None:
            config["max_tokens"] = parse_tokens(config["max_tokens"])
        spec_v = VariantSpec.parse(get_dotted(config, "model.variant") or "QKV")
        set_dotted(config, "model.variant", spec_v.id)
        model = _model_name(config)
        mha = copy.deepcopy(config)
        set_dotted(mha, "model.variant", VariantSpec(pos=spec_v.pos).id)
        shape = json.dumps([mha["model"], config.get("seq_len")], sort_keys=True, default=str)
        if shape not in checked_shapes:  # the model itself must build (as QKV): else no variant can
            model_config_for(mha)
            checked_shapes.add(shape)
        tokens = config.get("max_tokens")
        seed = int(config.get("seed", 0))
        run_id = run_id_for(config, variant_id=spec_v.id, model=model, tokens=tokens, seed=seed)
        reason = _why_invalid(config, spec_v, model)
        plans.append(
            RunPlan(
                run_id=run_id,
                variant=spec_v.paper_name,
                variant_id=spec_v.id,
                model=model,
                tokens=tokens,
                seed=seed,
                config=config,
                axes=point,
                status=STATUS_SKIPPED if reason else "pending",
                reason=reason,
            )
        )
    ids = [p.run_id for p in plans]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"The grid repeats runs {dupes[:3]}: two grid values give the same config; remove one.")
    return plans


# ================================================================== results rows
#: The code version of rows whose run folder records none, looked up once per sweep process.
_code_version = functools.cache(code_version)


def model_family(model_cfg: dict[str, Any]) -> str:
    """The family (``gpt``, ``encoder``, ``vit``, ``set``) of a resolved model config dict."""
    for key, family in (("n_labels", "encoder"), ("image_size", "vit"), ("in_features", "set")):
        if key in model_cfg:
            return family
    return "gpt"


@functools.lru_cache(maxsize=64)
def _costs(model_json: str, family: str = "gpt") -> dict[str, Any]:
    """Parameters and KV-cache bytes (bf16) of a model config, vs QKV of the same shape.

    Only a causal language model has a KV cache; other families get their parameter counts
    and None for the cache columns.
    """
    from qkvlab.costs import variant_costs
    from qkvlab.models.config import CONFIG_TYPES, GPTConfig

    if family != "gpt":
        from qkvlab.costs import build_on_meta, count_params

        none = {"kv_cache_bytes_per_token": None, "cache_reduction": None, "kv_cache_dtype": None}
        none["decode_state_bytes"] = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params = count_params(build_on_meta(CONFIG_TYPES[family].from_dict(json.loads(model_json))))
        except (ConfigError, KeyError, TypeError, ValueError):
            return {"params_total": None, "params_attention": None, **none}
        return {"params_total": params["total"], "params_attention": params["attention"], **none}
    from qkvlab.costs import build_on_meta, params_nonembedding

    cfg = GPTConfig.from_dict(json.loads(model_json))
    (row,) = variant_costs(cfg, [cfg.variant])
    keep = ("params_total", "params_attention", "kv_cache_bytes_per_token", "cache_reduction", "dtype")
    out = {("kv_cache_dtype" if k == "dtype" else k): row[k] for k in keep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["params_nonembedding"] = params_nonembedding(build_on_meta(cfg))
    out["decode_state_bytes"] = row.get("decode_state_bytes") or None  # linear attention's fixed state
    return out


def _run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        info = {}
    return info if isinstance(info, dict) else {}


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
    """The results row of a finished run, from the trainer's summary and its run folder."""
    info = _run_info(run_dir)
    summary = {**_last_eval(run_dir), **{k: v for k, v in summary.items() if v is not None}}
    model_cfg = info.get("model")
    family = info.get("model_family")
    if not isinstance(model_cfg, dict):  # no run.json: resolve as the trainer would (preset vocabulary)
        resolved = model_config_for(config)
        model_cfg, family = (resolved.to_dict(), resolved.family) if resolved is not None else ({}, None)
    family = family if isinstance(family, str) else model_family(model_cfg)
    costs = _costs(json.dumps(model_cfg, sort_keys=True), family) if model_cfg else {}
    git = info.get("git") if isinstance(info.get("git"), dict) else {}
    commit, dirty = (git.get("commit"), git.get("dirty")) if git.get("commit") else _code_version()
    row: dict[str, Any] = {
        **_plan_row(plan),
        "status": STATUS_OK,
        "tokens": summary.get("tokens", plan.tokens),
        "steps": summary.get("steps"),
        "val_loss": summary.get("val_loss"),
        "val_ppl": summary.get("val_ppl"),
        "train_loss": summary.get("train_loss"),
        "train_tokens_per_s": summary.get("train_tokens_per_s"),
        "train_time_s": summary.get("train_time_s"),
        **costs,
        "params_trained": summary.get("params"),
        "git_commit": commit,
        "git_dirty": dirty,
        "config": config,
        "started": started,
        "finished": now(),
        "wall_s": wall_s,
        "resumed": resumed,
    }
    for key in ("decode_tokens_per_s", "world_size", "device_name", "flops_per_token", "mfu"):  # optional extras
        if summary.get(key) is not None:
            row[key] = summary[key]
    for key, value in summary.items():  # every other evaluation metric (val_acc, <set>_ppl, ...)
        if key not in row and (key.startswith("val_") or key.endswith(("_loss", "_ppl", "_tokens"))):
            row[key] = value
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
            raise ConfigError(
                f"Device {max(wanted)} asked for, but {count} CUDA device(s) are visible; "
                f"use indices below {count}, or 'cpu'."
            )
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

    def __str__(self) -> str:
        later = f", {len(self.deferred)} left for a later call (time limit)" if self.deferred else ""
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
        force: run into ``study_dir`` even if it holds another study (see :func:`check_same_study`);
            its ``sweep.yaml`` is replaced and its rows stay.

    One sweep at a time per study folder: a second :func:`run_sweep` on a folder whose lock
    another holds is refused at once (the worker processes of several devices run the trainer,
    not this function, so they take no lock). A ``KeyboardInterrupt`` stops the sweep at once;
    finished runs stay in ``results.jsonl`` and the next call continues with the rest.
    """
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time_limit must be a positive number of seconds, got {time_limit!r}.")
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
        return _run_plans(spec, plans, store, run_fn, local_fn, device_list, verbose, deadline)


def select(plans: list[RunPlan], only: dict[str, Sequence[Any]] | None) -> list[RunPlan]:
    """The plans whose value of every key in ``only`` is one of the values given for it.

    Keys are grid axes (``model``, ``variant``, ``tokens``, ``seed``) or dotted config keys;
    variants and token budgets match in any spelling (``Q-K=V`` / ``q_kv``, ``9.85M`` / ``9850000``).
    """
    if not only:
        return plans
    wanted: dict[str, set[str]] = {}
    for key, values in only.items():
        if key == "variant":
            wanted[key] = {VariantSpec.parse(v).id for v in values}
        elif key == "tokens":
            wanted[key] = {str(parse_tokens(v)) for v in values}
        else:
            wanted[key] = {str(parse_value(str(v))) for v in values}
    chosen = []
    for plan in plans:
        config_value = {key: get_dotted(plan.config, AXES.get(key, key)) for key in wanted}
        if all(str(config_value[key]) in values for key, values in wanted.items()):
            chosen.append(plan)
    if not chosen:
        keys = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in only.items())
        raise ConfigError(f"No grid point has {keys}; check the values against the sweep's grid.")
    return chosen


def _run_plans(
    spec: SweepSpec,
    plans: list[RunPlan],
    store: ResultsStore,
    run_fn: RunFn | None,
    local_fn: RunFn,
    device_list: list[str],
    verbose: bool,
    deadline: float | None,
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
    fits = _Timer(store, deadline)
    if parallel:
        _run_parallel(pending, store, summary, run_fn, device_list, say, fits)  # None: the trainer, in each worker
    else:
        device = device_list[0] if device_list else None
        for k, plan in enumerate(pending, start=1):
            if not fits(plan):
                summary.deferred.append(plan.run_id)
                continue
            say(f"[{k}/{len(pending)}] {plan.run_id}: {plan.variant} on {plan.model}, seed {plan.seed}", flush=True)
            _run_one(plan, store, summary, local_fn, device, say)
    say(str(summary), flush=True)
    return summary


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
    if stored.get("name") != mine["name"]:
        raise ConfigError(f"{str(study)!r} holds another study ({stored.get('name')!r}, not {spec.name!r}); {where}.")
    old, new = _computed(stored.get("base")), _computed(mine["base"])
    if old != new:
        keys = sorted(_flat_diff(old, new)) if isinstance(old, dict) and isinstance(new, dict) else ["base"]
        raise ConfigError(
            f"{str(study)!r} holds study {spec.name!r} with another base config (differs in {', '.join(keys[:4])}): "
            f"runs of two bases would mix in one report; {where}."
        )


class _Timer:
    """Whether a plan is expected to finish before the deadline (always, without one)."""

    def __init__(self, store: ResultsStore, deadline: float | None):
        self.store, self.deadline = store, deadline

    def seconds_per_token(self, model: str) -> float | None:
        rates = [
            r["wall_s"] / r["tokens"]
            for r in self.store.latest().values()
            if r.get("status") == STATUS_OK and r.get("model") == model and r.get("wall_s") and r.get("tokens")
        ]
        return sorted(rates)[len(rates) // 2] if rates else None

    def __call__(self, plan: RunPlan) -> bool:
        if self.deadline is None:
            return True
        left = self.deadline - time.monotonic()
        rate = self.seconds_per_token(plan.model)
        if left <= 0:
            return False
        return rate is None or plan.tokens is None or rate * plan.tokens <= left


def _device_config(config: dict[str, Any], device: str | None) -> dict[str, Any]:
    config = copy.deepcopy(config)
    if device is not None:
        config["device"] = "cpu" if device == "cpu" else f"cuda:{device}"
    return config


def _outcome(row: dict[str, Any]) -> str:
    loss, ppl, acc, wall = row.get("val_loss"), row.get("val_ppl"), row.get("val_acc"), row.get("wall_s") or 0.0
    if loss is not None and ppl is not None:
        scores = f"val loss {loss:.4f}, val ppl {ppl:.2f}"
    elif loss is not None and acc is not None:
        scores = f"val loss {loss:.4f}, val acc {acc:.4f}"
    else:
        scores = "no val loss"
    return f"{scores} ({wall:.0f} s)"


def _is_partial(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def _run_one(
    plan: RunPlan,
    store: ResultsStore,
    summary: SweepSummary,
    run_fn: RunFn,
    device: str | None,
    say: Callable[..., None],
) -> None:
    """Train one plan in this process and append its row (ok or failed)."""
    run_dir = store.run_dir(plan.run_id)
    resume = _is_partial(run_dir)
    config = _device_config(plan.config, device)
    config["out_dir"] = str(run_dir)
    started, t0 = now(), time.perf_counter()
    try:
        result = run_fn(config, resume=resume)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        store.append(failed_row(plan, config, error, started=started))
        summary.failed.append((plan.run_id, error))
        say(f"  failed: {error}", flush=True)
        return
    row = result_row(
        plan,
        config,
        dict(result or {}),
        run_dir=run_dir,
        started=started,
        wall_s=time.perf_counter() - t0,
        resumed=resume,
    )
    store.append(row)
    summary.ran.append(plan.run_id)
    if resume:
        summary.resumed.append(plan.run_id)
    say(f"  done: {_outcome(row)}", flush=True)


# ------------------------------------------------------------------ several devices
_WORKER = "import sys; from qkvlab.study.sweep import worker_main; sys.exit(worker_main(sys.argv[1:]))"
JOBS_DIR = ".jobs"


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
        summary = run_fn(job["config"], resume=job["resume"])
        result = {"ok": True, "summary": summary}
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(result, default=str)))
    return 0 if result["ok"] else 1


def _run_parallel(
    pending: list[RunPlan],
    store: ResultsStore,
    summary: SweepSummary,
    run_fn: RunFn | None,
    devices: list[str],
    say: Callable[..., None],
    fits: Callable[[RunPlan], bool] = lambda plan: True,
) -> None:
    """One thread per device entry takes plans from a queue and trains each in a subprocess on that device."""
    ref = _function_ref(run_fn)
    jobs = store.study_dir / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue[RunPlan] = queue.Queue()
    for plan in pending:
        todo.put(plan)
    stop = threading.Event()
    procs: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()
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
                    summary.deferred.append(plan.run_id)
                continue
            run_dir = store.run_dir(plan.run_id)
            resume = _is_partial(run_dir)
            config = _device_config(plan.config, "cpu" if device == "cpu" else "0")
            config["out_dir"] = str(run_dir)
            job, result_path = jobs / f"{plan.run_id}.json", jobs / f"{plan.run_id}.result.json"
            result_path.unlink(missing_ok=True)
            job.write_text(json.dumps({"config": config, "resume": resume, "run_fn": ref, "result": str(result_path)}))
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if device == "cpu" else device}
            started, t0 = now(), time.perf_counter()
            say(f"[device {label}] {plan.run_id}: {plan.variant} on {plan.model}, seed {plan.seed}", flush=True)
            with open(jobs / f"{plan.run_id}.log", "w") as log:
                proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(job)], env=env, stdout=log, stderr=log)
                with lock:
                    procs[worker] = proc
                proc.wait()
            if stop.is_set():
                return  # interrupted: not recorded, so the next sweep runs (resumes) it
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            if result and result.get("ok"):
                row = result_row(
                    plan,
                    config,
                    dict(result["summary"] or {}),
                    run_dir=run_dir,
                    started=started,
                    wall_s=time.perf_counter() - t0,
                    resumed=resume,
                )
                row["runs_per_device"] = devices.count(device)  # throughput and MFU are shared this way
                store.append(row)
                with lock:
                    summary.ran.append(plan.run_id)
                    if resume:
                        summary.resumed.append(plan.run_id)
                say(f"[device {label}] done {plan.run_id}: {_outcome(row)}", flush=True)
            else:
                error = (result or {}).get("error") or f"worker exited with {proc.returncode}; see {log.name}"
                store.append(failed_row(plan, config, error, started=started))
                with lock:
                    summary.failed.append((plan.run_id, error))
                say(f"[device {label}] failed {plan.run_id}: {error}", flush=True)

    threads = [
        threading.Thread(target=work, args=(i, d), name=f"sweep-{d}-{i}", daemon=True) for i, d in enumerate(devices)
    ]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            running = [p for p in procs.values() if p.poll() is None]
        for p in running:
            p.terminate()
        for t in threads:
            t.join(timeout=30)
        raise
