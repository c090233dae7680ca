"""What the tasks share: checks of a ``task`` section and the Task-protocol plumbing of example tasks.

* :func:`as_int`, :func:`task_epochs`: read and check ``task`` settings, with the same messages
  in every task;
* :func:`model_fields`, :func:`build_config`: a task's ``model`` section as a model config;
* :class:`ExampleTask`: the budget, model and batch methods of a task that trains on a fixed set
  of examples with one label each (the vision and anomaly tasks).

Like the task modules, it takes the train config as an argument and imports no task or trainer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from qkvlab.errors import ConfigError, check_keys
from qkvlab.train.batches import ExampleBatches, epoch_budget

#: Preset fields that describe a language model, not an image or set model.
LM_ONLY_FIELDS = ("vocab_size", "max_seq_len", "tie_embeddings")


# ================================================================== the task section
def as_int(key: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """``task.<key>`` as an integer ``>= minimum`` (a whole float is one; ``optional``: None too)."""
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"task.{key} must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}.")
    return value


def task_epochs(value: Any, config, dataset: str | None = None) -> float | None:
    """``task.epochs``: a positive number of passes over the training set, or None (no epoch budget).

    With ``dataset`` it may also be a mapping from dataset name to one. Setting it as well as
    ``config.max_tokens`` is an error: both would set the step budget.
    """
    if value is None:
        return None
    if dataset is not None and isinstance(value, dict):
        if dataset not in value:
            raise ConfigError(
                f"task.epochs is a per-dataset mapping ({', '.join(map(str, value))}) without an entry for "
                f"dataset {dataset!r}; add '{dataset}: <epochs>' to it."
            )
        value = value[dataset]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"task.epochs must be a positive number of passes over the training set, got {value!r}.")
    epochs = float(value)
    if config.max_tokens is not None:
        raise ConfigError(
            f"Both task.epochs={epochs:g} and max_tokens={config.max_tokens} set the step budget; "
            "remove one of them (max_tokens=null, or drop task.epochs)."
        )
    return epochs


# ================================================================== the model section
def model_fields(config, family: type) -> dict[str, Any]:
    """``config.model`` as keyword arguments of ``family``, on top of its preset's shape."""
    from qkvlab.models.presets import with_preset

    valid = ("preset", *(f.name for f in dataclasses.fields(family)))
    check_keys("model", config.model, valid)
    return with_preset(config.model, skip=LM_ONLY_FIELDS, fields=valid)


def build_config(family: type, fields: dict[str, Any], task: str):
    """``family(**fields)``; a wrongly typed field is a :class:`ConfigError` naming ``task``."""
    try:
        return family(**fields)
    except TypeError as e:  # a wrongly typed field
        raise ConfigError(f"Bad model section for the {task} task: {e}.") from None


# ================================================================== the Task protocol
class ExampleTask:
    """The Task-protocol methods of a task that trains on fixed examples with one label each.

    A subclass sets ``self.settings`` (with an ``epochs`` field) and ``self.model_cfg``, and
    defines :meth:`train_examples`; the trainer's "tokens" are examples (images, sets).
    """

    def train_examples(self) -> tuple[Any, Any]:
        """The training inputs and their labels, one label per example."""
        raise NotImplementedError

    # ------------------------------------------------------------- budget
    def total_steps(self, config) -> int:
        return epoch_budget(
            config,
            epochs=self.settings.epochs,
            n_examples=len(self.train_examples()[1]),
            count_per_step=self.count_per_step(config),
        )

    def count_per_step(self, config) -> int:
        """Examples per optimizer step (the trainer's "tokens")."""
        return config.batch_size * config.grad_accum

    # ------------------------------------------------------------- the Task protocol
    def build_model(self) -> nn.Module:
        from qkvlab.models import build_model

        return build_model(self.model_cfg)

    def batches(self, batch_size: int, *, seed: int, ctx):
        x, y = self.train_examples()
        return ExampleBatches(x, y, batch_size, seed=seed, rank=ctx.rank, world_size=ctx.world_size)

    def count(self, batch) -> int:
        return len(batch[1])


__all__ = ["LM_ONLY_FIELDS", "ExampleTask", "as_int", "build_config", "model_fields", "task_epochs"]
