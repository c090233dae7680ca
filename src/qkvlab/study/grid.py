"""The grid of a study: its points, each a resolved train config with a stable run id.

:func:`expand` turns a :class:`~qkvlab.study.spec.SweepSpec` into :class:`RunPlan` s: each
block's Cartesian product in the order model > tokens > other axes > seed > variant. Each point
gets a readable, stable id, e.g. ``q_kv-gpt2-1m-t1e6-s0-3f9a0c12``: the variant id, the model,
the budget, the seed and 8 hex digits of a SHA-256 of the resolved config (keys that do not
change what a run computes, :data:`ID_EXCLUDED`, left out). Points that cannot be built (the
query tied to a key or value with grouped KV heads; GQA-N on a model with N heads, which is MHA
and would repeat another run) come back as ``"skipped"`` with the reason.

This module only plans: :mod:`qkvlab.study.sweep` runs the plans and writes their rows, and a
report that needs to know which rows belong to a study's current grid asks :func:`planned_ids`.
It imports no trainer (only the task registry, for a task's own model config).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.models.config import GPTConfig
from qkvlab.models.presets import DEFAULT_PRESET, PRESETS, with_preset
from qkvlab.study.results import STATUS_SKIPPED
from qkvlab.study.spec import AXES, SweepSpec, format_tokens, parse_tokens, read_study_file
from qkvlab.train.config import get_dotted, parse_value, set_dotted

#: Config keys left out of the run id: they do not change what a run computes.
ID_EXCLUDED = ("out_dir", "device", "log.progress", "log.tensorboard", "data.cache_dir")


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
    """The model config a train config asks for, to check a grid point before it runs.

    For the language model (:class:`~qkvlab.models.GPTConfig`) the vocabulary is the preset's
    (the trainer uses the tokenizer's), which changes neither the attention layers nor the
    KV cache; only :class:`GPTConfig` fields are read, the trainer itself rejects unknown keys.
    Another task resolves its own model config (``model_config`` of its class); None when
    the task cannot say without its data. What a run trained is what its trainer reports.
    """
    if task_of(config) != "lm":
        from qkvlab.tasks import model_config
        from qkvlab.train import TrainConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "GQA-N on N heads is MHA" is reported as a skip instead
            return model_config(TrainConfig.from_dict({**config, "out_dir": "unused"}))
    if config.get("init_from"):  # the checkpoint's model, as the trainer builds it
        from qkvlab.train import TrainConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TrainConfig.from_dict({**config, "out_dir": "unused"}).model_config()
    model = config.get("model") or {}
    fields = with_preset(model, fields={f.name for f in dataclasses.fields(GPTConfig)}, default=DEFAULT_PRESET)
    if "max_seq_len" not in model and config.get("seq_len") is not None:
        fields["max_seq_len"] = config["seq_len"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GQA-N on N heads is MHA" is reported as a skip instead
        return GPTConfig(**fields)


def _model_name(config: dict[str, Any]) -> str:
    if config.get("init_from") and not (config.get("model") or {}).get("preset"):
        path = Path(str(config["init_from"]))  # a run folder, or the weights file in one
        return (path.parent if path.suffix == ".safetensors" else path).name or "custom"
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
        if config.get("init_from") and get_dotted(config, "model.variant") is None:
            # the model is the checkpoint's: so is the variant (a point naming one must match it);
            # written as a grid names variants, the positions being the recipe's
            spec_v = model_config_for(config).variant.replace(pos=None)
        else:
            spec_v = VariantSpec.parse(get_dotted(config, "model.variant") or "QKV")
        set_dotted(config, "model.variant", spec_v.id)
        model = _model_name(config)
        mha = copy.deepcopy(config)
        set_dotted(mha, "model.variant", VariantSpec(pos=spec_v.pos).id)
        shape = json.dumps([mha["model"], config.get("seq_len")], sort_keys=True, default=str)
        if shape not in checked_shapes and not config.get("init_from"):
            # the model itself must build (as QKV): else no variant can (a checkpoint's builds)
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


def planned_ids(study_dir: str | Path) -> set[str] | None:
    """Run ids of the grid in a study folder's ``sweep.yaml``; None when it has none, or only
    report settings (then every row of the folder is the study's)."""
    stored = read_study_file(study_dir)
    if not stored:
        return None
    try:
        return {p.run_id for p in expand(SweepSpec.from_dict(stored))}
    except ConfigError:
        return None
