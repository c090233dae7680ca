"""What a run trains: the task registry.

A train config's ``task`` section names the task and carries its settings::

    task: {name: lm}                                          # the default: next-token prediction
    task: {name: synthetic, kind: reverse, seq_len: 16, n_train: 10000, n_test: 2000, epochs: 2}

:func:`build_task` maps ``task.name`` to its class, imported only when asked for, and calls
the class's ``from_config(config, ctx)``. Every class implements
:class:`qkvlab.train.trainer.Task`; it may also offer these classmethods, which the config
and the sweep use when present:

* ``check_config(config)``: validate the task and model sections before anything is built;
* ``model_config(config)``: the model config the task would build, without reading data
  (sweeps use it to skip grid points a variant cannot run and to count parameters).

The train config validates its ``task`` section through this registry, so the registry
imports no task class, config or trainer when it is imported, and the task modules take the
config as an argument without importing it: the config sits above the tasks, the trainer
above both.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qkvlab.errors import ConfigError

if TYPE_CHECKING:
    from qkvlab.train.config import TrainConfig
    from qkvlab.train.context import RunContext

#: Task name -> ``module:class``; each is imported on first use.
TASKS: dict[str, str] = {
    "lm": "qkvlab.tasks.lm:LMTask",
    "synthetic": "qkvlab.tasks.synthetic:SyntheticTask",
    "vision": "qkvlab.tasks.vision:VisionTask",
    "anomaly": "qkvlab.tasks.anomaly:AnomalyTask",
}
DEFAULT_TASK = "lm"


def task_name(task: dict[str, Any] | None) -> str:
    """The ``name`` of a task section (``"lm"`` when it is missing)."""
    name = (task or {}).get("name", DEFAULT_TASK)
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"Unknown task.name {name!r}; use one of {', '.join(TASKS)}.")
    return name


def task_class(name: str) -> type:
    """The class registered as ``name``; a clear error when it is unknown or cannot be imported."""
    if name not in TASKS:
        raise ConfigError(f"Unknown task.name {name!r}; use one of {', '.join(TASKS)}.")
    module, _, attr = TASKS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"Task {name!r} needs {TASKS[name]}, which cannot be imported here ({e}); "
            f"install what it needs or use another task ({', '.join(TASKS)})."
        ) from None


def build_task(config: TrainConfig, ctx: RunContext):
    """The task that ``config.task`` names, ready to train."""
    return task_class(task_name(config.task)).from_config(config, ctx)


def check_config(config: TrainConfig) -> None:
    """Run the task class's own ``check_config`` when it has one."""
    cls = task_class(task_name(config.task))
    check = getattr(cls, "check_config", None)
    if check is not None:
        check(config)


def model_config(config: TrainConfig):
    """The model config the task of ``config`` builds (None when the task cannot say without data)."""
    cls = task_class(task_name(config.task))
    fn = getattr(cls, "model_config", None)
    return None if fn is None else fn(config)


__all__ = ["DEFAULT_TASK", "TASKS", "build_task", "check_config", "model_config", "task_class", "task_name"]
