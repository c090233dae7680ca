"""Training: configs, packed LM batches, the loop (one process, DDP or FSDP2), checkpoints.

Example::

    from qkvlab.train import load_config, train
    summary = train(load_config("configs/lm/tiny-stdlib.yaml", ["optim.lr=1e-3"]))

The loop (:mod:`qkvlab.train.trainer`) and the language-model task (:mod:`qkvlab.tasks.lm`)
are imported on first use of their names: the tasks build on the modules below the loop
(batches, config, run context), and the loop on the tasks, so importing the loop here would
bring ``import qkvlab.tasks.lm`` back to itself half-initialised.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qkvlab.train.batches import IGNORE_INDEX, PackedBatches, eval_windows, lm_loss, mask_padding
from qkvlab.train.config import (
    DataConfig,
    LogConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from qkvlab.train.context import RunContext
from qkvlab.train.state import latest_checkpoint, load_state, load_weights

if TYPE_CHECKING:
    from qkvlab.tasks.lm import LMSplits, LMTask, load_splits
    from qkvlab.train.trainer import RunStopped, Task, Trainer, lr_at, request_stop, train

#: Names imported on first use, and their modules.
_LAZY = {
    "LMSplits": "qkvlab.tasks.lm",
    "LMTask": "qkvlab.tasks.lm",
    "load_splits": "qkvlab.tasks.lm",
    "RunStopped": "qkvlab.train.trainer",
    "Task": "qkvlab.train.trainer",
    "Trainer": "qkvlab.train.trainer",
    "lr_at": "qkvlab.train.trainer",
    "request_stop": "qkvlab.train.trainer",
    "train": "qkvlab.train.trainer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "LMSplits",
    "LMTask",
    "LogConfig",
    "OptimConfig",
    "PackedBatches",
    "RunContext",
    "RunStopped",
    "ScheduleConfig",
    "Task",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "eval_windows",
    "latest_checkpoint",
    "lm_loss",
    "load_config",
    "load_splits",
    "load_state",
    "load_weights",
    "lr_at",
    "mask_padding",
    "request_stop",
    "train",
]
