"""Training: configs, packed LM batches, the loop (one process, DDP or FSDP2), checkpoints.

Example::

    from qkvlab.train import load_config, train
    summary = train(load_config("configs/lm/tiny-stdlib.yaml", ["optim.lr=1e-3"]))
"""

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
from qkvlab.train.state import latest_checkpoint, load_state, load_weights
from qkvlab.train.trainer import LMSplits, LMTask, RunContext, Task, Trainer, load_splits, lr_at, train

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "LMSplits",
    "LMTask",
    "LogConfig",
    "OptimConfig",
    "PackedBatches",
    "RunContext",
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
    "train",
]
