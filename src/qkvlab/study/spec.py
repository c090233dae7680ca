"""The sweep file: a study written down as a base train config, grid axes and report settings.

A sweep file is YAML::

    name: lm-variants-tiny              # optional; default: the file name
    study_dir: studies/lm-variants-tiny # optional; default: studies/<name>
    base: ../lm/tiny-stdlib.yaml        # a train config: a path (relative to this file,
                                        #   else to the working directory) or a mapping
    grid:                               # the Cartesian product of these lists
      variant: [QKV, Q-K=V, GQA-4]      # -> model.variant (paper notation or our ids)
      model: [gpt2-1m, gpt2-3m]         # -> model.preset (names from qkvlab.models.PRESETS)
      tokens: [1e6, 4M]                 # -> max_tokens (token budget; k / M / B suffixes allowed)
      seed: [0, 1]                      # -> seed
      optim.lr: [1e-3, 3e-3]            # any other dotted config key is an axis too
    overrides:                          # set in every run (a mapping or KEY=VALUE strings)
      log.progress: false
    metric: val_ppl                     # optional: what the report compares (default: val_ppl,
                                        #   or val_acc when the runs report accuracy); see
                                        #   qkvlab.study.metrics.METRICS
    group_by: [task.kind]               # optional: one table per value of these config keys
    paper_table: table2                 # optional: the paper's numbers beside ours in the report
                                        #   (qkvlab.study.paper.PAPER_TABLES)
    report: ladder                      # optional: the report's layout (variants, the default,
                                        #   or ladder: fits and tests across model sizes)

``grid`` may also be a list of such mappings: each is its own Cartesian product and the sweep
runs their union, block by block (a point that two blocks share runs once). A study whose axes
depend on each other uses this, e.g. a learning-rate sweep on QKV per model size, then every
variant at the rate each size chose.

Any task trains through the same grid: a base config with ``task: {name: synthetic, ...}``
and axes such as ``task.kind: [reverse, sort]``, ``task.seq_len: [16, 64]`` or
``model.d_model: [32, 64]`` (every dotted key is an axis).

:func:`load_sweep` reads such a file into a :class:`SweepSpec`; :mod:`qkvlab.study.grid`
expands it, :mod:`qkvlab.study.sweep` runs it and leaves a copy in the study folder, which
:func:`read_study_file` reads back for the reports (the study's name and report settings).
This module imports none of them, so all can use its names (the axes, token budgets).
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvlab.errors import ConfigError, check_keys
from qkvlab.study.metrics import METRICS
from qkvlab.study.paper import PAPER_TABLES
from qkvlab.train.config import load_yaml, parse_override

#: The named grid axes and the config key each one sets.
AXES = {"variant": "model.variant", "model": "model.preset", "tokens": "max_tokens", "seed": "seed"}
SWEEP_KEYS = (
    "name",
    "study_dir",
    "base",
    "grid",
    "overrides",
    "description",
    "metric",
    "group_by",
    "paper_table",
    "report",
)
#: Report layouts a sweep may ask for: the generic variant tables, or the scaling-ladder analysis.
REPORT_KINDS = ("variants", "ladder")
SWEEP_FILE = "sweep.yaml"


@dataclass
class SweepSpec:
    """A parsed sweep file: a base train config, the grid axes and overrides for every run.

    Args:
        base: the train config every run starts from (a plain nested mapping).
        grid: axis name -> list of values; see the module docstring for the axes.
        overrides: dotted key -> value, applied to ``base`` before the grid values.
        name: the study's name (shown in the report).
        study_dir: where results go when :func:`~qkvlab.study.sweep.run_sweep` is given none.
    """

    base: dict[str, Any]
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = "sweep"
    study_dir: str | None = None
    description: str | None = None
    metric: str | None = None
    group_by: list[str] | None = None
    paper_table: str | None = None
    report: str = "variants"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, root: str | os.PathLike | None = None, name: str = "sweep") -> SweepSpec:
        """Validate a sweep mapping; a ``base`` path is looked up under ``root``, then the working directory."""
        if not isinstance(d, dict):
            raise ConfigError(f"A sweep must be a mapping with 'base' and 'grid', got {type(d).__name__}.")
        check_keys("", d, SWEEP_KEYS, noun="sweep")
        if "base" not in d:
            raise ConfigError("The sweep has no 'base': give a train config mapping or the path of a train YAML.")
        base = _load_base(d["base"], Path(root) if root is not None else None)
        grid = {} if d.get("grid") is None else d["grid"]
        blocks = grid if isinstance(grid, list) else [grid]
        if not blocks:
            raise ConfigError("'grid' is an empty list; give at least one mapping of axes to lists.")
        for i, block in enumerate(blocks):
            where = f"grid[{i}]" if isinstance(grid, list) else "grid"
            if not isinstance(block, dict):
                raise ConfigError(
                    f"{where} must map axis names to lists, e.g. {{variant: [QKV, Q-K=V]}}, got {block!r}."
                )
            for axis, values in block.items():
                if not isinstance(values, list) or not values:
                    example = f"[{values!r}]" if values not in (None, [], {}, "") else "[QKV, Q-K=V] or [0, 1]"
                    raise ConfigError(f"{where}.{axis} must be a non-empty list, e.g. {example}, got {values!r}.")
                if axis not in AXES and "." not in axis and difflib.get_close_matches(axis, AXES, n=1, cutoff=0.75):
                    near = difflib.get_close_matches(axis, AXES, n=1, cutoff=0.75)[0]
                    raise ConfigError(f"Unknown grid axis {axis!r}; did you mean {near!r}? Axes: {', '.join(AXES)}.")
        parsed = [{str(k): list(v) for k, v in block.items()} for block in blocks]
        metric, group_by, paper_table = _report_settings(d)
        report = d.get("report") or "variants"
        if report not in REPORT_KINDS:
            raise ConfigError(f"report must be one of {', '.join(REPORT_KINDS)}, got {report!r}.")
        sweep_name = str(d.get("name") or name)
        if "/" in sweep_name or "\\" in sweep_name or sweep_name in (".", ".."):
            raise ConfigError(
                f"name {sweep_name!r} names the study's folder under studies/, so it cannot hold '/' or be '..'; "
                "write a plain name such as lm-variants-tiny (study_dir: places the folder anywhere)."
            )
        return cls(
            report=report,
            base=base,
            grid=parsed if isinstance(grid, list) else parsed[0],
            overrides=_parse_overrides(d.get("overrides")),
            name=sweep_name,
            study_dir=None if d.get("study_dir") is None else str(d["study_dir"]),
            description=d.get("description"),
            metric=metric,
            group_by=group_by,
            paper_table=paper_table,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _report_settings(d: dict[str, Any]) -> tuple[str | None, list[str] | None, str | None]:
    """``metric``, ``group_by`` and ``paper_table`` of a sweep mapping, checked."""
    metric = d.get("metric")
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
    group_by = d.get("group_by")
    if isinstance(group_by, str):
        group_by = [group_by]
    if group_by is not None and (not isinstance(group_by, list) or not all(isinstance(k, str) for k in group_by)):
        raise ConfigError(
            f"group_by must be a dotted config key or a list of them, e.g. [task.kind]; got {group_by!r}."
        )
    table = d.get("paper_table")
    if table is not None and table not in PAPER_TABLES:
        raise ConfigError(f"Unknown paper_table {table!r}; use one of {', '.join(PAPER_TABLES)} or leave it out.")
    return metric, group_by, table


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read a sweep YAML (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No sweep file at {str(path)!r}; pass a YAML such as configs/studies/lm-variants-tiny.yaml.")
    d = _read_yaml(path, "sweep")
    return SweepSpec.from_dict(d, root=path.parent, name=path.stem)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot parse {what} file {str(path)!r}: {e}".replace("\n", " ")) from None
    except OSError as e:
        raise ConfigError(f"Cannot read {what} file {str(path)!r}: {e.strerror or e}.") from None


def _load_base(base: Any, root: Path | None) -> dict[str, Any]:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if not isinstance(base, str | os.PathLike):
        raise ConfigError(f"'base' must be a train config mapping or a YAML path, got {base!r}.")
    tried = [root / base] if root is not None else []
    tried.append(Path(base))
    for candidate in tried:
        if candidate.is_file():
            loaded = _read_yaml(candidate, "base config")
            if loaded is None:  # an empty file is a mistake, never "all defaults"
                raise ConfigError(
                    f"Base config {str(candidate)!r} is empty; give the train config the runs start from."
                )
            if not isinstance(loaded, dict):
                raise ConfigError(f"Base config {str(candidate)!r} must be a YAML mapping.")
            return loaded
    looked = " and ".join(repr(str(p)) for p in tried)
    raise ConfigError(f"Base config {str(base)!r} not found (looked at {looked}); fix the 'base' path of the sweep.")


def _parse_overrides(overrides: Any) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return {str(k): v for k, v in overrides.items()}
    if isinstance(overrides, list):
        return dict(parse_override(item) for item in overrides)
    raise ConfigError(f"'overrides' must be a mapping or a list of KEY=VALUE strings, got {overrides!r}.")


def read_study_file(study_dir: str | os.PathLike, *, strict: bool = False) -> dict[str, Any]:
    """The ``sweep.yaml`` a sweep left in a study folder, as a plain mapping: {} when the folder
    has none or it cannot be read (a report then takes its defaults). ``strict``: a file that is
    there but cannot be read raises :class:`ConfigError` instead (its settings would be lost)."""
    path = Path(study_dir) / SWEEP_FILE
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        if strict:
            raise ConfigError(f"Cannot read {str(path)!r}: {str(e).splitlines()[0]}") from None
        stored = None
    return stored if isinstance(stored, dict) else {}


def study_name(study_dir: str | os.PathLike) -> str:
    """The study's ``name`` in its ``sweep.yaml``, else the folder's name."""
    return str(read_study_file(study_dir).get("name") or Path(study_dir).resolve().name)


def parse_tokens(value: Any) -> int:
    """A token budget: an integer, a float such as ``1e6``, or text such as ``"1e6"``, ``"400k"``, ``"4M"``."""
    scale = 1
    text = value
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        suffix = text[-1:].lower()
        if suffix in ("k", "m", "b"):
            scale, text = {"k": 10**3, "m": 10**6, "b": 10**9}[suffix], text[:-1]
    try:  # in decimal: float("4.1") * 10**6 is 4099999.9999999995, not the whole number it means
        number = decimal.Decimal(str(text)) * scale
    except (TypeError, ValueError, decimal.InvalidOperation):
        number = decimal.Decimal("NaN")
    if (
        isinstance(value, bool)
        or not math.isfinite(float(number))  # 1e400 too: no budget is past float's range
        or number < 1
        or number != number.to_integral_value()
    ):
        raise ConfigError(f"Token budget {value!r} is not a positive whole number; write e.g. 1000000, 1e6 or 1M.")
    return int(number)


def format_tokens(n: int) -> str:
    """Short form of a token count for ids and labels: 1000000 -> ``1e6``, 2500000 -> ``2.5e6``."""
    if n < 1000:
        return str(n)
    exponent = math.floor(math.log10(n))
    mantissa = n / 10**exponent
    if abs(mantissa * 100 - round(mantissa * 100)) < 1e-9:
        return f"{mantissa:g}e{exponent}"
    return str(n)
