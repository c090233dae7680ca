"""The evaluation loop every task shares: batches in, summed scores out, added over processes.

A task's ``evaluate`` chooses its batches (:func:`strided_batches` over a fixed held-out set,
or :func:`~qkvlab.train.batches.eval_windows` over a corpus) and a ``score(logits, y)`` that
returns the batch's sums (summed loss, correct, scored, ...). :func:`evaluate_sums` runs the
model in eval mode, without gradients, under the run's autocast, and returns the float64
totals of all processes; the task divides them into its metrics. :func:`evaluate_classifier`
is that for one label per example (the vision and anomaly tasks).

Every process runs the same number of forward passes, as FSDP needs (each forward gathers the
sharded parameters from all processes): :func:`strided_batches` ends a process's share with
:class:`PaddingBatch` es up to process 0's count, and :func:`evaluate_sums` runs the model on
those but leaves them out of the sums.

Example::

    total = evaluate_sums(model, strided_batches(x, y, batch_size=64, ctx=ctx), score, n_sums=2, ctx=ctx)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.train.context import RunContext

Score = Callable[[torch.Tensor, torch.Tensor], Sequence[Any]]


class PaddingBatch(tuple):
    """An ``(x, y)`` batch that is run but not scored: it only makes a process that has run out
    of examples run as many forward passes as the others (see :func:`strided_batches`)."""

    __slots__ = ()


def strided_batches(
    inputs: np.ndarray, labels: np.ndarray, *, batch_size: int, ctx: RunContext
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of a fixed held-out set: every ``world_size``-th example from
    ``rank``, in batches of ``batch_size // world_size`` (``batch_size`` is global).

    Process 0 has the most examples; a process with one batch fewer (when the examples do not
    fill the same number of batches everywhere) ends with a :class:`PaddingBatch` (the set's
    first examples), so every process yields the same number of batches. :func:`evaluate_sums`
    runs the model on it and does not score it; a consumer of its own must skip it too.
    """
    x_all = torch.from_numpy(inputs[ctx.rank :: ctx.world_size])
    y_all = torch.from_numpy(labels[ctx.rank :: ctx.world_size])
    step = max(1, batch_size // ctx.world_size)
    for i in range(0, len(x_all), step):
        yield x_all[i : i + step], y_all[i : i + step]
    most = math.ceil(math.ceil(len(inputs) / ctx.world_size) / step)  # process 0's batches
    for _ in range(most - math.ceil(len(x_all) / step)):
        yield PaddingBatch((torch.from_numpy(inputs[:step]), torch.from_numpy(labels[:step])))


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    score: Score,
    *,
    n_sums: int,
    ctx: RunContext,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``n_sums`` values of ``score(logits, y)`` summed over ``batches`` and processes (float64).

    Each ``(x, y)`` batch is moved to ``ctx.device`` and ``forward(x)`` (default: ``model``) runs
    under ``ctx.autocast()``; a :class:`PaddingBatch` is run the same way but not scored. Under
    FSDP every process must get the same number of batches (:func:`strided_batches` and
    :func:`~qkvlab.train.batches.eval_windows` see to it). The model is left in eval mode: the
    trainer sets train mode at every step, and a caller evaluating a trained model wants eval
    mode anyway.
    """
    model.eval()
    forward = model if forward is None else forward
    total = torch.zeros(n_sums, dtype=torch.float64, device=ctx.device)
    for batch in batches:
        x, y = batch
        with ctx.autocast():
            logits = forward(x.to(ctx.device))
        if isinstance(batch, PaddingBatch):
            continue  # run only so that this process's forward passes match the others'
        y = y.to(ctx.device)
        for i, value in enumerate(score(logits, y)):
            total[i] += value
    return ctx.sum(total)


def evaluate_classifier(
    model: nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    ctx: RunContext,
    count_key: str,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of one label per example over a fixed held-out set.

    ``forward(x)`` (default: ``model``) maps a batch of ``inputs`` to logits ``(B, C)``; each
    process scores its :func:`strided_batches`. Returns ``val_loss``, ``val_acc`` and the
    example count as ``count_key``.
    """

    def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[Any, ...]:
        logits = logits.float()
        return F.cross_entropy(logits, y, reduction="sum").double(), (logits.argmax(-1) == y).sum(), len(y)

    batches = strided_batches(inputs, labels, batch_size=batch_size, ctx=ctx)
    total = evaluate_sums(model, batches, score, n_sums=3, ctx=ctx, forward=forward)
    return {
        "val_loss": (total[0] / total[2]).item(),
        "val_acc": (total[1] / total[2]).item(),
        count_key: int(total[2].item()),
    }
