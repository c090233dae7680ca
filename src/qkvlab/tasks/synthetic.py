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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qkvlab.data import synthetic as synth
from qkvlab.errors import ConfigError, check_keys
from qkvlab.models.config import EncoderConfig
from qkvlab.tasks.common import as_int, build_config, task_epochs
from qkvlab.train.batches import IGNORE_INDEX, ExampleBatches, epoch_budget, lm_loss
from qkvlab.train.evaluation import evaluate_sums, strided_batches

TASK_KEYS = ("name", "kind", "seq_len", "n_train", "n_test", "seed", "epochs")


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
        seq_len = as_int("seq_len", task.get("seq_len", config.seq_len), 1)
        synth.check_task(kind, seq_len)
        epochs = task_epochs(task.get("epochs"), config)
        return cls(
            kind=kind,
            seq_len=seq_len,
            n_train=as_int("n_train", task.get("n_train", cls.n_train), 1),
            n_test=as_int("n_test", task.get("n_test", cls.n_test), 1),
            seed=as_int("seed", task.get("seed", cls.seed), 0),
            epochs=epochs,
        )

    @property
    def scored_per_example(self) -> int:
        return synth.scored_positions(self.kind, self.seq_len)


# ================================================================== the task
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
        return build_config(EncoderConfig, fields, "synthetic")

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
        return lm_loss(model(x), y)

    def count(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def evaluate(self, model: nn.Module, *, batch_size: int, max_batches: int, ctx) -> dict[str, float]:
        """Loss and accuracy over the whole test set (``max_batches`` is not used: ``n_test`` sizes it).

        Each process scores every ``world_size``-th example; the sums are added over processes.
        """

        def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[Any, ...]:
            scored = y != IGNORE_INDEX
            right = (logits.argmax(-1) == y) & scored
            seq_right = (right.sum(1) == scored.sum(1)).sum()
            return lm_loss(logits, y, reduction="sum").double(), right.sum(), scored.sum(), seq_right, len(y)

        batches = strided_batches(self.data.test_x, self.data.test_y, batch_size=batch_size, ctx=ctx)
        # summed loss, correct positions, scored positions, fully correct examples, examples
        total = evaluate_sums(model, batches, score, n_sums=5, ctx=ctx)
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
