"""The synthetic sequence tasks (PAPER.md 2.1) as a trainer :class:`~qkvlab.train.trainer.Task`.

A non-causal :class:`~qkvlab.models.SequenceEncoder` labels every position of a digit list;
the loss is cross-entropy over the scored positions and evaluation is over the whole fixed
test set: ``val_loss``, ``val_acc`` (token accuracy over scored positions), ``val_seq_acc``
(share of examples with every scored position right) and ``val_tokens`` (positions scored).

The task section of a train config::

    task:
      name: synthetic
      kind: reverse        # reverse, sort, sub, swap, copy; probes shift, successor, recall
      seq_len: 16          # list length = encoder input length (default: the top-level seq_len)
      n_train: 10000       # fixed training set
      n_test: 2000         # fixed test set, inputs disjoint from the training set
      seed: 0              # data seed, kept apart from the training seed (same data for every seed)
      epochs: 2            # optional budget: passes over the training set

The step budget is, in order of precedence: ``task.epochs`` (``ceil(epochs * n_train /
(batch_size * grad_accum))`` steps); else ``max_tokens``, counted in scored positions (the
trainer's ``tokens`` are scored positions for this task); else ``max_steps``. Setting both
``task.epochs`` and ``max_tokens`` is an error; with ``task.epochs`` set, ``max_steps`` is not
used (the config warns when it is set).

The ``model`` section holds :class:`~qkvlab.models.EncoderConfig` fields plus an optional
``preset`` for the shape (its vocabulary and length are not used): the vocabulary is the
shared synthetic one, the labels are the ten digits, ``max_seq_len`` defaults to the task's
``seq_len``. Variants may use the 2D positional fix, e.g. ``(Q=K-V)+`` or ``qk_v+2d``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.data import synthetic as synth
from qkvlab.errors import ConfigError, check_keys
from qkvlab.models.config import EncoderConfig
from qkvlab.train.batches import EpochStream

TASK_KEYS = ("name", "kind", "seq_len", "n_train", "n_test", "seed", "epochs")


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"task.{key} must be an integer >= {minimum}, got {value!r}.")
    return value


@dataclass(frozen=True)
class SyntheticSettings:
    """The validated ``task`` section of a synthetic run."""

    kind: str
    seq_len: int
    n_train: int = 10_000
    n_test: int = 2_000
    seed: int = 0
    epochs: float | None = None

    @classmethod
    def from_train_config(cls, config) -> SyntheticSettings:
        task = dict(config.task)
        check_keys("task", task, TASK_KEYS)
        if "kind" not in task:
            raise ConfigError(f"The synthetic task needs task.kind, one of {', '.join(synth.TASKS)}.")
        kind = task["kind"]
        if kind not in synth.TASKS:
            raise ConfigError(
                f"Unknown synthetic task {kind!r}; use one of {', '.join(synth.TASKS)} (set task.kind to one of them)."
            )
        seq_len = _int("seq_len", task.get("seq_len", config.seq_len), 1)
        synth.check_task(kind, seq_len)
        epochs = task.get("epochs")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int | float) or not math.isfinite(epochs) or epochs <= 0
        ):
            raise ConfigError(f"task.epochs must be a positive number of passes over the training set, got {epochs!r}.")
        if epochs is not None and config.max_tokens is not None:
            raise ConfigError(
                f"Both task.epochs={epochs} and max_tokens={config.max_tokens} set the step budget; "
                "remove one of them (max_tokens=null, or drop task.epochs)."
            )
        return cls(
            kind=kind,
            seq_len=seq_len,
            n_train=_int("n_train", task.get("n_train", cls.n_train), 1),
            n_test=_int("n_test", task.get("n_test", cls.n_test), 1),
            seed=_int("seed", task.get("seed", cls.seed), 0),
            epochs=None if epochs is None else float(epochs),
        )

    @property
    def scored_per_example(self) -> int:
        return synth.scored_positions(self.kind, self.seq_len)


# ================================================================== batches
class ExampleBatches:
    """Deterministic, resumable, rank-sharded batches from a fixed set of examples.

    The examples are visited in a fresh random order each epoch (a permutation drawn from
    ``(seed, epoch)``); global batch ``k`` is stream positions ``k*G .. k*G + G - 1`` (a batch
    may straddle two epochs) and rank ``r`` takes the ``r``-th slice of ``G / W``. The state
    to resume is the number of global batches consumed.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        self.x, self.y = x, y
        self.n = len(x)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.global_batch = batch_size * world_size
        self.batch = 0
        self._stream = EpochStream(self.n, seed)

    @property
    def epoch(self) -> float:
        """Passes over the training set so far (fractional)."""
        return self.batch * self.global_batch / self.n

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._stream.items(self.batch * self.global_batch + self.rank * self.batch_size, self.batch_size)
        self.batch += 1
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])

    def state_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "seed": self.seed, "global_batch": self.global_batch, "n_examples": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "global_batch", "n_examples") if k in state and state[k] != mine[k]]
        if changed:
            detail = ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
            raise ConfigError(
                f"The saved batch stream does not match this run ({detail}); resume with the settings it was "
                "saved with (same seed, global batch size and training set)."
            )
        self.batch = int(state["batch"])


# ================================================================== the task
def epoch_budget(config, *, epochs: float | None, n_examples: int, count_per_step: int) -> int:
    """Optimizer steps of an example-based task: ``epochs`` passes over ``n_examples`` when set,
    else ``max_tokens`` counted in the task's units (``count_per_step`` a step), else ``max_steps``."""
    if epochs is not None:
        return max(1, math.ceil(epochs * n_examples / (config.batch_size * config.grad_accum)))
    if config.max_tokens is not None:
        return max(1, math.ceil(config.max_tokens / count_per_step))
    return config.max_steps


def example_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the scored positions (targets != -100), in fp32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        y.reshape(-1),
        ignore_index=synth.IGNORE_INDEX,
        reduction=reduction,
    )


class SyntheticTask:
    """One synthetic task on a fixed train/test split (see the module docstring)."""

    metric_keys = ("val_loss", "val_acc", "val_seq_acc")

    def __init__(self, config, data: synth.SyntheticData | None = None):
        self.config = config
        self.settings = SyntheticSettings.from_train_config(config)
        self.model_cfg = self.model_config(config)
        s = self.settings
        self.data = data or synth.make_dataset(s.kind, s.seq_len, s.n_train, s.n_test, s.seed)

    # ------------------------------------------------------------- config
    @classmethod
    def check_config(cls, config) -> None:
        SyntheticSettings.from_train_config(config)
        cls.model_config(config)

    @classmethod
    def model_config(cls, config) -> EncoderConfig:
        """The encoder this task trains: ``config.model`` on the shared synthetic vocabulary."""
        from qkvlab.models.presets import with_preset

        settings = SyntheticSettings.from_train_config(config)
        valid = ("preset", *(f.name for f in dataclasses.fields(EncoderConfig)))
        check_keys("model", config.model, valid)
        # The preset gives the shape; the vocabulary and length are the task's.
        fields = with_preset(config.model, skip=("vocab_size", "max_seq_len"))
        vocab = fields.setdefault("vocab_size", synth.VOCAB_SIZE)
        if not isinstance(vocab, int) or vocab < synth.VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size={vocab!r} cannot hold the synthetic vocabulary of {synth.VOCAB_SIZE} ids "
                "(10 digits, SEP, PAD); remove model.vocab_size."
            )
        labels = fields.setdefault("n_labels", synth.N_LABELS)
        if not isinstance(labels, int) or labels < synth.N_LABELS:
            raise ConfigError(f"model.n_labels={labels!r} is fewer than the 10 digit labels; remove model.n_labels.")
        fields.setdefault("max_seq_len", settings.seq_len)
        if not isinstance(fields["max_seq_len"], int) or fields["max_seq_len"] < settings.seq_len:
            raise ConfigError(
                f"model.max_seq_len={fields['max_seq_len']!r} is shorter than the task's seq_len={settings.seq_len}; "
                "raise model.max_seq_len or remove it."
            )
        try:
            return EncoderConfig(**fields)
        except TypeError as e:  # a wrongly typed field
            raise ConfigError(f"Bad model section for the synthetic task: {e}.") from None

    @classmethod
    def from_config(cls, config, ctx) -> SyntheticTask:
        return cls(config)  # every process generates the same data from the seed

    # ------------------------------------------------------------- budget
    def total_steps(self, config) -> int:
        settings = SyntheticSettings.from_train_config(config)
        return epoch_budget(
            config, epochs=settings.epochs, n_examples=settings.n_train, count_per_step=self.count_per_step(config)
        )

    def count_per_step(self, config) -> int:
        """Scored positions per optimizer step (the trainer's "tokens")."""
        return config.batch_size * config.grad_accum * SyntheticSettings.from_train_config(config).scored_per_example

    # ------------------------------------------------------------- the Task protocol
    def build_model(self) -> nn.Module:
        from qkvlab.models import build_model

        return build_model(self.model_cfg)

    def batches(self, batch_size: int, *, seed: int, ctx) -> ExampleBatches:
        return ExampleBatches(
            self.data.train_x, self.data.train_y, batch_size, seed=seed, rank=ctx.rank, world_size=ctx.world_size
        )

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return example_loss(model(x), y)

    def count(self, batch) -> int:
        return int((batch[1] != synth.IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batch_size: int, max_batches: int, ctx) -> dict[str, float]:
        """Loss and accuracy over the whole test set (``max_batches`` is not used: ``n_test`` sizes it).

        Each process scores every ``world_size``-th example; the sums are added over processes.
        """
        model.eval()
        x_all = torch.from_numpy(self.data.test_x[ctx.rank :: ctx.world_size])
        y_all = torch.from_numpy(self.data.test_y[ctx.rank :: ctx.world_size])
        # summed loss, correct positions, scored positions, fully correct examples, examples
        total = torch.zeros(5, dtype=torch.float64, device=ctx.device)
        step = max(1, batch_size // ctx.world_size)
        for i in range(0, len(x_all), step):
            x, y = x_all[i : i + step].to(ctx.device), y_all[i : i + step].to(ctx.device)
            with ctx.autocast():
                logits = model(x)
            scored = y != synth.IGNORE_INDEX
            right = (logits.argmax(-1) == y) & scored
            total[0] += example_loss(logits, y, reduction="sum").double()
            total[1] += right.sum()
            total[2] += scored.sum()
            total[3] += (right.sum(1) == scored.sum(1)).sum()
            total[4] += len(x)
        total = ctx.sum(total)
        return {
            "val_loss": (total[0] / total[2]).item(),
            "val_acc": (total[1] / total[2]).item(),
            "val_seq_acc": (total[3] / total[4]).item(),
            "val_tokens": int(total[2].item()),
        }

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "task": {
                "name": "synthetic",
                "kind": s.kind,
                "description": synth.DESCRIPTIONS[s.kind],
                "seq_len": s.seq_len,
                "n_train": s.n_train,
                "n_test": len(self.data.test_x),
                "seed": s.seed,
                "epochs": s.epochs,
                "scored_per_example": s.scored_per_example,
                "vocab_size": synth.VOCAB_SIZE,
            },
            "model": self.model_cfg.to_dict(),
            "model_family": self.model_cfg.family,
            "vocab_size": synth.VOCAB_SIZE,
        }
